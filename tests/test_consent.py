"""Consent by event time: grant, withdraw, late and out-of-order arrivals, deletion and replay."""

import apache_beam as beam
import orjson
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import IdentityConfig
from tests.conftest import config_from, event, make_pipeline, run_job
from transforms.consent import (  # noqa: I001
    DELETED,
    DENIED,
    DestinationRule,
    EnforceConsent,
    add_observation,
    consent_at,
    consent_observation,
    judge_destinations,
    judge_history,
)
from transforms.envelope import Envelope
from transforms.person_history import FRAGMENTS, PersonHistory

DESTS = (
    DestinationRule("email_tool", ("marketing",)),
    DestinationRule("analytics", ("analytics",)),
)


def prefs(**p):
    return {"consent": {"categoryPreferences": p}}


def test_timeline_is_by_event_time_not_arrival():
    tl = []
    tl = add_observation(tl, 300, "m3", {"marketing": False})  # withdrawal arrives first
    tl = add_observation(tl, 100, "m1", {"marketing": True, "analytics": True})
    assert consent_at(tl, 50) == {}
    assert consent_at(tl, 200) == {"marketing": True, "analytics": True}
    assert consent_at(tl, 300) == {"marketing": False, "analytics": True}
    assert add_observation(tl, 300, "m3", {"marketing": False}) == tl  # idempotent


def test_explicit_consent_event_and_merge_most_restrictive_wins():
    from transforms.consent import merged_consent_at

    explicit = event(
        event="Consent Updated", properties={"categoryPreferences": {"marketing": True}}
    )
    assert consent_observation(explicit) == {"marketing": True}
    a = add_observation([], 10, "a1", {"marketing": True, "analytics": True})
    b = add_observation([], 20, "b1", {"marketing": False, "analytics": True})
    assert merged_consent_at([a, b], 15) == {
        "marketing": False,
        "analytics": False,
    }  # b: nothing yet
    assert merged_consent_at([a, b], 25) == {"marketing": False, "analytics": True}
    assert merged_consent_at([a], 25) == {"marketing": True, "analytics": True}


def test_judge_history_judges_each_event_at_its_own_time():
    history = [
        env("late-grant", 3, context=prefs(marketing=True)),
        env("early", 1),
        env("later", 5),
    ]
    deliveries, denials = judge_history(history, DESTS)
    assert [(allowed, e.event["messageId"]) for allowed, e in deliveries] == [
        (["email_tool"], "late-grant"),
        (["email_tool"], "later"),
    ]
    assert sorted((e.event["messageId"], name) for e, name, _ in denials) == [
        ("early", "analytics"),
        ("early", "email_tool"),
        ("late-grant", "analytics"),
        ("later", "analytics"),
    ]


def test_default_deny_and_missing_purposes():
    allowed, denied = judge_destinations({"analytics": True}, DESTS)
    assert allowed == ["analytics"] and denied == [("email_tool", ["marketing"])]
    assert judge_destinations({}, DESTS)[0] == []
    assert consent_observation(event(context=prefs(marketing=True, ads="yes"))) == {
        "marketing": True,
        "ads": False,
    }
    assert consent_observation(event()) is None


def env(mid, t_s, key_user="u1", **kw):
    e = event(messageId=mid, userId=key_user, **kw)
    return Envelope("web", "f", "", e, int(t_s * 1000), "v")


def run(elements, streaming_stream=None, deleted_ids=()):
    """Yields the outputs once per path, as ``{"delivered": (destination, messageId or the
    deleted profile's key), DENIED: record, DELETED: record}``: a TestStream runs the stateful
    (streaming) shell; a batch runs it and the bounded one (PersonHistory: grouped histories,
    record lists), which must agree."""
    for bounded in (False,) if streaming_stream is not None else (False, True):
        with make_pipeline(streaming=streaming_stream is not None) as p:
            src = (
                p | streaming_stream
                if streaming_stream is not None
                else (
                    p
                    | beam.Create(elements)
                    | beam.Map(lambda kv: TimestampedValue(kv, kv[1].event_time_ms / 1000))
                )
            )
            if not bounded:
                out = src | EnforceConsent(DESTS, deleted_ids, IdentityConfig())
                yield {
                    "delivered": out.delivered
                    | beam.FlatMap(
                        lambda d: [(n, d[2].event["messageId"] if d[2] else d[1]) for n in d[0]]
                    ),
                    DENIED: out[DENIED],
                    DELETED: out[DELETED],
                }
                continue
            pii = ((), {d.name: ({}, "keep") for d in DESTS}, "")
            out = src | PersonHistory(DESTS, deleted_ids, IdentityConfig(), pii, "profiles")
            per_destination = [
                out[d.name]
                | f"Unbatch[{d.name}]"
                >> beam.FlatMap(
                    lambda rs: [(r["destination"], r["event"]["messageId"]) for r in rs]
                )
                for d in DESTS
            ]
            deletes = out[FRAGMENTS] | beam.FlatMap(
                lambda kv: [("profiles-delete", kv[0])] if kv[1].get("deleted") else []
            )
            yield {
                "delivered": (*per_destination, deletes) | beam.Flatten(),
                DENIED: out[DENIED] | "UnbatchDenied" >> beam.FlatMap(list),
                DELETED: out[DELETED] | "UnbatchDeleted" >> beam.FlatMap(list),
            }


