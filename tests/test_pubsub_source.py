"""The Pub/Sub source at the client boundary: no Pub/Sub server or emulator can run here. A
message becomes the raw event validation reads; the job with a Pub/Sub source builds into a
Dataflow streaming job offline; any other runner is refused with a config error."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from tests.conftest import config_from

pytest.importorskip("apache_beam.io.gcp.pubsub")

SUB = "projects/demo-project/subscriptions/cdi-events"
CONFIG = f"""
sources:
  - name: web
    type: pubsub
    pubsub: {{subscription: {SUB}, timestamp_attribute: ts, id_label: message_id}}
"""


def test_a_message_becomes_a_raw_event_citing_where_it_came_from():
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.utils.timestamp import Timestamp

    from transforms.io.pubsub import raw_from_message

    msg = PubsubMessage(
        b'{"type":"page"}', {"ts": "1"}, message_id="42", publish_time=Timestamp(1_793_527_200)
    )
    source, origin, payload = raw_from_message("web", SUB, msg)
    assert (source, payload) == ("web", b'{"type":"page"}')
    assert origin.startswith("pubsub:cdi-events/42 ts=2026-")


def test_config_checks_the_subscription():
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="subscription: projects/<project>/subscriptions"):
        config_from("sources: [{name: web, type: pubsub, pubsub: {subscription: cdi-events}}]")
    with pytest.raises(ConfigError, match="pubsub"):
        config_from("sources: [{name: web, type: pubsub}]")


def test_the_job_reads_pubsub_on_dataflow_streaming_offline():
    from pipelines import governed_profiles as job
    from tests.test_dataflow import DATAFLOW

    cfg = config_from(CONFIG + "sinks: {profiles: {type: redis, url: 'redis://h:6379/0'}}\n")
    p = beam.Pipeline(options=PipelineOptions([*DATAFLOW, "--streaming"]))
    job.write_outputs(job.build(p, cfg, {}), cfg, "gs://b/out")
    p.run()
    names = [t.unique_name for t in p.runner.proto_pipeline.components.transforms.values()]
    assert any(n.startswith("Read[web]/Read") for n in names)
    assert any(n.startswith("UnifyProfiles") for n in names)


def test_other_runners_refuse_a_pubsub_source(tmp_path, capsys):
    from pipelines.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    assert main(["run", "--config", str(cfg), "--output", str(tmp_path / "o"), "--streaming"]) == 2
    assert "a pubsub source runs on Dataflow with --streaming only" in capsys.readouterr().err
