"""Unified profiles: per-identifier profile fragments routed to their person and merged.

    fragments (key: an event's primary identifier) --+
                                                     +--> RouteFragments (key: identifier) --+
    assignments (identifier -> person) --------------+                                       |
    identities (person -> members) ----------------------------------> UnifyProfiles (key: person)
                                                                                  |
                                                                           profile rows

Events are folded into a fragment per primary identifier (``user:<id>`` or ``anon:<id>``), which
never changes; stitching only changes which person a fragment belongs to. ``RouteFragments``
remembers each identifier's person and, when it changes, retracts the fragment from the old person
and adds it to the new one; ``UnifyProfiles`` merges a person's fragments. A merge therefore moves
fragments and a split moves them back: history is never recounted, and a person that loses all
its fragments (merged away) becomes a tombstone row, which the sink deletes.

Merging fragments of one person (:func:`unify_profile`): traits, counts, identities and first/last
seen as in :func:`transforms.profile.merge_profiles`; consent *most restrictive wins*: a purpose is
granted only if every fragment that recorded it currently grants it; computed traits over the same
window add up for ``count`` and ``sum`` (each event is in exactly one fragment), take min/max for
``first_seen``/``last_seen``, and add up for ``distinct_count``, an upper bound when two
identifiers of one person saw the same value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.typehints import KV

from transforms.dead_letter import FAILED, dead_letter_on_raise, guarded
from transforms.identity_graph import id_key, split_key
from transforms.pii import PathRedactor
from transforms.profile import (
    empty_profile,
    merge_profiles,
    next_version,
    only_consent,
    profile_row,
)
from transforms.stamps import fresh, upgraded

FRAGMENT, RETRACT, ASSIGN, MEMBERS, TRIGGER = "f", "r", "a", "m", "t"
TRIGGERED = "triggered"  # (current profile row, trigger record) pairs
RAW_MEMBERS, CAUSE = "_members", "_cause"  # row keys that are not columns


def without_activation_fields(row):
    """A row as stores and dead-letter records may see it: the raw identifiers and the cause
    travel with a row for activation only. Anything else is returned as it is."""
    if not isinstance(row, dict) or (RAW_MEMBERS not in row and CAUSE not in row):
        return row
    return {k: v for k, v in row.items() if k not in (RAW_MEMBERS, CAUSE)}


ROWS = "rows"


# --- pure core ---------------------------------------------------------------------------------


def _merge_computed_across(out: dict, pane: list, kind: str) -> None:
    """Two fragments' panes of one trait: the later window wins, the same window combines."""
    cur = out
    if cur.get("pane") is None or (pane[0], pane[1]) > (cur["pane"][0], cur["pane"][1]):
        cur["pane"] = list(pane)
        return
    if (pane[0], pane[1]) != (cur["pane"][0], cur["pane"][1]):
        return
    a, b = cur["pane"][3], pane[3]
    if a is None or b is None:
        cur["pane"][3] = a if b is None else b
    elif kind == "first_seen":
        cur["pane"][3] = min(a, b)
    elif kind == "last_seen":
        cur["pane"][3] = max(a, b)
    else:
        cur["pane"][3] = a + b


def unify_profile(
    person: str,
    fragments: dict[str, dict[str, Any]],
    members: list[str],
    trait_kinds: dict[str, str] | None = None,
    redact: Callable[[str], str | None] | None = None,
) -> dict[str, Any] | None:
    """The profile row of ``person`` from its fragments (module doc); ``None`` without any.

    ``members`` are raw identifier keys; ``redact`` maps each to what the profile sink's PII
    policy allows (``None``: leave it out), matching the already redacted fragments."""
    if not fragments:
        return None
    merged = empty_profile()
    computed: dict[str, dict] = {}
    consent: dict[str, bool] = {}
    for key in sorted(fragments):
        frag = fragments[key]
        for name, pane in frag["computed"].items():
            _merge_computed_across(
                computed.setdefault(name, {}), pane, (trait_kinds or {}).get(name, "count")
            )
        for purpose, entry in frag.get("consent", {}).items():
            consent[purpose] = consent.get(purpose, True) and entry[2] is True
        # No copy: merge_profiles never mutates the fragment's containers or entries (it only
        # stores references to entries it never changes), so state-held fragments stay intact.
        merge_profiles(merged, {**frag, "computed": {}})
    if merged.get("deleted"):
        return profile_row(person, merged)  # a tombstone, versioned by the events it removes
    if only_consent(merged):
        return None  # nothing the store may keep: consent snapshots only amend a profile
    merged["computed"] = {name: c["pane"] for name, c in computed.items()}
    raw = set(members) | set(fragments)
    keys = raw if redact is None else {r for r in map(redact, raw) if r is not None}
    ids = {split_key(k) for k in keys}
    row = profile_row(person, merged, sorted(ids), consent)
    # Not columns (stores never write them): what activation needs downstream. The raw
    # identifiers, to redact per destination as events are, and the newest event folded in.
    row[RAW_MEMBERS] = sorted(raw)
    row[CAUSE] = merged.get("newest")
    return row


