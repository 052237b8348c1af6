"""The continuous run (`cdi run --streaming`): the Kafka reader's rules, then the job on the real
broker and Prism, killed and restarted mid-stream, drained by SIGTERM, equal to the file run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apache_beam.io.restriction_trackers import OffsetRange

from pipelines.continuous import status_line
from pipelines.generate import generate
from runners.local import prism_binary
from tests.conftest import REPO, config_from, run_job, service_unavailable
from tests.test_kafka_source import _topic, broker  # noqa: F401 (the broker fixture)
from transforms.envelope import parse_iso_ms
from transforms.io.kafka import KafkaSourceConfig, committed_offsets
from transforms.io.unbounded import OPEN_END, PositionTracker, partition_watermark

DAY = 86_400_000


def test_the_watermark_trails_the_newest_record_and_never_goes_back():
    state = partition_watermark((None, None), 1_000, now_ms=5_000, delay_ms=100, idle_after_ms=50)
    assert state == (900, None)
    # an older record (out of order) does not move it back
    assert partition_watermark(state, 500, 5_000, 100, 50) == (900, None)
    assert partition_watermark(state, 2_000, 5_000, 100, 50) == (1_900, None)


def test_an_idle_partition_moves_its_watermark_to_now_after_idle_after():
    state = (900, None)
    state = partition_watermark(state, None, now_ms=10_000, delay_ms=100, idle_after_ms=3_000)
    assert state == (900, 10_000)  # idle since now, not long enough yet
    state = partition_watermark(state, None, 12_999, 100, 3_000)
    assert state == (900, 10_000)
    state = partition_watermark(state, None, 13_000, 100, 3_000)
    assert state == (12_900, 10_000)
    # a record ends the idle spell; the watermark still never goes back
    assert partition_watermark(state, 5_000, 14_000, 100, 3_000) == (12_900, None)


def test_the_watermark_never_passes_now_and_waits_out_errors():
    # a producer clock ahead of ours does not pull the watermark into the future
    assert partition_watermark((None, None), 9_000, now_ms=5_000, delay_ms=100,
                               idle_after_ms=50) == (4_900, None)  # fmt: skip
    # polls that were not caught up (errors, a broker away) never count as idle
    state = (900, 1_000)
    state = partition_watermark(state, None, 60_000, 100, 3_000, caught_up=False)
    assert state == (900, None)
    assert partition_watermark(state, None, 61_000, 100, 3_000) == (900, 61_000)


def test_commits_only_move_the_group_forward():
    from transforms.io import kafka

    class Consumer:
        sent = []

        def committed(self, partitions, timeout):  # the group's position, as the broker has it
            (tp,) = partitions
            tp.offset = self.sent[-1] if self.sent else -1001
            return [tp]

        def commit(self, offsets, asynchronous):
            assert asynchronous is False
            self.sent.append(offsets[0].offset)

    fn = kafka._ReadPartitionFn("web", KafkaSourceConfig("b:1", ("t",), group_id="g-fwd"), None)
    fn._consumers = {("t", 0): [Consumer(), None]}
    for offset in (10, 30, 20, 30, 31):  # finalizations out of order, and twice
        kafka._Commit(fn, "t", 0, offset)()
    kafka._Commit(fn, "t", 0, None)()  # a bundle that read nothing
    assert Consumer.sent == [10, 30, 31]


def test_every_file_of_an_unbounded_write_has_a_name_of_its_own():
    from transforms.sinks import UniqueFileNaming

    naming = UniqueFileNaming("part", "20261130T120000", ".ndjson")
    names = {naming(None, None, 0, 1, None, None) for _ in range(100)}
    assert len(names) == 100 and all(n.startswith("part-20261130T120000-") for n in names)


def test_a_partition_is_only_split_by_its_own_checkpoints():
    tracker = PositionTracker(OffsetRange(10, OPEN_END))
    assert not tracker.is_bounded()
    assert tracker.try_claim(10) and tracker.try_claim(12)
    assert tracker.try_split(0.5) is None  # a runner's split would start a second reader
    primary, residual = tracker.try_split(0)
    assert (primary.start, primary.stop) == (10, 13) and residual.start == 13
    tracker.check_done()


def test_no_stop_means_continuous_in_a_streaming_run_and_end_in_a_batch_run():
    config = KafkaSourceConfig("127.0.0.1:1", ("t",))
    assert config.stop is None
    from transforms.io.kafka import PartitionFacts, plan_range

    assert plan_range(config, 0, PartitionFacts(low=3, high=9)) == (3, 9)
    with pytest.raises(ValueError, match="idle_after"):
        KafkaSourceConfig("127.0.0.1:1", ("t",), idle_after=0)


def test_durations_of_the_kafka_section_are_read_from_config():
    cfg = config_from(
        """
