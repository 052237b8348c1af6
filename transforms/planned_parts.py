"""A planned run's pass: each connected part of the input validated, deduplicated and settled in
one call.

    pass files -> ReadPlannedParts: (part, raw events) -> SettlePart: validation, dedup,
        stitching, per-person history (consent, PII per destination, traits, fragment) and
        unify, for the part's events

Planning (pipelines/passes.py) put every event whose idempotency key or identifiers meet into
one part, and every event of a part into one pass file, so no copy of an event, identifier
graph, profile key or person reaches past a part. A pass can then settle each part whole in
memory, with the stages' own functions in their order, instead of shuffling every event, link,
fragment and member list between ~14 steps:

1. each raw event through validation (``_ValidateFn``: its counters, quarantine records and
   dead letters), each idempotency key's copies through dedup (``dedup_key``,
   ``_DedupHistoryFn.copies``), each unique event's junk-identifier pairs out for the review
   (the one step that joins across parts: :func:`transforms.stitching.report_blocked`);
2. stitching: :func:`transforms.stitching.bounded_stitch_messages` and ``_StitchPartFn`` (Link, the
   accepted adjacency, components by union-find, Route, each group's resolution);
3. per profile key: :func:`pipelines.governed_profiles.key_by_profile` and
   ``_PersonHistoryFn.history`` (``PersonHistory``);
4. per identifier, then per person: ``_RouteGroupedFn`` and ``_UnifyGroupedFn``
   (``UnifyProfiles``), event triggers matched on the way
   (:func:`transforms.audiences.trigger_inputs`).

The outputs are the stages' own: quarantine records, duplicates, the unique envelopes, profile
rows, merges, identity review, consent denials, deletions, each destination's record lists,
triggered rows, and each stage's dead letters under a tag of its own (the job turns them into
quarantine records as it does the stages'). What each call holds is one part: a person's
history and identifiers, as ``PersonHistory`` holds a profile key's; planning bounds a pass, not
a part (a giant part is a pass of its own).
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.typehints import KV

from transforms.audiences import trigger_inputs
from transforms.consent import DELETED
from transforms.consent import DENIED as CONSENT_DENIED
from transforms.dead_letter import FAILED, dead_letter, dead_letter_on_raise, guarded
from transforms.dedup import _DedupHistoryFn, dedup_key
from transforms.envelope import pack
from transforms.identity_graph import StitchRules
from transforms.person_history import _PersonHistoryFn
from transforms.quarantine import DUPLICATES, QUARANTINE
from transforms.stitching import (
    ASSIGNMENTS,
    IDENTITIES,
    MERGES,
    REVIEW,
    UNLINK_TYPE,
    _StitchPartFn,
    blocked_links,
    bounded_stitch_messages,
    config_key,
)
from transforms.unify import (
    ASSIGN,
    FRAGMENT,
    MEMBERS,
    ROWS,
    TRIGGER,
    TRIGGERED,
    _RouteGroupedFn,
    _UnifyGroupedFn,
)

# Dead letters, by the stage whose function raised (the job's quarantine names them so).
FAILED_STITCH_EVENTS = "failed:stitching_events"  # an envelope: its stitch messages
FAILED_GROUPS = "failed:identifier_groups"  # an identifier's or a group's messages
FAILED_KEY = "failed:key"  # an envelope: its profile key
FAILED_HISTORY = "failed:person_history"  # (profile key, packed envelopes)
FAILED_UNIFY = "failed:unify"  # an identifier's or a person's messages
FAILED_VALIDATE = "failed:validate"  # a raw event: validation raised on it
FAILED_DEDUP = "failed:dedup"  # an envelope whose key, or a key's copies, dedup raised on
FAILED_PART = "failed:part"  # (part, unique envelopes): the part's resolution raised outside
FAILED_TAGS = (
    FAILED_VALIDATE, FAILED_DEDUP, FAILED_STITCH_EVENTS, FAILED_GROUPS, FAILED_KEY,
    FAILED_HISTORY, FAILED_UNIFY, FAILED_PART,
)  # fmt: skip
UNIQUE = "unique"  # each unique envelope, timestamped by event time
BLOCKED = "blocked"  # ("junk|other", link) of each unique event, for the review


def destination_tag(name: str) -> str:
    """The output of a destination's record lists: prefixed, as a destination may be named like
    another output of the part's call (``merges``, ``triggered``...)."""
    return f"destination:{name}"


def _retag(output, tag: str) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(tag, output.value)


