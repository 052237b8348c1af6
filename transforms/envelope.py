"""The event envelope: decoding at the edge and the corrected event time.

Pure functions only. Newline-delimited JSON and Avro records of the canonical envelope
(``schemas/envelope.avsc``) both decode to a Segment-spec ``dict``; anything that cannot be decoded
becomes a :class:`~transforms.quarantine.Violation`, never an exception that kills the bundle.

Event time follows the peers' clock-skew correction: an explicit ``timestamp`` wins (server-side
imports set it on purpose); otherwise ``receivedAt - (sentAt - originalTimestamp)`` when all three are
present; otherwise ``originalTimestamp``; otherwise ``receivedAt``.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

import orjson

from transforms.quarantine import Violation

EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
# Control events: instructions about a person, not behaviour. They pass the envelope checks (type,
# messageId, identity, event time) but no tracking plan, and never reach a destination or a
# profile's counts: ``delete`` erases an identifier (transforms.consent), ``unlink`` detaches
# ``properties.identifier`` from the event's person (transforms.stitching).
CONTROL_TYPES = frozenset({"delete", "unlink"})

# Envelope fields that carry JSON objects as text in Avro.
_AVRO_JSON_FIELDS = ("properties", "traits", "context", "integrations")
_AVRO_STRING_FIELDS = (
    "source", "type", "messageId", "anonymousId", "userId", "previousId", "groupId", "event",
    "name", "timestamp", "originalTimestamp", "sentAt", "receivedAt",
)  # fmt: skip


class Envelope(NamedTuple):
    """One event on its way through the pipeline (a tuple: cheap to encode between stages)."""

    source: str
    origin: str  # where it came from: file path, or topic/partition@offset
    payload: str  # the original text, untouched, for quarantine and audit
    event: dict[str, Any]
    event_time_ms: int = 0
    plan_version: str = ""
    # The event's usable identifiers, ``((type, value), ...)`` in config priority order, and its
    # blocklisted ones, read once by validation (:func:`transforms.identity.read_identifiers`)
    # and carried, so the later stages do not read them again; None when not read (tests,
    # dead-letter replays): :func:`transforms.identity.identifiers_of` then reads them.
    identifiers: tuple | None = None
    junk_identifiers: tuple | None = None
    # The connected part of the input (pipelines/passes.py), from a raw event's fourth item.
    # No stage reads it since a pass reads each part whole (transforms/io/files.py:
    # ReadPlannedParts); kept so that envelopes held in streaming state (consent's held
    # events) by the release that added it still decode.
    part: int | None = None


def pack(env: Envelope) -> bytes:
    """The envelope as compact JSON bytes, for values that wait in a shuffle (bounded runs).

    Why: Beam's local runner holds a stage's whole shuffled input in memory several times over
    when the stage starts (the grouped values, the re-encoded stream, the copy handed to the
    worker), so a run's peak memory is a multiple of its largest shuffle's size. orjson bytes are
    the smallest faithful form of an envelope, and faster to encode and decode than Beam's
    generic coder. An event came from JSON or Avro, so it round-trips (:func:`unpack`) unchanged.

    When the event is its payload's JSON with some top-level keys added or changed (validation
    sets ``source`` and may annotate ``context``), only those keys are stored next to the
    payload instead of a second copy of the whole event: that halves what the dedup shuffle, the
    largest one, holds. The shortcut is taken only when the rebuilt event encodes to exactly the
    same bytes (keys, order, types), otherwise the whole event is stored."""
    event_json = orjson.dumps(env.event)
    if env.payload:
        patch = _patch_over_payload(env.payload, env.event, event_json)
        if patch is not None:
            return orjson.dumps((*env[:3], patch, *env[4:], _PATCHED))
    return orjson.dumps((*env[:3], orjson.Fragment(event_json), *env[4:]))


def unpack(blob: bytes) -> Envelope:
    fields = orjson.loads(blob)
    if len(fields) == len(Envelope._fields) + 1:  # an event stored as a patch over its payload
        fields.pop()
        fields[3] = {**orjson.loads(fields[2]), **fields[3]}
    for i in _ID_FIELDS:  # JSON has no tuples: the pairs come back as lists
        if fields[i] is not None:
            fields[i] = tuple(map(tuple, fields[i]))
    return Envelope(*fields)


_ID_FIELDS = (Envelope._fields.index("identifiers"), Envelope._fields.index("junk_identifiers"))


_PATCHED = 1  # trailing marker of a packed envelope whose event is a patch over its payload


def _patch_over_payload(payload: str, event: dict[str, Any], event_json: bytes) -> dict | None:
    """The top-level keys of ``event`` that differ from ``payload``'s JSON, if that JSON updated
    with them encodes exactly as ``event_json``; else None."""
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    patch = {k: v for k, v in event.items() if k not in parsed or parsed[k] != v}
    if orjson.dumps({**parsed, **patch}) != event_json:
        return None  # a key removed, reordered, or a value equal but of another type (1 vs 1.0)
    return patch


# --- decoding ----------------------------------------------------------------------------------


_BOM = b"\xef\xbb\xbf"


def decode_text(line: bytes) -> tuple[str | None, Violation | None]:
    """One raw line as text: UTF-8, a leading byte-order mark dropped (editors on Windows write
    one at the top of a file); ``(None, decode.bad_encoding)`` when it is not UTF-8."""
    if line.startswith(_BOM):
        line = line[3:]
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, Violation(
            "decode.bad_encoding", "", f"not UTF-8: byte {e.start} is 0x{line[e.start]:02x}"
        )


def decode_json(
    payload: str | bytes, max_bytes: int
) -> tuple[dict[str, Any] | None, Violation | None]:
    """Parse one NDJSON line. Returns ``(event, None)`` or ``(None, violation)``."""
    size = len(payload)
    # A str's UTF-8 size lies between len and 4 * len: encode only when that range straddles
    # the limit, so the common small event costs no copy.
    if isinstance(payload, str) and size <= max_bytes < 4 * size:
        size = len(payload.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return None, Violation("decode.oversize", "", f"payload is {size} bytes, limit {max_bytes}")
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        reason = "decode.bad_encoding" if "utf-8" in str(e).lower() else "decode.malformed_json"
        return None, Violation(reason, "", f"invalid JSON: {e}")
    if not isinstance(value, dict):
        return None, Violation(
            "decode.not_an_object", "", f"expected a JSON object, got {type(value).__name__}"
        )
    return value, None


def avro_record_to_event(record: dict[str, Any]) -> tuple[dict[str, Any] | None, Violation | None]:
    """Turn a canonical-envelope Avro record into a Segment-spec event dict."""
    event: dict[str, Any] = {}
    for name in _AVRO_STRING_FIELDS:
        if record.get(name) is not None:
            event[name] = record[name]
    for name in (*_AVRO_JSON_FIELDS, "extra"):
        text = record.get(name)
        if text is None:
            continue
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            return None, Violation("decode.malformed_json", name, f"invalid JSON text: {e}")
        if not isinstance(value, dict):
            return None, Violation("decode.not_an_object", name, "expected a JSON object")
        if name == "extra":
            for k, v in value.items():
                event.setdefault(k, v)
        else:
            event[name] = value
    return event, None


def event_to_avro_record(event: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`avro_record_to_event`: lossless for any JSON object event."""
    record: dict[str, Any] = {}
    extra = {}
    for k, v in event.items():
        if k in _AVRO_STRING_FIELDS and (isinstance(v, str) or v is None):
            record[k] = v
        elif k in _AVRO_JSON_FIELDS and isinstance(v, dict):
            record[k] = orjson.dumps(v).decode()
        else:
            extra[k] = v
    record["extra"] = orjson.dumps(extra).decode() if extra else None
    return record


