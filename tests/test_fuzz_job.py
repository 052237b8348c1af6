"""Hostile input through the whole job (``build``), bounded and streaming stage kinds.

Whatever the lines, the job finishes; every line is accounted for exactly (``events in = valid +
quarantined + duplicates``); no step raised on any of them (``internal_errors`` empty: the
dead-letter path is a safety net, and a fuzz finding is a bug to fix and a corpus line to keep);
and every record of every output has the fields its contract promises.

``tests/corpus/*.ndjson`` keeps every input that ever broke the job, one raw line each (bytes:
some are not UTF-8); it runs through both stage kinds here, with the same checks.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import config_from, run_job
from tests.hostile import good_lines, hostile_lines
from transforms.profile_store import PROFILE_COLUMNS
from transforms.quarantine import REASONS

CORPUS = Path(__file__).parent / "corpus"

# The demo's governance (plan with a relaxed rule, computed traits, PII per destination,
# set_once and increment traits) so that hostile values reach every stage.
CONFIG = """
sources: [{name: web, paths: [], tracking_plan: default,
           violations: {schema.additional_property: omit, event.unplanned: allow}}]
tracking_plans: {default: {path: ../tracking_plans/example.yaml}}
profile: {set_once: [first_plan], increment: [logins]}
computed_traits:
  - {name: views, aggregate: count, event: Product Viewed}
  - {name: spend_1d, aggregate: sum, event: Order Completed, property: properties.revenue,
     window: {type: fixed, size: 1d}}
  - {name: products, aggregate: distinct_count, event: Product Viewed,
     property: properties.product_id}
  - {name: last_active, aggregate: last_seen}
consent:
  purposes: [analytics, marketing]
  destinations:
    email_tool: {purposes: [marketing], pii: {email: keep, phone: hash, ip: drop}}
    warehouse: {purposes: [analytics], pii: {email: hash, phone: hash, ip: hash}}
pii: {salt: fuzz-salt}
"""

QUARANTINE_FIELDS = ("stage", "reason", "message", "violations", "payload", "source", "origin")
DUPLICATE_FIELDS = ("stage", "reason", "key", "message_id", "first_message_id", "payload")
DELIVERY_FIELDS = ("destination", "profile_key", "event_time", "event")
DENIED_FIELDS = ("reason", "destination", "missing_purposes", "profile_key", "message_id")


def _sanitized(lines: list[bytes]) -> list[bytes]:
    """One event per line: a raw newline inside a drawn line would split it in two."""
    return [line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines]


def check_run(run: dict, lines: list[bytes]) -> None:
    report, outputs = run["report"], run["outputs"]
    events = sum(1 for line in lines if line.strip())
    assert report["events_in"] == events
    assert report["valid"] + report["quarantined"] + report["duplicates"] == events
    assert report["accounted"]
    assert report["internal_errors"] == {}, report["internal_errors"]
    assert len(outputs["quarantine"]) == report["quarantined"]
    assert len(outputs["duplicates"]) == report["duplicates"]
    for r in outputs["quarantine"]:
        assert all(k in r for k in QUARANTINE_FIELDS), r
        assert r["reason"] in REASONS and isinstance(r["payload"], str), r
    for r in outputs["duplicates"]:
        assert all(k in r for k in DUPLICATE_FIELDS), r
    for name, records in outputs["destinations"].items():
        for r in records:
            assert all(k in r for k in DELIVERY_FIELDS) and r["destination"] == name, r
            assert isinstance(r["event"], dict), r
    for r in outputs["consent_denied"]:
        assert all(k in r for k in DENIED_FIELDS), r
    for r in (*outputs["merges"], *outputs["identity_review"]):
        assert "kind" in r, r
    for row in run["rows"].values():
        assert set(PROFILE_COLUMNS) <= set(row), row
        for column in ("identities", "traits", "computed_traits", "event_counts", "consent"):
            orjson.loads(row[column])
        assert row["version"] >= 1


_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # CI reproducible; open-ended fuzzing is `make fuzz`
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "streaming"])
@_SETTINGS
@given(
    hostile=st.lists(hostile_lines, min_size=10, max_size=40),
    good=st.lists(good_lines, min_size=5, max_size=15),
    order=st.randoms(use_true_random=False),
)
def test_hostile_lines_never_stop_the_job(tmp_path_factory, bounded, hostile, good, order):
    lines = _sanitized(hostile + good + good[:3])  # some re-sent copies too
    order.shuffle(lines)
    run = run_job(tmp_path_factory.mktemp("fuzz"), lines, config_from(CONFIG), bounded)
    check_run(run, lines)
    assert run["report"]["valid"] >= len(set(good))  # the good events all got through


def corpus_lines() -> list[bytes]:
    return [
        line
        for f in sorted(CORPUS.glob("*.ndjson"))
        for line in f.read_bytes().split(b"\n")
        if line.strip()
    ]


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "streaming"])
def test_regression_corpus(tmp_path, bounded):
    lines = corpus_lines()
    assert len(lines) >= 10  # the corpus is there and read
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    check_run(run, lines)
