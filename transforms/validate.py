"""Decode and validate: raw payloads in, valid :class:`Envelope` s out, everything else quarantined.

Stateless, so it runs before any keying (validate before keying: a bad event never touches
state). Order of checks, first failure decides the record's ``reason``: decode -> envelope (type,
messageId, identity) -> event time -> tracking plan. Each quarantine record carries every violation
found at the failing step. The event timestamp of every valid element is set to its corrected
event time, so downstream windows and TTL timers run on event time.
"""

from __future__ import annotations

import time
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

from transforms.dead_letter import dead_letter_on_raise, guarded
from transforms.envelope import (
    CONTROL_TYPES,
    Envelope,
    avro_record_to_event,
    check_event_time,
    corrected_event_time_ms,
    decode_json,
    decode_text,
    parse_iso_ms,
)
from transforms.identity import read_identifiers
from transforms.quarantine import QUARANTINE, Violation, quarantine_record
from transforms.tracking_plan import (
    NO_DEPTH_CHECK,
    TrackingPlan,
    apply_rule_modes,
    cannot_be_too_deep,
    compile_plan,
    depth_violations,
    envelope_violations,
    plan_violations,
)

# A raw input element: (source name, origin, payload). Payload is NDJSON text or an Avro record.
# A planned run's pass file holds a fourth item, the event's part (Envelope.part).
RawEvent = tuple[str, str, Any] | tuple[str, str, Any, int]


NO_PLAN = "none"  # the plan_version of events from a source without a tracking plan


def read_envelope(payload, max_event_bytes: int, identity) -> tuple:
    """Decode, the envelope rules (type, messageId, an identifier) and the identifiers: the
    first steps of :func:`judge`, which planning a run in passes takes alone
    (pipelines/passes.py). ``(text, event, raw bytes, identifiers, junk identifiers,
    refusal)``: the raw bytes only when the payload is not UTF-8 (kept for the record), the
    refusal ``(stage, violations)`` or None. A plain tuple: it is made for every event."""
    text, event, violation, raw_bytes = _decode(payload, max_event_bytes)
    if violation is not None:
        return text, event, raw_bytes, None, None, ("decode", [violation])
    violations = envelope_violations(event)
    if violations:
        return text, event, raw_bytes, None, None, ("validate", violations)
    ids, junk = read_identifiers(event, identity)
    if not ids:
        # The same rule that keys the event (transforms.identity.primary_profile_key): an event
        # is kept only when it has a usable identifier to be keyed by.
        missing = Violation(
            "identity.missing", "anonymousId", "every identifier is blocklisted junk"
        )
        return text, event, raw_bytes, ids, junk, ("validate", [missing])
    return text, event, raw_bytes, ids, junk, None


def _decode(
    payload, max_event_bytes: int
) -> tuple[str, dict | None, Violation | None, bytes | None]:
    """``(text, event, violation, raw bytes)`` of a raw payload: an NDJSON line as bytes or
    text, or an Avro record; the bytes only when they are not UTF-8 (kept for the record)."""
    if isinstance(payload, dict):  # an Avro record of the canonical envelope
        text = orjson.dumps(payload).decode()
        event, violation = avro_record_to_event(payload)
        return text, event, violation, None
    if isinstance(payload, bytes):  # an NDJSON line as read from the file
        text, violation = decode_text(payload)
        if violation is not None:
            return payload.decode("utf-8", "replace"), None, violation, payload
    else:
        text = payload
    event, violation = decode_json(text, max_event_bytes)
    return text, event, violation, None


def judge(
    raw: RawEvent,
    plan,
    *,
    max_event_bytes: int,
    max_depth: int,
    max_future_skew_ms: int,
    floor_ms: int,
    identity,
    clamp_event_time: bool = False,
    rule_modes: dict[str, str] | None = None,
    now_ms: int | None = None,
) -> tuple[Envelope | None, dict | None]:
    """The whole stateless verdict on one raw event: ``(envelope, None)`` or ``(None, record)``.

    ``plan`` is a :class:`~transforms.tracking_plan.CompiledPlan`, or None for a source without
    a tracking plan (envelope rules and the depth limit only; ``plan_version`` ``none``);
    ``identity`` an IdentityConfig; ``now_ms`` the time the job reads the event (the upper
    bound of event times without a ``receivedAt``, see :func:`check_event_time`).
    """
    source, origin, payload = raw[:3]
    text, event, raw_bytes, ids, junk, refusal = read_envelope(payload, max_event_bytes, identity)

    def reject(stage: str, violations: list[Violation], version: str | None = None):
        received = event.get("receivedAt") if event else None
        mid = event.get("messageId") if event else None
        return None, quarantine_record(
            stage=stage,
            violations=violations,
            payload=text,
            source=source,
            origin=origin,
            received_at=received if isinstance(received, str) else None,
            plan_version=version,
            message_id=mid if isinstance(mid, str) else None,
            raw=raw_bytes,
        )

    if refusal is not None:
        return reject(*refusal)
    event_time = corrected_event_time_ms(event)
    violation = check_event_time(event, event_time, max_future_skew_ms, floor_ms, now_ms)
    if violation is not None and clamp_event_time:
        received = parse_iso_ms(event.get("receivedAt"))
        if received is not None:
            # Configured to keep such events at their receive time (never later than the
            # time the job read them); say so on the event.
            ctx = event.setdefault("context", {})
            if isinstance(ctx, dict):  # a malformed context is the plan's to judge, not a crash
                ctx["cdi_clamped_event_time"] = violation.message
            event_time = received if now_ms is None else min(received, now_ms)
            violation = None
    if violation is not None:
        return reject("event_time", [violation])
    version = plan.plan.version if plan is not None else NO_PLAN
    if cannot_be_too_deep(text, max_depth):
        # Validation adds at most one level (a clamped event's context), and the count is
        # strict, so skipping the walk cannot let a too-deep event through.
        max_depth = NO_DEPTH_CHECK
    if event.get("type") in CONTROL_TYPES:
        violations = []  # control events carry no behaviour for a plan to judge
    elif plan is None:
        violations = depth_violations(event, max_depth)
    elif rule_modes:
        violations, notes = apply_rule_modes(event, plan, max_depth, rule_modes)
        if notes and not violations:
            ctx = event.setdefault("context", {})
            if isinstance(ctx, dict):
                ctx["cdi"] = {"plan_version": version, "violations": notes}
            # An `omit` rule may have removed a field an identifier is read from: the
            # envelope carries the identifiers of the event as it goes on.
            ids, junk = read_identifiers(event, identity)
    else:
        violations = plan_violations(event, plan, max_depth)
    if violations:
        return reject("validate", violations, version)
    event.setdefault("source", source)
    part = raw[3] if len(raw) > 3 else None
    return Envelope(source, origin, text, event, event_time, version, ids, junk, part), None


