import orjson
import pytest

from tests.conftest import JUDGE_SETTINGS, PLAN, event
from transforms.tracking_plan import (
    PlanError,
    compile_plan,
    envelope_violations,
    load_plan,
    parse_plan,
    plan_violations,
)
from transforms.validate import judge

PLAN_OBJ = load_plan(PLAN)
COMPILED = compile_plan(PLAN_OBJ)


def reasons(e):
    v = envelope_violations(e)
    return [x.reason for x in (v or plan_violations(e, COMPILED, 16))]


@pytest.mark.parametrize(
    "overrides, expected, path",
    [
        ({}, [], None),
        ({"type": "purchase"}, ["event.unknown_type"], "type"),
        ({"messageId": None}, ["event.missing_message_id"], "messageId"),
        ({"messageId": "  "}, ["event.missing_message_id"], "messageId"),
        ({"anonymousId": None}, ["identity.missing"], "userId"),
        ({"event": None}, ["event.missing_event_name"], "event"),
        ({"event": "Button Clicked v2"}, ["event.unplanned"], "event"),
        ({"properties": {"price": 1}}, ["schema.required_missing"], "properties"),
        ({"properties": {"product_id": 7}}, ["schema.type_mismatch"], "properties.product_id"),
        (
            {"properties": {"product_id": "p", "colour": "red"}},
            ["schema.additional_property"],
            "properties",
        ),
        (
            {"properties": {"product_id": "p", "currency": "BTC"}},
            ["schema.enum_violation"],
            "properties.currency",
        ),
        (
            {"properties": {"product_id": "p", "price": -1}},
            ["schema.constraint_violation"],
            "properties.price",
        ),
        ({"properties": "nope"}, ["schema.type_mismatch"], "properties"),
        (
            {
                "type": "identify",
                "event": None,
                "properties": None,
                "traits": {"email": "not-an-email"},
            },
            ["schema.format_violation"],
            "traits.email",
        ),
        (
            {"context": {"a": {"b": {"c": {"d": {"e": {}}}}}}},
            None,
            None,
        ),  # checked with max_depth below
    ],
)
def test_violation_classes(overrides, expected, path):
    e = event(**overrides)
    if expected is None:
        assert [v.reason for v in plan_violations(e, COMPILED, 3)] == ["schema.too_deep"]
        return
    assert reasons(e) == expected
    if path:
        v = envelope_violations(e) or plan_violations(e, COMPILED, 16)
        assert v[0].path == path


def test_judge_records_plan_version_and_keeps_payload():
    settings = JUDGE_SETTINGS
    payload = '{"type":"track","event":"Order Completed","messageId":"m","anonymousId":"a","properties":{"order_id":"o","revenue":"12.50","currency":"USD"},"originalTimestamp":"2026-11-01T00:00:00Z"}'
    env, record = judge(("web", "f.ndjson", payload), COMPILED, **settings)
    assert env is None
    assert record["reason"] == "schema.type_mismatch"
    assert record["plan_version"] == PLAN_OBJ.version
    assert (
        record["payload"] == payload
        and record["source"] == "web"
        and record["origin"] == "f.ndjson"
    )
    assert "properties.revenue" in record["message"]


def test_junk_only_identity_is_quarantined():
    settings = JUDGE_SETTINGS
    import orjson

    env, record = judge(
        ("web", "f", orjson.dumps(event(anonymousId="undefined")).decode()), COMPILED, **settings
    )
    assert env is None and record["reason"] == "identity.missing"
    env, record = judge(
        ("web", "f", orjson.dumps(event(anonymousId="undefined", userId="u1")).decode()),
        COMPILED,
        **settings,
    )
    assert record is None and env.event["userId"] == "u1"


def test_clamp_mode_keeps_out_of_range_events_at_receive_time():
    import orjson

    settings = {**JUDGE_SETTINGS, "max_future_skew_ms": 1000}
    e = event(timestamp="2030-01-01T00:00:00Z")
    env, record = judge(("web", "f", orjson.dumps(e).decode()), COMPILED, **settings)
    assert record["reason"] == "timestamp.out_of_range" and record["stage"] == "event_time"
    env, record = judge(
        ("web", "f", orjson.dumps(e).decode()), COMPILED, clamp_event_time=True, **settings
    )
    assert record is None
    from transforms.envelope import parse_iso_ms

    assert env.event_time_ms == parse_iso_ms(e["receivedAt"])


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "expected a mapping"),
        ({"version": 1, "evnts": {}}, "evnts: unknown key"),
        ({"events": {}}, "version: required"),
        ({"version": 1, "types": {"purchase": {}}}, "types.purchase: not a Segment event type"),
        (
            {"version": 1, "events": {"X": {"properties": {"type": "objekt"}}}},
            "invalid JSON Schema",
        ),
    ],
)
def test_bad_plans(data, message):
    with pytest.raises(PlanError) as e:
        parse_plan(data, "plan.yaml")
    assert message in str(e.value) and str(e.value).startswith("plan.yaml")


def test_clamp_with_a_non_object_context_does_not_crash():
    import orjson

    settings = {**JUDGE_SETTINGS, "max_future_skew_ms": 1000}
    e = event(timestamp="2030-01-01T00:00:00Z", context="not an object")
    env, record = judge(
        ("web", "f", orjson.dumps(e).decode()), COMPILED, clamp_event_time=True, **settings
    )
    assert record is None and env.event["context"] == "not an object"


def test_a_source_without_a_plan_gets_envelope_rules_and_the_depth_limit():
    from transforms.validate import NO_PLAN

    unplanned = orjson.dumps(event(event="Anything At All", properties={"any": [1, {"x": 2}]}))
    env, record = judge(("web", "f", unplanned), None, **JUDGE_SETTINGS)
    assert record is None and env.plan_version == NO_PLAN == "none"
    deep: object = 1
    for _ in range(20):
        deep = {"x": deep}
    too_deep = orjson.dumps(event(properties={"deep": deep}))
    env, record = judge(("web", "f", too_deep), None, **JUDGE_SETTINGS)
    assert record["reason"] == "schema.too_deep" and record["plan_version"] == "none"
    no_id = orjson.dumps(event(anonymousId=None))
    env, record = judge(("web", "f", no_id), None, **JUDGE_SETTINGS)
    assert record["reason"] == "identity.missing"
