"""Windowed computed traits: pure window/aggregate logic, and TestStream scenarios that move the
watermark explicitly (on time, late within lateness, too late, sessions merging, early panes)."""

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import event, make_pipeline
from transforms.computed_traits import (
    LATE,
    ComputedTraitSpec,
    ComputeTraits,
    agg_add,
    agg_init,
    agg_merge,
    agg_value,
    assign_windows,
    extract_value,
    history_panes,
    open_window,
    window_key,
)
from transforms.envelope import Envelope

S = 1000  # ms


def spec(**kw):
    base = dict(name="n", aggregate="count", window="fixed", size_ms=10 * S)
    base.update(kw)
    return ComputedTraitSpec(**base)


def test_assign_windows():
    assert assign_windows(spec(), 12_345) == [(10_000, 20_000)]
    assert assign_windows(spec(window="sliding", size_ms=10 * S, period_ms=5 * S), 12_000) == [
        (5_000, 15_000),
        (10_000, 20_000),
    ]
    assert assign_windows(spec(window="session", gap_ms=30 * S), 7_000) == [(7_000, 37_000)]
    assert assign_windows(spec(window="lifetime"), 7)[0][0] == -1


def test_aggregates_merge_like_they_add():
    for kind, values in [
        ("count", [None] * 3),
        ("sum", [1, 2.5, 3]),
        ("distinct_count", ["a", "b", "a"]),
    ]:
        whole = agg_init(kind)
        for i, v in enumerate(values):
            whole = agg_add(kind, whole, v, i)
        a = agg_add(kind, agg_init(kind), values[0], 0)
        b = agg_init(kind)
        for i, v in enumerate(values[1:], 1):
            b = agg_add(kind, b, v, i)
        assert agg_value(kind, agg_merge(kind, a, b)) == agg_value(kind, whole)
    assert agg_value("distinct_count", agg_add("distinct_count", ["a"], "a", 0)) == 1


def test_extract_value_filters_by_event_and_property():
    s = spec(aggregate="sum", event="Order Completed", property="properties.revenue")
    assert extract_value(s, event(event="Order Completed", properties={"revenue": 5})) == (True, 5)
    assert extract_value(s, event(event="Product Viewed", properties={"revenue": 5}))[0] is False
    assert extract_value(s, event(event="Order Completed", properties={"revenue": "5"}))[0] is False


def env(mid, t_s):
    return Envelope("web", "f", mid, event(messageId=mid), int(t_s * S), "v")


def at(mid, t_s, key="k"):
    return TimestampedValue((key, env(mid, t_s)), t_s)


def panes(out):
    return out.computed | beam.MapTuple(lambda k, np: (k, np[0], np[1][2], np[1][3]))


def test_on_time_late_within_lateness_and_too_late():
    stream = (
        TestStream()
        .add_elements([at("a", 1), at("b", 2)])
        .advance_watermark_to(10)  # window [0,10) closes: ON_TIME pane, count 2
        .add_elements([at("c", 3)])  # late but within 5 s lateness: LATE pane, corrected count 3
        .advance_watermark_to(16)  # window state garbage-collected at 10 + 5
        .add_elements([at("d", 4)])  # too late: to the late output, not counted
        .add_elements([at("e", 17)])  # on time for [10, 20)
        .advance_watermark_to_infinity()
    )
    with make_pipeline(streaming=True) as p:
        out = p | stream | ComputeTraits([spec()], allowed_lateness_ms=5 * S)
        assert_that(
            panes(out),
            equal_to([("k", "n", 0, 2), ("k", "n", 1, 3), ("k", "n", 0, 1)]),
            label="panes",
        )
        assert_that(
            out[LATE]
            | beam.Map(lambda r: (r["message_id"], r["behind_watermark_ms"], r["traits"])),
            equal_to([("d", 11 * S, ["n"])]),
            label="late",
        )


def test_discarding_panes_are_deltas():
    s = spec(aggregate="count")
    s = ComputedTraitSpec(**{**s.__dict__, "accumulation": "discarding"})
    stream = (
        TestStream()
        .add_elements([at("a", 1), at("b", 2)])
        .advance_watermark_to(10)
        .add_elements([at("c", 3)])
        .advance_watermark_to_infinity()
    )
    with make_pipeline(streaming=True) as p:
        out = p | stream | ComputeTraits([s], allowed_lateness_ms=5 * S)
        assert_that(panes(out), equal_to([("k", "n", 0, 2), ("k", "n", 1, 1)]))


