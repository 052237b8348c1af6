"""Deduplication by idempotency key, in keyed Beam state with an event-time TTL.

Stream contract:
- Key: the values at the configured paths (default ``source`` and ``messageId``), joined.
- State per key: one ``(fingerprint, first messageId, first event time)`` tuple, constant size.
- TTL: an event-time timer at ``first event time + ttl`` clears the state, so state stays bounded
  while any replay whose copies fall inside the TTL is suppressed.
- Outputs: the first copy on the main output; later identical copies (same payload fingerprint) to
  ``duplicates`` with the first copy's id; same key with a different payload to ``quarantine`` as
  ``dedup.collision`` (the first arrival wins, which is what an idempotency key promises).
- Bounded runs group each key's copies (GroupByKey) and take them in the order the collector
  received them (``receivedAt``, then the payload text; :func:`arrival_order`), so "first" is the
  first one received whatever order the files list them in, and no state or timer is needed.

The fingerprint ignores ``sentAt``, ``receivedAt`` and ``messageId``: a client retry re-sends
the same event with new transport times, and a server that rebuilds a retried order under a
business key (``properties.order_id``) gives it a new ``messageId``; both are still the same
event. Under the default key the ``messageId`` is part of the key, so ignoring it there changes
nothing. (State written by a version that still fingerprinted the ``messageId`` calls such a
retry a collision until that key's TTL ends.)
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
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration as BeamDuration
from apache_beam.utils.timestamp import Timestamp

from transforms.dead_letter import FAILED, dead_letter_on_raise, guarded, one_or_dead_letter
from transforms.envelope import Envelope, format_iso_ms, get_path, pack, parse_iso_ms, unpack
from transforms.quarantine import DUPLICATES, QUARANTINE, Violation, quarantine_record

# Not content: transport times, and the id a sender gives each try (module doc).
_NOT_CONTENT = frozenset({"sentAt", "receivedAt", "messageId"})

FIRST, DUPLICATE, COLLISION = "first", "duplicate", "collision"


def fingerprint(event: dict[str, Any]) -> str:
    """A stable digest of the event's content (transport times and ``messageId`` excluded), key
    order irrelevant."""
    content = {k: v for k, v in event.items() if k not in _NOT_CONTENT}
    blob = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def dedup_key(source: str, event: dict[str, Any], key_paths: tuple[str, ...]) -> str:
    """The idempotency key. ``source`` is the event's own ``source`` field when it has one (so a
    quarantine replay through another input keeps its key), else the configured source name.

    An event without a value at one of the other paths (a page view under a key of
    ``properties.order_id``) is keyed by its source and ``messageId`` instead, apart from every
    business key: events that lack the business key are not copies of each other."""
    src = event.get("source") or source
    parts = []
    for path in key_paths:
        v = src if path == "source" else get_path(event, path)
        if v is None:
            return message_id_key(source, event)
        parts.append(str(v))
    return "\x1f".join(parts)


def message_id_key(source: str, event: dict[str, Any]) -> str:
    """The key of an event without a value at one of the key paths: its source and
    ``messageId``, apart from every business key (:func:`dedup_key`)."""
    src = event.get("source") or source
    return "\x1e".join(("", "messageId", str(src), str(event.get("messageId"))))


def decide(seen: tuple[str, str, int] | None, fp: str) -> str:
    """What to do with an event given the key's state: first copy, duplicate or collision."""
    if seen is None:
        return FIRST
    return DUPLICATE if seen[0] == fp else COLLISION


_NEVER_RECEIVED = 2**63  # copies without a receivedAt sort after every received one


def arrival_order(env: Envelope) -> tuple[int, str]:
    """The order a bounded run takes a key's copies in: when the collector received them."""
    received = parse_iso_ms(env.event.get("receivedAt"))
    return (_NEVER_RECEIVED if received is None else received), env.payload


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