class _ResolvePartFn:
    """A part's unique envelopes in; its outputs, each stage's function applied in the
    stages' order, its dead letters retagged by stage (module docstring)."""

    def __init__(self, identity, stitch: _StitchPartFn, history: _PersonHistoryFn, unify,
                 key_by_profile, triggers: tuple, fired_on: frozenset):  # fmt: skip
        self._identity = identity
        self._stitch = stitch
        self._history = history
        self._route = _RouteGroupedFn()
        self._unify = unify
        self._key = key_by_profile
        self._triggers = triggers
        self._fired_on = fired_on

    def resolve(self, part: int, envelopes: list) -> list:
        """The part's outputs from its unique envelopes (module docstring, steps 1-3)."""
        out: list = []
        # 1. Stitching.
        links: list = []
        notices: list = []
        for env in envelopes:
            try:
                said = bounded_stitch_messages(
                    env.event, env.event_time_ms, self._identity, env.identifiers
                )
            except Exception as e:
                out.append(_retag(dead_letter(env, e), FAILED_STITCH_EVENTS))
                continue
            links += said[0]
            notices += said[1]
        assignments: list = []
        identities: list = []
        for o in self._stitch.process((part, (links, notices))):
            if o.tag == ASSIGNMENTS:
                assignments.append(o.value)
            elif o.tag == IDENTITIES:
                identities.append(o.value)
            elif o.tag == FAILED:
                out.append(_retag(o, FAILED_GROUPS))
            else:
                out.append(o)  # merges, review
        # 2. Each profile key's history (unlinks are instructions, not behaviour).
        by_key: dict[str, list] = {}
        for env in envelopes:
            if env.event.get("type") == UNLINK_TYPE:
                continue
            try:
                key, keyed = self._key(env, self._identity)
            except Exception as e:
                out.append(_retag(dead_letter(env, e), FAILED_KEY))
                continue
            by_key.setdefault(key, []).append(keyed)
        to_route: dict[str, list] = {}
        for key, group in by_key.items():
            try:
                results = self._history.history(key, group)
            except Exception as e:
                out.append(_retag(dead_letter((key, [pack(x) for x in group]), e), FAILED_HISTORY))
                continue
            for o in results:
                if not isinstance(o, beam.pvalue.TaggedOutput):
                    to_route.setdefault(o[0], []).append((FRAGMENT, o[1]))
                    continue
                if o.tag in (CONSENT_DENIED, DELETED):
                    out.append(o)
                    continue
                out.append(_retag(o, destination_tag(o.tag)))  # a destination's records
                if o.tag in self._fired_on:
                    for k, payload in trigger_inputs(o.value, self._triggers):
                        to_route.setdefault(k, []).append((TRIGGER, payload))
        # 3. Unify: each identifier's fragment to its person, then each person's row.
        for x, assignment in assignments:
            to_route.setdefault(x, []).append((ASSIGN, assignment))
        to_unify: dict[str, list] = {}
        for x, messages in to_route.items():
            for o in self._route.process((x, messages)):
                if isinstance(o, beam.pvalue.TaggedOutput):
                    out.append(_retag(o, FAILED_UNIFY))
                else:
                    to_unify.setdefault(o[0], []).append(o[1])
        for person, members in identities:
            to_unify.setdefault(person, []).append((MEMBERS, members))
        for person, messages in to_unify.items():
            for o in self._unify.process((person, messages)):
                if isinstance(o, beam.pvalue.TaggedOutput) and o.tag == FAILED:
                    out.append(_retag(o, FAILED_UNIFY))
                else:
                    out.append(o)  # the row, triggered rows
        return out