def test_sessions_merge_when_a_gap_is_filled():
    s = spec(window="session", gap_ms=10 * S)
    stream = (
        TestStream()
        .add_elements([at("a", 0), at("b", 15)])  # two sessions: [0,10) and [15,25)
        .add_elements([at("c", 8)])  # [8,18) bridges both: one session [0,25) with 3 events
        .advance_watermark_to_infinity()
    )
    with make_pipeline(streaming=True) as p:
        out = p | stream | ComputeTraits([s], allowed_lateness_ms=0)
        assert_that(
            out.computed | beam.MapTuple(lambda k, np: (np[1][1], np[1][0], np[1][3])),
            equal_to([(0, 25 * S, 3)]),
        )


def _two_events_ten_seconds_apart() -> TestStream:
    """Events at 1 s and 2 s of event time, 10 s of processing time after each."""
    return (
        TestStream()
        .add_elements([at("a", 1)])
        .advance_processing_time(10)
        .add_elements([at("b", 2)])
        .advance_processing_time(10)
        .advance_watermark_to_infinity()
    )


def test_early_panes_on_processing_time():
    s = ComputedTraitSpec(
        name="n", aggregate="count", window="fixed", size_ms=100 * S, early_ms=5 * S
    )
    clock = [0.0]
    stream = _two_events_ten_seconds_apart()
    with make_pipeline(streaming=True) as p:
        out = p | stream | ComputeTraits([s], allowed_lateness_ms=0, clock=lambda: clock[0])
        # Early panes count 1 then 2, then the ON_TIME pane with 2.
        assert_that(panes(out), equal_to([("k", "n", 0, 1), ("k", "n", 1, 2), ("k", "n", 2, 2)]))


def test_each_trait_has_its_own_early_period():
    """Two traits, early every 5 s and every hour: after 20 s of processing time only the fast
    one has early panes (one timer per key, due times per trait)."""
    fast = spec(name="fast", size_ms=1000 * S, early_ms=5 * S)
    slow = spec(name="slow", size_ms=1000 * S, early_ms=3600 * S)
    clock = [0.0]
    stream = _two_events_ten_seconds_apart()
    with make_pipeline(streaming=True) as p:
        out = (
            p | stream | ComputeTraits([fast, slow], allowed_lateness_ms=0, clock=lambda: clock[0])
        )
        assert_that(
            panes(out),
            equal_to(
                [
                    ("k", "fast", 0, 1),  # EARLY after 5 s
                    ("k", "fast", 1, 2),  # EARLY after the second event
                    ("k", "fast", 2, 2),  # ON_TIME
                    ("k", "slow", 0, 2),  # ON_TIME only: its hour never passed
                ]
            ),
        )


class _Cell:
    def __init__(self, value=None):
        self.value = value

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None


class _Timer:
    def __init__(self):
        self.set_to = []

    def set(self, t):
        self.set_to.append(t)


def test_an_early_timer_left_by_an_earlier_job_does_not_fire_for_ever():
    """After an update: a due time for a trait that no longer has early panes is dropped (not
    re-armed in the past for ever), and a timer armed before due times per trait (no due
    times in state) fires every early trait's dirty windows once."""
    from apache_beam.utils.timestamp import Timestamp

    from transforms.computed_traits import _ComputeTraitsFn

    no_early = _ComputeTraitsFn((spec(name="fast", size_ms=100 * S),), 0)
    due, timer = _Cell({"fast": 5000}), _Timer()
    out = list(
        no_early.on_early_timer(
            key="k",
            windows_state=_Cell({}),
            early_state=due,
            early_timer=timer,
            fired_at=Timestamp.of(5.0),
        )  # fmt: skip
    )
    assert out == [] and due.value is None and timer.set_to == []
    early = _ComputeTraitsFn((spec(name="fast", size_ms=100 * S, early_ms=5 * S),), 0)
    windows = {"fast": {}}
    w = open_window(windows["fast"], window_key(0, 100 * S), "count")
    w["acc"], w["dirty"] = agg_add("count", w["acc"], 1, 0), True
    legacy, timer = _Cell(None), _Timer()
    out = list(
        early.on_early_timer(
            key="k",
            windows_state=_Cell(windows),
            early_state=legacy,
            early_timer=timer,
            fired_at=Timestamp.of(5.0),
        )  # fmt: skip
    )
    assert [(k, name, pane[2], pane[3]) for k, (name, pane) in out] == [("k", "fast", 0, 1)]
    assert legacy.value is None and timer.set_to == []


