"""Where a local `cdi run` spends its time and memory: the profile behind the performance notes.

Runs the job in-process on the FnApiRunner under cProfile and prints

- time per event split into Beam's runner/worker machinery, Beam's coders, our transforms (per
  module) and the rest, from cProfile's own time per function (µs per input event);
- DoFn calls per event that take runner-supplied arguments (state, timers, timestamps, side
  inputs): a stateful call costs the runner a key switch, state objects and a commit, whatever
  the DoFn does;
- element-steps per top-level transform: how many elements each one's steps handled (the
  runner's element counts per PCollection, named by the step that produced them). The
  in-process runner's cost is mostly per element and step, whatever the DoFn does;
- the state census at the end of the main stage: cells and bytes per transform and state name,
  from the runner's in-memory state store. The local runner executes a bounded stage as one
  bundle and keeps every touched cell's state objects until the bundle commits, so this census is
  what grows with input size.

    python -m benchmarks.where_time_goes --events 10000          # generates its own input
    python -m benchmarks.where_time_goes --input events.ndjson

Reads Beam internals (the runner's state store, bundle hook) for measurement only; nothing here is
used by the job.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

# Our own code, by top-level package; everything else is bucketed by where it lives.
_OURS = ("/transforms/", "/pipelines/", "/runners/")
_BEAM_RUNNER = ("apache_beam/runners/",)
_BEAM_CODERS = ("apache_beam/coders/",)


def bucket(filename: str) -> str:
    if any(p in filename for p in _OURS) and "site-packages" not in filename:
        return "ours: " + Path(filename).stem
    if any(p in filename for p in _BEAM_RUNNER):
        return "beam runner/worker machinery"
    if any(p in filename for p in _BEAM_CODERS):
        return "beam coders"
    if "apache_beam" in filename:
        return "beam other (windows, timestamps, metrics)"
    if filename == "~":
        return "builtins (dict/list/regex/isinstance...)"
    return "stdlib and other libraries"


_UNOWNED = ("builtins", "stdlib")


def time_split(stats: pstats.Stats) -> dict[str, float]:
    """Own time per bucket. Builtins and stdlib calls (dict.get, re.search, copy.deepcopy...) are
    charged to whoever called them (per call edge), so "ours" and "beam" include what they use."""
    table = stats.stats

    def owner(func, seen=frozenset()):
        name = bucket(func[0])
        if not name.startswith(_UNOWNED):
            return name
        callers = table.get(func, (0, 0, 0, 0, {}))[4]
        if not callers or func in seen:
            return name
        top = max(callers.items(), key=lambda kv: kv[1][2])[0]  # the caller with most time
        return owner(top, seen | {func})

    out: collections.Counter = collections.Counter()
    for func, (_cc, _nc, tottime, _ct, callers) in table.items():
        if not bucket(func[0]).startswith(_UNOWNED) or not callers:
            out[bucket(func[0])] += tottime
            continue
        for caller, edge in callers.items():  # edge = (cc, nc, tottime, cumtime) via this caller
            out[owner(caller, frozenset({func}))] += edge[2]
    return dict(out)


def stateful_calls(stats: pstats.Stats) -> int:
    """Calls into DoFns that take state, timer, timestamp or side-input parameters (Beam inserts
    their values per call)."""
    return sum(
        nc
        for (filename, _line, name), (_cc, nc, *_rest) in stats.stats.items()
        if name == "insert_values_in_args" and "apache_beam/internal/util.py" in filename
    )


def state_census(state: dict) -> list[tuple[str, int, int]]:
    """(transform/state, cells, value bytes) from the runner's state store, largest first."""
    from apache_beam.portability.api import beam_fn_api_pb2

    agg: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for raw_key, values in state.items():
        key = beam_fn_api_pb2.StateKey.FromString(raw_key)
        kind = key.WhichOneof("type")
        if kind != "bag_user_state":
            continue
        sub = key.bag_user_state
        cell = agg[f"{sub.transform_id.split('/ParDo(')[0]} : {sub.user_state_id}"]
        cell[0] += 1
        cell[1] += sum(len(v) for v in values) + len(raw_key)
    return sorted(((k, c, b) for k, (c, b) in agg.items()), key=lambda r: -r[2])