class IdentifierRedactor:
    """``identifier key -> key as a PII policy allows it`` (``None``: dropped).

    Stitching works on raw identifiers; a profile row must not carry them raw. The identifier is
    redacted as :func:`transforms.pii.apply_policy` would redact it where its type is read from
    (its first path) in an otherwise empty event (:class:`transforms.pii.PathRedactor`), so an
    email in the identity list is hashed or dropped exactly as in the events (and hashed ones
    still match the fragments)."""

    def __init__(self, paths: dict[str, str], rules, policy, default: str, salt: str):
        self._paths = paths
        self._at = PathRedactor(rules, policy, default, salt)
        # A pure function's cache (not per-key state): an identifier recurs on every event of
        # its person, and once more in the person's member list.
        self._memo: dict[tuple[str, str], str | None] = {}

    def __call__(self, key: str) -> str | None:
        id_type, value = split_key(key)
        redacted = self._value(id_type, value)
        return None if redacted is None else id_key(id_type, redacted)

    @classmethod
    def for_identity(cls, identity, rules, policy, default: str, salt: str) -> IdentifierRedactor:
        """Each identifier type read from its first path (``identity``: the identity config)."""
        return cls({t.name: t.paths[0] for t in identity.types}, rules, policy, default, salt)

    def pairs(self, identifiers) -> list[tuple[str, str]]:
        """An event's ``(type, value)`` identifiers (as validation read them: normalized, raw)
        as the profile keeps them: the keys a fragment's first/last seen are recorded under
        must be the person's member keys after this same redaction (a hashed identifier read
        back from the redacted event would be normalized again, and hashed from the raw text)."""
        out = []
        for t, v in identifiers:
            redacted = self._value(t, v)
            if redacted is not None:
                out.append((t, redacted))
        return out

    def _value(self, id_type: str, value: str) -> str | None:
        memo = self._memo
        found = memo.get((id_type, value), memo)
        if found is memo:
            path = self._paths.get(id_type)
            redacted = value if path is None else self._at(path, value)
            found = redacted if isinstance(redacted, str) and redacted else None
            if len(memo) >= 100_000:
                memo.clear()
            memo[(id_type, value)] = found
        return found


# --- Beam shells -------------------------------------------------------------------------------


def route_fragment(x: str, msg: tuple, state: tuple | None) -> tuple[tuple | None, list]:
    """One message to an identifier's router (pure): ``(new state or None when nothing changed,
    messages to persons)``.

    State: ``(person per group, fragment, person routed to, stamps, messages sent)``. A fragment
    (an accumulating pane: its ``inputs`` only grow) and a group's assignment (stamped with the
    group's resolutions) replace what is held only when newer (transforms/stamps.py), so any
    arrival order ends in the same state. When the person changes, the fragment is retracted from
    the old one and sent to the new one; each message to a person carries the count of messages
    this identifier sent, so a person keeps the newest fragment or retraction of it."""
    groups, frag, routed, stamps, sent = upgraded(state, ({}, None, None, {}, 0))
    if msg[0] == ASSIGN:
        if not fresh(stamps, msg[1][0], msg[1][2]):
            return None, []
        _assign(groups, msg[1])
    else:
        if not fresh(stamps, FRAGMENT, msg[1].get("inputs", 0)):
            return None, []
        frag = msg[1]
    out = []
    person = person_of(x, groups)
    if frag is not None and (routed != person or msg[0] == FRAGMENT):
        if routed is not None and routed != person:
            sent += 1
            out.append((routed, (RETRACT, x, sent)))
        sent += 1
        out.append((person, (FRAGMENT, x, frag, sent)))
        routed = person
    return (groups, frag, routed, stamps, sent), out


