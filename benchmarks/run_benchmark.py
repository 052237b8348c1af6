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
TARGETS = {
    "events_per_s": 10_000,
    "ratio_to_oracle": 2.0,
    "oracle_events_per_s": 12_000,
    "growth_2m_1m": 2.2,
    "peak_gib": 4.0,
}

# Runs a command as a child and reports its wall time, the peak RSS of its largest process
# (RUSAGE_CHILDREN covers the child and every descendant it waited for) and the peak of the
# whole tree's RSS summed (sampled from /proc every 0.2 s: a runner with worker processes or a
# Go runner beside the Python job uses several processes at once). Written by hand: psutil
# would be a dependency for one loop over /proc.
_MEASURE = """
import json, os, resource, subprocess, sys, time

def tree_rss(root):
    children = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total

t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
import threading
out = {}
def drain(name, stream):
    out[name] = stream.read()
threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("o", p.stdout), ("e", p.stderr))]
for th in threads:
    th.start()
peak_tree = 0
while p.poll() is None:
    peak_tree = max(peak_tree, tree_rss(p.pid))
    time.sleep(0.2)
for th in threads:
    th.join()
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": p.returncode, "wall": wall, "rss": rss, "tree_rss": max(peak_tree, rss),
                  "stdout": out["o"][-20000:], "stderr": out["e"][-3000:]}))
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


def too_big(rows: list[dict], events: int, runner: str = "local") -> str | None:
    """Why a size is not run: its peak memory, extrapolated linearly from the largest size
    measured so far, would not fit in this machine (the run would be OOM-killed after many
    minutes, measuring nothing)."""
    done = [r for r in rows if "peak_rss_mib" in r and r.get("runner", "local") == runner]
    if not done:
        return None
    last = max(done, key=lambda r: r["events"])
    peak = max(last["peak_rss_mib"], last.get("peak_tree_rss_mib", 0))
    if "--max-events-per-pass" in RUNNERS.get(runner, ()) and events > 250_000:
        return None  # bounded by the pass size, not the input
    estimate = peak / 1024 * events / last["events"]
    if estimate > 0.9 * machine_gib():
        return (
            f"not run: peak memory extrapolated from {last['events']:,} events is "
            f"{estimate:.1f} GiB, more than 90% of this machine's {machine_gib():.0f} GiB"
        )
    return None


def _oracle_available() -> bool:
    return (Path(__file__).resolve().parent / "oracle.py").exists()


# The local runners a scaling run compares: the in-process FnApiRunner (one core), the same
# runner in passes, the same runner with two SDK worker processes (Beam's multi_processing mode: bundles run in both,
# shuffles in the runner process), and Prism (Beam's Go runner: shuffles and state in Go
# threads, the Python work in one loopback SDK harness).
RUNNERS = {
    "local": [],
    # The same runner in passes of at most 250k events (pipelines/passes.py): memory bounded.
    "local-passes": ["--max-events-per-pass", "250000"],
    # Both cores: the input split into two halves of whole persons, run at once in two
    # processes; and the same with passes of at most 250k, two at a time (pipelines/passes.py).
    "local-2workers": ["--workers", "2"],
    "local-passes-2workers": ["--workers", "2", "--max-events-per-pass", "250000"],
    "local-2proc": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    "prism": ["--runner", "prism"],
}


def _oracle_row(src: Path, workdir: Path, events: int) -> tuple[dict, dict | None]:
    """The oracle's measures for ``src`` and its profile rows (None without an oracle)."""
    if not _oracle_available():
        return {}, None
    py = sys.executable
    rows_file = workdir / f"oracle-{events}.json"
    oracle = measure(
        [py, "-m", "benchmarks.oracle", "--input", str(src), "--profiles-out", str(rows_file)]
    )
    return {
        "oracle_wall_s": round(oracle["wall"], 2),
        "oracle_events_per_s": round(events / oracle["wall"]),
        "oracle_peak_rss_mib": round(oracle["rss"] / 2**20),
    }, orjson.loads(rows_file.read_bytes())