def test_lifetime_and_sliding_in_batch():
    """Both paths: the stateful shell over a batch, and the grouped history bounded runs use."""
    specs = [
        spec(name="life", window="lifetime"),
        spec(name="slide", window="sliding", size_ms=10 * S, period_ms=5 * S),
    ]
    items = [("k", env(m, t)) for m, t in [("a", 1), ("b", 6), ("c", 12)]]
    expected = [
        ("life", None, 3),
        ("slide", -5 * S, 1),  # [-5, 5): a
        ("slide", 0, 2),  # [0, 10): a, b
        ("slide", 5 * S, 2),  # [5, 15): b, c
        ("slide", 10 * S, 1),  # [10, 20): c
    ]
    history = [(e.event_time_ms, e.event) for _, e in items]
    assert sorted(
        (name, pane[1], pane[3]) for name, pane in history_panes(tuple(specs), history)
    ) == sorted(expected, key=lambda x: (x[0], x[1] if x[1] is not None else -(10**18)))
    with make_pipeline() as p:
        out = (
            p
            | beam.Create(items)
            | beam.Map(lambda kv: TimestampedValue(kv, kv[1].event_time_ms / 1000))
            | ComputeTraits(specs, allowed_lateness_ms=0)
        )
        assert_that(
            out.computed | beam.MapTuple(lambda k, np: (np[0], np[1][1], np[1][3])),
            equal_to(expected),
        )


HISTORY_SPECS = (
    spec(name="sessions", window="session", gap_ms=10 * S),
    spec(name="slide", window="sliding", size_ms=10 * S, period_ms=5 * S),
    spec(name="total", aggregate="sum", property="properties.v", window="lifetime"),
    spec(name="kinds", aggregate="distinct_count", property="properties.v", window="fixed"),
    spec(name="first", aggregate="first_seen", window="lifetime"),
)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 60), st.sampled_from([0.1, 0.2, 0.3, 7, "x"])),
        min_size=1,
        max_size=12,
    ),
    st.randoms(),
)
def test_history_panes_do_not_depend_on_order(items, rnd):
    history = [(t * S, event(properties={"v": v})) for t, v in items]
    shuffled = list(history)
    rnd.shuffle(shuffled)
    assert history_panes(HISTORY_SPECS, shuffled) == history_panes(HISTORY_SPECS, history)
    sessions = [p for name, p in history_panes(HISTORY_SPECS, history) if name == "sessions"]
    assert sum(p[3] for p in sessions) == len(items)  # every event in exactly one session


def test_history_panes_equal_the_stateful_paths_final_panes():
    """The grouped path (bounded runs) and the stateful path give the same final pane values."""
    history = [(t, v) for t, v in [(0, 1.5), (8, 2), (15, 0.1), (40, 0.2), (3, "x")]]
    items = [("k", Envelope("web", "f", str(i), event(messageId=str(i), properties={"v": v}),
                            t * S, "v")) for i, (t, v) in enumerate(history)]  # fmt: skip
    expected = {
        (name, pane[0], pane[1], pane[3])
        for name, pane in history_panes(HISTORY_SPECS, [(e.event_time_ms, e.event) for _, e in items])
    }  # fmt: skip
    with make_pipeline() as p:
        out = (
            p
            | beam.Create(items)
            | beam.Map(lambda kv: TimestampedValue(kv, kv[1].event_time_ms / 1000))
            | ComputeTraits(HISTORY_SPECS, allowed_lateness_ms=0)
        )
        assert_that(
            out.computed | beam.MapTuple(lambda k, np: (np[0], np[1][0], np[1][1], np[1][3])),
            equal_to(sorted(expected)),
        )


def test_late_record_after_the_input_ended_says_so_instead_of_failing():
    """On a drain (or a finite input) the watermark is Beam's end of time, which no ISO-8601
    timestamp can show; an event released downstream after that is reported, not a crash."""
    from apache_beam.transforms.window import GlobalWindow

    from transforms.computed_traits import late_record

    e = Envelope("web", "f", "{}", event(messageId="m1"), 5 * S, "v")
    end_of_time_ms = GlobalWindow().max_timestamp().micros // 1000
    ended = late_record(e, end_of_time_ms, ["n"], 0)
    assert ended["watermark_at_least"] == "end-of-input" and ended["behind_watermark_ms"] is None
    on_time = late_record(e, 65 * S, ["n"], 0)
    assert on_time["watermark_at_least"] == "1970-01-01T00:01:05.000Z"
    assert on_time["behind_watermark_ms"] == 60 * S and on_time["message_id"] == "m1"
