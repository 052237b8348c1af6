"""Consent enforcement and deletion, per person, by event time, before fan-out.

Stream contract:
- Keyed by profile key. Consent observations come from ``context.consent.categoryPreferences``
  on any event (a snapshot of the purposes it names) and are kept as a timeline by event time.
- Each event is held in a bag until the watermark passes its event time, so every consent change
  with an earlier event time has arrived before it is judged; then it is judged by the consent in
  force *at its own event time*. A withdrawal therefore applies to every later event, including
  ones that arrived before it out of order; a late event older than the withdrawal is judged by
  the consent of its own time. In a bounded run every event is judged after all input is read.
- Default deny: a destination receives an event only if every purpose it needs was granted in
  the latest observation (by event time, then messageId) at or before the event's time.
- Deletion: a ``delete`` control event (or an identifier listed in ``privacy.deleted_identifiers``)
  purges the person's held events and consent state and suppresses every event for the person
  from then on; the tombstone stays in state, and because the delete event is part of the
  history, replaying that history suppresses the same events again. A deleted person's profile is
  removed from the sink.
- State per key: the timeline (one entry per consent change), the held events (drained at each
  watermark step), a deletion flag.
- Bounded runs: the watermark passes every event time at once, when the input is exhausted, so
  there is nothing to hold: :mod:`transforms.person_history` groups each person's events and
  judges the whole history at once by :func:`judge_history`, the same rules as the stateful path
  with no per-event state read, write or timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp

from transforms.dead_letter import FAILED, dead_letter, dead_letter_on_raise
from transforms.envelope import Envelope
from transforms.identity import extract_identifiers

DENIED = "consent_denied"
DELETED = "deleted"
DELETE_TYPE = "delete"
# The main output's instruction to remove a deleted person's profile.
PROFILES_DELETE = "profiles-delete"
# An event the profile store may not keep but whose consent snapshot the profile must know.
PROFILES_CONSENT = "profiles-consent"


@dataclass(frozen=True)
class DestinationRule:
    name: str
    purposes: tuple[str, ...]


# --- pure core ---------------------------------------------------------------------------------


CONSENT_EVENT = "Consent Updated"


def consent_observation(event: dict[str, Any]) -> dict[str, bool] | None:
    """The purposes -> granted snapshot an event carries, if any: an explicit ``Consent Updated``
    track event's ``properties.categoryPreferences`` (or ``properties.consent.categoryPreferences``)
    first, else ``context.consent.categoryPreferences`` (Segment's consent spec) on any event.
    Only ``true`` grants: anything else is a denial."""
    candidates = []
    if event.get("type") == "track" and event.get("event") == CONSENT_EVENT:
        props = event.get("properties")
        if isinstance(props, dict):
            candidates.append(props.get("categoryPreferences"))
            consent = props.get("consent")
            if isinstance(consent, dict):
                candidates.append(consent.get("categoryPreferences"))
    ctx = event.get("context")
    if isinstance(ctx, dict) and isinstance(ctx.get("consent"), dict):
        candidates.append(ctx["consent"].get("categoryPreferences"))
    for prefs in candidates:
        if isinstance(prefs, dict):
            return {str(k): v is True for k, v in prefs.items()}
    return None


def merged_consent_at(timelines: list[list], t_ms: int) -> dict[str, bool]:
    """Consent of a merged person at ``t_ms``: the most restrictive of its parts. A purpose is
    granted only if every merged part granted it at that time (for identity stitching merges)."""
    states = [consent_at(tl, t_ms) for tl in timelines]
    purposes = set().union(*states) if states else set()
    return {p: all(s.get(p, False) for s in states) for p in purposes}


def add_observation(timeline: list, t_ms: int, message_id: str, prefs: dict[str, bool]) -> list:
    """Insert an observation, keeping the timeline sorted by (time, messageId), no duplicates."""
    entry = [t_ms, message_id, prefs]
    if entry not in timeline:
        timeline = sorted([*timeline, entry], key=lambda e: (e[0], e[1]))
    return timeline


def consent_at(timeline: list, t_ms: int) -> dict[str, bool]:
    """Per purpose, the latest observation at or before ``t_ms`` that names it."""
    state: dict[str, bool] = {}
    for obs_t, _mid, prefs in timeline:  # sorted, so later observations overwrite earlier ones
        if obs_t > t_ms:
            break
        state.update(prefs)
    return state


def judge_destinations(
    consent: dict[str, bool], destinations: tuple[DestinationRule, ...]
) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``(allowed destination names, [(denied name, missing purposes)])``; default deny."""
    allowed, denied = [], []
    for d in destinations:
        missing = [p for p in d.purposes if not consent.get(p, False)]
        if missing:
            denied.append((d.name, missing))
        else:
            allowed.append(d.name)
    return allowed, denied


def is_deletion(event: dict[str, Any]) -> bool:
    return event.get("type") == DELETE_TYPE


def deletes_person(event: dict[str, Any], deleted_ids: frozenset, identity) -> bool:
    """A ``delete`` control event, or an event carrying an identifier listed in
    ``privacy.deleted_identifiers`` (``type:value``)."""
    if is_deletion(event):
        return True
    if not deleted_ids:
        return False
    return any(f"{t}:{v}" in deleted_ids for t, v in extract_identifiers(event, identity))


def judge_history(
    envelopes: list[Envelope], destinations: tuple[DestinationRule, ...]
) -> tuple[list[tuple[list[str], Envelope]], list[tuple[Envelope, str, list[str]]]]:
    """A person's whole history at once (bounded input, the person not deleted):
    ``(deliveries, denials)``, each event judged by the consent in force at its own time."""
    timeline: list = []
    for env in envelopes:
        prefs = consent_observation(env.event)
        if prefs is not None:
            timeline = add_observation(
                timeline, env.event_time_ms, env.event.get("messageId", ""), prefs
            )
    deliveries, denials = [], []
    for env in envelopes:
        allowed, denied = judge_destinations(consent_at(timeline, env.event_time_ms), destinations)
        if allowed:
            deliveries.append((allowed, env))
        denials.extend((env, name, missing) for name, missing in denied)
    return deliveries, denials


# --- Beam shell --------------------------------------------------------------------------------


class _EnforceConsentFn(beam.DoFn):
    TIMELINE_STATE = ReadModifyWriteStateSpec("consent_timeline", FastPrimitivesCoder())
    HELD_STATE = BagStateSpec("held", FastPrimitivesCoder())
    DELETED_STATE = ReadModifyWriteStateSpec("deleted", VarIntCoder())
    ARMED_STATE = ReadModifyWriteStateSpec("armed", VarIntCoder())
    RELEASE_TIMER = TimerSpec("release", TimeDomain.WATERMARK)

    def __init__(
        self,
        destinations: tuple[DestinationRule, ...],
        deleted_identifiers: frozenset,
        identity,
        profiles: str | None = None,
    ):
        self._destinations = destinations
        self._profiles = profiles
        self._deleted_ids = deleted_identifiers
        self._identity = identity
        self._denied = Metrics.counter("cdi", "consent.denied")
        self._suppressed = Metrics.counter("cdi", "privacy.deleted")
        self._delivered = Metrics.counter("cdi", "delivered")

    @dead_letter_on_raise
    def process(
        self,
        element: tuple[str, Envelope],
        held=beam.DoFn.StateParam(HELD_STATE),
        timeline_state=beam.DoFn.StateParam(TIMELINE_STATE),
        deleted=beam.DoFn.StateParam(DELETED_STATE),
        armed=beam.DoFn.StateParam(ARMED_STATE),
        timer=beam.DoFn.TimerParam(RELEASE_TIMER),
    ):
        key, env = element
        if deleted.read() is not None:
            self._suppressed.inc()
            yield beam.pvalue.TaggedOutput(DELETED, deleted_record(env, key))
            return
        if deletes_person(env.event, self._deleted_ids, self._identity):
            # Purge: everything held for this person is suppressed, consent state dropped.
            for old in held.read():
                self._suppressed.inc()
                yield beam.pvalue.TaggedOutput(DELETED, deleted_record(_envelope(old), key))
            held.clear()
            timeline_state.clear()
            armed.clear()
            deleted.write(env.event_time_ms)
            self._suppressed.inc()
            yield beam.pvalue.TaggedOutput(DELETED, deleted_record(env, key))
            yield ((PROFILES_DELETE,), key, None)
            return
        # The pure rule first, state after: an event that raises has changed nothing.
        prefs = consent_observation(env.event)
        if prefs is not None:
            timeline = add_observation(
                timeline_state.read() or [],
                env.event_time_ms,
                env.event.get("messageId", ""),
                prefs,
            )
            timeline_state.write(timeline)
        held.add(tuple(env))
        current = armed.read()
        if current is None or env.event_time_ms < current:
            armed.write(env.event_time_ms)
            timer.set(Timestamp(micros=env.event_time_ms * 1000))

    @on_timer(RELEASE_TIMER)
    @dead_letter_on_raise
    def release(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        held=beam.DoFn.StateParam(HELD_STATE),
        timeline_state=beam.DoFn.StateParam(TIMELINE_STATE),
        armed=beam.DoFn.StateParam(ARMED_STATE),
        timer=beam.DoFn.TimerParam(RELEASE_TIMER),
    ):
        now_ms = int(fired.micros // 1000)
        timeline = timeline_state.read() or []
        keep = []
        for item in held.read():
            env = _envelope(item)
            if env.event_time_ms > now_ms:
                keep.append(item)
                continue
            try:  # one bad held event costs its own dead letter, not the others' release
                allowed, denied = judge_destinations(
                    consent_at(timeline, env.event_time_ms), self._destinations
                )
                records = [denied_record(env, key, name, missing) for name, missing in denied]
            except Exception as e:
                yield dead_letter((key, env), e)
                continue
            if allowed:
                # One element per event, not per destination: PII redaction downstream
                # classifies the event once for all of them.
                self._delivered.inc(len(allowed))
                yield (tuple(allowed), key, env)
            if (
                self._profiles is not None
                and self._profiles not in allowed
                and consent_observation(env.event) is not None
            ):
                yield ((PROFILES_CONSENT,), key, env)  # only its consent reaches the profile
            self._denied.inc(len(records))
            for record in records:
                yield beam.pvalue.TaggedOutput(DENIED, record)
        held.clear()
        armed.clear()
        for item in keep:
            held.add(item)
        if keep:
            nxt = min(_envelope(i).event_time_ms for i in keep)
            armed.write(nxt)
            timer.set(Timestamp(micros=nxt * 1000))


def _envelope(item) -> Envelope:
    return item if isinstance(item, Envelope) else Envelope(*item)


def deleted_record(env: Envelope, key: str) -> dict:
    # No payload: the person asked to be forgotten.
    return {
        "stage": "consent",
        "reason": "privacy.deleted",
        "profile_key": key,
        "message_id": env.event.get("messageId"),
        "source": env.source,
    }


def denied_record(env: Envelope, key: str, destination: str, missing: list[str]) -> dict:
    # No payload: the event must not travel further than the consent allows, not even here.
    return {
        "stage": "consent",
        "reason": "consent.denied",
        "destination": destination,
        "missing_purposes": missing,
        "profile_key": key,
        "message_id": env.event.get("messageId"),
        "source": env.source,
    }


class EnforceConsent(beam.PTransform):
    """``(profile_key, envelope)`` in. Main output: ``(allowed destinations, profile_key,
    envelope)`` once per event allowed anywhere, plus ``(("profiles-delete",), profile_key,
    None)`` for deleted persons; tagged ``consent_denied`` and ``deleted`` records, and
    ``failed`` dead letters (``(profile_key, envelope)`` the step raised on)."""

    def __init__(self, destinations, deleted_identifiers=(), identity=None, profiles=None):
        """``profiles``: the profile store's destination name; an event it may not keep but
        that carries a consent snapshot then also goes out as ``(("profiles-consent",),
        profile_key, envelope)``: the profile learns a withdrawal it may not store the event
        of."""
        super().__init__()
        self._profiles = profiles
        self._destinations = tuple(destinations)
        names = [d.name for d in self._destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique: {names}")
        self._deleted = frozenset(deleted_identifiers)
        if self._deleted and identity is None:
            raise ValueError("deleted_identifiers need the identity config to match identifiers")
        self._identity = identity

    def expand(self, keyed):
        return keyed | "Judge" >> beam.ParDo(
            _EnforceConsentFn(self._destinations, self._deleted, self._identity, self._profiles)
        ).with_outputs(DENIED, DELETED, FAILED, main="delivered")
