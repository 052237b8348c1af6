"""`cdi quarantine summarize` / `replay` over quarantine shard files."""

from __future__ import annotations

import orjson
import pytest

from pipelines.quarantine_tools import (
    format_summary,
    main_replay,
    main_summarize,
    read_located,
    read_records,
    replay_line,
    replay_lines,
    summarize,
    write_replay,
)
from transforms.quarantine import Violation, quarantine_record


def record(
    reason="schema.type_mismatch", source="web", payload=None, mid="m-1", origin="in.ndjson"
):
    if payload is None:
        payload = orjson.dumps({"type": "track", "event": "X", "messageId": mid}).decode()
    return quarantine_record(
        stage="validate",
        violations=[Violation(reason, "properties.price", "expected number")],
        payload=payload,
        source=source,
        origin=origin,
        message_id=mid,
    )


def write_shards(directory, *shards):
    directory.mkdir(parents=True, exist_ok=True)
    for i, records in enumerate(shards):
        lines = [orjson.dumps(r).decode() for r in records]
        name = f"part-{i:05d}-of-{len(shards):05d}.ndjson"
        (directory / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.fixture
def out_dir(tmp_path):
    """A run's output directory with its quarantine/ shards (written out of name order)."""
    q = tmp_path / "out" / "quarantine"
    write_shards(
        q,
        [
            record(mid="m-1"),
            record(mid="m-2", source="ios"),
            record("decode.malformed_json", payload="{oops"),
        ],
        [record(mid="m-3"), record("timestamp.invalid", source="ios", mid="m-4")],
    )
    (q / "not-a-shard.txt").write_text("ignored\n")
    return tmp_path / "out"


# --- reading ----------------------------------------------------------------------------------


def test_reads_a_run_output_dir_or_its_quarantine_dir_in_shard_order(out_dir):
    from_out = list(read_records(out_dir))
    from_q = list(read_records(out_dir / "quarantine"))
    assert from_out == from_q
    assert [r["message_id"] for r in from_out] == ["m-1", "m-2", "m-1", "m-3", "m-4"]
    single = out_dir / "quarantine" / "part-00001-of-00002.ndjson"
    assert [r["message_id"] for r in read_records(single)] == ["m-3", "m-4"]


def test_missing_or_empty_dir_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no quarantine files found"):
        read_records(tmp_path / "nope")  # raised at the call, not at the first next()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no quarantine files found"):
        read_records(tmp_path / "empty")


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"reason": "x", "payload": "{\\"email\\": \\"a@b.com\\"", oops', "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"reason": "x"}', "no 'payload' field"),
    ],
)
def test_a_corrupt_line_names_file_and_line_and_not_its_content(tmp_path, line, why):
    q = tmp_path / "q"
    write_shards(q, [record()])
    shard = q / "part-00000-of-00001.ndjson"
    shard.write_bytes(shard.read_bytes() + b"\n" + line + b"\n")  # a blank line is skipped
    with pytest.raises(ValueError) as e:
        list(read_records(q))
    assert str(e.value).startswith(f"{shard}:3: ")
    assert why in str(e.value)
    assert "a@b.com" not in str(e.value)


# --- summarize --------------------------------------------------------------------------------


def test_summarize_counts_by_reason_and_source(out_dir):
    summary = summarize(read_records(out_dir))
    assert summary == {
        "total": 5,
        "by_reason": {
            "decode.malformed_json": 1,
            "schema.type_mismatch": 3,
            "timestamp.invalid": 1,
        },
        "by_source": {"ios": 2, "web": 3},
        "by_reason_and_source": {
            "decode.malformed_json": {"web": 1},
            "schema.type_mismatch": {"ios": 1, "web": 2},
            "timestamp.invalid": {"ios": 1},
        },
    }
    assert list(summary["by_reason"]) == sorted(summary["by_reason"])


def test_summarize_labels_missing_fields():
    summary = summarize([{"reason": "x", "payload": ""}])
    assert summary["by_reason_and_source"] == {"x": {"(unknown)": 1}}


def test_format_summary_is_a_table_with_totals(out_dir):
    text = format_summary(summarize(read_records(out_dir)))
    lines = text.splitlines()
    assert lines[0].split() == ["reason", "source", "count"]
    assert ["schema.type_mismatch", "ios", "1"] in [line.split() for line in lines]
    assert ["all", "reasons", "web", "3"] in [line.split() for line in lines]
    assert lines[-1].split() == ["total", "5"]
    assert format_summary(summarize([])) == "no quarantined records"


def test_main_summarize(out_dir, tmp_path, capsys):
    assert main_summarize(str(out_dir)) == 0
    assert "schema.type_mismatch" in capsys.readouterr().out
    assert main_summarize(str(tmp_path / "missing")) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"cdi quarantine: {tmp_path / 'missing'}: no quarantine files found"


