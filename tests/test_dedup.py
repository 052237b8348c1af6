import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import event, make_pipeline
from transforms.dedup import (
    COLLISION,
    DUPLICATE,
    FIRST,
    DeduplicateEvents,
    arrival_order,
    decide,
    dedup_key,
    fingerprint,
)
from transforms.envelope import Envelope
from transforms.quarantine import DUPLICATES, QUARANTINE


def env(mid="m-1", t_ms=1_000_000, source="web", **kw):
    e = event(messageId=mid, **kw)
    return Envelope(source, "f", "payload-" + mid, e, t_ms, "v1")


def test_fingerprint_ignores_transport_times_and_key_order():
    a = event(receivedAt="2026-11-01T10:00:35Z")
    b = dict(reversed(list(event(receivedAt="2026-11-01T11:00:00Z", sentAt="x").items())))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(event(properties={"product_id": "p-2"}))


def test_decide_and_key():
    fp = fingerprint(event())
    assert decide(None, fp) == FIRST
    assert decide((fp, "m", 0), fp) == DUPLICATE
    assert decide(("other", "m", 0), fp) == COLLISION
    assert dedup_key("web", event(), ("source", "messageId")) != dedup_key(
        "ios", event(), ("source", "messageId")
    )
    assert dedup_key("web", event(properties={"order_id": "o1"}), ("properties.order_id",)) == "o1"


def test_events_without_the_business_key_are_keyed_by_their_message_id():
    """Under ``[source, properties.order_id]``, two orders with one id are copies; a page view
    and an identify (no order id) are neither copies of each other nor of any order."""
    key = ("source", "properties.order_id")
    order = event(properties={"order_id": "o1"})
    assert dedup_key("web", order, key) == dedup_key("web", dict(order, messageId="m9"), key)
    lacking = [dedup_key("web", dict(event(), messageId=m, properties={}), key) for m in "abc"]
    assert len(set(lacking)) == 3
    assert dedup_key("web", order, key) not in lacking
    # The event's own source field wins over the input's name (a replay keeps its key).
    assert dedup_key("web", dict(order, source="ios"), key) == dedup_key("ios", order, key)


@pytest.mark.parametrize("bounded", [False, True], ids=["stateful", "grouped-copies"])
def test_a_retried_order_with_a_new_message_id_is_a_duplicate_under_a_business_key(bounded):
    """Under ``[source, properties.order_id]`` a server's retry of an order (same content, a new
    ``messageId``, new transport times) is a duplicate of the first, not a collision; the same
    order id with other content still is one."""
    order = {"order_id": "o1", "revenue": 10}
    items = [
        env("m1", receivedAt="2026-11-01T00:00:00Z", properties=order),
        env(
            "m2", receivedAt="2026-11-01T00:00:05Z", sentAt="2026-11-01T00:00:04Z", properties=order
        ),
        env("m3", receivedAt="2026-11-01T00:00:09Z", properties={**order, "revenue": 12}),
    ]
    assert fingerprint(items[0].event) == fingerprint(items[1].event)
    with make_pipeline() as p:
        out = (
            p
            | beam.Create(items)
            | beam.Map(lambda e: TimestampedValue(e, e.event_time_ms / 1000))
            | DeduplicateEvents(("source", "properties.order_id"), bounded=bounded)
        )
        assert_that(
            out["unique"] | "U" >> beam.Map(lambda e: e.event["messageId"]),
            equal_to(["m1"]),
            label="unique",
        )
        assert_that(
            out[DUPLICATES] | "D" >> beam.Map(lambda r: (r["message_id"], r["first_message_id"])),
            equal_to([("m2", "m1")]),
            label="dups",
        )
        assert_that(
            out[QUARANTINE] | "Q" >> beam.Map(lambda r: (r["reason"], r["message_id"])),
            equal_to([("dedup.collision", "m3")]),
            label="collisions",
        )


