import io

import fastavro
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import event
from transforms.envelope import (
    avro_record_to_event,
    check_event_time,
    corrected_event_time_ms,
    decode_json,
    envelope_avro_schema,
    event_to_avro_record,
    format_iso_ms,
    parse_iso_ms,
)


def test_decode_json_classes():
    assert decode_json('{"a": 1}', 100) == ({"a": 1}, None)
    _, v = decode_json('{"a": ', 100)
    assert v.reason == "decode.malformed_json"
    _, v = decode_json("[1]", 100)
    assert v.reason == "decode.not_an_object" and "list" in v.message
    _, v = decode_json('"x"', 100)
    assert v.reason == "decode.not_an_object"
    _, v = decode_json('{"a": "' + "x" * 200 + '"}', 100)
    assert v.reason == "decode.oversize" and "limit 100" in v.message
    _, v = decode_json(b'{"a": "\xff"}', 100)
    assert v.reason in ("decode.bad_encoding", "decode.malformed_json")


def test_skew_correction_uses_receive_time_minus_client_delay():
    # Client clock 2 minutes behind: sent 10:00:05 client time, received 10:02:05.2 server time.
    e = event(
        originalTimestamp="2026-11-01T10:00:00.000Z",
        sentAt="2026-11-01T10:00:05.000Z",
        receivedAt="2026-11-01T10:02:05.200Z",
    )
    assert format_iso_ms(corrected_event_time_ms(e)) == "2026-11-01T10:02:00.200Z"


def test_event_time_precedence():
    assert corrected_event_time_ms(event(timestamp="2026-01-01T00:00:00Z")) == parse_iso_ms(
        "2026-01-01T00:00:00Z"
    )
    only_original = event(sentAt=None, receivedAt=None)
    assert corrected_event_time_ms(only_original) == parse_iso_ms("2026-11-01T10:00:00Z")
    only_received = event(originalTimestamp=None, sentAt=None)
    assert corrected_event_time_ms(only_received) == parse_iso_ms("2026-11-01T10:00:35Z")
    assert (
        corrected_event_time_ms(event(originalTimestamp=None, sentAt=None, receivedAt=None)) is None
    )
    assert (
        corrected_event_time_ms(event(originalTimestamp="yesterday", sentAt=None, receivedAt=None))
        is None
    )


def test_event_time_range_checks():
    e = event()
    t = corrected_event_time_ms(e)
    assert check_event_time(e, t, 3600_000, 0) is None
    assert check_event_time(e, None, 3600_000, 0).reason == "timestamp.invalid"
    assert check_event_time(e, t, 3600_000, t + 1).reason == "timestamp.out_of_range"
    future = event(timestamp="2026-11-01T12:00:00Z")
    v = check_event_time(future, corrected_event_time_ms(future), 3600_000, 0)
    assert v.reason == "timestamp.out_of_range" and "after receivedAt" in v.message


json_objects = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["track", "identify"]),
            "messageId": st.text(min_size=1, max_size=8),
        },
        optional={
            "properties": st.dictionaries(st.text(max_size=5), json_objects, max_size=3),
            "context": st.dictionaries(st.text(max_size=5), json_objects, max_size=3),
            "custom": json_objects,
            "userId": st.text(max_size=5),
        },
    )
)
def test_avro_envelope_roundtrip_is_lossless(e):
    schema = fastavro.parse_schema(envelope_avro_schema())
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [event_to_avro_record(e)])
    buf.seek(0)
    (record,) = list(fastavro.reader(buf))
    back, violation = avro_record_to_event(record)
    assert violation is None
    assert orjson.dumps(back, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        e, option=orjson.OPT_SORT_KEYS
    )


def test_avro_record_with_bad_json_text_is_a_violation():
    _, v = avro_record_to_event({"type": "track", "properties": "{oops"})
    assert v.reason == "decode.malformed_json" and v.path == "properties"
    _, v = avro_record_to_event({"type": "track", "context": "[1]"})
    assert v.reason == "decode.not_an_object" and v.path == "context"


@pytest.mark.parametrize("bad", ["", "not a date", None, 5])
def test_parse_iso_rejects(bad):
    assert parse_iso_ms(bad) is None


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _assert_round_trip(env) -> None:
    from transforms.envelope import Envelope, pack, unpack

    back = unpack(pack(env))
    assert back == env and type(back) is Envelope
    # Exactly: key order and types too (1, 1.0 and True are == in Python, not in JSON).
    assert orjson.dumps(back.event) == orjson.dumps(env.event)


_EVENTS = st.dictionaries(st.text(max_size=8), _JSON, max_size=6)


@given(_EVENTS, st.integers(0, 2**62), st.one_of(st.just(""), st.text(), _EVENTS))
def test_pack_round_trips_any_event_with_any_payload(ev, t_ms, payload):
    """What waits in a bounded run's shuffles as bytes comes back equal, whatever the payload
    text is (empty, not JSON, or another event's JSON)."""
    from transforms.envelope import Envelope

    text = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    _assert_round_trip(Envelope("web", "f.ndjson:3", text, ev, t_ms, "v1"))


@given(_EVENTS, st.dictionaries(st.text(max_size=8), _JSON, max_size=3), st.data())
def test_pack_round_trips_an_event_derived_from_its_payload(original, changes, data):
    """The shortcut case: the event is the payload's JSON with keys set, changed or removed, or a
    value turned into an equal one of another type; the rebuilt event is exact or not used."""
    from transforms.envelope import Envelope

    event = orjson.loads(orjson.dumps(original))
    event.update(changes)
    if event and data.draw(st.booleans()):
        event.pop(data.draw(st.sampled_from(sorted(event))))
    for k, v in list(event.items()):
        if v is True or v == 1:
            event[k] = data.draw(st.sampled_from([1, 1.0, True]))
    env = Envelope("web", "f", orjson.dumps(original).decode(), event, 5, "v")
    _assert_round_trip(env)


def test_pack_stores_a_validated_event_as_a_patch_over_its_payload():
    from transforms.envelope import Envelope, pack

    payload = orjson.dumps(event(messageId="m1")).decode()
    validated = {**orjson.loads(payload), "source": "web"}
    packed = pack(Envelope("web", "f", payload, validated, 5, "v"))
    assert len(packed) < len(payload) + 100  # the event is not stored a second time
    _assert_round_trip(Envelope("web", "f", payload, validated, 5, "v"))


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_formatted_times_are_datetimes_own_iso_text(ms):
    """Years 1-9999 to the millisecond, before 1970 included: the same text as datetime's."""
    import datetime as dt

    t = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=ms)
    assert format_iso_ms(ms) == t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_times_beyond_datetimes_years_are_said_not_raised():
    assert format_iso_ms(253_402_300_800_000) == "+out-of-range(253402300800000ms)"
    assert format_iso_ms(-62_135_596_800_001) == "-out-of-range(-62135596800001ms)"
