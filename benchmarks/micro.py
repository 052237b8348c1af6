"""Per-event cost of each pure stage, no Beam: JSON decode alone, decode + validation, the dedup
fingerprint and decision, the profile fold. Prints microseconds per event on N generated events.

    python -m benchmarks.micro --events 100000
"""

from __future__ import annotations

import argparse
import time

import orjson

from pipelines.config import IdentityConfig
from schemas import __file__ as _schemas_file  # noqa: F401  (package data lives here)
from transforms.dedup import decide, dedup_key, fingerprint
from transforms.identity import extract_identifiers, primary_profile_key
from transforms.identity_graph import StitchRules, earlier, event_links, resolve
from transforms.profile import empty_profile, fold_event
from transforms.tracking_plan import compile_plan, load_plan
from transforms.validate import judge


def _plan():
    from pathlib import Path

    return compile_plan(load_plan(Path(_schemas_file).parent / "tracking_plans" / "example.yaml"))


SETTINGS = dict(max_event_bytes=32768, max_depth=16, max_future_skew_ms=3600_000, floor_ms=0)


def core_pass(lines: list[str]) -> int:
    """Decode, validate, dedup and fold every line, as the pipeline's core does; returns profiles."""
    plan, identity = _plan(), IdentityConfig()
    seen: dict[str, tuple] = {}
    profiles: dict[str, dict] = {}
    for line in lines:
        env, record = judge(("web", "f", line), plan, identity=identity, **SETTINGS)
        if env is None:
            continue
        key = dedup_key(env.source, env.event, ("source", "messageId"))
        fp = fingerprint(env.event)
        if decide(seen.get(key), fp) != "first":
            continue
        seen[key] = (fp, env.event.get("messageId"), env.event_time_ms)
        pk = primary_profile_key(env.event, identity)
        acc = profiles.get(pk)
        if acc is None:
            acc = profiles[pk] = empty_profile()
        fold_event(acc, env.event, env.event_time_ms, extract_identifiers(env.event, identity))
    return len(profiles)


def _time(fn, lines) -> float:
    started = time.perf_counter()
    fn(lines)
    return (time.perf_counter() - started) / len(lines) * 1e6


def main() -> None:
    from pipelines.generate import generate

    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    lines, _ = generate(args.events, max(args.events // 20, 1), 42)
    plan, identity = _plan(), IdentityConfig()

    def decode_only(ls):
        for line in ls:
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                pass

    def decode_validate(ls):
        for line in ls:
            judge(("web", "f", line), plan, identity=identity, **SETTINGS)

    events = []
    for x in lines:
        try:
            e = orjson.loads(x)
        except orjson.JSONDecodeError:
            continue
        if isinstance(e, dict):
            events.append(e)

    def dedup_only(es):
        seen = {}
        for e in es:
            k = dedup_key("web", e, ("source", "messageId"))
            fp = fingerprint(e)
            if decide(seen.get(k), fp) == "first":
                seen[k] = (fp, "", 0)

    def fold_only(es):
        acc = empty_profile()
        for e in es:
            fold_event(acc, e, 0, extract_identifiers(e, identity))

    def stitch_only(es):
        # Links per event, earliest evidence per pair, then the rule over every candidate group.
        best: dict = {}
        for i, e in enumerate(es):
            for link in event_links(e, i, identity):
                k = (link.a, link.b)
                best[k] = earlier(best.get(k), link)
        nodes = {x for k in best for x in k}
        resolve(nodes, best.values(), StitchRules.from_config(identity))

    from pipelines.config import load_default_config
    from pipelines.governed_profiles import pii_policies, pii_rules
    from transforms.pii import Redaction

    config = load_default_config()
    policies = pii_policies(config)
    rules = pii_rules(config)
    salt = "micro-benchmark-salt"

    def identifiers_only(es):
        for e in es:
            extract_identifiers(e, identity)

    redaction = Redaction(rules, policies, salt)  # held, as the job's stages hold one

    def pii_only(es):
        # Every event redacted for every destination, one classification each (as the job does).
        for e in es:
            redaction.apply(e)

    d = _time(decode_only, lines)
    v = _time(decode_validate, lines)
    print(f"events: {len(lines):,}")
    print(f"JSON decode alone (orjson)          {d:7.2f} us/event")
    print(f"decode + validate (judge, all rules) {v:7.2f} us/event  (validation adds {v - d:.2f})")
    print(f"dedup key + fingerprint + decision  {_time(dedup_only, events):7.2f} us/event")
    print(f"profile fold (identities + traits)  {_time(fold_only, events):7.2f} us/event")
    print(f"stitching (links + earliest + rule) {_time(stitch_only, events):7.2f} us/event")
    print(f"identifier extraction (one reading) {_time(identifiers_only, events):7.2f} us/event")
    print(f"PII, {len(policies)} destination policies   {_time(pii_only, events):7.2f} us/event")
    print(f"whole core pass                     {_time(core_pass, lines):7.2f} us/event")


if __name__ == "__main__":
    main()