class _RouteFragmentsFn(beam.DoFn):
    """Keyed by identifier: its fragment and person; moves the fragment when the person changes
    (:func:`route_fragment`)."""

    # One cell per identifier: the state of :func:`route_fragment`.
    ROUTE = ReadModifyWriteStateSpec("route", FastPrimitivesCoder())

    @dead_letter_on_raise
    def process(self, element, route_state=beam.DoFn.StateParam(ROUTE)):
        x, msg = element
        state = route_state.read()
        if msg[0] == TRIGGER:  # an event trigger: to the identifier's person, as it is now
            yield (person_of(x, state[0] if state else {}), msg)
            return
        after, out = route_fragment(x, msg, state)
        if after is not None:
            route_state.write(after)
        yield from out


def _assign(groups: dict[str, str], assignment: tuple) -> None:
    """Apply a group's ``(group, person or None, stamp)`` to an identifier's persons per group."""
    group, person, _ = assignment
    if person is None:
        groups.pop(group, None)
    else:
        groups[group] = person


def person_of(x: str, groups: dict[str, str]) -> str:
    """The person an identifier's fragment belongs to. While an identifier moves between
    candidate groups both may claim it for a moment; the smaller group label is where it is
    going (labels only decrease)."""
    return groups[min(groups)] if groups else x


class _RouteGroupedFn(beam.DoFn):
    """Bounded runs: ``(identifier, its fragment and assignments)`` in, the fragment sent once
    to its final person (a bounded run's PersonHistory emits one fragment per profile key)."""

    @dead_letter_on_raise
    def process(self, element):
        x, messages = element
        groups: dict = {}
        frag = None
        triggers = []
        for msg in messages:
            if msg[0] == TRIGGER:
                triggers.append(msg)
            elif msg[0] == ASSIGN:
                _assign(groups, msg[1])
            else:
                frag = msg[1]
        person = person_of(x, groups)
        if frag is not None:
            yield (person, (FRAGMENT, x, frag, 1))
        for msg in triggers:
            yield (person, msg)


def apply_person_message(msg, frags: dict, by_group: dict, stamps: dict) -> bool:
    """One message to a person (pure; mutates the three dicts): a fragment or retraction of an
    identifier (stamped by its router) or a group's member list (stamped by its resolutions)
    replaces what is held only when newer (transforms/stamps.py). Returns whether anything
    changed."""
    if msg[0] == MEMBERS:
        group, members, stamp = msg[1]
        if not fresh(stamps, (MEMBERS, group), stamp):
            return False
        if members is None:
            by_group.pop(group, None)
        else:
            by_group[group] = list(members)
        return True
    if not fresh(stamps, (FRAGMENT, msg[1]), msg[-1]):
        return False
    if msg[0] == FRAGMENT:
        frags[msg[1]] = msg[2]
    else:
        frags.pop(msg[1], None)
    return True


def _members(by_group: dict[str, list]) -> list[str]:
    return sorted({m for ms in by_group.values() for m in ms})


class _UnifyGroupedFn(beam.DoFn):
    """Bounded runs: ``(person, its fragments and member lists)`` in, its row out, once (its
    as-of version, :func:`transforms.profile.as_of_version`)."""

    def __init__(self, trait_kinds: dict[str, str], redact):
        self._kinds = trait_kinds
        self._redact = redact

    @dead_letter_on_raise
    def process(self, element):
        person, messages = element
        frags: dict = {}
        by_group: dict = {}
        triggers = []
        stamps: dict = {}
        for msg in messages:
            if msg[0] == TRIGGER:
                triggers.append(msg[1])
            else:
                apply_person_message(msg, frags, by_group, stamps)
        row = unify_profile(person, frags, _members(by_group), self._kinds, self._redact)
        if row is not None:  # None: never had a row, nothing to write or delete
            yield row
        for record in triggers:  # a bounded run's current profile is its final one
            yield beam.pvalue.TaggedOutput(TRIGGERED, (row, record))


