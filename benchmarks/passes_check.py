"""A backfill larger than memory, in passes, checked person by person against the truth.

    python -m benchmarks.passes_check --events 10000000 --max-events-per-pass 250000

1. Generates ``--events`` events in chunks of ``--chunk`` (seeds 1, 2, ...: each chunk its own
   persons, so no chunk's generator holds more than one chunk in memory), one NDJSON file.
2. Runs ``cdi run --max-events-per-pass N [--workers W]`` on it, measured in a child process: wall time,
   events/s, the peak RSS of the job's processes summed.
3. Samples ``--sample`` persons of the generator's ground truth (among those sharing no
   identifier with a person of another chunk), takes every line that carries
   one of their identifiers (user id, e-mail, anonymous ids, device ids), runs the job on only
   those lines (one run, no passes), and compares every profile row of that run with the row of
   the same profile in the big run, all columns (versions included).

Prints one JSON summary and writes it to ``benchmarks/results/passes_check.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
from collections import Counter
from pathlib import Path

import orjson

from benchmarks.run_benchmark import RESULTS, measure


def generate_chunks(path: Path, events: int, chunk: int) -> list[dict]:
    """The events, chunk by chunk; returns the truth's identity lists of every person."""
    from pipelines.generate import generate

    persons: list[dict] = []
    with path.open("w", encoding="utf-8", newline="\n") as f:
        seed, left = 1, events
        while left > 0:
            n = min(chunk, left)
            lines, truth = generate(n, max(n // 5, 1), seed)
            for line in lines:
                f.write(line)
                f.write("\n")
            for p in truth["identities"]:
                persons.append({**p, "person": f"s{seed}-{p['person']}"})
            del lines, truth
            seed, left = seed + 1, left - n
    return persons


def _ids_of(event: dict) -> list[str]:
    ctx = event.get("context") if isinstance(event.get("context"), dict) else {}
    traits = event.get("traits") if isinstance(event.get("traits"), dict) else {}
    ctraits = ctx.get("traits") if isinstance(ctx.get("traits"), dict) else {}
    device = ctx.get("device") if isinstance(ctx.get("device"), dict) else {}
    out = [event.get("userId"), event.get("anonymousId"), event.get("previousId")]
    out += [device.get("id"), traits.get("email"), ctraits.get("email")]
    return [str(x).strip().lower() for x in out if isinstance(x, str) and x.strip()]


def _person_ids(person: dict) -> list[str]:
    ids = [person["user_id"], *person["emails"], *person["anonymous_ids"], *person["device_ids"]]
    return [str(i).strip().lower() for i in ids if i]


def sample_lines(src: Path, dst: Path, persons: list[dict]) -> int:
    """Every line of ``src`` that carries an identifier of one of ``persons``, to ``dst``."""
    wanted: set[str] = set()
    for p in persons:
        wanted.update(_person_ids(p))
    kept = 0
    with src.open("rb") as fin, dst.open("wb") as fout:
        for line in fin:
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and any(i in wanted for i in _ids_of(event)):
                fout.write(line)
                kept += 1
    return kept


def rows(db: Path) -> dict[str, dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return {r["profile_id"]: dict(r) for r in conn.execute("SELECT * FROM profiles")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--chunk", type=int, default=1_000_000)
    ap.add_argument("--max-events-per-pass", type=int, default=250_000)
    ap.add_argument("--workers", type=int, default=1, help="cdi run --workers (passes at once)")
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        src = work / "events.ndjson"
        persons = generate_chunks(src, args.events, args.chunk)
        print(f"generated {args.events:,} events of {len(persons):,} persons", flush=True)
        big = work / "big"
        job = measure(
            [
                py,
                "-m",
                "pipelines.cli",
                "run",
                "--input",
                str(src),
                "--output",
                str(big),
                "--max-events-per-pass",
                str(args.max_events_per_pass),
                "--workers",
                str(args.workers),
            ]  # fmt: skip
        )
        report = json.loads((big / "run_report.json").read_text())
        print(
            f"passes run: {job['wall']:.0f} s, {args.events / job['wall']:,.0f} events/s, "
            f"peak {job['tree_rss'] / 2**30:.2f} GiB (all processes), "
            f"{report['passes']['passes']} passes, accounted {report['accounted']}",
            flush=True,
        )
        # Chunks are generated independently, so two persons of different chunks can share an
        # identifier (an e-mail address drawn from the same names): the job rightly makes them
        # one profile, which a run over one of them cannot reproduce. Sample the others.
        owners = Counter(i for p in persons for i in set(_person_ids(p)))
        alone = [p for p in persons if all(owners[i] == 1 for i in _person_ids(p))]
        sampled = random.Random(7).sample(alone, min(args.sample, len(alone)))
        sub_src = work / "sampled.ndjson"
        lines = sample_lines(src, sub_src, sampled)
        sub = work / "sampled"
        measure([py, "-m", "pipelines.cli", "run", "--input", str(sub_src), "--output", str(sub)])
        small_rows, big_rows = rows(sub / "profiles.sqlite"), rows(big / "profiles.sqlite")
        differing = [pid for pid, row in small_rows.items() if big_rows.get(pid) != row]
        summary = {
            "events": args.events,
            "persons": len(persons),
            "max_events_per_pass": args.max_events_per_pass,
            "workers": args.workers,
            "passes": report["passes"],
            "wall_s": round(job["wall"], 1),
            "events_per_s": round(args.events / job["wall"]),
            "peak_tree_rss_mib": round(job["tree_rss"] / 2**20),
            "peak_largest_process_mib": round(job["rss"] / 2**20),
            "accounted": report["accounted"],
            "unresolved_links": report["identity"]["unresolved_links"],
            "persons_sharing_an_identifier": len(persons) - len(alone),
            "sampled_persons": len(sampled),
            "sampled_lines": lines,
            "sampled_profile_rows": len(small_rows),
            "rows_equal": len(small_rows) - len(differing),
            "rows_differing": differing[:10],
        }
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "passes_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if report["accounted"] and not differing and small_rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
