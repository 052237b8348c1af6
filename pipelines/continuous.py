"""The shell of a continuous run (``cdi run --streaming``): it starts the job, prints a status line
while it runs, and drains it on SIGINT/SIGTERM.

Drain: the first signal creates the run's drain file; every continuous Kafka reader stops at its
next poll (transforms/io/kafka.py), the watermark reaches the end of time, event-time timers fire
(held consent buffers, windows, audience state), every sink flushes, and the job ends as a batch
run does, with its report. A second signal cancels the job (exit 1: buffered outputs are lost,
the sources re-read them on restart). Dataflow drains through its own drain command (the
readers' restrictions are truncated); Flink jobs stop with a savepoint.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from apache_beam.metrics.metric import MetricsFilter

from pipelines.report import counters as report_counters


def live_metrics(result) -> tuple[dict[str, int], dict[str, int]]:
    """The job's ``cdi`` counters and gauges as of now (attempted values: the job is running)."""
    if hasattr(result, "_metrics"):
        # Beam's portable PipelineResult caches its first metrics answer; a status line needs
        # each answer afresh.
        result._metrics = None
    counters = report_counters(result, live=True)
    query = result.metrics().query(MetricsFilter().with_namespace("cdi"))
    gauges: dict[str, int] = {}
    for g in query["gauges"]:
        value = g.attempted if g.attempted is not None else g.committed
        if value is not None and value.value is not None:
            name = g.key.metric.name
            gauges[name] = max(gauges.get(name, value.value), value.value)
    return counters, gauges


def status_line(
    counters: dict[str, int], gauges: dict[str, int], elapsed: float, rate: float
) -> str:
    """One line of progress: the counts a person watching a continuous job asks for."""
    lag = gauges.get("kafka.watermark_lag_ms")
    written = sum(v for k, v in counters.items() if k.startswith("profiles_written."))
    quarantined = sum(v for k, v in counters.items() if k.startswith("quarantined."))
    return (
        f"[{elapsed:7.0f}s] events in {counters.get('events_in', 0):,} ({rate:,.0f}/s)"
        f" | quarantined {quarantined:,} | duplicates {counters.get('dedup.duplicates', 0):,}"
        f" | late {counters.get('late', 0):,}"
        f" | watermark lag {'-' if lag is None else f'{lag / 1000:,.1f}s'}"
        f" | profile rows written {written:,}"
    )


def run_continuously(pipeline, drain_file: Path, status_every: float, out=sys.stderr) -> Any:
    """Runs ``pipeline`` until it ends (drained, or failed); returns the PipelineResult. Raises
    the job's error; ``KeyboardInterrupt`` when a second signal cancelled it."""
    drain_file.parent.mkdir(parents=True, exist_ok=True)
    drain_file.unlink(missing_ok=True)
    signals = []
    result = pipeline.run()

    def on_signal(signum, _frame):
        # Only what is safe in a handler: note the signal and create the drain file. Messages
        # and the cancel happen in the loop below.
        signals.append(signum)
        if len(signals) == 1:
            drain_file.touch()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failure: list[BaseException] = []

    def wait():
        try:
            result.wait_until_finish()
        except BaseException as e:  # reported on the main thread
            failure.append(e)

    waiter = threading.Thread(target=wait, name="cdi-wait", daemon=True)
    waiter.start()
    started = last_at = next_status = time.monotonic()
    next_status += status_every
    last_in, told = 0, 0
    try:
        while waiter.is_alive():
            waiter.join(0.2)
            if len(signals) > told:
                told = len(signals)
                name = signal.Signals(signals[-1]).name
                if told == 1:
                    print(f"cdi run: {name}: draining (again to cancel)", file=out, flush=True)
                else:
                    print("cdi run: cancelling the job", file=out, flush=True)
                    try:
                        result.cancel()
                    except Exception as e:  # already ending: nothing to cancel
                        print(f"cdi run: cancel: {e}", file=out, flush=True)
            now = time.monotonic()
            if not waiter.is_alive() or now < next_status:
                continue
            next_status = now + status_every
            try:
                counters, gauges = live_metrics(result)
            except Exception as e:  # metrics are best effort while running
                print(f"cdi run: status unavailable: {type(e).__name__}", file=out, flush=True)
                continue
            events_in = counters.get("events_in", 0)
            rate = (events_in - last_in) / max(now - last_at, 1e-9)
            last_in, last_at = events_in, now
            print(status_line(counters, gauges, now - started, rate), file=out, flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        drain_file.unlink(missing_ok=True)
    if len(signals) > 1:
        raise KeyboardInterrupt("cancelled")
    if failure:
        raise failure[0]
    return result
