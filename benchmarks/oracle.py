"""The reference oracle: the job's semantics in one process, in memory, over a plain event list.

    python -m benchmarks.oracle --input events.ndjson [--config c.yaml] [--profiles-out p.json]

Deliberately simple: no Beam, no keys, no state, no timers, no watermark. It reads every input,
then answers each question of the job with a loop over *all* the events at once:

1. validate each line (the same pure ``judge`` as the pipeline: validation is per event and
   stateless, so there is nothing about ordering or keying to get wrong there);
2. dedup with one dict: the copy the collector received first wins (``arrival_order``, as in a
   bounded pipeline run);
3. consent per primary identifier: the whole timeline is known, so each event is judged by the
   observations at or before its own time; a deleted identifier loses every event;
4. stitching: one global union-find over every link, sorted by (event time, messageId), with the
   guardrails (:func:`transforms.identity_graph.resolve` called once on the whole graph: here one
   "key" may hold everything);
5. computed traits: every window's aggregate from the sorted event times (sessions merged by a
   sweep), the latest window kept;
6. profiles: each identifier's events folded into a fragment, fragments merged per person.

It is the correctness reference for the differential tests (``tests/test_oracle.py``: the
pipeline's profile rows must equal these for any order, duplication and bundling) and the speed
floor of ``benchmarks/run_benchmark.py``. Rows are compared without ``version``, which counts
panes and so depends on how the runner bundled the work (see the README).
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from pipelines.config import PipelineConfig, parse_instant
from pipelines.governed_profiles import (
    PROFILES_DESTINATION,
    destination_rules,
    identifier_redactor,
    pii_policies,
    pii_rules,
    pii_salt,
    source_inputs,
)
from transforms.computed_traits import (
    ComputedTraitSpec,
    agg_add,
    agg_init,
    agg_value,
    assign_windows,
    extract_value,
)
from transforms.consent import consent_at, consent_observation, judge_destinations
from transforms.dedup import arrival_order, fingerprint
from transforms.dedup import dedup_key as make_dedup_key
from transforms.identity import extract_identifiers, identifiers_of, primary_profile_key
from transforms.identity_graph import StitchRules, earlier, event_links, id_key, resolve
from transforms.pii import Redaction
from transforms.profile import (
    TraitRules,
    empty_profile,
    fold_computed,
    fold_consent,
    fold_event,
)
from transforms.stitching import DELETE_TYPE, UNLINK_TYPE, unlink_target
from transforms.tracking_plan import compile_plan, load_plan
from transforms.unify import unify_profile
from transforms.validate import judge


def read_raw(config: PipelineConfig, inputs: dict[str, list[str]]) -> list[tuple[str, str, Any]]:
    """``(source, origin, payload)`` for every record of every input, in file order."""
    import fastavro

    out = []
    for src in config.sources:
        for pattern in inputs[src.name]:
            for path in sorted(glob.glob(pattern)) or [pattern]:
                if src.format == "avro":
                    with open(path, "rb") as f:
                        out.extend((src.name, path, rec) for rec in fastavro.reader(f))
                    continue
                with open(path, "rb") as f:  # bytes, as the job reads lines
                    for line in f:
                        line = line[:-1] if line.endswith(b"\n") else line
                        line = line[:-1] if line.endswith(b"\r") else line
                        if line.strip():
                            out.append((src.name, path, line))
    return out


def _validate(config: PipelineConfig, raw):
    plans = {
        n: compile_plan(load_plan(config.resolve(r.path))) for n, r in config.tracking_plans.items()
    }
    plan_of = {s.name: plans.get(s.tracking_plan) for s in config.sources}
    modes = {s.name: dict(s.violations) for s in config.sources}
    settings = dict(
        max_event_bytes=config.validation.max_event_bytes,
        max_depth=config.validation.max_depth,
        max_future_skew_ms=int(config.event_time.max_future_skew * 1000),
        floor_ms=int(parse_instant(config.event_time.min_event_time) * 1000),
        identity=config.identity,
        clamp_event_time=config.event_time.on_invalid == "clamp",
    )
    valid, quarantined = [], []
    now_ms = int(
        time.time() * 1000
    )  # the read time, as the job's (bounds events without receivedAt)
    for r in raw:
        env, record = judge(r, plan_of[r[0]], rule_modes=modes[r[0]], now_ms=now_ms, **settings)
        if env is None:
            quarantined.append(record)
        else:
            valid.append(env)
    return valid, quarantined


def _deduplicate(config: PipelineConfig, valid):
    copies: dict[str, list] = {}
    for env in valid:
        copies.setdefault(make_dedup_key(env.source, env.event, config.dedup.key), []).append(env)
    unique, duplicates, collisions = [], 0, 0
    for group in copies.values():
        if len(group) == 1:  # most keys: nothing to order or compare
            unique.append(group[0])
            continue
        first, *rest = sorted(group, key=arrival_order)  # the first one the collector received
        unique.append(first)
        fp = fingerprint(first.event)
        for env in rest:
            if fingerprint(env.event) == fp:
                duplicates += 1
            else:
                collisions += 1
    return unique, duplicates, collisions


def _stitch(config: PipelineConfig, unique):
    """One global resolution: identifier -> person, person -> members."""
    identity = config.identity
    rules = StitchRules.from_config(identity)
    best: dict[tuple[str, str], Any] = {}
    nodes: set[str] = set()
    deleted = {id_key(*d.split(":", 1)) for d in config.privacy.deleted_identifiers}
    unlinked = []
    for env in unique:
        ev, t = env.event, env.event_time_ms
        if ev.get("type") == DELETE_TYPE:
            ids = [id_key(a, b) for a, b in extract_identifiers(ev, identity)]
            if ids:
                deleted.add(ids[0])
                nodes.add(ids[0])
            continue
        if ev.get("type") == UNLINK_TYPE:
            ids = [id_key(a, b) for a, b in extract_identifiers(ev, identity)]
            other = unlink_target(ev, identity)
            if ids and other and other != ids[0]:
                unlinked.append((ids[0], other))
                nodes.update((ids[0], other))
            continue
        ids = [id_key(a, b) for a, b in identifiers_of(env, identity)]
        for link in event_links(ev, t, identity, ids):
            best[(link.a, link.b)] = earlier(best.get((link.a, link.b)), link)
            nodes.update((link.a, link.b))
    # A shared identifier: more distinct neighbours than the breaker allows.
    degree: Counter = Counter()
    for a, b in best:
        degree[a] += 1
        degree[b] += 1
    shared = {x for x, n in degree.items() if n > rules.max_cluster_size}
    links = [k for (a, b), k in best.items() if a not in deleted and b not in deleted]
    return resolve(nodes, links, rules, unlinked, shared)


def _session_windows(times: list[int], gap: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for t in sorted(times):
        if out and t <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t + gap)
        else:
            out.append([t, t + gap])
    return [(a, b) for a, b in out]


def _latest_pane(spec: ComputedTraitSpec, feeds: list[tuple[int, Any]]) -> list | None:
    """The pane a profile keeps for one trait: the latest window's complete aggregate."""
    if not feeds:
        return None
    if spec.window == "session":
        windows = _session_windows([t for t, _ in feeds], spec.gap_ms)
        lo, hi = windows[-1]
        members = [(t, v) for t, v in feeds if lo <= t < hi]
    else:
        placed = [(t, v, assign_windows(spec, t)) for t, v in feeds]
        lo, hi = max(w for _, _, windows in placed for w in windows)
        members = [(t, v) for t, v, windows in placed if (lo, hi) in windows]
    acc = agg_init(spec.aggregate)
    for t, v in sorted(members, key=lambda tv: tv[0]):
        acc = agg_add(spec.aggregate, acc, v, t)
    start = None if spec.window == "lifetime" else lo
    return [hi, start, 0, agg_value(spec.aggregate, acc), "accumulating"]


