"""The job on Prism, Beam's portable runner (`make prism`), equals the local runner's run.

Prism runs the pipeline as a portable job with the Python SDK harness, as Flink and Dataflow do,
and advances real watermarks: the streaming stages (keyed state and timers) run there over a
bounded input too. Scenario: generated events with deletes and unlinks, re-sent copies and the
hostile regression corpus. Without the binary (no Go) the tests skip with a reason; under
CDI_REQUIRE_SERVICES=1 they fail.
"""

from __future__ import annotations

import logging
import random

import pytest

from pipelines.generate import generate
from runners.local import harden_loopback_harness, prism_binary
from tests.conftest import config_from, run_job, service_unavailable
from tests.test_fuzz_job import CONFIG, corpus_lines
from tests.test_oracle import _control_events

# Beam stops the Prism job server at interpreter exit and says so at WARNING, after pytest has
# closed its log capture ("--- Logging error ---" in CI's output): that one notice is muted.
logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    binary = prism_binary()
    if binary is None:
        service_unavailable("no Prism binary", fix="build it with `make prism`, which needs Go")
    harden_loopback_harness()  # as `cdi run --runner prism` does (runners/local.py)
    rng = random.Random(3)
    lines, _ = generate(400, 40, 3)
    lines += _control_events(lines, rng, deletes=2, unlinks=1)
    raw = [line.encode() for line in lines]
    raw += rng.sample(raw, 40) + corpus_lines()
    rng.shuffle(raw)
    config = config_from(CONFIG)
    local = run_job(tmp_path_factory.mktemp("local"), raw, config)
    return binary, raw, config, local


def _records(run: dict) -> dict:
    """Every record output, sorted; ``origin`` aside (each run reads its own copy of the file)."""

    def lines(records):
        return sorted(repr({k: v for k, v in r.items() if k != "origin"}) for r in records)

    out = {
        name: lines(run["outputs"][name])
        for name in ("quarantine", "duplicates", "merges", "identity_review", "consent_denied")
    }
    for name, records in run["outputs"]["destinations"].items():
        out[name] = lines(records)
    return out


def _rows(run: dict, computed: bool = True) -> dict:
    drop = {"version"} | (set() if computed else {"computed_traits"})
    return {
        pid: {k: v for k, v in row.items() if k not in drop} for pid, row in run["rows"].items()
    }


def test_batch_on_prism_equals_the_local_runner(scenario, tmp_path):
    binary, raw, config, local = scenario
    prism = run_job(
        tmp_path, raw, config, options=["--runner=PrismRunner", f"--prism_location={binary}"]
    )
    assert prism["report"]["accounted"] and prism["report"]["internal_errors"] == {}
    for key in ("events_in", "valid", "quarantined_by_reason", "duplicates", "deliveries"):
        assert prism["report"][key] == local["report"][key], key
    assert _rows(prism) == _rows(local) and local["rows"]
    assert _records(prism) == _records(local)


def test_streaming_stages_on_prism_equal_the_batch_run(scenario, tmp_path):
    """Keyed state and timers, with Prism's watermarks, give the batch run's outputs. Computed
    traits aside: over a finite input the streaming chain sees consent's releases after its
    windows closed, as a drain would (tests/test_person_history.py)."""
    binary, raw, config, local = scenario
    options = ["--runner=PrismRunner", f"--prism_location={binary}", "--streaming"]
    prism = run_job(tmp_path, raw, config, bounded=False, options=options)
    assert prism["report"]["accounted"] and prism["report"]["internal_errors"] == {}
    for key in ("events_in", "valid", "quarantined_by_reason", "duplicates"):
        assert prism["report"][key] == local["report"][key], key
    assert _rows(prism, computed=False) == _rows(local, computed=False)
    assert _records(prism) == _records(local)


def test_prism_runner_flags(tmp_path, monkeypatch):
    """`--runner prism` finds its binary and lifts Beam's 300 s job stream deadline; a flag the
    user gives after them wins."""
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions

    from runners.local import runner_args

    fake = tmp_path / "prism"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CDI_PRISM", str(fake))
    args = runner_args("prism")
    assert args[0] == "--runner=PrismRunner" and f"--prism_location={fake}" in args
    assert PipelineOptions(args).view_as(PortableOptions).job_server_timeout == 30 * 86400
    mine = PipelineOptions([*args, "--job_server_timeout=60"])
    assert mine.view_as(PortableOptions).job_server_timeout == 60


def test_the_in_process_runner_turns_off_the_state_cache_and_collects_less_often():
    """`--runner local` sets what its speed was measured with: no state cache (as production
    harnesses) and the raised garbage collector thresholds; other runners leave the process's
    collector alone."""
    import gc

    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    from runners.local import GC_THRESHOLDS, runner_flag

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert runner_flag("local-streaming") == "BundleBasedDirectRunner"
        assert gc.get_threshold() == (700, 10, 10)
        assert runner_flag("local") == "FnApiRunner"
        assert gc.get_threshold() == GC_THRESHOLDS
        assert worker_handlers.STATE_CACHE_SIZE_MB == 0
    finally:
        gc.set_threshold(*before)
