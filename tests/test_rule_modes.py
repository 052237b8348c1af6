"""Per-source, per-rule block / omit / allow for tracking-plan violations."""

import orjson
import pytest

from pipelines.config import ConfigError
from tests.conftest import JUDGE_SETTINGS, PLAN, config_from, event
from transforms.tracking_plan import compile_plan, load_plan
from transforms.validate import judge

COMPILED = compile_plan(load_plan(PLAN))


def run(e, modes):
    return judge(
        ("web", "f", orjson.dumps(e).decode()), COMPILED, rule_modes=modes, **JUDGE_SETTINGS
    )


EXTRA = {"product_id": "p", "colour": "red", "size": "xl"}
WRONG_TYPE = {"product_id": "p", "price": "9.99"}
BAD_ENUM = {"product_id": "p", "currency": "BTC"}
MISSING = {"price": 1}


@pytest.mark.parametrize(
    "props, reason, path",
    [
        (EXTRA, "schema.additional_property", "properties"),
        (WRONG_TYPE, "schema.type_mismatch", "properties.price"),
        (BAD_ENUM, "schema.enum_violation", "properties.currency"),
        (MISSING, "schema.required_missing", "properties"),
    ],
)
def test_block_quarantines(props, reason, path):
    env, record = run(event(properties=props), {"default": "block"})
    assert env is None and record["reason"] == reason and record["violations"][0]["path"] == path
    env, record = run(event(properties=props), {})  # block is the default
    assert env is None and record["reason"] == reason


@pytest.mark.parametrize(
    "props, kept",
    [
        (EXTRA, {"product_id": "p"}),
        (WRONG_TYPE, {"product_id": "p"}),
        (BAD_ENUM, {"product_id": "p"}),
    ],
)
def test_omit_strips_and_records_in_context(props, kept):
    env, record = run(event(properties=props), {"default": "omit"})
    assert record is None
    assert env.event["properties"] == kept
    notes = env.event["context"]["cdi"]
    assert notes["plan_version"] == COMPILED.plan.version
    assert all(n["mode"] == "omit" for n in notes["violations"])


def test_omit_cannot_repair_a_missing_required_property():
    env, record = run(event(properties=MISSING), {"default": "omit"})
    assert record["reason"] == "schema.required_missing"


@pytest.mark.parametrize("props", [EXTRA, WRONG_TYPE, BAD_ENUM, MISSING])
def test_allow_keeps_and_annotates(props):
    env, record = run(event(properties=props), {"default": "allow"})
    assert record is None and env.event["properties"] == props
    assert env.event["context"]["cdi"]["violations"][0]["mode"] == "allow"


def test_modes_are_per_rule_and_every_violation_is_seen():
    # Two problems: an extra property (omitted) and a wrong type (blocked): blocked.
    props = {"product_id": "p", "colour": "red", "price": "9.99"}
    env, record = run(event(properties=props), {"schema.additional_property": "omit"})
    assert record["reason"] == "schema.type_mismatch"
    env, record = run(
        event(properties=props),
        {"schema.additional_property": "omit", "schema.type_mismatch": "allow"},
    )
    assert record is None and env.event["properties"] == {"product_id": "p", "price": "9.99"}


def test_unplanned_allow_and_envelope_rules_always_block():
    env, record = run(event(event="Button Clicked v2"), {"event.unplanned": "allow"})
    assert record is None
    env, record = run(event(messageId=None), {"default": "allow"})
    assert record["reason"] == "event.missing_message_id"


def test_unknown_rule_in_config_suggests_the_nearest():
    with pytest.raises(ConfigError) as e:
        config_from(
            "sources: [{name: web, tracking_plan: default, violations: {schema.aditional_property: omit}}]\n"
            "tracking_plans: {default: {path: ../tracking_plans/example.yaml}}"
        )
    assert "did you mean 'schema.additional_property'?" in str(e.value)


def test_an_omitted_identifier_field_is_not_carried_as_an_identifier():
    """The envelope carries the identifiers of the event as it goes on: an `omit` that removes
    a malformed e-mail leaves no email identifier behind (stitching and keying read these)."""
    identify = event(type="identify", userId="u1", event=None, properties=None, traits={"email": 5})
    env, record = run(identify, {"default": "omit"})
    assert record is None and "email" not in env.event["traits"]
    assert env.identifiers == (("user_id", "u1"), ("anonymous_id", identify["anonymousId"]))
    env, _ = run({**identify, "traits": {"email": "A@B.io"}}, {"default": "omit"})
    assert ("email", "a@b.io") in env.identifiers
