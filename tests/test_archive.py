"""The raw-input archive: every raw element the job reads is archived by event hour (Avro), and
`cdi replay --from-archive` runs it back through the same job with the same results."""

from __future__ import annotations

import sqlite3

import fastavro
import orjson

from pipelines.cli import main
from transforms.io.files import UNDATED, archive_files, event_hour


def test_event_hour_reads_the_events_own_time():
    assert event_hour(b'{"timestamp": "2026-11-01T10:59:59.999Z"}') == "2026-11-01T10"
    assert event_hour(b'{"originalTimestamp": "2026-11-01T23:00:00+02:00"}') == "2026-11-01T21"
    assert event_hour({"receivedAt": "2026-11-02T00:00:00Z"}) == "2026-11-02T00"
    for junk in (
        b"not json",
        b"[1]",
        b'{"timestamp": "yesterday"}',
        b'{"timestamp": "99999-01-01"}',
    ):
        assert event_hour(junk) == UNDATED


def test_archive_files_are_the_whole_hours_overlapping_the_range(tmp_path):
    from transforms.envelope import parse_iso_ms

    for name in (
        "web.2026-11-01T07-00000-of-00001.avro",
        "web.2026-11-01T08-00000-of-00001.avro",
        "ios.2026-11-01T09-00000-of-00002.avro",
        "web.2026-11-01T10-00000-of-00001.avro",
        "web.undated-00000-of-00001.avro",
        "web.eu.2026-11-01T08-r1-00000-of-00001.avro",  # a source named web.eu
        "other.2026-11-01T08-00000-of-00001.avro",
    ):
        (tmp_path / name).write_bytes(b"")
    t0 = parse_iso_ms("2026-11-01T08:00:00Z")
    got = archive_files(str(tmp_path), ["web", "ios"], t0 + 30 * 60_000, t0 + 2 * 3_600_000)
    assert [p.rsplit("/", 1)[1][:17] for p in got] == ["ios.2026-11-01T09", "web.2026-11-01T08"]
    eu = archive_files(str(tmp_path), ["web.eu"], t0, t0 + 3_600_000)
    assert [p.rsplit("/", 1)[1] for p in eu] == ["web.eu.2026-11-01T08-r1-00000-of-00001.avro"]


CONFIG = """
sources: [{{name: web, format: ndjson, paths: ["{events}"]}}]
computed_traits:
  - {{name: orders_lifetime, aggregate: count, event: Order Completed}}
sinks: {{archive: {{path: "{archive}"}}}}
"""


def rows(db) -> dict:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    out = {r["profile_id"]: dict(r) for r in conn.execute("SELECT * FROM profiles")}
    conn.close()
    return out


def test_archive_then_replay_from_it_gives_the_same_profiles(tmp_path, capsys):
    from pipelines.generate import generate

    lines, _ = generate(900, 80, seed=13)
    events = tmp_path / "events.ndjson"
    events.write_text("\n".join(lines) + "\nnot json at all\n")
    archive = tmp_path / "archive"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(events=events, archive=archive))

    assert main(["run", "--config", str(cfg), "--output", str(tmp_path / "live")]) == 0
    live = orjson.loads((tmp_path / "live" / "run_report.json").read_bytes())
    files = sorted(archive.glob("web.*.avro"))
    archived = [r for f in files for r in fastavro.reader(f.open("rb"))]
    assert len(archived) == live["events_in"]  # every raw line, the junk one included
    undated = [f for f in files if f.name.startswith(f"web.{UNDATED}")]
    assert undated and all(r["source"] == "web" for r in archived)
    hours = {f.name.split(".")[1][:13] for f in files if f not in undated}
    assert len(hours) > 24  # partitioned by event hour

    capsys.readouterr()
    code = main(
        ["replay", "--config", str(cfg), "--from-archive", str(archive), "--from",
         "2000-01-01T00:00:00Z", "--to", "2000-01-01T03:00:00Z", "--output", str(tmp_path / "none")]
    )  # fmt: skip
    assert code == 0  # an empty range is a run with no input
    code = main(
        ["replay", "--config", str(cfg), "--from-archive", str(archive), "--from",
         "2015-01-01T00:00:00Z", "--to", "2030-01-01T00:00:00Z", "--output", str(tmp_path / "re")]
    )  # fmt: skip
    assert code == 0
    replay = orjson.loads((tmp_path / "re" / "run_report.json").read_bytes())
    n_undated = sum(1 for f in undated for _ in fastavro.reader(f.open("rb")))
    assert replay["events_in"] == live["events_in"] - n_undated
    assert replay["duplicates"] == live["duplicates"]
    assert rows(tmp_path / "re" / "profiles.sqlite") == rows(tmp_path / "live" / "profiles.sqlite")
    assert not (tmp_path / "re" / "archive").exists()
    assert len(sorted(archive.glob("web.*.avro"))) == len(files)  # a replay archives nothing

    # A second run of an overlapping input adds its own files: no hour of the first is lost.
    assert main(["run", "--config", str(cfg), "--output", str(tmp_path / "again")]) == 0
    again = sorted(archive.glob("web.*.avro"))
    assert len(again) == 2 * len(files)
    assert sum(1 for f in again for _ in fastavro.reader(f.open("rb"))) == 2 * len(archived)


def test_archiving_a_streaming_run_is_refused_with_a_config_error(tmp_path, capsys):
    events = tmp_path / "e.ndjson"
    events.write_text('{"type": "page", "messageId": "m1", "anonymousId": "a1"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(events=events, archive=tmp_path / "arch"))
    code = main(["run", "--config", str(cfg), "--output", str(tmp_path / "o"), "--streaming"])
    assert code == 2
    assert "sinks.archive.path: archives bounded runs only" in capsys.readouterr().err


def test_a_kafka_replay_archives_nothing(tmp_path, monkeypatch):
    """`cdi replay --source` re-reads a topic: its events are already in the archive, so the
    replay's job has no archive sink (a later replay from the archive would read them twice)."""
    from pipelines import cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "sources: [{name: k, type: kafka, kafka: {topics: [t], bootstrap_servers: h}}]\n"
        f"sinks: {{archive: {{path: {tmp_path / 'archive'}}}}}\n"
    )
    seen = {}
    monkeypatch.setattr(
        cli, "cmd_run", lambda args, rest: seen.setdefault("cfg", args.replay_config) and 0
    )
    args = ["replay", "--config", str(cfg), "--source", "k", "--from", "2026-11-01T00:00:00Z"]
    assert main([*args, "--to", "2026-11-02T00:00:00Z", "--output", str(tmp_path / "o")]) == 0
    assert seen["cfg"].sinks.archive.path is None
    assert seen["cfg"].sources[0].kafka.stop == "2026-11-02T00:00:00Z"
