"""Windowed computed traits with allowed lateness, configurable triggers and a `late` output.

Stream contract:
- Keyed by profile key; event time is the element timestamp (the corrected event time).
- Windows per trait: fixed, sliding, session (merging) or lifetime, assigned by the pure
  :func:`assign_windows`; aggregates (count, sum, distinct_count, first_seen, last_seen) by the pure
  ``agg_*`` functions.
- Panes: EARLY after ``trigger.early`` of processing time (when set), ON_TIME when the watermark
  passes the window end, LATE for each event that arrives after that but within
  ``allowed_lateness``. Accumulating panes carry the full value (a late pane corrects the value);
  discarding panes carry the delta since the previous pane.
- State per key: one small dict of open windows per trait, a watermark lower bound, the armed
  timer times. A window's state is cleared by an event-time timer at ``end + allowed_lateness``.
- Too late: an event whose window was already garbage-collected goes to the ``late`` output with
  how far behind the watermark it was; nothing is dropped silently. We do the windowing in keyed
  state rather than with ``WindowInto`` + ``GroupByKey`` because Beam drops data past the allowed
  lateness at the GroupByKey without any output or hook, and the late output is a promise here.
  The watermark is known per key from the event-time timers that fired for it (a timer at T fires
  only once the input watermark has passed T); for a key with no closed window yet, a very late
  event opens a window of its own and is emitted in a pane of its own at once: it is counted,
  never double counted, and no earlier value is overwritten.
- Bounded runs (batch, backfills from files): nothing is late, by definition of a bounded input,
  and every window closes when the input ends, so :mod:`transforms.person_history` groups each
  person's events and :func:`history_panes` gives each window its one ON_TIME pane: no state, no
  timers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.typehints import KV
from apache_beam.utils.timestamp import Timestamp

from transforms import exact_sum
from transforms.dead_letter import FAILED, dead_letter_on_raise
from transforms.envelope import Envelope, format_iso_ms, get_path

LATE = "late"
COMPUTED = "computed"

# The lifetime window ends where Beam's global window ends: its on-time pane fires when a bounded
# input is exhausted (and never, in streaming, where early panes carry it).
LIFETIME_END_MS = int(GlobalWindow().max_timestamp().micros // 1000)


@dataclass(frozen=True)
class ComputedTraitSpec:
    name: str
    aggregate: str  # count | sum | distinct_count | first_seen | last_seen
    event: str | None = None
    property: str | None = None
    window: str = "lifetime"  # fixed | sliding | session | lifetime
    size_ms: int = 0
    period_ms: int = 0
    gap_ms: int = 0
    early_ms: int | None = None
    late_panes: bool = True
    accumulation: str = "accumulating"

    @classmethod
    def from_config(cls, c) -> ComputedTraitSpec:
        ms = lambda d: int(d * 1000) if d is not None else 0  # noqa: E731
        return cls(
            name=c.name,
            aggregate=c.aggregate,
            event=c.event,
            property=c.property,
            window=c.window.type,
            size_ms=ms(c.window.size),
            period_ms=ms(c.window.period),
            gap_ms=ms(c.window.gap),
            early_ms=ms(c.trigger.early) if c.trigger.early else None,
            late_panes=c.trigger.late,
            accumulation=c.trigger.accumulation,
        )


# --- pure core ---------------------------------------------------------------------------------


def assign_windows(spec: ComputedTraitSpec, ts_ms: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` windows an event at ``ts_ms`` belongs to (sessions before merging)."""
    if spec.window == "fixed":
        start = ts_ms - ts_ms % spec.size_ms
        return [(start, start + spec.size_ms)]
    if spec.window == "sliding":
        last = ts_ms - ts_ms % spec.period_ms
        out = []
        start = last
        while start > ts_ms - spec.size_ms:
            out.append((start, start + spec.size_ms))
            start -= spec.period_ms
        return sorted(out)
    if spec.window == "session":
        return [(ts_ms, ts_ms + spec.gap_ms)]
    return [(-1, LIFETIME_END_MS)]


def extract_value(spec: ComputedTraitSpec, event: dict[str, Any]) -> tuple[bool, Any]:
    """Whether the event feeds this trait, and the value it contributes."""
    if spec.event is not None and (
        event.get("type") != "track" or event.get("event") != spec.event
    ):
        return False, None
    if spec.aggregate in ("sum", "distinct_count"):
        value = get_path(event, spec.property)
        if spec.aggregate == "sum":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            return ok, value
        return value is not None, value
    return True, None


def agg_init(kind: str) -> Any:
    return [] if kind == "distinct_count" else None