class _CopyJudge:
    """The per-copy decision with its counters, shared by the stateful and the grouped path.
    Counters are bumped only once an element's outputs are all made (:meth:`_tally`): an element
    that raises half-way goes to the dead letters and must not be counted unique as well."""

    def _count(self) -> None:
        self._counters = {
            FIRST: Metrics.counter("cdi", "dedup.first"),
            DUPLICATE: Metrics.counter("cdi", "dedup.duplicates"),
            COLLISION: Metrics.counter("cdi", "quarantined.dedup.collision"),
        }

    def _tally(self, decisions: list[str]) -> None:
        for decision in decisions:
            self._counters[decision].inc()

    def _judge(self, key: str, env: Envelope, state):
        """``(decision, outputs, new state or None)`` for one copy given the key's state."""
        fp = fingerprint(env.event)
        decision = decide(state, fp)
        if decision == FIRST:
            return decision, [env], (fp, str(env.event.get("messageId", "")), env.event_time_ms)
        if decision == DUPLICATE:
            record = duplicate_record(env, key, state[1], state[2])
            return decision, [beam.pvalue.TaggedOutput(DUPLICATES, record)], None
        violation = Violation(
            "dedup.collision",
            "messageId",
            f"key seen before (first {state[1]} at {format_iso_ms(state[2])}) with another payload",
        )
        record = quarantine_record(
            stage="dedup",
            violations=[violation],
            payload=env.payload,
            source=env.source,
            origin=env.origin,
            received_at=env.event.get("receivedAt"),
            plan_version=env.plan_version,
            message_id=env.event.get("messageId"),
        )
        return decision, [beam.pvalue.TaggedOutput(QUARANTINE, record)], None


class _DedupFn(beam.DoFn, _CopyJudge):
    SEEN_STATE = ReadModifyWriteStateSpec(
        "seen", TupleCoder([StrUtf8Coder(), StrUtf8Coder(), VarIntCoder()])
    )
    EXPIRY_TIMER = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, ttl_seconds: float):
        self._ttl = BeamDuration(seconds=ttl_seconds)
        self._count()

    @dead_letter_on_raise
    def process(
        self,
        element: tuple[str, Envelope],
        ts=beam.DoFn.TimestampParam,
        seen=beam.DoFn.StateParam(SEEN_STATE),
        expiry=beam.DoFn.TimerParam(EXPIRY_TIMER),
    ):
        key, env = element
        decision, outputs, first = self._judge(key, env, seen.read())
        if first is not None:  # state is written once the pure decision is made
            seen.write(first)
            expiry.set(ts + self._ttl)
        self._tally([decision])
        yield from outputs

    @on_timer(EXPIRY_TIMER)
    def expire(self, seen=beam.DoFn.StateParam(SEEN_STATE)):
        seen.clear()


class _DedupHistoryFn(beam.DoFn, _CopyJudge):
    """Bounded runs: ``(key, all its copies)`` in, the same outputs as the stateful path, the
    copies taken in :func:`arrival_order`."""

    def __init__(self):
        self._count()

    @dead_letter_on_raise
    def process(self, element):
        key, packed = element
        return self.copies(key, map(unpack, packed))

    def copies(self, key: str, envelopes) -> list:
        """The outputs for one key's copies (a planned pass calls this per key inside a part's
        call: transforms/planned_parts.py); the counters are bumped once all are made."""
        state = None
        decisions, out = [], []
        for env in sorted(envelopes, key=arrival_order):
            decision, outputs, first = self._judge(key, env, state)
            decisions.append(decision)
            if first is not None:
                state = first
                # Stamped with its event time again, as the event left validation, and without
                # the original text: its only later use is the late output, and nothing is late
                # in a bounded run. Later shuffles then carry the parsed event alone.
                kept = env._replace(payload="")
                outputs = [TimestampedValue(kept, Timestamp(micros=env.event_time_ms * 1000))]
            out += outputs
        self._tally(decisions)
        return out


class DeduplicateEvents(beam.PTransform):
    """Envelopes in; unique envelopes out, plus ``duplicates``, ``quarantine`` and ``failed``
    (dead letters: a key's copies the step raised on) tagged outputs."""

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
        # Bounded: a key's copies wait for their group as bytes (envelope.pack), packed in the
        # same step that keys them.
        value = pack if self._bounded else (lambda env: env)
        keyed = envelopes | "KeyByIdempotencyKey" >> guarded(
            beam.FlatMap(
                one_or_dead_letter(
                    lambda env: (dedup_key(env.source, env.event, key_paths), value(env))
                )
            ).with_output_types(beam.typehints.KV[str, Any])
        )
        if self._bounded:
            # A key's copies are grouped once instead of a state read (and write) per copy.
            judged = (
                keyed.good
                | "Copies" >> beam.GroupByKey()
                | "DropRepeatsOfCopies"
                >> guarded(beam.ParDo(_DedupHistoryFn()), DUPLICATES, QUARANTINE, main="unique")
            )
        else:
            judged = keyed.good | "DropRepeats" >> beam.ParDo(_DedupFn(self._ttl)).with_outputs(
                DUPLICATES, QUARANTINE, FAILED, main="unique"
            )
        failed = (keyed[FAILED], judged[FAILED]) | "MergeFailed" >> beam.Flatten()
        return {
            "unique": judged.unique,
            DUPLICATES: judged[DUPLICATES],
            QUARANTINE: judged[QUARANTINE],
            FAILED: failed,
        }
