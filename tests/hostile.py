"""Hypothesis strategies for hostile input lines: what real SDKs, proxies and people send.

Each strategy draws one NDJSON *line as bytes*. Most are Segment-spec events that are almost
right (a valid base event with one or more fields replaced by something hostile), so they get
deep into the job instead of stopping at the JSON parser; the rest are broken at the byte level
(not UTF-8, a BOM, truncated, NaN literals, duplicate keys). Used by the job-level fuzz suite
(tests/test_fuzz_job.py) and the atheris harness (fuzz/), and to grow tests/corpus/.
"""

from __future__ import annotations

import orjson
from hypothesis import strategies as st

BASE_TIME = "2026-11-01T10:00:00.000Z"

# Values that break assumptions about a field's type or content.
weird_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            "",
            " ",
            "undefined",
            "null",
            "0",
            "00000000-0000-0000-0000-000000000000",
            "\x00",
            "a\x00b",
            "\u202e\u200b",
            "x" * 5000,
            "é" * 300,
            "😀",
            "\ud7ff",
            "NaN",
            "user:u1",
            "a|b",
            "a\x1fb",
        ]
    ),
    st.text(max_size=12),
)
json_values = st.recursive(
    weird_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)

# Instants in every malformed and extreme form.
timestamps = st.one_of(
    st.sampled_from(
        [
            BASE_TIME,
            "2026-11-01T10:00:00Z",
            "2026-11-01 10:00:00",
            "2026-11-01",
            "2026-11-01T10:00:00+14:00",
            "2026-11-01T10:00:00-12:00",
            "2026-11-01T10:00:00.123456789Z",
            "2026-06-30T23:59:60Z",
            "2026-13-45T99:99:99Z",
            "0001-01-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2014-12-31T23:59:59Z",
            "9999-12-31T23:59:59Z",
            "+275760-09-13T00:00:00Z",
            "-000001-01-01T00:00:00Z",
            "2100-01-01T00:00:00Z",
            "",
            "now",
            "NaN",
            "Mon, 01 Nov 2026 10:00:00 GMT",
            "1762000000000",
        ]
    ),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False),
    st.none(),
    json_values,
)

ENVELOPE_FIELDS = (
    "type",
    "messageId",
    "anonymousId",
    "userId",
    "previousId",
    "groupId",
    "event",
    "name",
    "properties",
    "traits",
    "context",
    "integrations",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
)
TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")


@st.composite
def base_events(draw, person: int | None = None) -> dict:
    """A valid event of the example plan's vocabulary, with a small person pool so that
    hostile events share identifiers with good ones (and reach stitching and profiles)."""
    n = draw(st.integers(0, 5)) if person is None else person
    kind = draw(st.sampled_from(["track", "identify", "page", "screen", "group", "alias"]))
    event = {
        "type": kind,
        "messageId": draw(st.uuids()).hex,
        "anonymousId": f"anon-{n}",
        "timestamp": BASE_TIME,
        "receivedAt": "2026-11-01T10:00:30.000Z",
        "context": {
            "device": {"id": f"dev-{n}"},
            "consent": {"categoryPreferences": {"analytics": True, "marketing": n % 2 == 0}},
        },
    }
    if draw(st.booleans()):
        event["userId"] = f"u{n}"
    if kind == "track":
        event["event"] = "Product Viewed"
        event["properties"] = {"product_id": f"p{n}", "price": 9.5, "currency": "EUR"}
    elif kind == "identify":
        event["traits"] = {"email": f"P{n}@Example.com", "plan": "pro", "logins": 1}
    elif kind in ("page", "screen"):
        event["name"] = "Home"
        event["properties"] = {"path": "/"}
    elif kind == "group":
        event["groupId"] = f"g{n}"
        event["traits"] = {"name": "Acme"}
    else:
        event["previousId"] = f"anon-{n + 1}"
    return event


@st.composite
def hostile_events(draw) -> dict:
    """A base event with 1-4 fields replaced by hostile values (or deleted)."""
    event = draw(base_events())
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from(ENVELOPE_FIELDS + ("context.device.id", "consent", "deep")))
        if field in TIME_FIELDS:
            value = draw(timestamps)
        elif field == "context.device.id":
            event.setdefault("context", {})
            if isinstance(event["context"], dict):
                event["context"]["device"] = {"id": draw(weird_scalars)}
            continue
        elif field == "consent":
            if isinstance(event.get("context"), dict):
                event["context"]["consent"] = draw(
                    st.one_of(
                        json_values,
                        st.fixed_dictionaries({"categoryPreferences": json_values}),
                    )
                )
            continue
        elif field == "deep":
            deep: object = draw(weird_scalars)
            for _ in range(draw(st.integers(10, 40))):
                deep = {"x": deep} if draw(st.booleans()) else [deep]
            event["properties"] = {"deep": deep}
            continue
        else:
            value = draw(json_values)
        if draw(st.integers(0, 5)) == 0:
            event.pop(field, None)
        else:
            event[field] = value
    return event


@st.composite
def control_events(draw) -> dict:
    """``delete`` and ``unlink`` control events with good and bad bodies."""
    event = draw(base_events())
    event["type"] = draw(st.sampled_from(["delete", "unlink"]))
    event.pop("event", None)
    if event["type"] == "unlink":
        event["properties"] = draw(
            st.one_of(
                st.fixed_dictionaries({"identifier": st.sampled_from(["dev-1", "anon-2"])}),
                st.fixed_dictionaries({"identifier": json_values}),
                json_values,
            )
        )
    return event


def _json_line(event: dict) -> bytes:
    return orjson.dumps(event)


@st.composite
def byte_level_lines(draw) -> bytes:
    """Lines broken below JSON: encodings, BOMs, literals orjson refuses, truncation."""
    good = _json_line(draw(base_events()))
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return b"\xff\xfe" + good
    if kind == 1:
        return b"\xef\xbb\xbf" + good  # a UTF-8 BOM before a good event
    if kind == 2:
        return good[: draw(st.integers(1, len(good) - 1))]
    if kind == 3:
        return good.replace(b'"price":9.5', b'"price":NaN').replace(b"}", b',"x":Infinity}', 1)
    if kind == 4:  # duplicate keys: the last one wins in orjson, as in most parsers
        return good[:-1] + b',"messageId":' + _json_line(draw(weird_scalars)) + b"}"
    if kind == 5:
        cut = draw(st.integers(0, len(good)))
        return good[:cut] + draw(st.binary(min_size=1, max_size=4)) + good[cut:]
    if kind == 6:
        return good.decode().encode("utf-16")
    if kind == 7:
        return b'{"type":"track","messageId":"\\ud800","anonymousId":"a"}'
    if kind == 8:
        return _json_line(draw(json_values))
    return draw(st.binary(max_size=40)).replace(b"\n", b" ").replace(b"\r", b" ")


hostile_lines = st.one_of(
    hostile_events().map(_json_line),
    control_events().map(_json_line),
    byte_level_lines(),
)
good_lines = base_events().map(_json_line)