class _ValidateFn(beam.DoFn):
    def __init__(
        self,
        plans_by_source: dict[str, TrackingPlan],
        settings: dict[str, Any],
        identity,
        modes: dict[str, dict[str, str]],
        clock=time.time,
    ):
        self._clock = clock  # the read time bounds event times without receivedAt
        self._plans = plans_by_source
        self._modes = modes
        self._settings = settings
        self._identity = identity
        self._valid = Metrics.counter("cdi", "valid")
        self._events_in = Metrics.counter("cdi", "events_in")

    def setup(self):
        # Compile once per worker process; fastjsonschema output is not picklable anyway.
        self._compiled = {
            s: (compile_plan(p) if p is not None else None) for s, p in self._plans.items()
        }
        self._quarantined: dict[str, Any] = {}

    @dead_letter_on_raise
    def process(self, raw: RawEvent):
        self._events_in.inc()
        env, record = judge(
            raw,
            self._compiled[raw[0]],
            identity=self._identity,
            rule_modes=self._modes.get(raw[0]),
            now_ms=int(self._clock() * 1000),
            **self._settings,
        )
        if env is not None:
            self._valid.inc()
            yield beam.window.TimestampedValue(env, env.event_time_ms / 1000.0)
        else:
            reason = record["reason"]
            counter = self._quarantined.get(reason)
            if counter is None:
                counter = self._quarantined[reason] = Metrics.counter(
                    "cdi", "quarantined." + reason
                )
            counter.inc()
            yield beam.pvalue.TaggedOutput(QUARANTINE, record)


class ValidateEvents(beam.PTransform):
    """Raw events in; ``valid`` envelopes (timestamped by event time), ``quarantine`` records and
    ``failed`` dead letters (raw events the step raised on, see transforms/dead_letter.py) out.

    ``plans_by_source``: every source's plan, None for a source without one (envelope rules and
    the depth limit only). ``clock``: seconds since the epoch, the read time of an event."""

    def __init__(
        self,
        plans_by_source: dict[str, TrackingPlan | None],
        identity,
        *,
        max_event_bytes: int = 32768,
        max_depth: int = 16,
        max_future_skew_ms: int = 3600_000,
        floor_ms: int = 1420070400000,  # 2015-01-01
        clamp_event_time: bool = False,
        rule_modes: dict[str, dict[str, str]] | None = None,
        clock=time.time,
    ):
        super().__init__()
        self._modes = {s: dict(m) for s, m in (rule_modes or {}).items() if m}
        self._clock = clock
        if not plans_by_source:
            raise ValueError("at least one source is required")
        if max_event_bytes <= 0 or max_depth <= 0 or max_future_skew_ms < 0:
            raise ValueError("limits must be positive")
        self._plans = dict(plans_by_source)
        self._identity = identity
        self._settings = {
            "max_event_bytes": max_event_bytes,
            "max_depth": max_depth,
            "max_future_skew_ms": max_future_skew_ms,
            "floor_ms": floor_ms,
            "clamp_event_time": clamp_event_time,
        }

    def judge_locally(self):
        """``judge(raw, now_ms) -> (envelope, record)``: this stage's verdict outside a
        pipeline (planning a run in passes reads the input with it)."""
        compiled = {s: (compile_plan(p) if p is not None else None) for s, p in self._plans.items()}
        identity, modes, settings = self._identity, self._modes, self._settings

        def verdict(raw: RawEvent, now_ms: int):
            return judge(
                raw,
                compiled[raw[0]],
                identity=identity,
                rule_modes=modes.get(raw[0]),
                now_ms=now_ms,
                **settings,
            )

        return verdict

    def fn(self) -> _ValidateFn:
        """This stage's DoFn (a planned pass calls it per event inside a part's call:
        transforms/planned_parts.py)."""
        return _ValidateFn(self._plans, self._settings, self._identity, self._modes, self._clock)

    def expand(self, raw_events):
        return raw_events | "Judge" >> guarded(beam.ParDo(self.fn()), QUARANTINE, main="valid")