def agg_add(kind: str, acc: Any, value: Any, ts_ms: int) -> Any:
    if kind == "count":
        return (acc or 0) + 1
    if kind == "sum":
        # Exact partials: a float total must not depend on the order events arrive in.
        return exact_sum.add(acc if acc is not None else exact_sum.new(), value)
    if kind == "distinct_count":
        # Kept sorted and unique so the state (and the merge) is deterministic.
        key = value if isinstance(value, (str, int, float, bool)) else repr(value)
        if key not in acc:
            acc = sorted([*acc, key], key=repr)
        return acc
    if kind == "first_seen":
        return ts_ms if acc is None else min(acc, ts_ms)
    return ts_ms if acc is None else max(acc, ts_ms)  # last_seen


def agg_merge(kind: str, a: Any, b: Any) -> Any:
    if a is None or b is None:
        return b if a is None else a
    if kind == "count":
        return a + b
    if kind == "sum":
        return exact_sum.merge(exact_sum.merge(exact_sum.new(), a), b)
    if kind == "distinct_count":
        return sorted(set(a) | set(b), key=repr)
    return min(a, b) if kind == "first_seen" else max(a, b)


def agg_value(kind: str, acc: Any) -> Any:
    if kind == "distinct_count":
        return len(acc)
    if kind in ("first_seen", "last_seen"):
        return format_iso_ms(acc) if acc is not None else None
    if kind == "sum":
        return exact_sum.value(acc) if acc is not None else 0
    return acc if acc is not None else 0


def window_key(start: int, end: int) -> str:
    """Open windows are kept in a dict keyed by ``"start:end"`` (a plain str key encodes fast)."""
    return f"{start}:{end}"


def window_bounds(key: str) -> tuple[int, int]:
    start, end = key.split(":")
    return int(start), int(end)


def new_window(kind: str) -> dict:
    """An open window: accumulator, panes emitted, on-time pane fired, data since last pane."""
    return {"acc": agg_init(kind), "pane": 0, "fired": False, "dirty": False}


def open_window(windows: dict[str, dict], key: str, kind: str) -> dict:
    """The open window at ``key``, created empty on first use."""
    w = windows.get(key)
    if w is None:
        w = windows[key] = new_window(kind)
    return w


def merge_sessions(windows: dict[str, dict], new: tuple[int, int], kind: str) -> tuple[str, dict]:
    """Merge a new session with every overlapping open one; returns the merged entry's key."""
    lo, hi = new
    merged = new_window(kind)
    for key in list(windows):
        s, e = window_bounds(key)
        if s <= hi and lo <= e:  # overlapping or touching sessions merge
            w = windows.pop(key)
            lo, hi = min(lo, s), max(hi, e)
            merged["acc"] = agg_merge(kind, merged["acc"], w["acc"])
            merged["pane"] = max(merged["pane"], w["pane"])
            merged["dirty"] = merged["dirty"] or w["dirty"]
    key = window_key(lo, hi)
    windows[key] = merged
    return key, merged


def history_panes(
    specs: tuple[ComputedTraitSpec, ...], events: list[tuple[int, dict[str, Any]]]
) -> list[tuple[str, list]]:
    """Bounded input: a key's whole history ``[(event_time_ms, event)]`` at once. Every window
    closes when the input ends, so each gets one ON_TIME pane with its full value (for
    discarding panes too: it is the first pane). Any order gives the same panes: aggregates
    are commutative and sessions merge the same way whatever order they open in."""
    state: dict[str, dict[str, dict]] = {}
    for ts_ms, event in events:
        for spec in specs:
            feeds, value = extract_value(spec, event)
            if not feeds:
                continue
            open_windows = state.setdefault(spec.name, {})
            for lo, hi in assign_windows(spec, ts_ms):
                if spec.window == "session":
                    _, w = merge_sessions(open_windows, (lo, hi), spec.aggregate)
                else:
                    w = open_window(open_windows, window_key(lo, hi), spec.aggregate)
                w["acc"] = agg_add(spec.aggregate, w["acc"], value, ts_ms)
    return [
        (spec.name, _pane(spec, key, windows[key]))
        for spec in specs
        for windows in [state.get(spec.name, {})]
        for key in sorted(windows, key=lambda k: window_bounds(k)[1])
    ]


# The last instant an ISO-8601 timestamp can show (9999-12-31T23:59:59.999Z).
_LAST_ISO_MS = 253_402_300_799_999


def late_record(env: Envelope, watermark_ms: int, traits: list[str], lateness_ms: int) -> dict:
    """The ``late`` output's record for an event too late for ``traits``. After the input ends
    (a drain, or a finite input), the watermark is Beam's end of time, past anything ISO-8601
    can write: the record says ``end-of-input`` instead of failing the bundle."""
    ended = watermark_ms > _LAST_ISO_MS
    return {
        "stage": "lateness",
        "reason": "late.beyond_allowed_lateness",
        "message_id": env.event.get("messageId"),
        "event_time": format_iso_ms(env.event_time_ms),
        "watermark_at_least": "end-of-input" if ended else format_iso_ms(watermark_ms),
        "behind_watermark_ms": None if ended else watermark_ms - env.event_time_ms,
        "allowed_lateness_ms": lateness_ms,
        "traits": traits,
        "source": env.source,
        "origin": env.origin,
        "payload": env.payload,
    }


