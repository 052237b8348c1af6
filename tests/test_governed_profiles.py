"""The whole graph through build(): one assert_that per output, NDJSON and Avro sources."""

import sqlite3

import apache_beam as beam
import fastavro
import orjson
from apache_beam.testing.util import assert_that, equal_to

from pipelines import governed_profiles as job
from tests.conftest import config_from, event, make_pipeline
from transforms.envelope import envelope_avro_schema, event_to_avro_record

LINES = [
    orjson.dumps(event(messageId="1")).decode(),
    orjson.dumps(event(messageId="1")).decode(),  # duplicate
    orjson.dumps(event(messageId="2", userId="u1")).decode(),
    orjson.dumps(
        event(
            messageId="3",
            type="identify",
            userId="u1",
            traits={"email": "A@x.io"},
            event=None,
            properties=None,
        )
    ).decode(),
    orjson.dumps(event(messageId="4", properties={"product_id": 5})).decode(),  # type mismatch
    "{truncated",
    "",  # blank separator line: not an event
    "42",
]


def _config(tmp_path, fmt="ndjson"):
    return config_from(
        f"""
sources: [{{name: web, format: {fmt}, paths: [], tracking_plan: default}}]
tracking_plans: {{default: {{path: ../tracking_plans/example.yaml}}}}
"""
    )


def test_build_routes_every_event_to_exactly_one_output(tmp_path):
    src = tmp_path / "events.ndjson"
    src.write_text("\n".join(LINES) + "\n")
    cfg = _config(tmp_path)
    with make_pipeline() as p:
        out = job.build(p, cfg, {"web": [str(src)]})
        assert_that(
            out["valid"] | beam.Map(lambda e: e.event["messageId"]),
            equal_to(["1", "2", "3"]),
            label="valid",
        )
        assert_that(
            out["quarantine"] | beam.Map(lambda r: (r["reason"], r["payload"])),
            equal_to(
                [
                    ("schema.type_mismatch", LINES[4]),
                    ("decode.malformed_json", "{truncated"),
                    ("decode.not_an_object", "42"),
                ]
            ),
            label="quarantine",
        )
        assert_that(
            out["duplicates"] | beam.Map(lambda r: r["first_message_id"]),
            equal_to(["1"]),
            label="dups",
        )
        assert_that(
            out["profiles"]
            | beam.Map(lambda r: (r["profile_id"], r["event_counts"], r["identities"].count("{"))),
            # anon-1's anonymous event and u1's events (which carry anon-1) are one person.
            equal_to(
                [("user:u1", '{"event:Product Viewed":2,"type:identify":1,"type:track":2}', 3)]
            ),
            label="profiles",
        )
        assert_that(
            out["merges"] | beam.Map(lambda r: (r["kind"], r["from"], r["into"], r["rule"])),
            equal_to([("profile_merged", "anon:anon-1", "user:u1", "linked_by.track")]),
            label="merges",
        )


def test_avro_source_and_sinks(tmp_path):
    src = tmp_path / "events.avro"
    records = [event_to_avro_record(orjson.loads(line)) for line in LINES[:5]]
    with open(src, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(envelope_avro_schema()), records)
    cfg = _config(tmp_path, "avro")
    outdir = tmp_path / "out"
    with make_pipeline() as p:
        out = job.build(p, cfg, {"web": [str(src)]})
        job.write_outputs(out, cfg, outdir)
    with sqlite3.connect(outdir / "profiles.sqlite") as conn:
        rows = dict(conn.execute("SELECT profile_id, identities FROM profiles").fetchall())
    # anon:anon-1 was merged into user:u1: its row is gone, its identifier is on the person.
    assert set(rows) == {"user:u1"}
    ids = {(i["type"], i["value"]) for i in orjson.loads(rows["user:u1"])}
    assert ids == {("user_id", "u1"), ("anonymous_id", "anon-1"), ("email", "a@x.io")}
    quarantine = [
        orjson.loads(x)
        for f in (outdir / "quarantine").glob("part-*")
        for x in f.read_text().splitlines()
    ]
    assert [q["reason"] for q in quarantine] == ["schema.type_mismatch"]
    assert quarantine[0]["origin"].endswith("events.avro")
    dups = [x for f in (outdir / "duplicates").glob("part-*") for x in f.read_text().splitlines()]
    assert len(dups) == 1


def test_sink_never_rolls_a_profile_back(tmp_path):
    from transforms.io.sqlite import open_profile_db, upsert_profiles

    conn = open_profile_db(tmp_path / "p.sqlite")
    row = {
        "profile_id": "p",
        "identities": "[]",
        "traits": "{}",
        "computed_traits": "{}",
        "event_counts": "{}",
        "consent": "{}",
        "first_seen": None,
        "last_seen": None,
        "updated_at": "t",
    }
    upsert_profiles(conn, [{**row, "version": 5, "traits": '{"v":5}'}])
    upsert_profiles(
        conn, [{**row, "version": 3, "traits": '{"v":3}'}]
    )  # a stale, re-delivered pane
    assert conn.execute("SELECT version, traits FROM profiles").fetchall() == [(5, '{"v":5}')]
    upsert_profiles(conn, [{**row, "version": 6, "traits": '{"v":6}'}])
    assert conn.execute("SELECT version, traits FROM profiles").fetchall() == [(6, '{"v":6}')]
