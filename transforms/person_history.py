"""Bounded runs: each person's whole history in one pass, from consent to the profile fragment.

In a bounded run (files, backfills) the watermark passes every event time at once, when the input
ends: consent has nothing to hold, every computed-trait window closes, and the profile fragment is
final. The three keyed steps the streaming job runs one after another (``EnforceConsent``,
``ComputeTraits``, ``BuildProfiles``, each keyed by the same profile key) are then one
``GroupByKey`` and one call per person applying the same pure rules:

1. :func:`~transforms.consent.judge_history`: every event judged by the consent in force at its
   own event time (a deleted person: every event reported as deleted, the profile removed);
2. each delivery redacted once per destination (:class:`~transforms.pii.Redaction`);
3. the events the profile store may keep folded into the fragment
   (:func:`~transforms.profile.fold_event`) with their computed-trait panes
   (:func:`~transforms.computed_traits.history_panes`, one ON_TIME pane per window).

Outputs are what the streaming chain produces, in batches: the main output is the per-key profile
fragment ``(profile_key, accumulator)`` that ``BuildProfiles(as_rows=False)`` would emit, and
each record output (every destination, ``consent_denied``, ``deleted``) carries one list of
records per person. Batches rather than single records because the fan-out is ~4 records per
event and every element costs the local runner a window, a timestamp and a DoFn call per step;
the sinks write a batch as consecutive lines.

Same counters as the streaming stages (``delivered``, ``consent.denied``, ``privacy.deleted``,
``computed_trait_panes``), so the run report does not depend on the path.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.computed_traits import ComputedTraitSpec, history_panes
from transforms.consent import (
    DELETED,
    DENIED,
    DestinationRule,
    deleted_record,
    deletes_person,
    denied_record,
    judge_history,
)
from transforms.dead_letter import FAILED, dead_letter_on_raise, guarded, one_or_dead_letter
from transforms.envelope import Envelope, format_iso_ms, pack, unpack
from transforms.identity import identifiers_of
from transforms.pii import PiiRule, Redaction
from transforms.profile import (
    TraitRules,
    empty_profile,
    fold_computed,
    fold_consent,
    fold_event,
)
from transforms.unify import IdentifierRedactor

FRAGMENTS = "fragments"


def delivery_record(destination: str, profile_key: str, env: Envelope) -> dict:
    """What an activation destination receives: the event as its PII policy allows."""
    return {
        "destination": destination,
        "profile_key": profile_key,
        "event_time": format_iso_ms(env.event_time_ms),
        "event": env.event,
    }


class _PersonHistoryFn(beam.DoFn):
    def __init__(
        self,
        destinations: tuple[DestinationRule, ...],
        deleted_identifiers: frozenset,
        identity,
        pii: tuple[tuple[PiiRule, ...], dict[str, tuple[dict, str]], str],
        profiles_destination: str,
        specs: tuple[ComputedTraitSpec, ...],
        trait_rules: TraitRules,
    ):
        self._destinations = destinations
        rules, policies, salt = pii
        policy, default = policies.get(profiles_destination, ({}, "keep"))
        self._redact_ids = IdentifierRedactor.for_identity(identity, rules, policy, default, salt)
        self._deleted_ids = deleted_identifiers
        self._identity = identity
        self._redaction = Redaction(*pii)
        self._profiles = profiles_destination
        self._specs = specs
        self._trait_rules = trait_rules
        self._denied = Metrics.counter("cdi", "consent.denied")
        self._suppressed = Metrics.counter("cdi", "privacy.deleted")
        self._delivered = Metrics.counter("cdi", "delivered")
        self._panes = Metrics.counter("cdi", "computed_trait_panes")

    @dead_letter_on_raise
    def process(self, element):
        """All of a person's outputs, made before any is emitted or counted: a person whose
        history raises goes to the dead letters whole (every event of it, see
        transforms/dead_letter.py), and must not be counted as delivered as well."""
        key, packed = element
        return self.history(key, [unpack(blob) for blob in packed])

    def history(self, key: str, envelopes: list) -> list:
        """One profile key's outputs from its envelopes (raises on a bad history: the caller
        makes the dead letter)."""
        if any(deletes_person(e.event, self._deleted_ids, self._identity) for e in envelopes):
            profile = empty_profile()
            profile["deleted"] = True
            records = [deleted_record(e, key) for e in envelopes]
            self._suppressed.inc(len(envelopes))
            return [beam.pvalue.TaggedOutput(DELETED, records), (key, profile)]
        out: list = []
        deliveries, denials = judge_history(envelopes, self._destinations)
        if denials:
            out.append(
                beam.pvalue.TaggedOutput(
                    DENIED,
                    [denied_record(env, key, name, missing) for env, name, missing in denials],
                )
            )
        batches: dict[str, list[dict]] = {}
        kept: list[tuple[int, dict[str, Any]]] = []  # what the profile store may keep
        kept_ids: list = []  # the identifiers of each, as the profile keeps them
        kept_envs: set[int] = set()
        delivered = 0
        for allowed, env in deliveries:
            delivered += len(allowed)
            events = self._redaction.apply(env.event, allowed)
            for name in allowed:
                if name == self._profiles:
                    kept_envs.add(id(env))
                    kept.append((env.event_time_ms, events[name]))
                    kept_ids.append(self._redact_ids.pairs(identifiers_of(env, self._identity)))
                else:
                    batches.setdefault(name, []).append(
                        delivery_record(name, key, env._replace(event=events[name]))
                    )
        out += [beam.pvalue.TaggedOutput(name, records) for name, records in batches.items()]
        panes = []
        profile = empty_profile()
        for env in envelopes:  # the consent snapshot of each event the store may not keep
            if id(env) not in kept_envs:  # (a kept one's comes with it, as the store keeps it)
                fold_consent(profile, env.event, env.event_time_ms)
        if kept:
            for (ts_ms, event), ids in zip(kept, kept_ids, strict=True):
                fold_event(profile, event, ts_ms, ids, self._trait_rules)
            if self._specs:
                panes = history_panes(self._specs, kept)
                for name, pane in panes:
                    fold_computed(profile, name, pane)
        if kept or profile["consent"]:
            out.append((key, profile))
        self._denied.inc(len(denials))
        self._delivered.inc(delivered)
        self._panes.inc(len(panes))
        return out


class PersonHistory(beam.PTransform):
    """``(profile_key, envelope)`` in (bounded input only). Main output: ``(profile_key, profile
    fragment)``; tagged outputs ``consent_denied``, ``deleted`` and one per destination other
    than the profile store, each a PCollection of record lists (one list per person), and
    ``failed``: dead letters ``((profile_key, [packed envelopes]), error)``."""

    def __init__(
        self,
        destinations,
        deleted_identifiers,
        identity,
        pii: tuple[tuple[PiiRule, ...], dict[str, tuple[dict, str]], str],
        profiles_destination: str,
        specs=(),
        trait_rules: TraitRules | None = None,
    ):
        super().__init__()
        self._destinations = tuple(destinations)
        names = [d.name for d in self._destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique: {names}")
        self._outputs = [d.name for d in self._destinations if d.name != profiles_destination]
        self._fn = _PersonHistoryFn(
            self._destinations,
            frozenset(deleted_identifiers),
            identity,
            pii,
            profiles_destination,
            tuple(specs),
            trait_rules or TraitRules(),
        )

    def expand(self, keyed):
        if not keyed.is_bounded:
            raise ValueError("PersonHistory needs a bounded input; streaming runs keep state")
        packed = keyed | "Pack" >> guarded(  # waits as bytes
            beam.FlatMap(one_or_dead_letter(lambda kv: (kv[0], pack(kv[1]))))
        )
        history = (
            packed.good
            | "History" >> beam.GroupByKey()
            | "JudgeAndFold"
            >> guarded(beam.ParDo(self._fn), DENIED, DELETED, *self._outputs, main=FRAGMENTS)
        )
        failed = (packed[FAILED], history[FAILED]) | "MergeFailed" >> beam.Flatten()
        outputs = {tag: history[tag] for tag in (FRAGMENTS, DENIED, DELETED, *self._outputs)}
        return {**outputs, FAILED: failed}