# --- Beam shell --------------------------------------------------------------------------------


def _pane(spec: ComputedTraitSpec, key: str, w: dict) -> list:
    start, end = window_bounds(key)
    return [
        end,
        None if spec.window == "lifetime" else start,
        w["pane"],
        agg_value(spec.aggregate, w["acc"]),
        spec.accumulation,
    ]


class _ComputeTraitsFn(beam.DoFn):
    WINDOWS_STATE = ReadModifyWriteStateSpec("windows", FastPrimitivesCoder())
    WATERMARK_STATE = ReadModifyWriteStateSpec("watermark_lb", VarIntCoder())
    ARMED_STATE = ReadModifyWriteStateSpec("armed", VarIntCoder())
    # {trait: when (processing time, ms) its next EARLY pane is due}: each trait its own period.
    EARLY_DUE_STATE = ReadModifyWriteStateSpec("early_due", FastPrimitivesCoder())
    WINDOW_TIMER = TimerSpec("window", TimeDomain.WATERMARK)
    EARLY_TIMER = TimerSpec("early", TimeDomain.REAL_TIME)

    def __init__(self, specs: tuple[ComputedTraitSpec, ...], allowed_lateness_ms: int, clock=None):
        self._specs = specs
        self._lateness = allowed_lateness_ms
        # Processing time source; injectable because TestStream's clock is not the wall clock.
        self._clock = clock
        self._late = Metrics.counter("cdi", "late")
        self._panes = Metrics.counter("cdi", "computed_trait_panes")

    def _now(self) -> Timestamp:
        return Timestamp.of(self._clock()) if self._clock else Timestamp.now()

    @dead_letter_on_raise
    def process(
        self,
        element: tuple[str, Envelope],
        ts=beam.DoFn.TimestampParam,
        windows_state=beam.DoFn.StateParam(WINDOWS_STATE),
        wm_state=beam.DoFn.StateParam(WATERMARK_STATE),
        armed_state=beam.DoFn.StateParam(ARMED_STATE),
        early_state=beam.DoFn.StateParam(EARLY_DUE_STATE),
        window_timer=beam.DoFn.TimerParam(WINDOW_TIMER),
        early_timer=beam.DoFn.TimerParam(EARLY_TIMER),
    ):
        profile_key, env = element
        early_changed = []
        ts_ms = env.event_time_ms
        wm = wm_state.read()
        state = windows_state.read() or {}
        too_late = []
        changed = False
        for spec in self._specs:
            feeds, value = extract_value(spec, env.event)
            if not feeds:
                continue
            open_windows = state.setdefault(spec.name, {})
            for lo, hi in assign_windows(spec, ts_ms):
                if spec.window != "lifetime" and wm is not None and hi + self._lateness <= wm:
                    too_late.append(spec.name)
                    continue
                if spec.window == "session":
                    key, w = merge_sessions(open_windows, (lo, hi), spec.aggregate)
                    w["fired"] = wm is not None and window_bounds(key)[1] <= wm
                else:
                    key = window_key(lo, hi)
                    w = open_window(open_windows, key, spec.aggregate)
                w["acc"] = agg_add(spec.aggregate, w["acc"], value, ts_ms)
                changed = True
                if w["fired"]:
                    if spec.late_panes:  # a LATE pane, corrected value, right away
                        yield self._emit(profile_key, spec, key, w)
                    else:
                        w["dirty"] = True
                else:
                    w["dirty"] = True
                    if spec.early_ms:
                        early_changed.append(spec)
        if too_late:
            self._late.inc()
            yield beam.pvalue.TaggedOutput(
                LATE, late_record(env, wm, sorted(set(too_late)), self._lateness)
            )
        if changed:
            windows_state.write(state)
            self._arm(state, wm, armed_state, window_timer)
            if early_changed:
                due = early_state.read() or {}
                now_ms = self._now().micros // 1000
                for spec in early_changed:
                    due.setdefault(spec.name, now_ms + int(spec.early_ms))
                early_state.write(due)
                early_timer.set(Timestamp.of(min(due.values()) / 1000))

    def _emit(self, profile_key: str, spec: ComputedTraitSpec, key: str, w: dict):
        pane = _pane(spec, key, w)
        w["pane"] += 1
        w["dirty"] = False
        if spec.accumulation == "discarding":
            w["acc"] = agg_init(spec.aggregate)
        self._panes.inc()
        return (profile_key, (spec.name, pane))

    def _deadline(self, spec_window: str, key: str, w: dict) -> int | None:
        end = window_bounds(key)[1]
        if not w["fired"]:
            return end
        if spec_window == "lifetime":
            return None
        return end + self._lateness

    def _arm(self, state, wm, armed_state, timer) -> None:
        deadlines = [
            self._deadline(spec.window, key, w)
            for spec in self._specs
            for key, w in state.get(spec.name, {}).items()
        ]
        deadlines = [d for d in deadlines if d is not None]
        if not deadlines:
            armed_state.clear()
            return
        nxt = min(deadlines)
        if armed_state.read() != nxt:
            armed_state.write(nxt)
            timer.set(Timestamp(micros=nxt * 1000))

    @on_timer(WINDOW_TIMER)
    @dead_letter_on_raise
    def on_window_timer(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        windows_state=beam.DoFn.StateParam(WINDOWS_STATE),
        wm_state=beam.DoFn.StateParam(WATERMARK_STATE),
        armed_state=beam.DoFn.StateParam(ARMED_STATE),
        window_timer=beam.DoFn.TimerParam(WINDOW_TIMER),
    ):
        now_ms = int(fired.micros // 1000)
        wm = max(wm_state.read() or now_ms, now_ms)
        wm_state.write(wm)  # the input watermark has passed `fired`
        state = windows_state.read() or {}
        for spec in self._specs:
            open_windows = state.get(spec.name, {})
            for wkey in sorted(open_windows, key=lambda k: window_bounds(k)[1]):
                w = open_windows[wkey]
                end = window_bounds(wkey)[1]
                if not w["fired"] and end <= wm:
                    w["fired"] = True
                    yield self._emit(key, spec, wkey, w)  # the ON_TIME pane
                if w["fired"] and spec.window != "lifetime" and end + self._lateness <= wm:
                    if w["dirty"]:  # late data held back (late panes off): final pane now
                        yield self._emit(key, spec, wkey, w)
                    del open_windows[wkey]
        windows_state.write(state)
        armed_state.clear()
        self._arm(state, wm, armed_state, window_timer)

    @on_timer(EARLY_TIMER)
    @dead_letter_on_raise
    def on_early_timer(
        self,
        key=beam.DoFn.KeyParam,
        windows_state=beam.DoFn.StateParam(WINDOWS_STATE),
        early_state=beam.DoFn.StateParam(EARLY_DUE_STATE),
        early_timer=beam.DoFn.TimerParam(EARLY_TIMER),
        fired_at=beam.DoFn.TimestampParam,
    ):
        now_ms = fired_at.micros // 1000  # the time this timer was set for
        early = {s.name for s in self._specs if s.early_ms}
        # Only traits that still have early panes (a trait renamed, removed or without
        # `trigger.early` since an update must not re-arm the timer for ever); a timer armed by
        # a job before due times per trait (no due times) fires every early trait once.
        stored = early_state.read()
        if stored:
            due = {n: t for n, t in stored.items() if n in early}
        else:
            due = dict.fromkeys(early, now_ms)
        state = windows_state.read() or {}
        for spec in self._specs:
            if not spec.early_ms or due.get(spec.name, now_ms + 1) > now_ms:
                continue  # not this trait's turn: its own period has not passed
            del due[spec.name]
            for wkey, w in state.get(spec.name, {}).items():
                if w["dirty"] and not w["fired"]:
                    yield self._emit(key, spec, wkey, w)  # an EARLY pane
        windows_state.write(state)
        if due:
            early_state.write(due)
            early_timer.set(Timestamp.of(min(due.values()) / 1000))
        else:
            early_state.clear()


class ComputeTraits(beam.PTransform):
    """``(profile_key, envelope)`` in; ``(profile_key, (trait, pane))`` panes, ``late`` records
    and ``failed`` dead letters (an event, or a timer's key, the step raised on) out."""

    def __init__(self, specs, allowed_lateness_ms: int, clock=None):
        super().__init__()
        specs = tuple(specs)
        if not specs:
            raise ValueError("at least one computed trait is required")
        if allowed_lateness_ms < 0:
            raise ValueError("allowed_lateness_ms must not be negative")
        self._specs, self._clock = specs, clock
        self._lateness = allowed_lateness_ms

    def expand(self, keyed_envelopes):
        # Keys typed as text, so the state's key coder is the standard, deterministic UTF-8
        # one on every runner (a tagged output upstream is untyped: Beam would fall back to a
        # pickled Python coder). tests/test_portability.py checks every stateful step.
        typed = keyed_envelopes | "KeyedByText" >> beam.Map(lambda kv: kv).with_output_types(
            KV[str, Any]
        )
        return typed | "Windows" >> beam.ParDo(
            _ComputeTraitsFn(self._specs, self._lateness, self._clock)
        ).with_outputs(LATE, FAILED, main=COMPUTED)
