"""The Pub/Sub source at the client boundary: no Pub/Sub server or emulator can run here. A
message becomes the raw event validation reads; the job with a Pub/Sub source builds into a
Dataflow streaming job offline; elsewhere the native reader runs the job on Prism against a fake
subscriber client that speaks google-cloud-pubsub's request and response types."""

from __future__ import annotations

import datetime as dt

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
    pubsub: {{subscription: {SUB}, timestamp_attribute: ts, id_label: message_id,
              watermark_delay: 3650d}}
"""
FILE_CONFIG = "sources: [{name: web, paths: []}]"


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


def test_a_batch_run_refuses_a_pubsub_source(tmp_path, capsys):
    from pipelines.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "o"
    (out / "quarantine").mkdir(parents=True)
    (out / "quarantine" / "part-0").write_text("an earlier run's record\n")
    assert main(["run", "--config", str(cfg), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: sources[0]: a pubsub source is read with --streaming" in err
    # Refused before anything ran: the earlier run's outputs are still there.
    assert (out / "quarantine" / "part-0").read_text() == "an earlier run's record\n"


def test_event_time_from_the_attribute_else_the_publish_time():
    from google.cloud.pubsub_v1.types import PubsubMessage

    from transforms.io.pubsub import event_time_ms

    published = PubsubMessage(data=b"{}", message_id="1")
    published.publish_time = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    t = 1_793_491_200_000
    assert event_time_ms(published, None) == t
    stamped = PubsubMessage(data=b"{}", attributes={"ts": "2026-11-01T00:00:01Z"})
    assert event_time_ms(stamped, "ts") == t + 1000
    assert event_time_ms(PubsubMessage(data=b"{}", attributes={"ts": str(t)}), "ts") == t
    assert event_time_ms(PubsubMessage(data=b"{}", attributes={"ts": "soon"}), "ts") is None


class FakeSubscriber:
    """google-cloud-pubsub's SubscriberClient at its boundary: ``pull(request=..., timeout=...)``
    answers a real ``PullResponse``; ``acknowledge(request=...)`` records the ack ids. Messages
    come from a file (each line: message id, data), and the second pull delivers the first
    message a second time (at-least-once); the file state is shared across the
    pickled copies Beam makes. When everything has been pulled and acknowledged it creates the
    drain file, as an operator's SIGTERM would."""

    def __init__(self, folder: str, batch: int):
        self._folder, self._batch = folder, batch

    def _paths(self):
        from pathlib import Path

        folder = Path(self._folder)
        return folder / "messages.jsonl", folder / "pulled", folder / "acked", folder / "drain"

    def pull(self, request, timeout):
        import json

        from google.cloud.pubsub_v1.types import PubsubMessage, PullResponse, ReceivedMessage

        messages, pulled, acked, drain = self._paths()
        assert request["subscription"] == SUB and request["max_messages"] > 0 and timeout > 0
        lines = messages.read_text().splitlines()
        done = len(pulled.read_text().splitlines()) if pulled.exists() else 0
        acks = set(acked.read_text().split()) if acked.exists() else set()
        batch = lines[done : done + self._batch]
        if not batch and len(acks) >= len(lines):
            drain.touch()
        items = []
        for line in batch:
            mid, data = json.loads(line)
            message = PubsubMessage(data=data.encode(), message_id=mid, attributes={"ts": ""})
            message.publish_time = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
            items.append(ReceivedMessage(ack_id=f"ack-{mid}", message=message))
        again = messages.with_suffix(".redelivered")
        if done == self._batch and not again.exists():  # at-least-once: the first, again
            again.touch()
            first = [json.loads(line) for line in lines[:1]]
            for mid, data in first:
                message = PubsubMessage(data=data.encode(), message_id=mid)
                message.publish_time = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
                items.append(ReceivedMessage(ack_id=f"ack-{mid}-again", message=message))
        with pulled.open("a") as f:
            f.writelines(f"{i}\n" for i in range(len(batch)))
        return PullResponse(received_messages=items)

    def modify_ack_deadline(self, request):
        assert request["subscription"] == SUB and request["ack_deadline_seconds"] >= 60
        from pathlib import Path

        with (Path(self._folder) / "held").open("a") as f:
            f.writelines(f"{a}\n" for a in request["ack_ids"])

    def acknowledge(self, request):
        _, _, acked, _ = self._paths()
        assert request["subscription"] == SUB
        with acked.open("a") as f:
            f.writelines(f"{a}\n" for a in request["ack_ids"])


def test_the_native_reader_runs_the_job_on_prism_and_acks_after_the_outputs(tmp_path):
    """Generated events through the native reader on Prism (streaming): the same profiles and
    counts as a file run, every message acknowledged (by finalization, after the bundle's
    outputs were committed), a redelivered message counted as a duplicate, and the run ends
    by the drain file like a SIGTERM."""
    import json

    from pipelines import governed_profiles as job
    from pipelines.generate import generate
    from runners.local import prism_binary, runner_args
    from tests.conftest import run_job, service_unavailable
    from transforms.io.pubsub import ReadPubSubNative

    if prism_binary() is None:
        service_unavailable("no Prism binary", fix="build it with `make prism`, which needs Go")
    lines, _ = generate(120, 12, 5)
    ids = [json.loads(line).get("messageId") or f"m{i}" for i, line in enumerate(lines)]
    (tmp_path / "messages.jsonl").write_text(
        "".join(
            json.dumps([f"{mid}-{i}", line]) + "\n"
            for i, (mid, line) in enumerate(zip(ids, lines, strict=True))
        )
    )
    cfg = config_from(CONFIG)
    fake = FakeSubscriber(str(tmp_path), batch=25)
    drain = str(tmp_path / "drain")
    original = job.pubsub_read
    job.pubsub_read = lambda p, src, _drain: ReadPubSubNative(
        src.name, src.pubsub, drain, client_factory=lambda: fake
    )
    try:
        live = run_job(
            tmp_path / "live",
            [],
            cfg,
            bounded=False,
            options=[*runner_args("prism", True), "--streaming"],
        )
    finally:
        job.pubsub_read = original
    batch = run_job(tmp_path / "file", [line.encode() for line in lines], config_from(FILE_CONFIG))
    acked = (tmp_path / "acked").read_text().split()
    held = (tmp_path / "held").read_text().split()
    assert sorted(held) == sorted(acked)  # every message held until its bundle acked it
    assert len(set(acked)) == len(acked) and len(acked) == len(lines) + 1
    assert live["report"]["events_in"] == len(lines) + 1
    assert live["report"]["duplicates"] == batch["report"]["duplicates"] + 1
    for key in ("valid", "quarantined_by_reason"):
        assert live["report"][key] == batch["report"][key], key

    def strip(rows):
        return {p: {k: v for k, v in r.items() if k != "version"} for p, r in rows.items()}

    assert strip(live["rows"]) == strip(batch["rows"]) and batch["rows"]