@lru_cache(maxsize=1)
def envelope_avro_schema() -> dict[str, Any]:
    """The canonical envelope schema (package data), parsed."""
    text = (resources.files("schemas") / "envelope.avsc").read_text(encoding="utf-8")
    return json.loads(text)


# --- event time --------------------------------------------------------------------------------


def parse_iso_ms(value: Any) -> int | None:
    """ISO 8601 text to epoch milliseconds; None when absent or unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(round(t.timestamp() * 1000))


_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@lru_cache(maxsize=4096)
def _iso_day(days: int) -> str:
    return dt.date.fromordinal(_EPOCH_ORDINAL + days).isoformat()


def format_iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC text (``2026-11-01T10:02:00.200Z``). Integer
    arithmetic on the time of day and a cached date: called for every first/last seen of every
    identifier of every profile row and for every delivery, where a datetime per call was ~4%
    of a run; exactly the datetime formatting (tested over the whole range)."""
    days, rest = divmod(int(ms), 86_400_000)
    try:
        day = _iso_day(days)
    except (OverflowError, ValueError):
        # Beyond datetime's years 1-9999: only a bound or a sentinel gets here, never an
        # accepted event time; say it rather than fail the bundle formatting it.
        return f"{'+' if ms > 0 else '-'}out-of-range({ms}ms)"
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{day}T{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}Z"