@pytest.mark.parametrize("bounded", [False, True], ids=["stateful", "grouped-copies"])
def test_pipeline_duplicates_collisions_and_sources(bounded):
    items = [
        env("a", receivedAt="2026-11-01T00:00:00Z"),
        env("a", receivedAt="2026-11-01T00:00:00Z"),  # exact resend
        env(
            "a", receivedAt="2026-11-02T00:00:00Z"
        ),  # retry with a new receive time: still a duplicate
        # same key, other payload, received last: collision
        env("a", receivedAt="2026-11-03T00:00:00Z", properties={"product_id": "zzz"}),
        env("b"),
        env("a", source="ios"),  # same messageId from another source: not a duplicate by default
    ]
    with make_pipeline() as p:
        out = (
            p
            | beam.Create(items)
            | beam.Map(lambda e: TimestampedValue(e, e.event_time_ms / 1000))
            | DeduplicateEvents(bounded=bounded)
        )
        assert_that(
            out["unique"] | "U" >> beam.Map(lambda e: (e.source, e.event["messageId"])),
            equal_to([("web", "a"), ("web", "b"), ("ios", "a")]),
            label="unique",
        )
        assert_that(
            out[DUPLICATES] | "D" >> beam.Map(lambda r: (r["reason"], r["first_message_id"])),
            equal_to([("dedup.duplicate", "a")] * 2),
            label="dups",
        )
        assert_that(
            out[QUARANTINE] | "Q" >> beam.Map(lambda r: r["reason"]),
            equal_to(["dedup.collision"]),
            label="collisions",
        )


def test_ttl_expires_state_by_event_time():
    """A copy inside the TTL is suppressed; after the watermark passes first + TTL, state is gone."""
    ttl = 3600
    stream = (
        TestStream()
        .add_elements([TimestampedValue(env("x", 0), 0)])
        .advance_watermark_to(1800)
        .add_elements([TimestampedValue(env("x", 1800_000), 1800)])  # inside TTL: duplicate
        .advance_watermark_to(3601)  # timer at 0 + 3600 fires, state cleared
        .add_elements([TimestampedValue(env("x", 3700_000), 3700)])  # outside TTL: passes again
        .advance_watermark_to_infinity()
    )
    with make_pipeline(streaming=True) as p:
        out = p | stream | DeduplicateEvents(ttl_seconds=ttl)
        assert_that(
            out["unique"] | "U" >> beam.Map(lambda e: e.event_time_ms),
            equal_to([0, 3700_000]),
            label="u",
        )
        assert_that(
            out[DUPLICATES] | "D" >> beam.Map(lambda r: r["message_id"]), equal_to(["x"]), label="d"
        )


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.sampled_from("abcdef"), min_size=1, max_size=25),
    st.randoms(use_true_random=False),
)
def test_any_order_and_duplication_gives_each_key_once(ids, rnd):
    items = [env(i, t_ms=1000 * ord(i)) for i in ids]
    rnd.shuffle(items)
    with make_pipeline() as p:
        out = p | beam.Create(items) | DeduplicateEvents()
        assert_that(
            out["unique"] | beam.Map(lambda e: e.event["messageId"]),
            equal_to(sorted(set(ids))),
            label="u",
        )
        assert_that(
            out[DUPLICATES] | "n" >> beam.combiners.Count.Globally(),
            equal_to([len(ids) - len(set(ids))]),
            label="d",
        )


@settings(max_examples=10, deadline=None)
@given(st.permutations(range(4)))
def test_bounded_run_keeps_the_copy_received_first_whatever_the_file_order(order):
    copies = [
        env("a", receivedAt="2026-11-01T00:00:05Z"),  # received first: kept
        env("a", receivedAt="2026-11-01T00:09:00Z"),  # the same request again: duplicate
        env("a", receivedAt="2026-11-01T00:07:00Z", properties={"product_id": "other"}),
        env("a", receivedAt=None, properties={"product_id": "none"}),  # sorts last: collision
    ]
    assert sorted(copies, key=arrival_order)[0] is copies[0]
    with make_pipeline() as p:
        out = p | beam.Create([copies[i] for i in order]) | DeduplicateEvents(bounded=True)
        assert_that(
            out["unique"] | "U" >> beam.Map(lambda e: e.event["receivedAt"]),
            equal_to(["2026-11-01T00:00:05Z"]),
            label="unique",
        )
        assert_that(
            out[DUPLICATES] | "D" >> beam.Map(lambda r: r["received_at"]),
            equal_to(["2026-11-01T00:09:00Z"]),
            label="dups",
        )
        assert_that(
            out[QUARANTINE] | "Q" >> beam.Map(lambda r: r["reason"]),
            equal_to(["dedup.collision"] * 2),
            label="collisions",
        )