def element_steps(counts: dict[str, int], producers: dict[str, str]) -> list[tuple[str, int]]:
    """Elements per top-level transform (``Read[web]/ReadLines/...`` -> ``Read``), largest first:
    ``counts`` is the runner's element count per PCollection id, ``producers`` the unique name
    of the step that outputs each id. A count of an id no step names (a runner-made
    PCollection, such as a lifted combiner's) goes under ``(runner)``."""
    totals: collections.Counter = collections.Counter()
    for pc, n in counts.items():
        name = producers.get(pc) or producers.get(pc.removeprefix("ref_PCollection_"))
        top = name.split("/", 1)[0].split("[", 1)[0] if name else "(runner)"
        totals[top] += n
    return totals.most_common()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", help="an NDJSON file (default: generate --events)")
    ap.add_argument("--events", type=int, default=10_000)
    args = ap.parse_args(argv)

    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from pipelines.cli import main as cdi

    census: list = []
    execute = fn_runner.FnApiRunner._execute_bundle

    def execute_and_count(self, ctx, manager, bundle_input):
        result = execute(self, ctx, manager, bundle_input)
        cells = state_census(ctx.state_servicer._state)
        if cells and sum(c for _k, c, _b in cells) > sum(c for _k, c, _b in census):
            census[:] = cells  # the fullest the store got
        return result

    fn_runner.FnApiRunner._execute_bundle = execute_and_count

    import apache_beam as beam

    import pipelines.report as report

    producers: dict[str, str] = {}
    counts: collections.Counter = collections.Counter()
    run, read_counters = beam.Pipeline.run, report.counters

    def run_and_name(self, *a, **k):
        for t in self.to_runner_api().components.transforms.values():
            if not t.subtransforms:
                producers.update({pc: t.unique_name for pc in t.outputs.values()})
        return run(self, *a, **k)

    def counters_and_elements(result):
        from apache_beam.metrics.monitoring_infos import extract_counter_value

        for info in result.monitoring_infos():
            if info.urn == "beam:metric:element_count:v1":
                counts[info.labels.get("PCOLLECTION")] += extract_counter_value(info)
        return read_counters(result)

    beam.Pipeline.run, report.counters = run_and_name, counters_and_elements
    with tempfile.TemporaryDirectory() as tmp:
        src = args.input
        if not src:
            from pipelines.generate import write

            src = str(Path(tmp) / "events.ndjson")
            write(src, args.events, max(args.events // 5, 1), seed=42)
        events = sum(1 for _ in open(src, "rb"))
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        rc = cdi(["run", "--input", src, "--output", str(Path(tmp) / "out")])
        profiler.disable()
        wall = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"cdi run exited {rc}")
    stats = pstats.Stats(profiler, stream=sys.stderr)
    split = time_split(stats)
    total = sum(split.values())
    print(f"\n{events:,} events, {wall:.1f} s wall under cProfile ({total:.1f} s profiled)")
    print(f"{'µs/event':>9} {'share':>6}  where")
    for name, t in sorted(split.items(), key=lambda kv: -kv[1]):
        if t / total >= 0.005:
            print(f"{t / events * 1e6:9.0f} {t / total:6.1%}  {name}")
    calls = stateful_calls(stats)
    print(
        f"\nDoFn calls with state/timer/timestamp/side-input arguments: {calls:,} "
        f"({calls / events:.1f} per event)"
    )
    steps = element_steps(counts, producers)
    every = sum(n for _name, n in steps)
    print(f"\nelement-steps: {every:,} ({every / events:.1f} per event)")
    for name, n in steps[:10]:
        print(f"  {n:>9,} {n / every:6.1%}  {name}")
    cells = sum(c for _k, c, _b in census)
    size = sum(b for _k, _c, b in census)
    print(
        f"\nstate store at its fullest: {cells:,} cells ({cells / events:.1f} per event), "
        f"{size / 2**20:.1f} MiB encoded ({size / events:.0f} B per event)"
    )
    for name, c, b in census[:12]:
        print(f"  {c:>9,} cells {b / 2**20:8.1f} MiB  {name}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:,.0f} MiB ({peak * 1024 / events:.1f} KiB per event incl. startup)")


if __name__ == "__main__":
    main()
