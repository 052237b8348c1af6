"""`cdi generate` then `cdi run`, end to end, checked against the generator's ground truth."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.identity_accuracy import pairwise_scores, profile_rows
from pipelines.cli import main

EVENTS, PERSONS = 3000, 150
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = str(REPO / "schemas" / "configs" / "example.yaml")  # the example plan judges events
# What a tracking plan rejects; without a plan these events are valid.
PLAN_REASONS = ("event.unplanned", "schema.")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    src = d / "events.ndjson"
    assert (
        main(
            [
                "generate",
                "--events",
                str(EVENTS),
                "--persons",
                str(PERSONS),
                "--seed",
                "11",
                "--out",
                str(src),
            ]
        )
        == 0
    )
    truth = json.loads((d / "events.ndjson.truth.json").read_text())
    run = ["run", "--config", EXAMPLE, "--input", str(src), "--output", str(d / "out")]
    assert main(run) == 0
    return d, src, truth


def _records(directory):
    return [
        orjson.loads(line)
        for f in sorted(directory.glob("part-*"))
        for line in f.read_text().splitlines()
    ]


def _profiles(db):
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM profiles ORDER BY profile_id").fetchall()
    # `version` counts panes too, and how many panes fire depends on bundling: compare content.
    return [{k: r[k] for k in r.keys() if k != "version"} for r in rows]


def test_every_event_is_accounted_for_and_matches_the_ground_truth(generated):
    d, _, truth = generated
    report = json.loads((d / "out" / "run_report.json").read_text())
    assert report["events_in"] == truth["events"] == EVENTS
    assert report["valid"] == truth["valid_unique"]
    assert report["duplicates"] == truth["duplicates"]
    assert report["quarantined_by_reason"] == truth["invalid"]
    assert report["accounted"] is True
    # One profile per group of identifiers the person's own events link (stitching).
    groups = [g for p in truth["linked_identities"] for g in p["groups"]]
    assert report["profiles"] == len(groups)
    scores = pairwise_scores(truth, profile_rows(d / "out"))
    assert (scores["precision"], scores["recall"], scores["cross_person_pairs"]) == (1.0, 1.0, 0)
    assert report["identity"]["unresolved_links"] == 0
    # The written records agree with the counters, line for line.
    quarantine = _records(d / "out" / "quarantine")
    assert len(quarantine) == sum(truth["invalid"].values())
    assert all(q["payload"] and q["stage"] and q["reason"] for q in quarantine)
    assert len(_records(d / "out" / "duplicates")) == truth["duplicates"]


def test_profiles_equal_a_run_on_deduplicated_time_sorted_input(generated, tmp_path):
    d, src, truth = generated
    times = truth["event_times"]
    seen, valid, other = set(), [], []
    for line in src.read_text().splitlines():
        try:
            mid = orjson.loads(line).get("messageId")
        except (orjson.JSONDecodeError, AttributeError):
            mid = None
        if mid in times:
            if mid not in seen:
                seen.add(mid)
                valid.append((times[mid], mid, line))
        else:
            other.append(line)
    clean = tmp_path / "clean.ndjson"
    clean.write_text("\n".join([line for _, _, line in sorted(valid)] + other) + "\n")
    run = ["run", "--config", EXAMPLE, "--input", str(clean), "--output", str(tmp_path / "out")]
    assert main(run) == 0
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["duplicates"] == 0
    assert _profiles(tmp_path / "out" / "profiles.sqlite") == _profiles(
        d / "out" / "profiles.sqlite"
    )


def test_no_raw_email_reaches_a_destination_that_hashes_or_drops_it(generated):
    d, _, truth = generated
    emails = {e for person in truth["identities"] for e in person["emails"]}
    assert emails
    # Default config: ad_network and warehouse hash emails; email_tool keeps them.
    for name in ("ad_network", "warehouse"):
        text = "".join(
            f.read_text() for f in (d / "out" / "destinations" / name).glob("part-*")
        ).lower()
        assert text, name
        assert not any(e in text for e in emails), name
    kept = "".join(
        f.read_text() for f in (d / "out" / "destinations" / "email_tool").glob("part-*")
    ).lower()
    assert any(e in kept for e in emails)
    # Denials and deletions never carry the payload.
    for sub in ("consent_denied", "deleted"):
        text = "".join(f.read_text() for f in (d / "out" / sub).glob("part-*")).lower()
        assert not any(e in text for e in emails), sub


def test_without_a_plan_every_well_formed_event_is_valid(generated, tmp_path):
    """The embedded default has no tracking plan: the generator's plan violations are valid
    events there, and only envelope problems are quarantined."""
    d, src, truth = generated
    assert main(["run", "--input", str(src), "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    planned = {r: n for r, n in truth["invalid"].items() if r.startswith(PLAN_REASONS)}
    assert planned  # the generator writes some: the test would prove nothing otherwise
    envelope = {r: n for r, n in truth["invalid"].items() if r not in planned}
    assert report["quarantined_by_reason"] == envelope
    assert report["valid"] == truth["valid_unique"] + sum(planned.values())
    assert report["accounted"]


def test_cli_exit_code_and_default_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accounted         yes" in proc.stdout
    assert (tmp_path / "cdi-output" / "profiles.sqlite").exists()


def test_quarantine_summarize_and_replay_through_the_same_dedup_keys(generated, tmp_path, capsys):
    d, src, truth = generated
    assert main(["quarantine", "summarize", str(d / "out")]) == 0
    out = capsys.readouterr().out
    for reason in truth["invalid"]:
        assert reason in out
    # Replay everything: payloads that were never fixed are quarantined again; nothing valid
    # is counted twice, because re-submitted events keep messageId and source.
    replay = tmp_path / "replay.ndjson"
    assert main(["quarantine", "replay", str(d / "out"), "--out", str(replay)]) == 0
    valid_line = next(
        line
        for line in src.read_text().splitlines()
        if '"messageId"' in line and '"type":"track"' in line
    )
    replay.write_text(replay.read_text() + valid_line + "\n")  # a copy of an accepted event
    run = ["run", "--config", EXAMPLE, "--input", str(src), "--input", str(replay)]
    assert main([*run, "--output", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "run_report.json").read_text())
    assert report["valid"] == truth["valid_unique"]
    assert report["duplicates"] == truth["duplicates"] + 1
    assert report["accounted"]
