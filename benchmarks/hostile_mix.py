"""Hostile lines mixed into generated events: the job finishes, counts every line, and gives every
generated person the same profile as a run without them.

    python -m benchmarks.hostile_mix                      # 300k events, 3,000 hostile lines
    python -m benchmarks.hostile_mix --events 30000 --hostile 1000

Generates N events (``cdi generate``, persons = N / 5), draws the hostile lines with the fuzz
suite's strategies (``tests/hostile.py``, a fixed seed) plus the regression corpus, then runs
``cdi run`` twice on the local runner with the example config: on the generated file alone, and
on the generated file with the hostile file as a second input. Checks: both runs exit 0; the
mixed run's ``events_in`` is the number of non-blank lines of both files and ``in = valid +
quarantined + duplicates``; no step raised (``internal_errors`` empty); every profile row of the
clean run is in the mixed run, identical. Prints wall time, events/s and peak RSS of both runs
side by side; results go to ``benchmarks/results/hostile_mix.json``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from pathlib import Path

from benchmarks.run_benchmark import RESULTS, measure

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "schemas" / "configs" / "example.yaml"


def hostile_lines(count: int) -> list[bytes]:
    """``count`` lines drawn with a fixed seed from the fuzz suite's strategies, plus the corpus."""
    from hypothesis import HealthCheck, given, settings

    sys.path.insert(0, str(REPO))
    from tests.hostile import hostile_lines as strategy

    drawn: list[bytes] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(line: bytes) -> None:
        drawn.append(line.replace(b"\n", b" ").replace(b"\r", b" "))

    collect()
    corpus = [
        line
        for f in sorted((REPO / "tests" / "corpus").glob("*.ndjson"))
        for line in f.read_bytes().split(b"\n")
        if line.strip()
    ]
    return drawn + corpus


def rows(db: Path) -> dict[str, dict]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return {r["profile_id"]: dict(r) for r in conn.execute("SELECT * FROM profiles")}


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cdi-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    cdi = [sys.executable, "-m", "pipelines.cli"]
    events = work / "events.ndjson"
    gen = measure([*cdi, "generate", "--events", str(args.events), "--persons",
                   str(max(1, args.events // 5)), "--seed", "7", "--out", str(events)])  # fmt: skip
    assert gen["rc"] == 0
    hostile = hostile_lines(args.hostile)
    bad = work / "hostile.ndjson"
    bad.write_bytes(b"".join(line + b"\n" for line in hostile))
    lines_in = sum(1 for f in (events, bad) for line in f.read_bytes().split(b"\n") if line.strip())

    results = {}
    for name, inputs in (("clean", [events]), ("mixed", [events, bad])):
        out = work / name
        cmd = [*cdi, "run", "--config", str(EXAMPLE), "--output", str(out)]
        for f in inputs:
            cmd += ["--input", str(f)]
        m = measure(cmd)
        report = json.loads((out / "run_report.json").read_text())
        results[name] = {"measure": m, "report": report, "rows": rows(out / "profiles.sqlite")}

    clean, mixed = results["clean"], results["mixed"]
    differ = [pid for pid, row in clean["rows"].items() if mixed["rows"].get(pid) != row]
    report = mixed["report"]
    summary = {
        "events": args.events,
        "hostile_lines": len(hostile),
        "lines_in": lines_in,
        "mixed": {k: report[k] for k in ("events_in", "valid", "quarantined", "duplicates")},
        "quarantined_by_reason": report["quarantined_by_reason"],
        "internal_errors": report["internal_errors"],
        "accounted": report["accounted"] and report["events_in"] == lines_in,
        "clean_profiles": len(clean["rows"]),
        "mixed_profiles": len(mixed["rows"]),
        "generated_persons_rows_differing": len(differ),
        "examples_differing": differ[:5],
        "runs": {
            name: {
                "wall_s": round(r["measure"]["wall"], 1),
                "events_per_s": round(r["report"]["events_in"] / r["measure"]["wall"]),
                "peak_rss_mib": round(r["measure"]["rss"] / 2**20),
            }
            for name, r in results.items()
        },
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--hostile", type=int, default=3_000)
    parser.add_argument("--workdir", help="keep the files here (default: a temp dir)")
    args = parser.parse_args(argv)
    s = run(args)
    print(
        f"generated events {s['events']:,} + hostile lines {s['hostile_lines']:,} "
        f"= {s['lines_in']:,} lines"
    )
    print(f"{'run':<8}{'wall':>10}{'events/s':>12}{'peak RSS':>12}")
    for name, r in s["runs"].items():
        print(f"{name:<8}{r['wall_s']:>9.1f}s{r['events_per_s']:>12,}{r['peak_rss_mib']:>9,} MiB")
    print(f"mixed run: {s['mixed']}, accounted: {s['accounted']}")
    print(f"quarantined by reason: {s['quarantined_by_reason']}")
    print(f"internal errors: {s['internal_errors'] or 'none'}")
    print(
        f"profiles: clean {s['clean_profiles']:,}, mixed {s['mixed_profiles']:,}; rows of the "
        f"clean run differing in the mixed run: {s['generated_persons_rows_differing']}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile_mix.json").write_text(json.dumps(s, indent=2) + "\n")
    ok = s["accounted"] and not s["internal_errors"] and not s["generated_persons_rows_differing"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
