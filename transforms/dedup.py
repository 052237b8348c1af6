"""Deduplication by idempotency key, in keyed Beam state with an event-time TTL.

Stream contract:
- Key: the values at the configured paths (default ``source`` and ``messageId``), joined.
- State per key: one ``(fingerprint, first messageId, first event time)`` tuple, constant size.
- TTL: an event-time timer at ``first event time + ttl`` clears the state, so state stays bounded
  while any replay whose copies fall inside the TTL is suppressed. In a bounded (batch) run the
  watermark only advances at the end, so every copy in the input is deduplicated (and no TTL
  timer is set: the state ends with the run).
- Outputs: the first copy on the main output; later identical copies (same payload fingerprint) to
  ``duplicates`` with the first copy's id; same key with a different payload to ``quarantine`` as
  ``dedup.collision`` (the first arrival wins, which is what an idempotency key promises).

The fingerprint ignores ``sentAt`` and ``receivedAt``: a client retry re-sends the same event with
new transport times, and that is still the same event.
"""

from __future__ import annotations

import hashlib
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.coders import StrUtf8Coder, TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration as BeamDuration

from transforms.envelope import Envelope, format_iso_ms, get_path
from transforms.quarantine import DUPLICATES, QUARANTINE, Violation, quarantine_record

_TRANSPORT_FIELDS = frozenset({"sentAt", "receivedAt"})

FIRST, DUPLICATE, COLLISION = "first", "duplicate", "collision"


def fingerprint(event: dict[str, Any]) -> str:
    """A stable digest of the event's content, transport times excluded, key order irrelevant."""
    content = {k: v for k, v in event.items() if k not in _TRANSPORT_FIELDS}
    blob = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def dedup_key(source: str, event: dict[str, Any], key_paths: tuple[str, ...]) -> str:
    """The idempotency key. ``source`` is the event's own ``source`` field when it has one (so a
    quarantine replay through another input keeps its key), else the configured source name."""
    parts = []
    for path in key_paths:
        v = (event.get("source") or source) if path == "source" else get_path(event, path)
        parts.append("" if v is None else str(v))
    return "\x1f".join(parts)


def decide(seen: tuple[str, str, int] | None, fp: str) -> str:
    """What to do with an event given the key's state: first copy, duplicate or collision."""
    if seen is None:
        return FIRST
    return DUPLICATE if seen[0] == fp else COLLISION


def duplicate_record(env: Envelope, key: str, first_message_id: str, first_time_ms: int) -> dict:
    return {
        "stage": "dedup",
        "reason": "dedup.duplicate",
        "key": key,
        "message_id": env.event.get("messageId"),
        "first_message_id": first_message_id,
        "first_event_time": format_iso_ms(first_time_ms),
        "source": env.source,
        "origin": env.origin,
        "received_at": env.event.get("receivedAt"),
        "payload": env.payload,
    }


class _DedupFn(beam.DoFn):
    SEEN_STATE = ReadModifyWriteStateSpec(
        "seen", TupleCoder([StrUtf8Coder(), StrUtf8Coder(), VarIntCoder()])
    )
    EXPIRY_TIMER = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, ttl_seconds: float, bounded: bool = False):
        self._ttl = BeamDuration(seconds=ttl_seconds)
        # Bounded input: the watermark passes every TTL only when the input is exhausted, so a
        # TTL timer could only clear state that dies with the run anyway; not setting one saves
        # a timer write and a firing per key.
        self._bounded = bounded
        self._first = Metrics.counter("cdi", "dedup.first")
        self._dups = Metrics.counter("cdi", "dedup.duplicates")
        self._collisions = Metrics.counter("cdi", "quarantined.dedup.collision")

    def process(
        self,
        element: tuple[str, Envelope],
        ts=beam.DoFn.TimestampParam,
        seen=beam.DoFn.StateParam(SEEN_STATE),
        expiry=beam.DoFn.TimerParam(EXPIRY_TIMER),
    ):
        key, env = element
        fp = fingerprint(env.event)
        state = seen.read()
        decision = decide(state, fp)
        if decision == FIRST:
            seen.write((fp, str(env.event.get("messageId", "")), env.event_time_ms))
            if not self._bounded:
                expiry.set(ts + self._ttl)
            self._first.inc()
            yield env
        elif decision == DUPLICATE:
            self._dups.inc()
            yield beam.pvalue.TaggedOutput(
                DUPLICATES, duplicate_record(env, key, state[1], state[2])
            )
        else:
            self._collisions.inc()
            violation = Violation(
                "dedup.collision",
                "messageId",
                f"key seen before (first {state[1]} at {format_iso_ms(state[2])}) with another payload",
            )
            yield beam.pvalue.TaggedOutput(
                QUARANTINE,
                quarantine_record(
                    stage="dedup",
                    violations=[violation],
                    payload=env.payload,
                    source=env.source,
                    origin=env.origin,
                    received_at=env.event.get("receivedAt"),
                    plan_version=env.plan_version,
                    message_id=env.event.get("messageId"),
                ),
            )

    @on_timer(EXPIRY_TIMER)
    def expire(self, seen=beam.DoFn.StateParam(SEEN_STATE)):
        seen.clear()


class DeduplicateEvents(beam.PTransform):
    """Envelopes in; unique envelopes out, plus ``duplicates`` and ``quarantine`` tagged outputs."""

    def __init__(
        self,
        key_paths: tuple[str, ...] = ("source", "messageId"),
        ttl_seconds: float = 7 * 86400,
        bounded: bool = False,
    ):
        super().__init__()
        self._bounded = bounded
        if not key_paths:
            raise ValueError("key_paths must not be empty")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._key_paths = tuple(key_paths)
        self._ttl = ttl_seconds

    def expand(self, envelopes):
        key_paths = self._key_paths
        return (
            envelopes
            | "KeyByIdempotencyKey"
            >> beam.Map(
                lambda env: (dedup_key(env.source, env.event, key_paths), env)
            ).with_output_types(beam.typehints.KV[str, Any])
            | "DropRepeats"
            >> beam.ParDo(_DedupFn(self._ttl, self._bounded)).with_outputs(
                DUPLICATES, QUARANTINE, main="unique"
            )
        )