def corrected_event_time_ms(event: dict[str, Any]) -> int | None:
    """The event time in epoch ms, skew-corrected the way Segment and RudderStack do it."""
    explicit = parse_iso_ms(event.get("timestamp"))
    if explicit is not None:
        return explicit
    original = parse_iso_ms(event.get("originalTimestamp"))
    received = parse_iso_ms(event.get("receivedAt"))
    sent = parse_iso_ms(event.get("sentAt"))
    if original is not None and received is not None and sent is not None:
        return received - (sent - original)
    if original is not None:
        return original
    return received


def check_event_time(
    event: dict[str, Any],
    event_time_ms: int | None,
    max_future_skew_ms: int,
    floor_ms: int,
    now_ms: int | None = None,
) -> Violation | None:
    """A violation when the event time is missing, before the floor, or too far ahead.

    "Ahead" is measured from the event's ``receivedAt`` and from ``now_ms``, the time the job
    read it, whichever is earlier (nothing can have been received after it was read): so an
    event with no ``receivedAt`` is bounded by the read time, and a ``receivedAt`` in the far
    future does not lift the bound. ``now_ms=None`` (pure tests) uses ``receivedAt`` alone."""
    if event_time_ms is None:
        return Violation(
            "timestamp.invalid",
            "timestamp",
            "none of timestamp, originalTimestamp, receivedAt is an ISO 8601 instant",
        )
    if event_time_ms < floor_ms:
        return Violation(
            "timestamp.out_of_range",
            "timestamp",
            f"event time {format_iso_ms(event_time_ms)} is before the floor {format_iso_ms(floor_ms)}",
        )
    base, what = upper_bound_base(event, now_ms)
    if base is not None and event_time_ms - base > max_future_skew_ms:
        return Violation(
            "timestamp.out_of_range",
            "timestamp",
            f"event time {format_iso_ms(event_time_ms)} is more than "
            f"{max_future_skew_ms // 1000}s after {what}",
        )
    return None


def upper_bound_base(event: dict[str, Any], now_ms: int | None) -> tuple[int | None, str]:
    """The instant event times are bounded from, and what it is: the earlier of ``receivedAt``
    and the read time ``now_ms`` (either may be absent)."""
    received = parse_iso_ms(event.get("receivedAt"))
    if received is not None and (now_ms is None or received <= now_ms):
        return received, "receivedAt"
    if now_ms is not None:
        return now_ms, "the time the job read it"
    return None, ""


def get_path(obj: Any, path: str) -> Any:
    """Value at a dotted JSON path (``context.device.id``), or None."""
    for part in _path_parts(path):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


@lru_cache(maxsize=4096)
def _path_parts(path: str) -> tuple[str, ...]:
    # Paths come from the config (a handful), read for every event: split each once.
    return tuple(path.split("."))
