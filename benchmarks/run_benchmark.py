"""End-to-end benchmark: `cdi generate` N events, then `cdi run` on the offline local runner.

Prints events/s, wall time and peak RSS of the run's whole process tree, for each size, and writes
the results to benchmarks/results/latest.json. The baseline measured in the same run is the
pure-Python core alone (decode + validate + dedup decision + profile fold, no Beam) over the same
events: the ratio shows what the Beam shell costs on this runner.

    python -m benchmarks.run_benchmark --events 100000 --persons 5000
    python -m benchmarks.run_benchmark --scaling          # 25k, 50k, 100k
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_pipeline(src: Path, out: Path) -> tuple[float, int, dict]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "--input", str(src), "--output", str(out)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"cdi run failed:\n{proc.stderr[-3000:]}")
    peak_kb = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    return wall, peak_kb * 1024, json.loads((out / "run_report.json").read_text())


def run_core_baseline(src: Path) -> float:
    """The functional core over the same lines, in one process, no Beam: the floor."""
    from benchmarks.micro import core_pass

    lines = src.read_text().splitlines()
    started = time.perf_counter()
    core_pass(lines)
    return time.perf_counter() - started


def bench(events: int, persons: int, workdir: Path) -> dict:
    from pipelines.generate import write

    src = workdir / f"events-{events}.ndjson"
    write(str(src), events, persons, seed=42)
    wall, peak, report = run_pipeline(src, workdir / f"out-{events}")
    core = run_core_baseline(src)
    row = {
        "events": events,
        "persons": persons,
        "wall_s": round(wall, 2),
        "events_per_s": round(events / wall),
        "peak_rss_mib": round(peak / 2**20),
        "core_wall_s": round(core, 2),
        "core_events_per_s": round(events / core),
        "ratio_to_core": round(wall / core, 1),
        "accounted": report["accounted"],
    }
    print(
        f"{events:>9,} events  {wall:8.1f} s  {row['events_per_s']:>7,} ev/s  "
        f"peak {row['peak_rss_mib']:>5} MiB  | core {core:6.2f} s  {row['core_events_per_s']:>8,} ev/s  "
        f"| pipeline/core {row['ratio_to_core']}x",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--persons", type=int, default=5_000)
    ap.add_argument("--scaling", action="store_true", help="run 25k, 50k and 100k events")
    args = ap.parse_args()
    sizes = [25_000, 50_000, 100_000] if args.scaling else [args.events]
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(n, max(args.persons * n // max(sizes), 1), Path(tmp)) for n in sizes]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
