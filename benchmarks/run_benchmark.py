"""End-to-end benchmark: generate N events, run the job through `cdi run` on the offline local
runner, and run the reference oracle (and the bare functional core) on the same file, in one go.

For each size it prints wall time, events/s and peak RSS of the pipeline (the largest process of
its tree), the same figures for the oracle (``benchmarks/oracle.py``: a single-process in-memory
implementation of the job's semantics) and the bare core (decode + validate + dedup + fold, no
stitching or consent), the ratio pipeline / oracle, and checks the targets of the performance
issue. Results go to ``benchmarks/results/latest.json``.

    python -m benchmarks.run_benchmark                       # 1M events, 200k persons
    python -m benchmarks.run_benchmark --events 100000       # persons default to events / 5
    python -m benchmarks.run_benchmark --scaling             # 250k, 500k, 1M, 2M
    python -m benchmarks.run_benchmark --scaling --sizes 25000,50000,100000

Every measured program runs in its own child process, so one's memory never counts for another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

RESULTS = Path(__file__).resolve().parent / "results"
SCALING_SIZES = (250_000, 500_000, 1_000_000, 2_000_000)
TARGETS = {"events_per_s": 10_000, "ratio_to_oracle": 5.0, "growth_2m_1m": 2.2, "peak_gib": 4.0}

# Runs a command as a child and reports its wall time and peak RSS (RUSAGE_CHILDREN covers the
# child and every descendant it waited for: the largest process of the tree).
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": p.returncode, "wall": wall, "rss": rss,
                  "stdout": p.stdout[-20000:], "stderr": p.stderr[-3000:]}))
"""


class RunFailed(Exception):
    """A measured program exited non-zero (killed by the kernel's OOM killer: -9)."""


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        raise RunFailed(
            f"{' '.join(cmd[1:4])} exited {result['rc']} after {result['wall']:.0f} s, peak "
            f"{result['rss'] / 2**30:.1f} GiB: {result['stderr'][-500:]}"
        )
    return result


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def too_big(rows: list[dict], events: int) -> str | None:
    """Why a size is not run: its peak memory, extrapolated linearly from the largest size
    measured so far, would not fit in this machine (the run would be OOM-killed after many
    minutes, measuring nothing)."""
    done = [r for r in rows if "peak_rss_mib" in r]
    if not done:
        return None
    last = max(done, key=lambda r: r["events"])
    estimate = last["peak_rss_mib"] / 1024 * events / last["events"]
    if estimate > 0.9 * machine_gib():
        return (
            f"not run: peak memory extrapolated from {last['events']:,} events is "
            f"{estimate:.1f} GiB, more than 90% of this machine's {machine_gib():.0f} GiB"
        )
    return None


def _oracle_available() -> bool:
    return (Path(__file__).resolve().parent / "oracle.py").exists()