def run_oracle(config: PipelineConfig, inputs: dict[str, list[str]]) -> dict[str, Any]:
    """Counts and profile rows (``profile_id -> row`` without ``version``) for ``inputs``."""
    identity = config.identity
    raw = read_raw(config, inputs)
    valid, quarantined = _validate(config, raw)
    unique, duplicates, collisions = _deduplicate(config, valid)

    # Consent and deletion, per primary identifier, with the whole timeline known.
    listed = frozenset(config.privacy.deleted_identifiers)
    by_key: dict[str, list] = defaultdict(list)
    for env in unique:
        if env.event.get("type") != UNLINK_TYPE:
            by_key[primary_profile_key(env.event, identity, env.identifiers)].append(env)
    rules_ = pii_rules(config)
    policies = pii_policies(config)
    salt = pii_salt(config)
    redaction = Redaction(rules_, {PROFILES_DESTINATION: policies[PROFILES_DESTINATION]}, salt)
    redact = identifier_redactor(config, rules_, *policies[PROFILES_DESTINATION], salt)
    destinations = tuple(destination_rules(config))
    specs = [ComputedTraitSpec.from_config(c) for c in config.computed_traits]
    trait_rules = TraitRules(
        frozenset(config.profile.set_once), frozenset(config.profile.increment)
    )
    fragments: dict[str, dict] = {}
    deliveries: Counter = Counter()
    denied = deleted_events = 0
    for key, envs in by_key.items():
        if any(e.event.get("type") == DELETE_TYPE for e in envs) or (
            listed
            and any(f"{t}:{v}" in listed for e in envs for t, v in identifiers_of(e, identity))
        ):
            deleted_events += len(envs)
            fragments[key] = {**empty_profile(), "deleted": True}
            continue
        timeline = sorted(
            (
                [e.event_time_ms, e.event.get("messageId", ""), prefs]
                for e in envs
                if (prefs := consent_observation(e.event)) is not None
            ),
            key=lambda o: (o[0], o[1]),
        )
        folded = []
        for env in envs:
            allowed, refused = judge_destinations(
                consent_at(timeline, env.event_time_ms), destinations
            )
            denied += len(refused)
            deliveries.update(allowed)
            if PROFILES_DESTINATION in allowed:
                folded.append(
                    (redaction.apply(env.event, (PROFILES_DESTINATION,))[PROFILES_DESTINATION], env)
                )
        acc = empty_profile()
        kept = {id(env) for _, env in folded}
        for env in envs:  # the consent snapshot of each event the store may not keep
            if id(env) not in kept:
                fold_consent(acc, env.event, env.event_time_ms)
        if not folded and not acc["consent"]:
            continue
        for ev, env in folded:
            ids = redact.pairs(identifiers_of(env, identity))
            fold_event(acc, ev, env.event_time_ms, ids, trait_rules)
        for spec in specs:
            feeds = []
            for ev, env in folded:
                ok, value = extract_value(spec, ev)
                if ok:
                    feeds.append((env.event_time_ms, value))
            pane = _latest_pane(spec, feeds)
            if pane is not None:
                fold_computed(acc, spec.name, pane)
        fragments[key] = acc

    res = _stitch(config, unique)
    persons: dict[str, dict[str, dict]] = defaultdict(dict)
    for key, frag in fragments.items():
        persons[res.person_of.get(key, key)][key] = frag
    kinds = {c.name: c.aggregate for c in config.computed_traits}
    profiles = {}
    for person, frags in persons.items():
        row = unify_profile(person, frags, list(res.members.get(person, ())), kinds, redact)
        if row is not None and not row.get("deleted"):
            for not_a_column in ("version", "_members", "_cause"):
                row.pop(not_a_column, None)
            profiles[person] = row
    return {
        "events_in": len(raw),
        "valid": len(unique),
        "quarantined": len(quarantined) + collisions,
        "quarantine_reasons": dict(Counter(r["reason"] for r in quarantined)),
        "duplicates": duplicates,
        "deliveries": dict(deliveries),
        "consent_denied": denied,
        "deleted": deleted_events,
        "links_refused": len(res.refused),
        "profiles": profiles,
    }


