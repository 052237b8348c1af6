"""The unified profile as a mergeable aggregate of events.

A profile is a plain-dict accumulator, so that Beam encodes it natively and any two partial
profiles of the same person merge without recounting:

- ``ids``: ``"type\\x1fvalue" -> [first_seen_ms, last_seen_ms]``
- ``traits``: ``name -> [event_time_ms, messageId, value]``; ``set`` semantics by event time: the
  latest event time wins, ties broken by the larger messageId, so arrival order never matters;
- ``first_seen_ms`` / ``last_seen_ms``; ``counts``: events by ``type:<type>`` and ``event:<name>``;
- ``events``: how many distinct events were folded in, which is also the profile's monotonic
  ``version`` (accumulating panes only ever add events).

Traits come from identify ``traits`` and from ``context.traits`` on any event.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import orjson

from transforms.envelope import format_iso_ms

_SEP = "\x1f"


def empty_profile() -> dict[str, Any]:
    return {"ids": {}, "traits": {}, "first_seen_ms": None, "last_seen_ms": None, "counts": {}, "events": 0}


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _set_trait(traits: dict, name: str, entry: list) -> None:
    """``set``: the latest (event time, messageId) wins; a full tie falls back to the value's
    canonical JSON, so even two sources reusing one messageId resolve the same way in any order."""
    cur = traits.get(name)
    if cur is None:
        traits[name] = entry
        return
    new_key, cur_key = (entry[0], entry[1]), (cur[0], cur[1])
    if new_key > cur_key or (new_key == cur_key and _canonical(entry[2]) > _canonical(cur[2])):
        traits[name] = entry


def _trait_sources(event: dict[str, Any]) -> list[dict]:
    """Person traits an event carries: ``context.traits`` on any event, ``traits`` on identify.

    (``group`` traits describe the group, not the person, so they are not profile traits.)
    """
    out = []
    ctx = event.get("context")
    if isinstance(ctx, dict) and isinstance(ctx.get("traits"), dict):
        out.append(ctx["traits"])
    if event.get("type") == "identify" and isinstance(event.get("traits"), dict):
        out.append(event["traits"])
    return out


def fold_event(
    acc: dict[str, Any], event: dict[str, Any], event_time_ms: int, identifiers: list[tuple[str, str]]
) -> dict[str, Any]:
    """Add one event to a profile (mutates and returns ``acc``)."""
    for t, v in identifiers:
        key = t + _SEP + v
        span = acc["ids"].get(key)
        if span is None:
            acc["ids"][key] = [event_time_ms, event_time_ms]
        else:
            span[0] = min(span[0], event_time_ms)
            span[1] = max(span[1], event_time_ms)
    mid = event.get("messageId", "")
    for source in _trait_sources(event):
        for name, value in source.items():
            _set_trait(acc["traits"], name, [event_time_ms, mid, value])
    first, last = acc["first_seen_ms"], acc["last_seen_ms"]
    acc["first_seen_ms"] = event_time_ms if first is None else min(first, event_time_ms)
    acc["last_seen_ms"] = event_time_ms if last is None else max(last, event_time_ms)
    counts = acc["counts"]
    tkey = "type:" + str(event.get("type"))
    counts[tkey] = counts.get(tkey, 0) + 1
    if event.get("type") == "track":
        ekey = "event:" + str(event.get("event"))
        counts[ekey] = counts.get(ekey, 0) + 1
    acc["events"] += 1
    return acc


def merge_profiles(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Combine two partial profiles of one person (mutates and returns ``a``). Commutative."""
    for key, (lo, hi) in b["ids"].items():
        span = a["ids"].get(key)
        a["ids"][key] = [lo, hi] if span is None else [min(span[0], lo), max(span[1], hi)]
    for name, entry in b["traits"].items():
        _set_trait(a["traits"], name, entry)
    for field, pick in (("first_seen_ms", min), ("last_seen_ms", max)):
        vals = [v for v in (a[field], b[field]) if v is not None]
        a[field] = pick(vals) if vals else None
    for k, n in b["counts"].items():
        a["counts"][k] = a["counts"].get(k, 0) + n
    a["events"] += b["events"]
    return a


def profile_row(profile_id: str, acc: dict[str, Any]) -> dict[str, Any]:
    """The sink row: JSON columns as text, identities sorted so equal profiles are equal rows."""
    identities = []
    for key in sorted(acc["ids"]):
        t, v = key.split(_SEP, 1)
        lo, hi = acc["ids"][key]
        identities.append(
            {"type": t, "value": v, "first_seen": format_iso_ms(lo), "last_seen": format_iso_ms(hi)}
        )
    traits = {name: acc["traits"][name][2] for name in sorted(acc["traits"])}
    dump = lambda x: orjson.dumps(x, option=orjson.OPT_SORT_KEYS).decode()  # noqa: E731
    return {
        "profile_id": profile_id,
        "identities": dump(identities),
        "traits": dump(traits),
        "event_counts": dump(acc["counts"]),
        "first_seen": format_iso_ms(acc["first_seen_ms"]),
        "last_seen": format_iso_ms(acc["last_seen_ms"]),
        "version": acc["events"],
        # The event time of the newest event folded in: a pure function of the input, so a
        # replay writes byte-identical rows (wall-clock time would not).
        "updated_at": format_iso_ms(acc["last_seen_ms"]),
    }


class ProfileCombineFn(beam.CombineFn):
    """Beam shell over :func:`fold_event` / :func:`merge_profiles`; input ``(event, time_ms, ids)``."""

    def create_accumulator(self):
        return empty_profile()

    def add_input(self, acc, element):
        event, event_time_ms, identifiers = element
        return fold_event(acc, event, event_time_ms, identifiers)

    def merge_accumulators(self, accumulators):
        it = iter(accumulators)
        out = next(it)
        for other in it:
            out = merge_profiles(out, other)
        return out

    def extract_output(self, acc):
        return acc


class BuildProfiles(beam.PTransform):
    """Valid, unique envelopes in; one profile row per profile key out (``profile_row`` shape).

    Keyed by :func:`transforms.identity.primary_profile_key` (user id, else anonymous id) until
    identity stitching assigns person ids. Aggregation is a ``CombineFn`` over
    :func:`fold_event`/:func:`merge_profiles`, so it is order- and bundling-independent and
    Beam may pre-combine before the shuffle.
    """

    def __init__(self, identity):
        super().__init__()
        self._identity = identity

    def expand(self, envelopes):
        from transforms.identity import extract_identifiers, primary_profile_key

        identity = self._identity

        def keyed(env):
            ids = extract_identifiers(env.event, identity)
            return primary_profile_key(env.event, identity), (env.event, env.event_time_ms, ids)

        return (
            envelopes
            | "KeyByProfile" >> beam.Map(keyed)
            | "Aggregate" >> beam.CombinePerKey(ProfileCombineFn())
            | "ToRow" >> beam.MapTuple(profile_row)
        )
