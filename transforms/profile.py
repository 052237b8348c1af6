"""The unified profile as a mergeable aggregate of events.

A profile is a plain-dict accumulator, so that Beam encodes it natively and any two partial
profiles of the same person merge without recounting:

- ``ids``: ``"type\\x1fvalue" -> [first_seen_ms, last_seen_ms]``
- ``traits``: ``name -> [event_time_ms, messageId, value]``; ``set`` semantics by event time: the
  latest event time wins, ties broken by the larger messageId, so arrival order never matters;
- ``first_seen_ms`` / ``last_seen_ms``; ``counts``: events by ``type:<type>`` and ``event:<name>``;
- ``events``: how many distinct events were folded in.

A row's ``version`` says how new it is, the same way in batch, streaming and replay runs
(:func:`as_of_version`): first the newest event time folded in (to the second), then the number
of events folded in, then whether it is a deletion; a streaming run's changes that leave that
stamp (merges, computed-trait panes) count in a field below all three (:func:`next_version`). A
store keeps the row with the higher version, so a replay of older history, a retried bundle or a
re-run of the same input never moves a profile backwards, and a backfill that adds events (even
old ones) moves it forward, whatever run wrote the store before.

Traits come from identify ``traits`` and from ``context.traits`` on any event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import orjson

from transforms import exact_sum
from transforms.consent import consent_observation
from transforms.dead_letter import FAILED, guarded, one_or_dead_letter
from transforms.envelope import format_iso_ms

_SEP = "\x1f"


@dataclass(frozen=True)
class TraitRules:
    """How a trait combines across events; any trait not named here uses ``set``.

    - ``set``: latest event time wins (ties: larger messageId, then the value's canonical JSON);
      a ``null`` value is an ``unset``: a tombstone with its own event time, absent from the row;
    - ``set_once``: earliest event time wins (same tie rules, reversed);
    - ``increment``: numeric values are added (deduplication upstream makes this exactly-once),
      exactly (:mod:`transforms.exact_sum`), so the total does not depend on arrival order.
    """

    set_once: frozenset[str] = frozenset()
    increment: frozenset[str] = frozenset()


def empty_profile() -> dict[str, Any]:
    return {
        "ids": {},
        "traits": {},
        "once": {},
        "incr": {},
        "computed": {},
        "first_seen_ms": None,
        "last_seen_ms": None,
        "counts": {},
        "events": 0,
        "panes": 0,
        "consent": {},
    }


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _later(a: list, b: list) -> bool:
    """True when trait entry ``a`` ([time, messageId, value]) beats ``b`` under ``set``."""
    ka, kb = (a[0], a[1]), (b[0], b[1])
    return ka > kb or (ka == kb and _canonical(a[2]) > _canonical(b[2]))


def _set_trait(traits: dict, name: str, entry: list) -> None:
    cur = traits.get(name)
    if cur is None or _later(entry, cur):
        traits[name] = entry


def _set_once(traits: dict, name: str, entry: list) -> None:
    cur = traits.get(name)
    if cur is None or _later(cur, entry):
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


def fold_consent(acc: dict[str, Any], event: dict[str, Any], event_time_ms: int) -> None:
    """The consent snapshot an event carries, into the profile (the latest per purpose wins).
    Also for an event the profile store may not keep (its consent refused the store's purposes):
    a withdrawal must reach the profile that audiences are judged on, and consent preferences
    are governance, not the event's content."""
    prefs = consent_observation(event)
    if prefs:
        consent = acc.setdefault("consent", {})
        mid = event.get("messageId", "")
        for purpose, granted in prefs.items():
            _set_trait(consent, purpose, [event_time_ms, mid, granted])


def only_consent(acc: dict[str, Any]) -> bool:
    """Whether a profile holds nothing but consent snapshots (no event the store may keep)."""
    return not (acc["events"] or acc["traits"] or acc["once"] or acc["incr"] or acc["computed"])


def fold_event(
    acc: dict[str, Any],
    event: dict[str, Any],
    event_time_ms: int,
    identifiers: list[tuple[str, str]],
    rules: TraitRules = TraitRules(),
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
            if name in rules.increment:
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    exact_sum.add(acc["incr"].setdefault(name, exact_sum.new()), value)
            elif name in rules.set_once:
                if value is not None:
                    _set_once(acc["once"], name, [event_time_ms, mid, value])
            else:
                _set_trait(acc["traits"], name, [event_time_ms, mid, value])
    fold_consent(acc, event, event_time_ms)
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
    newest = [event_time_ms, str(mid)]
    if acc.get("newest") is None or newest > acc["newest"]:
        acc["newest"] = newest  # the event an activation cites as the cause of a change
    return acc


def _merge_pane(computed: dict, name: str, pane: list) -> None:
    """The latest window wins; within one window an accumulating pane replaces the earlier ones (a
    late pane corrects, it never double counts) and a discarding pane's delta is added."""
    cur = computed.get(name)
    if cur is None or (pane[0], pane[1]) > (cur[0], cur[1]):
        computed[name] = list(pane)
    elif (pane[0], pane[1]) == (cur[0], cur[1]):
        if pane[4] == "discarding":
            cur[3] = (cur[3] or 0) + (pane[3] or 0)
            cur[2] = max(cur[2], pane[2])
        elif pane[2] > cur[2]:
            computed[name] = list(pane)


def fold_computed(acc: dict[str, Any], name: str, pane: list) -> dict[str, Any]:
    """Add one computed-trait pane ``[window_end_ms, window_start_ms, pane_index, value, mode]``."""
    _merge_pane(acc["computed"], name, pane)
    acc["panes"] += 1
    return acc


def merge_profiles(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Combine two partial profiles of one person (mutates and returns ``a``). Commutative."""
    for key, (lo, hi) in b["ids"].items():
        span = a["ids"].get(key)
        a["ids"][key] = [lo, hi] if span is None else [min(span[0], lo), max(span[1], hi)]
    for name, entry in b["traits"].items():
        _set_trait(a["traits"], name, entry)
    for name, entry in b["once"].items():
        _set_once(a["once"], name, entry)
    for name, n in b["incr"].items():
        exact_sum.merge(a["incr"].setdefault(name, exact_sum.new()), n)
    for name, pane in b["computed"].items():
        _merge_pane(a["computed"], name, pane)
    a["panes"] += b["panes"]
    for purpose, entry in b.get("consent", {}).items():
        _set_trait(a.setdefault("consent", {}), purpose, entry)
    for field_name, pick in (("first_seen_ms", min), ("last_seen_ms", max)):
        vals = [v for v in (a[field_name], b[field_name]) if v is not None]
        a[field_name] = pick(vals) if vals else None
    for k, n in b["counts"].items():
        a["counts"][k] = a["counts"].get(k, 0) + n
    a["events"] += b["events"]
    if b.get("newest") is not None and (a.get("newest") is None or b["newest"] > a["newest"]):
        a["newest"] = b["newest"]
    if b.get("deleted"):
        a["deleted"] = True
    return a


def profile_row(
    profile_id: str,
    acc: dict[str, Any],
    members: list[tuple[str, str]] | None = None,
    consent: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """The sink row: JSON columns as text, identities sorted so equal profiles are equal rows.

    ``members``: the person's identifiers as stitching decided (default: every identifier its
    events carried); first/last seen come from the events. ``consent``: purpose -> granted
    (default: the latest observation of each purpose)."""
    identities = []
    keys = sorted(acc["ids"]) if members is None else sorted({t + _SEP + v for t, v in members})
    for key in keys:
        t, v = key.split(_SEP, 1)
        lo, hi = acc["ids"].get(key, (None, None))
        identities.append(
            {
                "type": t,
                "value": v,
                "first_seen": format_iso_ms(lo) if lo is not None else None,
                "last_seen": format_iso_ms(hi) if hi is not None else None,
            }
        )
    if consent is None:
        consent = {p: e[2] for p, e in acc.get("consent", {}).items()}
    traits = {n: e[2] for n, e in acc["traits"].items() if e[2] is not None}
    traits.update({n: e[2] for n, e in acc["once"].items()})
    traits.update({n: exact_sum.value(total) for n, total in acc["incr"].items()})
    computed = {
        name: {
            "value": pane[3],
            "window_start": format_iso_ms(pane[1]) if pane[1] is not None else None,
            "window_end": format_iso_ms(pane[0]) if pane[1] is not None else None,  # lifetime: none
        }
        for name, pane in acc["computed"].items()
    }

    def dump(x):
        return orjson.dumps(x, option=orjson.OPT_SORT_KEYS).decode()

    seen = acc["last_seen_ms"]
    if acc.get("deleted"):
        # A deletion request: nothing about the person survives, only the instruction to delete.
        return {
            "profile_id": profile_id,
            "deleted": True,
            "version": as_of_version(seen, acc["events"], deleted=True),
        }
    return {
        "profile_id": profile_id,
        "identities": dump(identities),
        "traits": dump(traits),
        "computed_traits": dump(computed),
        "event_counts": dump(acc["counts"]),
        "consent": dump(consent),
        "first_seen": format_iso_ms(acc["first_seen_ms"])
        if acc["first_seen_ms"] is not None
        else None,
        "last_seen": format_iso_ms(seen) if seen is not None else None,
        "version": as_of_version(seen, acc["events"]),
        # The event time of the newest event folded in: a pure function of the input, so a
        # replay writes byte-identical rows (wall-clock time would not).
        "updated_at": format_iso_ms(seen) if seen is not None else "",
    }


# Version bits (63: a signed 64-bit column everywhere), high to low:
# -  1 layout: set in every version of this layout, so that each beats any version the earlier
#      layout wrote into an existing store (event time in ms << 21: below 2**62 until 2039);
# - 33 newest event time, in seconds (to the year 2242);
# - 20 event count (saturating);
# -  1 deletion;
# -  8 changes of a streaming run that leave the stamp where it was (a merge without events, a
#      computed-trait pane, a merged-away tombstone; see next_version): the lowest field, so no
#      number of such changes in one run outranks an event another run added.
_LAYOUT = 1 << 62
_TIME_BITS, _COUNT_BITS, _CHANGE_BITS = 33, 20, 8
_COUNT_SHIFT = _CHANGE_BITS + 1


def as_of_version(high_water_ms: int | None, events: int, deleted: bool = False) -> int:
    """A profile state's version: ordered by its newest event time (to the second), then its
    event count, then deletion (a tombstone of a person beats the live row of the same events).
    A pure function of the events, the same in batch, streaming and replay runs, so a re-run of
    the same input writes the same versions and a run that adds events (even old ones) writes
    higher ones, whatever another run wrote before."""
    t = min(max(int(high_water_ms or 0) // 1000, 0), (1 << _TIME_BITS) - 1)
    n = min(max(int(events), 0), (1 << _COUNT_BITS) - 1)
    return (
        _LAYOUT
        | (t << (_COUNT_BITS + _COUNT_SHIFT))
        | (n << _COUNT_SHIFT)
        | (int(bool(deleted)) << _CHANGE_BITS)
    )


def next_version(previous: int, candidate: int) -> int:
    """A streaming run's next row version of a person: the row's as-of version (``candidate``),
    or one more than the previous row when a change leaves it where it was (a split, a merge of
    identifiers without events, a computed-trait pane, a merged-away person's tombstone), so a
    person's rows strictly increase within a run and never fall below what its events say. The
    one more lands in the lowest field (below deletion and the event count): another run's row
    with one more event still outranks it (past 255 such changes at one stamp it carries on,
    still increasing)."""
    return max(previous + 1, candidate)


COMPUTED, DELETE, FOLDED = "c", "d", "p"
PROFILES = "profiles"


class ProfileCombineFn(beam.CombineFn):
    """Beam shell over the fold/merge functions.

    Inputs: ``("p", one event already folded)``, ``("c", trait_name, pane)`` or ``("d",)``
    (deleted). Events are folded before the combine (``BuildProfiles``), where one that raises is
    a dead letter instead of a failed combine.

    The accumulator also counts its inputs (``inputs``): each accumulating pane of a key holds
    more than the one before, so the count orders a key's panes wherever they are reordered on
    the way (the fragment router keeps the newest, transforms/stamps.py).
    """

    def create_accumulator(self):
        return empty_profile()

    def add_input(self, acc, element):
        acc["inputs"] = acc.get("inputs", 0) + 1
        if element[0] == FOLDED:
            return merge_profiles(acc, element[1])
        if element[0] == DELETE:
            acc["deleted"] = True
            return acc
        return fold_computed(acc, element[1], element[2])

    def merge_accumulators(self, accumulators):
        it = iter(accumulators)
        out = next(it)
        for other in it:
            inputs = out.get("inputs", 0) + other.get("inputs", 0)
            out = merge_profiles(out, other)
            out["inputs"] = inputs
        return out

    def extract_output(self, acc):
        return acc


class BuildProfiles(beam.PTransform):
    """Keyed envelopes (and computed-trait panes, and deletions) in; profile rows out.

    Input: ``{"events": (profile_key, envelope), "computed": (profile_key, (trait, pane)),
    "deletes": (profile_key, None)}``; only ``events`` is required. Aggregation is a ``CombineFn``
    over the fold/merge functions, so it is order- and bundling-independent and Beam may
    pre-combine before the shuffle. A deletion makes the row a tombstone (``deleted``), which the
    sink turns into a DELETE. With ``update_every`` (seconds, streaming) the global window fires
    accumulating panes on processing time; each pane is the whole profile with a larger version.

    Output: ``{"profiles": rows (or ``(key, accumulator)`` fragments with ``as_rows=False``),
    "failed": dead letters}`` (an event whose fold raised, a profile whose row did).
    """

    def __init__(
        self,
        identity,
        rules: TraitRules = TraitRules(),
        update_every: float | None = None,
        as_rows: bool = True,
        redact=None,
    ):
        """``redact``: the profile store's :class:`~transforms.unify.IdentifierRedactor`, when
        the events come in redacted (each event's identifiers are then folded under their
        redacted keys, those of the person's member list); None: as validation read them."""
        super().__init__()
        self._as_rows = as_rows
        self._redact = redact
        if update_every is not None and update_every <= 0:
            raise ValueError("update_every must be positive")
        self._identity = identity
        self._rules = rules
        self._update_every = update_every

    def expand(self, inputs):
        from apache_beam.transforms import trigger, window

        from transforms.identity import identifiers_of

        identity = self._identity
        redact = self._redact

        rules = self._rules

        def fragment(element):
            # The event folded here, on its own, not inside the combiner: an event that makes
            # the fold raise is then one dead letter, not a failed combine. Folding then merging
            # is what combiner lifting does anyway (merge_profiles is the CombineFn's merge).
            key, env = element
            ids = identifiers_of(env, identity)
            if redact is not None:
                ids = redact.pairs(ids)
            return key, (
                FOLDED,
                fold_event(empty_profile(), env.event, env.event_time_ms, ids, rules),
            )

        folded = inputs["events"] | "EventFragments" >> guarded(
            beam.FlatMap(one_or_dead_letter(fragment))
        )
        parts = [folded.good]
        if inputs.get("computed") is not None:
            parts.append(
                inputs["computed"]
                | "PaneFragments" >> beam.MapTuple(lambda k, np: (k, (COMPUTED, *np)))
            )
        if inputs.get("deletes") is not None:
            parts.append(
                inputs["deletes"] | "DeleteFragments" >> beam.MapTuple(lambda k, _: (k, (DELETE,)))
            )
        failed = [folded[FAILED]]
        if inputs.get("consent") is not None:
            # Events the store may not keep: only their consent snapshot (fold_consent).

            def consent_fragment(element):
                key, env = element
                acc = empty_profile()
                fold_consent(acc, env.event, env.event_time_ms)
                return key, (FOLDED, acc)

            consented = inputs["consent"] | "ConsentFragments" >> guarded(
                beam.FlatMap(one_or_dead_letter(consent_fragment))
            )
            parts.append(consented.good)
            failed.append(consented[FAILED])
        fragments = parts[0] if len(parts) == 1 else tuple(parts) | "Fragments" >> beam.Flatten()
        if self._update_every:
            # Streaming on Dataflow/Flink: speculative panes on processing time, and a final pane
            # when the input ends. (Beam 2.77's local BundleBasedDirectRunner cannot evaluate
            # processing-time triggers downstream of stateful stages: it has no clock there.)
            fragments = fragments | "Global" >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.AfterWatermark(
                    early=trigger.AfterProcessingTime(int(self._update_every))
                ),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            )
        elif not fragments.is_bounded:
            # Unbounded without update_every: a new profile pane for every fragment (freshest,
            # most writes); the sink keeps the highest version.
            fragments = fragments | "Global" >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            )
        else:
            fragments = fragments | "Global" >> beam.WindowInto(window.GlobalWindows())
        aggregated = fragments | "Aggregate" >> beam.CombinePerKey(ProfileCombineFn())
        if not self._as_rows:
            # (key, accumulator): per-identifier fragments for UnifyProfiles
            failed_ = (
                failed[0] if len(failed) == 1 else tuple(failed) | "MergeFailed" >> beam.Flatten()
            )
            return {PROFILES: aggregated, FAILED: failed_}
        rows = aggregated | "ToRow" >> guarded(
            beam.FlatMap(one_or_dead_letter(lambda kv: profile_row(*kv)))
        )
        failed_ = (*failed, rows[FAILED]) | "MergeFailed" >> beam.Flatten()
        return {PROFILES: rows.good, FAILED: failed_}