def sink_rows(sqlite_path: str | Path) -> dict[str, dict]:
    """The profile sink's rows as the oracle states them (``version`` left out)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM profiles")]
    finally:
        conn.close()
    for row in rows:
        row.pop("version", None)
    return {r["profile_id"]: r for r in rows}


def differences(expected: dict[str, dict], actual: dict[str, dict], limit: int = 5) -> list[str]:
    """Readable differences between two ``profile_id -> row`` maps (empty when equal)."""
    out = []
    for pid in sorted(set(expected) | set(actual)):
        a, b = expected.get(pid), actual.get(pid)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"{pid}: only in {'pipeline' if a is None else 'oracle'}")
        else:
            cols = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(
                f"{pid}: "
                + "; ".join(f"{c}: oracle {a.get(c)!r} != pipeline {b.get(c)!r}" for c in cols)
            )
        if len(out) >= limit:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import _load
    from runners.local import tune_gc

    tune_gc()  # as the in-process runner does: the same footing

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", help="default: the embedded default config")
    ap.add_argument("--input", action="append", required=True, help="replaces the first source")
    ap.add_argument("--profiles-out", help="write the profile rows as JSON to this file")
    args = ap.parse_args(argv)
    config = _load(args.config)
    started = time.perf_counter()
    result = run_oracle(config, source_inputs(config, args.input))
    wall = time.perf_counter() - started
    profiles = result.pop("profiles")
    result["profiles"] = len(profiles)
    result["wall_s"] = round(wall, 3)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    if args.profiles_out:
        Path(args.profiles_out).write_bytes(orjson.dumps(profiles, option=orjson.OPT_SORT_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