def bench(
    events: int, persons: int, workdir: Path, runners: tuple[str, ...] = ("local",)
) -> list[dict]:
    """One row per runner for ``events`` generated events: the job, the oracle and the bare
    core on the same file; each runner's profile rows compared with the oracle's (and so with
    each other's)."""
    from benchmarks.oracle import differences, sink_rows
    from pipelines.generate import write

    src = workdir / f"events-{events}.ndjson"
    write(str(src), events, persons, seed=42)
    py = sys.executable
    core_code = (
        "import sys, time; from benchmarks.micro import core_pass; "
        "lines = open(sys.argv[1]).read().splitlines(); t = time.perf_counter(); "
        "core_pass(lines); print(time.perf_counter() - t)"
    )
    core = measure([py, "-c", core_code, str(src)])
    oracle, oracle_rows = _oracle_row(src, workdir, events)
    rows = []
    for runner in runners:
        out = workdir / f"out-{events}-{runner}"
        try:
            job = measure(
                [py, "-m", "pipelines.cli", "run", "--input", str(src), "--output", str(out)]
                + RUNNERS[runner]
            )
        except RunFailed as e:
            print(f"{events:>9,} events  {runner:<21} failed: {e}", flush=True)
            rows.append(
                {"events": events, "persons": persons, "runner": runner, "skipped": f"failed: {e}"}
            )
            continue
        report = json.loads((out / "run_report.json").read_text())
        row = {
            "events": events,
            "persons": persons,
            "runner": runner,
            "wall_s": round(job["wall"], 2),
            "events_per_s": round(events / job["wall"]),
            "peak_rss_mib": round(job["rss"] / 2**20),
            "peak_tree_rss_mib": round(job["tree_rss"] / 2**20),
            "core_wall_s": round(core["wall"], 2),
            "core_events_per_s": round(events / core["wall"]),
            "accounted": report["accounted"],
            "profiles": report["profiles"],
            "unresolved_links": report["identity"]["unresolved_links"],
            **oracle,
        }
        line = (
            f"{events:>9,} events  {runner:<21} {job['wall']:8.1f} s "
            f"{row['events_per_s']:>7,} ev/s peak {row['peak_rss_mib']:>6,} MiB "
            f"(all processes {row['peak_tree_rss_mib']:,}) "
            f"unresolved {row['unresolved_links']}"
        )
        if oracle_rows is not None:
            diff = differences(oracle_rows, sink_rows(out / "profiles.sqlite"))
            row.update(
                profiles_equal_oracle=not diff,
                oracle_differences=diff,
                ratio_to_oracle=round(job["wall"] / oracle["oracle_wall_s"], 1),
            )
            line += (
                f" | oracle {oracle['oracle_wall_s']:6.1f} s "
                f"{oracle['oracle_events_per_s']:>7,} ev/s "
                f"peak {oracle['oracle_peak_rss_mib']:>5,} MiB | pipeline/oracle "
                f"{row['ratio_to_oracle']}x | profiles equal: {'yes' if not diff else 'NO'}"
            )
        line += f" | bare core {core['wall']:5.1f} s"
        print(line, flush=True)
        rows.append(row)
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target of the performance issue: measured value and PASS/FAIL."""
    out = []
    by_size = {r["events"]: r for r in rows if r.get("runner", "local") == "local"}
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['events']:>9,} {r.get('runner', 'local'):<21}: {r['skipped']}")
            continue
        eps = r["events_per_s"]
        peak = r.get("peak_tree_rss_mib", r["peak_rss_mib"]) / 1024  # all its processes
        out.append(
            f"{r['events']:>9,} {r.get('runner', 'local'):<21}: events/s {eps:,} "
            f"{'PASS' if eps >= TARGETS['events_per_s'] else 'FAIL'} (>= 10,000); "
            f"peak {peak:.2f} GiB {'PASS' if peak < TARGETS['peak_gib'] else 'FAIL'} (< 4)"
            + (
                f"; pipeline/oracle {r['ratio_to_oracle']}x "
                f"{'PASS' if r['ratio_to_oracle'] <= TARGETS['ratio_to_oracle'] else 'FAIL'}"
                f" (<= {TARGETS['ratio_to_oracle']:g})"
                if "ratio_to_oracle" in r
                else ""
            )
            + f"; unresolved_links {r['unresolved_links']} "
            + ("PASS" if r["unresolved_links"] == 0 else "FAIL")
            + (
                f"; oracle {r['oracle_events_per_s']:,} ev/s "
                f"{'PASS' if r['oracle_events_per_s'] >= TARGETS['oracle_events_per_s'] else 'FAIL'}"
                f" (>= {TARGETS['oracle_events_per_s']:,})"
                if "oracle_events_per_s" in r
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
        "--runners",
        default="local",
        help=f"comma-separated local runners to compare ({', '.join(RUNNERS)}); default local",
    )
    ap.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SCALING_SIZES),
        help="comma-separated sizes for --scaling (default 250k,500k,1M,2M)",
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.scaling else [args.events]
    runners = tuple(args.runners.split(","))
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown:
        ap.error(f"unknown runner(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {machine_gib():.0f} GiB, "
        f"Python {platform.python_version()}"
    )
    print(f"machine: {machine}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in sizes:
            persons = args.persons if args.persons and not args.scaling else max(n // 5, 1)
            fitting = []
            for runner in runners:
                reason = too_big(rows, n, runner)
                if reason is None:
                    fitting.append(runner)
                    continue
                print(f"{n:>9,} events  {runner:<21} {reason}", flush=True)
                rows.append({"events": n, "persons": persons, "runner": runner, "skipped": reason})
            if fitting:
                rows.extend(bench(n, persons, Path(tmp), tuple(fitting)))
    targets = check_targets(rows)
    print("\n".join(["targets:", *("  " + t for t in targets)]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps({"machine": machine, "runs": rows, "targets": targets}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