# --- replay -----------------------------------------------------------------------------------


def test_replay_keeps_message_id_and_adds_only_the_source():
    payload = (
        '{"type":"track","messageId":"m-9","event":"X","properties":{"n":12345678901234567890}}'
    )
    line = replay_line(record(payload=payload, source="ios"))
    event = orjson.loads(line)
    assert event["source"] == "ios" and event["messageId"] == "m-9"
    assert {k: v for k, v in event.items() if k != "source"} == orjson.loads(payload)


def test_replay_keeps_an_existing_source_and_the_exact_text():
    payload = '{"type": "track", "source": "web", "messageId": "m-9", "price": 1.10}'
    assert replay_line(record(payload=payload, source="ios")) == payload


def test_replay_repaired_multi_line_payload_becomes_one_line():
    payload = '{\n  "type": "track",\n  "source": "web",\n  "messageId": "m-9"\n}'
    line = replay_line(record(payload=payload))
    assert "\n" not in line and orjson.loads(line) == orjson.loads(payload)


def test_replay_lines_reports_still_malformed():
    good = record(mid="m-1")
    broken = [record(payload="{oops"), record(payload="[1]"), {"reason": "x", "payload": None}]
    lines, still = replay_lines([broken[0], good, *broken[1:]])
    assert [orjson.loads(line)["messageId"] for line in lines] == ["m-1"]
    assert still == broken


def test_write_replay_counts_and_writes_ndjson(out_dir, tmp_path):
    out = tmp_path / "replay" / "events.ndjson"
    counts = write_replay(read_records(out_dir), out)
    assert counts == {
        "replayed": 4,
        "still_malformed": 1,
        "by_source": {"ios": 2, "web": 2},
        "not_events": 0,
    }
    events = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [(e["source"], e["messageId"]) for e in events] == [
        ("web", "m-1"),
        ("ios", "m-2"),
        ("web", "m-3"),
        ("ios", "m-4"),
    ]
    assert not (tmp_path / "replay" / "events.ndjson.tmp").exists()


def test_main_replay_reports_broken_records_by_location_never_payload(out_dir, tmp_path, capsys):
    out = tmp_path / "replay.ndjson"
    assert main_replay(str(out_dir), str(out)) == 0
    captured = capsys.readouterr()
    assert f"replayed 4 events to {out}" in captured.out
    shard = out_dir / "quarantine" / "part-00000-of-00002.ndjson"
    assert f"{shard}:3: decode.malformed_json (origin in.ndjson)" in captured.err
    assert "{oops" not in captured.err + captured.out
    assert "several sources" in captured.err
    assert len(out.read_text().splitlines()) == 4


def test_main_replay_errors_leave_no_partial_file(out_dir, tmp_path, capsys):
    shard = out_dir / "quarantine" / "part-00001-of-00002.ndjson"
    shard.write_text(shard.read_text() + "{corrupt\n")
    out = tmp_path / "replay.ndjson"
    assert main_replay(str(out_dir), str(out)) == 2
    assert f"{shard}:3: not valid JSON" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "replay.ndjson.tmp").exists()
    assert main_replay(str(tmp_path / "missing"), str(out)) == 2
    assert "no quarantine files found" in capsys.readouterr().err


def test_main_replay_refuses_to_overwrite_a_shard(out_dir, capsys):
    shard = out_dir / "quarantine" / "part-00000-of-00002.ndjson"
    before = shard.read_bytes()
    assert main_replay(str(out_dir), str(shard)) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert shard.read_bytes() == before


def test_read_located_gives_file_and_line(out_dir):
    located = list(read_located(out_dir))
    assert [(f.name, n) for f, n, _ in located][2:4] == [
        ("part-00000-of-00002.ndjson", 3),
        ("part-00001-of-00002.ndjson", 1),
    ]


def test_replay_skips_records_that_are_not_events(tmp_path):
    """Dead letters of identifier groups, persons and sink records carry the element as JSON,
    not an event; a repeat is an event already replayed from its first record."""
    event = {"reason": "internal.error", "subject": "event", "source": "web", "payload": '{"a":1}'}
    others = [
        {**event, "subject": "person", "payload": '["anon:a1",{}]'},
        {**event, "subject": "identifier group", "payload": '["g",[]]'},
        {**event, "repeat": True},
    ]
    counts = write_replay([event, *others], tmp_path / "r.ndjson")
    assert counts["replayed"] == 1 and counts["not_events"] == 3
    assert (tmp_path / "r.ndjson").read_text().splitlines() == ['{"a":1,"source":"web"}']