def bench(events: int, persons: int, workdir: Path) -> dict:
    from pipelines.generate import write

    src = workdir / f"events-{events}.ndjson"
    write(str(src), events, persons, seed=42)
    out = workdir / f"out-{events}"
    py = sys.executable
    job = measure([py, "-m", "pipelines.cli", "run", "--input", str(src), "--output", str(out)])
    report = json.loads((out / "run_report.json").read_text())
    core_code = (
        "import sys, time; from benchmarks.micro import core_pass; "
        "lines = open(sys.argv[1]).read().splitlines(); t = time.perf_counter(); "
        "core_pass(lines); print(time.perf_counter() - t)"
    )
    core = measure([py, "-c", core_code, str(src)])
    row = {
        "events": events,
        "persons": persons,
        "wall_s": round(job["wall"], 2),
        "events_per_s": round(events / job["wall"]),
        "peak_rss_mib": round(job["rss"] / 2**20),
        "core_wall_s": round(core["wall"], 2),
        "core_events_per_s": round(events / core["wall"]),
        "accounted": report["accounted"],
        "profiles": report["profiles"],
    }
    line = (
        f"{events:>9,} events  pipeline {job['wall']:8.1f} s {row['events_per_s']:>7,} ev/s "
        f"peak {row['peak_rss_mib']:>6,} MiB"
    )
    if _oracle_available():
        oracle_rows = workdir / f"oracle-{events}.json"
        oracle = measure(
            [py, "-m", "benchmarks.oracle", "--input", str(src), "--profiles-out", str(oracle_rows)]
        )
        from benchmarks.oracle import differences, sink_rows

        diff = differences(
            orjson.loads(oracle_rows.read_bytes()), sink_rows(out / "profiles.sqlite")
        )
        row.update(
            profiles_equal_oracle=not diff,
            oracle_differences=diff,
            oracle_wall_s=round(oracle["wall"], 2),
            oracle_events_per_s=round(events / oracle["wall"]),
            oracle_peak_rss_mib=round(oracle["rss"] / 2**20),
            ratio_to_oracle=round(job["wall"] / oracle["wall"], 1),
        )
        line += (
            f" | oracle {oracle['wall']:6.1f} s {row['oracle_events_per_s']:>7,} ev/s "
            f"peak {row['oracle_peak_rss_mib']:>5,} MiB | pipeline/oracle {row['ratio_to_oracle']}x"
            f" | profiles equal: {'yes' if not diff else 'NO'}"
        )
    line += f" | bare core {core['wall']:5.1f} s"
    print(line, flush=True)
    return row


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target of the performance issue: measured value and PASS/FAIL."""
    out = []
    by_size = {r["events"]: r for r in rows}
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['events']:>9,}: {r['skipped']}")
            continue
        eps, peak = r["events_per_s"], r["peak_rss_mib"] / 1024
        out.append(
            f"{r['events']:>9,}: events/s {eps:,} "
            f"{'PASS' if eps >= TARGETS['events_per_s'] else 'FAIL'} (>= 10,000); "
            f"peak {peak:.2f} GiB {'PASS' if peak < TARGETS['peak_gib'] else 'FAIL'} (< 4)"
            + (
                f"; pipeline/oracle {r['ratio_to_oracle']}x "
                f"{'PASS' if r['ratio_to_oracle'] <= TARGETS['ratio_to_oracle'] else 'FAIL'} (<= 5)"
                if "ratio_to_oracle" in r
                else ""
            )
        )
    sizes = sorted(n for n, r in by_size.items() if "skipped" not in r)
    for small, big in zip(sizes, sizes[1:], strict=False):
        growth = by_size[big]["wall_s"] / by_size[small]["wall_s"]
        limit = TARGETS["growth_2m_1m"] * big / small / 2  # 2.2 per doubling
        out.append(
            f"time({big:,})/time({small:,}) = {growth:.2f} "
            f"{'PASS' if growth <= limit else 'FAIL'} (<= {limit:.1f})"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--persons", type=int, help="default: events / 5")
    ap.add_argument("--scaling", action="store_true", help="run every size of --sizes")
    ap.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SCALING_SIZES),
        help="comma-separated sizes for --scaling (default 250k,500k,1M,2M)",
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.scaling else [args.events]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {machine_gib():.0f} GiB, "
        f"Python {platform.python_version()}"
    )
    print(f"machine: {machine}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in sizes:
            persons = args.persons if args.persons and not args.scaling else max(n // 5, 1)
            reason = too_big(rows, n)
            if reason is None:
                try:
                    rows.append(bench(n, persons, Path(tmp)))
                    continue
                except RunFailed as e:
                    reason = f"failed: {e}"
            print(f"{n:>9,} events  {reason}", flush=True)
            rows.append({"events": n, "persons": persons, "skipped": reason})
    targets = check_targets(rows)
    print("\n".join(["targets:", *("  " + t for t in targets)]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps({"machine": machine, "runs": rows, "targets": targets}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