def deliveries(out):
    return out["delivered"]


def test_withdrawal_applies_to_later_events_even_if_they_arrived_first():
    stream = (
        TestStream()
        .add_elements(
            [
                TimestampedValue(
                    ("u1", env("grant", 10, context=prefs(marketing=True, analytics=True))), 10
                )
            ]
        )
        .add_elements(
            [TimestampedValue(("u1", env("after", 40)), 40)]
        )  # arrives before the withdrawal
        .add_elements(
            [TimestampedValue(("u1", env("withdraw", 30, context=prefs(marketing=False))), 30)]
        )
        .advance_watermark_to(20)
        .add_elements(
            [TimestampedValue(("u1", env("between", 20)), 20)]
        )  # late-ish, before withdrawal
        .advance_watermark_to(100)
        .add_elements(
            [TimestampedValue(("u1", env("late-old", 15)), 15)]
        )  # late, judged at its own time
        .advance_watermark_to_infinity()
    )
    for out in run([], stream):
        assert_that(
            deliveries(out),
            equal_to(
                [
                    ("email_tool", "grant"),
                    ("analytics", "grant"),
                    ("email_tool", "between"),
                    ("analytics", "between"),
                    ("analytics", "withdraw"),
                    ("analytics", "after"),
                    ("email_tool", "late-old"),
                    ("analytics", "late-old"),
                ]
            ),
            label="delivered",
        )
        assert_that(
            out[DENIED]
            | beam.Map(lambda r: (r["destination"], r["message_id"], r["missing_purposes"])),
            equal_to(
                [("email_tool", "withdraw", ["marketing"]), ("email_tool", "after", ["marketing"])]
            ),
            label="denied",
        )


@settings(max_examples=10, deadline=None)
@given(st.permutations(range(5)))
def test_batch_verdicts_do_not_depend_on_arrival_order(order):
    events = [
        env("a", 1),  # no consent yet: denied everywhere
        env("b", 2, context=prefs(analytics=True, marketing=True)),
        env("c", 3),
        env("d", 4, context=prefs(marketing=False)),
        env("e", 5),
    ]
    items = [("u1", events[i]) for i in order]
    for out in run(items):
        assert_that(
            deliveries(out),
            equal_to(
                [
                    ("email_tool", "b"),
                    ("analytics", "b"),
                    ("email_tool", "c"),
                    ("analytics", "c"),
                    ("analytics", "d"),
                    ("analytics", "e"),
                ]
            ),  # fmt: skip
        )


def test_deletion_purges_and_suppresses_in_any_order_and_on_replay():
    grant = prefs(analytics=True, marketing=True)
    history = [
        ("u1", env("a", 1, context=grant)),
        ("u1", env("del", 2, type="delete", event=None, properties=None)),
        ("u1", env("b", 3, context=grant)),
        ("u2", env("x", 1, key_user="u2", context=grant)),
    ]
    replayed = history + history  # the same history again: still suppressed
    for items in (history, list(reversed(history)), replayed):
        for out in run(items):
            assert_that(
                deliveries(out),
                equal_to(
                    [("email_tool", "x"), ("analytics", "x")] * (1 + (items is replayed))
                    + [("profiles-delete", "u1")]  # once: the replayed delete finds the tombstone
                ),
                label="delivered",
            )
            assert_that(
                out[DELETED] | beam.Map(lambda r: r["message_id"]),
                equal_to(["a", "del", "b"] * (1 + (items is replayed))),
                label="deleted",
            )


def test_config_listed_identifier_is_deleted():
    items = [("u9", env("a", 1, key_user="u9", context=prefs(analytics=True)))]
    for out in run(items, deleted_ids=("user_id:u9",)):
        assert_that(out[DELETED] | beam.Map(lambda r: r["message_id"]), equal_to(["a"]))


WITHDRAWN = """
sources: [{name: web, paths: []}]
sinks: {profiles: {purposes: [analytics]}}
consent:
  purposes: [analytics, marketing, advertising]
  destinations: {crm: {purposes: [marketing]}}
"""


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "streaming"])
def test_a_withdrawal_the_store_may_not_keep_still_reaches_the_profile(tmp_path, bounded):
    """The profile store keeps events under `analytics`; a "reject all" event is refused for the
    store itself, yet the profile's consent must show the withdrawal (audiences are judged on
    it), and nothing else of that event reaches the profile."""
    grant = {"consent": {"categoryPreferences": {"analytics": True, "marketing": True}}}
    lines = [
        event(messageId="1", type="identify", userId="u1", event=None, properties=None,
              traits={"plan": "pro"}, context=grant),
        event(messageId="2", userId="u1", event="Consent Updated", originalTimestamp="2026-11-01T11:00:00.000Z",
              properties={"categoryPreferences": {"analytics": False, "marketing": False}}),
        # A person who only ever refused the store: no profile row at all.
        event(messageId="3", userId="u2", event="Consent Updated",
              properties={"categoryPreferences": {"analytics": False}}),
    ]  # fmt: skip
    run = run_job(tmp_path, [orjson.dumps(e) for e in lines], config_from(WITHDRAWN), bounded)
    (row,) = run["rows"].values()
    assert orjson.loads(row["consent"]) == {"analytics": False, "marketing": False}
    assert orjson.loads(row["event_counts"]) == {"type:identify": 1}  # the withdrawal not stored
