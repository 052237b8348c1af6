"""What the continuous sources share (transforms/io/kafka.py, transforms/io/pubsub.py): an open
offset range read by one reader in order, a watermark that trails the newest record with an idle
rule, the drain file, and the finalization quirks of Prism.

A continuous reader is a splittable DoFn whose restriction is ``[start, OPEN_END)``: it claims
positions (Kafka offsets, Pub/Sub pull numbers) and self-checkpoints after each poll; runner
splits are refused. Its watermark state ``(watermark_ms, idle_since_ms)`` rides in the
watermark-estimator state (:func:`partition_watermark` is the rule), so it survives
checkpoints.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.utils.timestamp import Timestamp

OPEN_END = 2**63 - 1  # the restriction end of a continuous read: no end


def partition_watermark(
    state: tuple[int | None, int | None],
    newest_ms: int | None,
    now_ms: int,
    delay_ms: int,
    idle_after_ms: int,
    caught_up: bool = True,
) -> tuple[int | None, int | None]:
    """One reader's (a Kafka partition's, a Pub/Sub subscription's) ``(watermark_ms,
    idle_since_ms)`` after a poll that read records whose newest timestamp is ``newest_ms``
    (None: the poll read nothing). The watermark never goes back and never passes
    ``now_ms - delay_ms`` (a producer's clock ahead of ours does not pull it into the future);
    it trails the newest record by ``delay_ms``. The idle rule: a reader that read nothing while
    ``caught_up`` (nothing left to read, no error) for ``idle_after_ms`` moves it to
    ``now_ms - delay_ms``; a poll that was not caught up (an error, a broker away) restarts the
    idle clock."""
    watermark, idle_since = state
    ceiling = now_ms - delay_ms
    if newest_ms is not None:
        candidate, idle_since = min(newest_ms - delay_ms, ceiling), None
    elif not caught_up:
        candidate, idle_since = None, None
    else:
        idle_since = now_ms if idle_since is None else idle_since
        candidate = ceiling if now_ms - idle_since >= idle_after_ms else None
    if candidate is not None and (watermark is None or candidate > watermark):
        watermark = candidate
    return watermark, idle_since


class PositionTracker(OffsetRestrictionTracker):
    """Offsets of one partition. Only self-checkpoints split it: a runner's split of an open
    range would start a second reader far past the end (and, reset by the broker, from the
    beginning)."""

    def try_split(self, fraction_of_remainder):
        if fraction_of_remainder > 0:
            return None
        return super().try_split(0)

    def is_bounded(self):
        return self.current_restriction().stop != OPEN_END


class OpenRangeRestrictions(beam.transforms.core.RestrictionProvider):
    def initial_restriction(self, element):
        return OffsetRange(element[2], OPEN_END)

    def create_tracker(self, restriction):
        return PositionTracker(restriction)

    def split(self, element, restriction):
        yield restriction  # one reader per partition

    def restriction_size(self, element, restriction):
        return 1  # the backlog is not known without a broker call; partitions weigh the same

    def truncate(self, element, restriction):
        return None  # a drain stops reading at once


class TrailingWatermarkEstimator(beam.io.iobase.WatermarkEstimator):
    """Holds ``(watermark_ms, idle_since_ms)`` (:func:`partition_watermark`) as the estimator
    state, so the rule survives checkpoints."""

    def __init__(self, state):
        self._state = tuple(state) if state else (None, None)

    def observe_timestamp(self, timestamp):
        pass

    def current_watermark(self):
        watermark = self._state[0]
        return None if watermark is None else Timestamp(micros=watermark * 1000)

    def get_estimator_state(self):
        return self._state

    def advance(self, state):
        self._state = state


class TrailingWatermarks(beam.transforms.core.WatermarkEstimatorProvider):
    def initial_estimator_state(self, element, restriction):
        return (None, None)

    def create_watermark_estimator(self, estimator_state):
        return TrailingWatermarkEstimator(estimator_state)


def advance_watermark(
    estimator, newest_ms: int | None, delay_s: float, idle_after_s: float, caught_up: bool = True
):
    """Applies :func:`partition_watermark` to a reader's estimator after a poll; returns the
    watermark lag in ms (now - watermark), or None while there is no watermark yet."""
    import time

    now_ms = int(time.time() * 1000)
    state = partition_watermark(
        estimator.get_estimator_state(),
        newest_ms,
        now_ms,
        int(delay_s * 1000),
        int(idle_after_s * 1000),
        caught_up,
    )
    estimator.advance(state)
    return None if state[0] is None else now_ms - state[0]


RESTRICTION = beam.DoFn.RestrictionParam(OpenRangeRestrictions())
WATERMARK = beam.DoFn.WatermarkEstimatorParam(TrailingWatermarks())


def drain_requested(path: str | None) -> bool:
    import os

    return bool(path) and os.path.exists(path)


def drained(tracker, drain_file: str | None) -> bool:
    """Whether a drain was requested; the reader's restriction is then claimed to its end, so
    the call returns with the restriction done and the watermark goes to the end of time."""
    if not drain_requested(drain_file):
        return False
    tracker.try_claim(OPEN_END)
    return True


class AcceptFinalization(beam.DoFn):
    """Registers a no-op finalization for each bundle of the stage that pairs each partition with
    its restriction: Prism fuses that step of the reader (which it marks as finalizing, like the
    reader) into this stage and asks its bundles to finalize, which the SDK refuses (failing
    the bundle) unless something registered."""

    def process(self, element, finalizer=beam.DoFn.BundleFinalizerParam):
        finalizer.register(noop)
        yield element


def noop() -> None:
    pass
