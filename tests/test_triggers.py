"""Triggers: an event trigger fires on one governed event and carries the person's current
profile; a threshold trigger fires each time a profile predicate becomes true."""

from __future__ import annotations

import pytest

from tests.conftest import config_from, run_job
from transforms.audiences import EVENT_SUBJECTS, EventTrigger, compile_predicate, matching_triggers


def test_event_trigger_matches_name_and_property_predicate():
    t = EventTrigger(
        "big_order",
        "Order Completed",
        compile_predicate({"property": "revenue", "gt": 50}, "where", EVENT_SUBJECTS),
        ("crm",),
    )
    assert t.matches({"type": "track", "event": "Order Completed", "properties": {"revenue": 51}})
    assert not t.matches(
        {"type": "track", "event": "Order Completed", "properties": {"revenue": 5}}
    )
    assert not t.matches({"type": "track", "event": "Order Completed"})  # no properties: false
    assert not t.matches(
        {"type": "page", "event": "Order Completed", "properties": {"revenue": 99}}
    )
    nested = compile_predicate({"property": "cart.total", "gte": 10}, "where", EVENT_SUBJECTS)
    assert nested({"property": {"cart": {"total": 10}}})
    record = {"destination": "crm", "event": {"type": "track", "event": "Order Completed",
                                              "properties": {"revenue": 70}}}  # fmt: skip
    assert matching_triggers(record, [t]) == ["big_order"]
    assert matching_triggers({**record, "destination": "ads"}, [t]) == []


@pytest.mark.parametrize(
    "trigger, message",
    [
        ("{name: t, destinations: [crm]}", "a trigger has either `event` (and `where`) or `when`"),
        ("{name: t, event: X, when: {trait: a, exists: true}}", "either `event`"),
        (
            "{name: t, when: {trait: a, exists: true}, where: {property: a, eq: 1}}",
            "where: only with",
        ),
        ("{name: t, event: X, where: {property: a, like: 1}}", "where.like: unknown key"),
    ],
)
def test_trigger_config_errors(trigger, message):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from(
            f"sources: [{{name: web}}]\nconsent: {{destinations: {{crm: {{}}}}}}\ntriggers: [{trigger}]\n"
        )
    assert message in e.value.problems[0]


CONFIG = """
sources: [{name: web, format: ndjson}]
computed_traits:
  - {name: orders_lifetime, aggregate: count, event: Order Completed}
consent:
  purposes: [analytics, marketing, advertising]
  destinations:
    crm: {purposes: [], pii: {email: hash}}
pii: {salt: s}
triggers:
  - {name: big_order, event: Order Completed, where: {property: revenue, gt: 40}, destinations: [crm]}
  - {name: second_order, when: {computed: orders_lifetime, gte: 2}, destinations: [crm]}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipelines.generate import generate

    config = config_from(CONFIG)
    lines, _ = generate(1200, 100, seed=21)
    raw = [x.encode() for x in lines]
    tmp = tmp_path_factory.mktemp("triggers")
    return {
        "bounded": run_job(tmp / "b", raw, config, bounded=True),
        "streaming": run_job(tmp / "s", raw, config, bounded=False),
    }


def big(revenue) -> bool:
    """The trigger's rule, restated: a number above 40 (a string revenue never compares)."""
    return isinstance(revenue, (int, float)) and not isinstance(revenue, bool) and revenue > 40


def fired(run, name):
    return [
        r for r in run["outputs"]["destinations"]["crm"] if r.get("trigger", {}).get("name") == name
    ]


def test_event_trigger_fires_once_per_matching_delivered_event(runs):
    keys = {}
    for kind, run in runs.items():
        crm = run["outputs"]["destinations"]["crm"]
        delivered = {
            r["event"]["messageId"]
            for r in crm
            if "trigger" not in r and "activation" not in r
            and r["event"].get("event") == "Order Completed"
            and big((r["event"].get("properties") or {}).get("revenue"))
        }  # fmt: skip
        records = fired(run, "big_order")
        sources = [r["event"]["properties"]["event"]["messageId"] for r in records]
        assert sorted(sources) == sorted(delivered) and len(delivered) > 5, kind
        for r in records:
            ev = r["event"]
            assert ev["event"] == "Trigger Fired" and ev["properties"]["trigger"] == "big_order"
            if kind == "bounded":  # the final profile, which holds the firing event
                assert ev["context"]["cdi"]["event_counts"]["event:Order Completed"] >= 1
            # streaming: the profile as the person's stage holds it when the trigger arrives
            # (the firing event's own fragment may come after it)
            email = ev["context"]["traits"].get("email")
            assert email is None or "@" not in email  # the profile under the crm policy
        keys[kind] = set(sources)
    assert keys["bounded"] == keys["streaming"]


def test_threshold_trigger_fires_when_the_profile_crosses(runs):
    bounded = fired(runs["bounded"], "second_order")
    rows = runs["bounded"]["rows"]
    import orjson

    crossed = {
        pid
        for pid, row in rows.items()
        if (orjson.loads(row["computed_traits"]).get("orders_lifetime") or {}).get("value", 0) >= 2
    }
    assert {r["profile_key"] for r in bounded} == crossed and len(bounded) == len(crossed) > 3
    streaming = fired(runs["streaming"], "second_order")
    ids = [r["event"]["messageId"] for r in streaming]
    assert len(ids) == len(set(ids))
    assert crossed <= {r["profile_key"] for r in streaming}


@pytest.mark.parametrize(
    "trigger, message",
    [
        (
            "{name: t, event: X, where: {trait: plan, eq: pro}}",
            "where.trait: not here; use property",
        ),
        ("{name: t, when: {property: amount, gt: 1}}", "when.property: not here"),
    ],
)
def test_each_predicate_reads_only_what_it_is_evaluated_on(trigger, message):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from(
            f"sources: [{{name: web}}]\nconsent: {{destinations: {{crm: {{}}}}}}\ntriggers: [{trigger}]\n"
        )
    assert message in e.value.problems[0]