class _SettlePartFn(beam.DoFn):
    """``(part, raw events)`` in: each event validated and each idempotency key's copies
    deduplicated by their stages' own functions (``_ValidateFn``, ``dedup_key``,
    ``_DedupHistoryFn.copies``), each unique event's junk-identifier pairs for the review, then
    the part resolved (``_ResolvePartFn.resolve``). A step that raises on an event or a key
    dead-letters it under that stage's tag, as the stage does; a resolution that raises
    dead-letters the part's unique events (``FAILED_PART``)."""

    def __init__(self, validate, key_paths: tuple[str, ...], identity, resolve: _ResolvePartFn):
        self._validate = validate
        self._key_paths = key_paths
        self._identity = identity
        self._dedup = _DedupHistoryFn()
        self._resolve = resolve

    def setup(self):
        self._validate.setup()

    @dead_letter_on_raise
    def process(self, element):
        part, raws = element
        out: list = []
        unique = self._unique(self._valid(raws, out), out)
        for stamped in unique:
            out.append(beam.pvalue.TaggedOutput(UNIQUE, stamped))
            env = stamped.value
            try:
                pairs = blocked_links(
                    env.event, env.event_time_ms, self._identity, env.identifiers,
                    env.junk_identifiers,
                )  # fmt: skip
            except Exception as e:
                out.append(_retag(dead_letter(env, e), FAILED_STITCH_EVENTS))
                continue
            out += [beam.pvalue.TaggedOutput(BLOCKED, pair) for pair in pairs]
        envelopes = [stamped.value for stamped in unique]
        try:
            out += self._resolve.resolve(part, envelopes)
        except Exception as e:
            out.append(_retag(dead_letter((part, envelopes), e), FAILED_PART))
        return out

    def _valid(self, raws, out: list) -> list:
        """The part's valid envelopes; quarantine records and dead letters into ``out``."""
        valid = []
        for raw in raws:
            for o in self._validate.process(raw):  # dead-letters a raw event itself
                if not isinstance(o, beam.pvalue.TaggedOutput):
                    valid.append(o.value)
                elif o.tag == FAILED:
                    out.append(_retag(o, FAILED_VALIDATE))
                else:
                    out.append(o)  # quarantine
        return valid

    def _unique(self, valid: list, out: list) -> list:
        """Each key's first copy (timestamped by event time, as dedup outputs it); duplicates,
        collisions and dead letters into ``out``."""
        copies: dict[str, list] = {}
        for env in valid:
            try:
                key = dedup_key(env.source, env.event, self._key_paths)
            except Exception as e:
                out.append(_retag(dead_letter(env, e), FAILED_DEDUP))
                continue
            copies.setdefault(key, []).append(env)
        unique = []
        for key, envs in copies.items():
            try:
                results = self._dedup.copies(key, envs)
            except Exception as e:
                out.append(_retag(dead_letter((key, envs), e), FAILED_DEDUP))
                continue
            for o in results:
                if isinstance(o, beam.pvalue.TaggedOutput):
                    out.append(o)  # duplicates, collisions
                else:
                    unique.append(o)
        return unique


class SettlePlannedParts(beam.PTransform):
    """``(part, raw events)`` of a planned pass in (:class:`transforms.io.files.ReadPlannedParts`);
    out: what validation, dedup and the resolution stages output (``quarantine``,
    ``duplicates``, ``unique``, ``rows``, ``merges``, ``identity_review``, ``consent_denied``,
    ``deleted``, one record-list output per destination other than the profile store
    (:func:`destination_tag`), ``triggered``), ``blocked`` (junk-identifier pairs for
    :func:`transforms.stitching.report_blocked`), each stage's dead letters under its own tag
    (:data:`FAILED_TAGS`) and ``failed`` (a part's call that raised outside every stage's
    guard: ``(part, raw events)``). ``validate`` is the job's
    :class:`transforms.validate.ValidateEvents`; the other arguments are those of
    ``DeduplicateEvents``, ``StitchIdentities``, ``PersonHistory`` and ``UnifyProfiles``, and
    the event triggers with the destinations they fire on."""

    def __init__(
        self,
        validate,
        key_paths: tuple[str, ...],
        identity,
        deleted_identifiers,
        destinations,
        pii,
        profiles_destination: str,
        specs,
        trait_rules,
        trait_kinds: dict[str, str],
        redact,
        key_by_profile,
        triggers=(),
        fired_on=(),
    ):
        super().__init__()
        rules = StitchRules.from_config(identity)
        deleted = frozenset(deleted_identifiers)
        resolve = _ResolvePartFn(
            identity,
            _StitchPartFn(rules, frozenset(config_key(d) for d in deleted)),
            _PersonHistoryFn(
                tuple(destinations),
                deleted,
                identity,
                pii,
                profiles_destination,
                tuple(specs),
                trait_rules,
            ),
            _UnifyGroupedFn(dict(trait_kinds), redact),
            key_by_profile,
            tuple(triggers),
            frozenset(fired_on),
        )
        self._fn = _SettlePartFn(validate.fn(), tuple(key_paths), identity, resolve)
        self._outputs = tuple(
            destination_tag(d.name) for d in destinations if d.name != profiles_destination
        )

    def expand(self, parts):
        tags = (
            QUARANTINE, DUPLICATES, UNIQUE, BLOCKED, MERGES, REVIEW, CONSENT_DENIED, DELETED,
            *self._outputs, TRIGGERED,
        )  # fmt: skip
        settled = parts | "SettlePart" >> guarded(
            beam.ParDo(self._fn).with_input_types(KV[int, Any]), *FAILED_TAGS, *tags, main=ROWS
        )
        return {tag: settled[tag] for tag in (ROWS, FAILED, *FAILED_TAGS, *tags)}