sources:
  - name: app
    type: kafka
    kafka: {bootstrap_servers: "127.0.0.1:1", topics: [t], watermark_delay: 2m, idle_after: 5s}
"""
    )
    assert cfg.sources[0].kafka.watermark_delay == 120 and cfg.sources[0].kafka.idle_after == 5


def test_the_status_line_names_what_an_operator_watches():
    line = status_line(
        {
            "events_in": 1200,
            "quarantined.schema.type_mismatch": 3,
            "quarantined.decode.malformed_json": 1,
            "dedup.duplicates": 7,
            "late": 2,
            "profiles_written.sqlite": 40,
            "profiles_written.redis": 40,
        },
        {"kafka.watermark_lag_ms": 2500},
        elapsed=12.0,
        rate=100.0,
    )
    assert "events in 1,200 (100/s)" in line and "quarantined 4" in line
    assert "duplicates 7" in line and "late 2" in line
    assert "watermark lag 2.5s" in line and "profile rows written 80" in line


# --- the continuous job on the broker and Prism ------------------------------------------------

LIVE_CONFIG = """
sources:
  - name: web
    type: kafka
    tracking_plan: default
    kafka:
      bootstrap_servers: "{bootstrap}"
      topics: [{topic}]
      group_id: {group}
      # far behind the newest record: nothing is late before the drain releases it all
      watermark_delay: 3650d
