"""Dataflow without GCP: the job serializes to a Dataflow job offline (Beam's ``--dry_run``
builds the job request without submitting it), batch and streaming, through `cdi run` itself;
the Flex Template's metadata names every `cdi run` parameter; the stateful step labels (the
streaming update contract) are the ones `--transform_name_mapping` users rely on."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import governed_profiles as job
from pipelines.config import load_config
from tests.conftest import REPO

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient")

DATAFLOW = [
    "--runner=DataflowRunner",
    "--project=demo-project",
    "--region=europe-west1",
    "--temp_location=gs://demo-bucket/tmp",
    "--sdk_container_image=apache/beam_python3.11_sdk:2.77.0",
    "--dry_run=True",
]
# Stateful steps of the streaming job: renaming one breaks `gcloud dataflow jobs update` (and a
# Flink savepoint restore) unless a --transform_name_mapping says where its state went.
STATEFUL_STEPS = {
    "DeduplicateEvents",
    "EnforceConsent",
    "ComputeTraits",
    "StitchIdentities",
    "UnifyProfiles",
}


def dry_run(streaming: bool):
    cfg = load_config(REPO / "schemas" / "configs" / "example.yaml")
    p = beam.Pipeline(options=PipelineOptions(DATAFLOW + (["--streaming"] if streaming else [])))
    job.write_outputs(job.build(p, cfg, {"web": ["gs://demo-bucket/in/*.ndjson"]}), cfg, "gs://o")
    result = p.run()
    return result, p.runner


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
def test_the_job_builds_a_dataflow_job_offline(streaming):
    result, runner = dry_run(streaming)
    description = json.loads(result.job.json())
    assert description["type"] == ("JOB_TYPE_STREAMING" if streaming else "JOB_TYPE_BATCH")
    names = {t.unique_name for t in runner.proto_pipeline.components.transforms.values()}
    tops = {n.split("/")[0] for n in names}
    common = {"Read[web]", "ValidateEvents", "DeduplicateEvents", "KeyByProfile"}
    assert common | {"StitchIdentities", "UnifyProfiles"} <= tops
    if streaming:
        assert STATEFUL_STEPS <= tops  # the labels the update contract names
    else:
        assert "PersonHistory" in tops


def test_cdi_run_submits_to_dataflow_detached(tmp_path, capsys):
    from pipelines.cli import main

    src = tmp_path / "events.ndjson"
    src.write_text((REPO / "schemas" / "samples" / "events.ndjson").read_text())
    code = main(
        ["run", "--config", str(REPO / "schemas" / "configs" / "example.yaml"), "--input",
         str(src), "--output", "gs://demo-bucket/out", "--detach", *DATAFLOW]
    )  # fmt: skip
    assert code == 0 and "detached" in capsys.readouterr().out


def test_flex_template_metadata_names_every_cdi_run_parameter():
    from pipelines.cli import _parser

    meta = json.loads((REPO / "infra" / "dataflow" / "metadata.json").read_text())
    params = {p["name"] for p in meta["parameters"]}
    run = next(a for a in _parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[
        1
    ]
    options = {a.dest for a in run._actions if a.dest != "help"}
    # runner and detach are fixed by the template itself (Dataflow, detached launcher), a
    # detached launcher prints no status lines, and passes are for the in-process runner's
    # memory and its processes (Dataflow shuffles to its service and brings its own workers;
    # cdi run refuses passes with --detach)
    local_only = {"runner", "detach", "status_every", "max_events_per_pass", "workers"}
    assert options - local_only <= params, options - params
    assert "streaming" in params
    for p in meta["parameters"]:
        assert p["helpText"] and p["label"]
    main_py = (REPO / "infra" / "dataflow" / "main.py").read_text()
    assert '"--detach"' in main_py
