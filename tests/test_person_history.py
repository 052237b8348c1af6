"""Bounded runs' one-pass-per-person stage equals the streaming chain it replaces.

``PersonHistory`` (consent, per-destination PII, computed traits and the profile fragment from one
``GroupByKey``) must write what ``EnforceConsent`` -> ``RedactPerDestination`` ->
``ComputeTraits`` -> ``BuildProfiles`` write over the same finite input: every destination's
records (PII applied), the consent denials, the deletions, and the profile rows (``version``
aside: the streaming chain counts panes).

Computed traits are compared elsewhere (``history_panes`` against the stateful panes, and every
row against the oracle): the local runner has no watermark holds between stages, so the streaming
chain over a finite input sees consent's later releases after its own windows closed at the end
of time, and reports them ``late``, as a drain would.
"""

from __future__ import annotations

import random

import orjson
import pytest

from benchmarks.oracle import sink_rows
from pipelines import governed_profiles as job
from pipelines.config import IdentityConfig, load_default_config
from pipelines.generate import generate
from tests.conftest import make_pipeline
from tests.test_oracle import _control_events
from transforms.consent import DestinationRule
from transforms.person_history import PersonHistory

RECORD_OUTPUTS = ("consent_denied", "deleted", "quarantine", "duplicates", "merges")


def _run(tmp_path, config, src, bounded: bool) -> tuple[dict, dict]:
    out = tmp_path / ("bounded" if bounded else "streaming")
    with make_pipeline() as p:
        job.write_outputs(job.build(p, config, {"web": [str(src)]}, bounded=bounded), config, out)
    lines = {}
    for name in (*RECORD_OUTPUTS, *(f"destinations/{d}" for d in config.consent.destinations)):
        lines[name] = sorted(
            line for f in (out / name).glob("part-*") for line in f.read_text().splitlines()
        )
    rows = sink_rows(out / "profiles.sqlite")
    for row in rows.values():
        row.pop("version", None)
        row.pop("computed_traits", None)
    return lines, rows


def _message_id(line: str) -> str:
    try:
        e = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line  # a malformed line is its own key
    return str(e.get("messageId", line)) if isinstance(e, dict) else line


def test_bounded_and_streaming_paths_write_the_same_records_and_rows(tmp_path):
    rng = random.Random(11)
    lines, _ = generate(400, 40, 11)
    lines += _control_events(lines, rng, deletes=2, unlinks=1)
    # One copy per messageId: on repeated copies the paths keep different ones by design (bounded
    # runs keep the copy the collector received first, streaming the first to arrive).
    lines = list({_message_id(x): x for x in reversed(lines)}.values())
    rng.shuffle(lines)
    src = tmp_path / "events.ndjson"
    src.write_text("\n".join(lines) + "\n")
    config = load_default_config()

    bounded_lines, bounded_rows = _run(tmp_path, config, src, bounded=True)
    streaming_lines, streaming_rows = _run(tmp_path, config, src, bounded=False)

    assert bounded_rows == streaming_rows
    assert bounded_lines == streaming_lines
    # The comparison was about something: deliveries with PII applied, denials, deletions.
    assert all(bounded_lines[f"destinations/{d}"] for d in config.consent.destinations)
    assert bounded_lines["consent_denied"] and bounded_lines["deleted"]
    warehouse = [orjson.loads(x)["event"] for x in bounded_lines["destinations/warehouse"]]
    emails = [e["traits"]["email"] for e in warehouse if "email" in e.get("traits", {})]
    assert emails and all(v.startswith("sha256:") for v in emails)


def test_destination_names_must_be_unique():
    twice = [DestinationRule("crm", ("marketing",)), DestinationRule("crm", ("analytics",))]
    with pytest.raises(ValueError, match="unique"):
        PersonHistory(twice, (), IdentityConfig(), ((), {}, ""), "profiles")