tracking_plans: {{default: {{path: {repo}/schemas/tracking_plans/example.yaml}}}}
"""
FILE_CONFIG = """
sources: [{name: web, paths: [], tracking_plan: default}]
tracking_plans: {default: {path: ../tracking_plans/example.yaml}}
"""


def _committed(bootstrap: str, topic: str, group: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = committed_offsets(consumer, [TopicPartition(topic, p) for p in range(3)], 10)
        return sum(max(tp.offset, 0) for tp in tps)
    finally:
        consumer.close()


def _start(config: Path, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--config", str(config)]
    cmd += ["--output", str(out), "--streaming", "--status-every", "2"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait(predicate, what: str, proc: subprocess.Popen, log: Path, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"not {what} within {seconds} s:\n{log.read_text()[-3000:]}")


def test_a_continuous_run_killed_restarted_and_drained_equals_the_file_run(broker, tmp_path):  # noqa: F811
    """Shuffled arrival over 3 partitions, 10% re-sent copies. The first job is killed (SIGKILL,
    runner included) once it has committed offsets; the second reads the topic again from
    `earliest` (local state is in memory: a restart rebuilds it, store included), commits every
    offset, and drains on SIGTERM. Its report and the store equal a batch run of the file, and
    so does `cdi replay` of the topic."""
    if prism_binary() is None:
        service_unavailable("no Prism binary", fix="build it with `make prism`, which needs Go")
    from confluent_kafka import Producer

    rng = random.Random(11)
    lines, _ = generate(150, 15, 11)
    raw = [line.encode() for line in lines]
    arrival = raw + rng.sample(raw, len(raw) // 10)
    rng.shuffle(arrival)
    topic = _topic(broker, 3)
    producer = Producer({"bootstrap.servers": broker, "enable.idempotence": True})
    for i, value in enumerate(arrival):
        try:  # the producer stamps each record with its event time (CreateTime)
            event = json.loads(value)
            ts = parse_iso_ms(event.get("timestamp") or event.get("originalTimestamp"))
        except (ValueError, AttributeError):
            ts = None
        producer.produce(
            topic, value=value, key=str(i % 5).encode(), **({"timestamp": ts} if ts else {})
        )
    assert producer.flush(30) == 0
    group = f"cdi-live-{topic}"
    config = tmp_path / "live.yaml"
    config.write_text(LIVE_CONFIG.format(bootstrap=broker, topic=topic, group=group, repo=REPO))
    out, log = tmp_path / "out", tmp_path / "job.log"

    first = _start(config, out, log)
    _wait(lambda: _committed(broker, topic, group) > 0, "offsets committed", first, log)
    runner = _children(first.pid)
    assert runner  # the job's own Prism
    first.kill()
    first.wait(30)
    # Prism runs in a session of its own, and dies with the job that started it
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}/stat").exists() and " Z " not in
              Path(f"/proc/{pid}/stat").read_text() for pid in runner):  # fmt: skip
        assert time.monotonic() < deadline, "the runner outlived the killed job"
        time.sleep(0.2)

    log = tmp_path / "restarted.log"
    second = _start(config, out, log)
    total = len(arrival)
    _wait(lambda: "events in" in log.read_text(), "a status line", second, log)
    _wait(lambda: _committed(broker, topic, group) >= total, "every offset committed", second, log)
    second.send_signal(signal.SIGTERM)
    assert second.wait(300) == 0, log.read_text()[-3000:]
    assert "SIGTERM: draining" in log.read_text()

    report = json.loads((out / "run_report.json").read_text())
    batch = run_job(tmp_path / "file", arrival, config_from(FILE_CONFIG))
    # (`deliveries` aside: Prism's final metrics of a drained job can miss the counts of its
    # last timer bundles, 6 of 140 here, while every event is in the store: the rows below.)
    for key in ("events_in", "valid", "quarantined_by_reason", "duplicates"):
        assert report[key] == batch["report"][key], key
    assert report["accounted"] and report["internal_errors"] == {}
    # The record outputs, written as files per firing while the job ran and at the drain.
    for name in ("quarantine", "duplicates", "merges"):
        written = [
            json.loads(line)
            for f in sorted((out / name).glob("part-*.ndjson"))
            for line in f.read_bytes().splitlines()
        ]
        expected = batch["outputs"][name]
        assert len(written) == len(expected) and expected, name
        if name == "merges":
            assert sorted(map(repr, written)) == sorted(map(repr, expected))
    import sqlite3

    with sqlite3.connect(out / "profiles.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        live = {r["profile_id"]: dict(r) for r in conn.execute("SELECT * FROM profiles")}
    # `cdi replay` of the topic's whole time range: the same report and rows again.
    from pipelines.cli import main

    replayed = tmp_path / "replay"
    window = ["--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"]
    assert main(["replay", "--config", str(config), "--source", "web", *window,
                 "--output", str(replayed)]) == 0  # fmt: skip
    replay = json.loads((replayed / "run_report.json").read_text())
    for key in ("events_in", "valid", "quarantined_by_reason", "duplicates", "deliveries"):
        assert replay[key] == batch["report"][key], key
    with sqlite3.connect(replayed / "profiles.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["profile_id"]: dict(r) for r in conn.execute("SELECT * FROM profiles")}
    assert rows == batch["rows"]
    assert live and live.keys() == batch["rows"].keys()
    for pid, row in batch["rows"].items():
        # A streaming run may stamp a row a step or two past the batch version (a merge that
        # leaves the as-of stamp where it was counts one up); never behind, same content.
        assert live[pid]["version"] >= row["version"], pid
        same = {k: live[pid][k] for k in row if k != "version"}
        assert same == {k: v for k, v in row.items() if k != "version"}, pid
