"""Typed dead-letter records: the one shape every rejected event takes, whatever the stage.

A quarantine record is a plain dict (JSON-ready) with ``stage``, ``reason`` (a stable code from
:data:`REASONS`), a human ``message`` with the JSON path, every ``violations`` entry found, the
tracking ``plan_version`` that judged it (when one did), the ``source``, the ``origin`` (file or
topic/partition/offset), the ``received_at`` time, and the untouched original ``payload`` text.
Records are never logged: payloads may carry PII.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

# Tagged-output names: part of the pipeline's output contract.
QUARANTINE = "quarantine"
DUPLICATES = "duplicates"

# Stable reason codes. Stages: decode -> validate -> event_time -> dedup.
REASONS = {
    "decode.malformed_json": "the payload is not valid JSON",
    "decode.not_an_object": "the payload is JSON but not an object",
    "decode.oversize": "the payload is larger than validation.max_event_bytes",
    "decode.bad_encoding": "the payload is not UTF-8",
    "event.unknown_type": "type is not one of track, identify, page, screen, group, alias",
    "event.missing_message_id": "messageId is missing or not a non-empty string",
    "event.missing_event_name": "a track event has no event name",
    "identity.missing": "neither userId nor anonymousId is a non-empty string",
    "event.unplanned": "the tracking plan has no entry for this event",
    "schema.required_missing": "a required property is missing",
    "schema.type_mismatch": "a value has the wrong JSON type",
    "schema.additional_property": "a property the plan does not declare",
    "schema.enum_violation": "a value outside the allowed set",
    "schema.format_violation": "a value that does not match the declared format or pattern",
    "schema.constraint_violation": "a value outside a declared bound (length, range, count)",
    "schema.too_deep": "the event nests deeper than validation.max_depth",
    "timestamp.invalid": "no parsable event time",
    "timestamp.out_of_range": "the event time is too far in the future or before the floor",
    "dedup.collision": "the idempotency key was seen before with a different payload",
    "internal.error": "a step of the job raised on this element (a bug): see `exception`",
}


@dataclass(frozen=True)
class Violation:
    reason: str
    path: str
    message: str
    # For schema.additional_property: the undeclared keys at ``path``.
    keys: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "path": self.path, "message": self.message}


def quarantine_record(
    *,
    stage: str,
    violations: list[Violation],
    payload: str,
    source: str,
    origin: str,
    received_at: str | None = None,
    plan_version: str | None = None,
    message_id: str | None = None,
    raw: bytes | None = None,
) -> dict[str, Any]:
    """The dead-letter record for one event; ``reason`` is the first violation's code.

    ``raw``: the original bytes when they are not text (``decode.bad_encoding``): the record
    then carries them as ``payload_base64`` and ``payload`` is their lossy UTF-8 reading."""
    first = violations[0]
    assert first.reason in REASONS, first.reason
    record = {
        "stage": stage,
        "reason": first.reason,
        "message": f"{first.path}: {first.message}" if first.path else first.message,
        "violations": [v.as_dict() for v in violations],
        "plan_version": plan_version,
        "source": source,
        "origin": origin,
        "message_id": message_id,
        "received_at": received_at,
        "payload": payload,
    }
    if raw is not None:
        record["payload_base64"] = base64.b64encode(raw).decode("ascii")
    return record