class _UnifyProfilesFn(beam.DoFn):
    # One cell per person, ``(fragments by identifier, members by group, row version, stamps of
    # the newest message applied per identifier and group)``.
    PERSON = ReadModifyWriteStateSpec("person", FastPrimitivesCoder())

    def __init__(self, trait_kinds: dict[str, str], redact):
        self._kinds = trait_kinds
        self._redact = redact

    @dead_letter_on_raise
    def process(self, element, person_state=beam.DoFn.StateParam(PERSON)):
        """Streaming: a new row version at every change of the person."""
        person, msg = element
        frags, by_group, version, stamps = upgraded(person_state.read(), ({}, {}, 0, {}))
        if msg[0] == TRIGGER:  # enrich with the profile as it is now; nothing changes
            row = unify_profile(person, frags, _members(by_group), self._kinds, self._redact)
            yield beam.pvalue.TaggedOutput(TRIGGERED, (row, msg[1]))
            return
        if not apply_person_message(msg, frags, by_group, stamps):
            return  # an older message than one applied: it changes nothing
        row = unify_profile(person, frags, _members(by_group), self._kinds, self._redact)
        if row is None:
            if not version:
                person_state.write((frags, by_group, version, stamps))
                return  # never had a row: nothing to delete
            row = {"profile_id": person, "deleted": True, "version": 0}  # merged away
        version = next_version(version, row["version"])
        person_state.write((frags, by_group, version, stamps))
        row["version"] = version
        yield row


class UnifyProfiles(beam.PTransform):
    """``{"fragments": (primary id, accumulator), "assignments": (identifier, (group, person)),
    "identities": (person, (group, members))}`` and optionally ``"triggers": (profile key,
    record)`` in; ``{"rows": profile rows (and tombstones), "triggered": (the person's current
    row, record), "failed": dead letters}`` out (an identifier's or a person's messages the step raised on:
    not events, see transforms/dead_letter.py)."""

    def __init__(
        self,
        trait_kinds: dict[str, str] | None = None,
        bounded: bool = True,
        redact: Callable[[str], str | None] | None = None,
    ):
        super().__init__()
        self._kinds = dict(trait_kinds or {})
        self._bounded = bounded
        self._redact = redact

    def expand(self, inputs):
        parts = [
            inputs["fragments"]
            | "AsFragment"
            >> beam.MapTuple(lambda k, f: (k, (FRAGMENT, f))).with_output_types(KV[str, Any]),
            inputs["assignments"]
            | "AsAssign"
            >> beam.MapTuple(lambda k, a: (k, (ASSIGN, a))).with_output_types(KV[str, Any]),
        ]
        if inputs.get("triggers") is not None:
            # Event triggers (profile key, record): routed to the key's person like its
            # fragment, then enriched with the person's profile (TRIGGERED).
            parts.append(
                inputs["triggers"]
                | "AsTrigger"
                >> beam.MapTuple(lambda k, r: (k, (TRIGGER, r))).with_output_types(KV[str, Any])
            )
        routed_in = tuple(parts) | "ToRouter" >> beam.Flatten()
        bounded = self._bounded

        if bounded:
            # Each keyed step a GroupByKey and one call per key (no state, no timers).
            routed_in = routed_in | "Fragment+Assignments" >> beam.GroupByKey()
            router, unifier = _RouteGroupedFn(), _UnifyGroupedFn(self._kinds, self._redact)
        else:
            router = _RouteFragmentsFn()
            unifier = _UnifyProfilesFn(self._kinds, self._redact)
        routed = routed_in | "RouteFragments" >> guarded(
            beam.ParDo(router).with_input_types(KV[str, Any]).with_output_types(KV[str, Any]),
            main="routed",
        )
        members = inputs["identities"] | "AsMembers" >> beam.MapTuple(
            lambda p, m: (p, (MEMBERS, m))
        ).with_output_types(KV[str, Any])
        to_unify = (routed.routed, members) | "ToUnify" >> beam.Flatten()
        if bounded:
            to_unify = to_unify | "Fragments+Members" >> beam.GroupByKey()
        rows = to_unify | "UnifyProfiles" >> guarded(
            beam.ParDo(unifier).with_input_types(KV[str, Any]), TRIGGERED, main="rows"
        )
        failed = (routed[FAILED], rows[FAILED]) | "MergeFailed" >> beam.Flatten()
        return {ROWS: rows.rows, FAILED: failed, TRIGGERED: rows[TRIGGERED]}
