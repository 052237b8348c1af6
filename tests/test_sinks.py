"""The SQLite profile sink when several workers open it at once (multi-process local runs)."""

import multiprocessing as mp
import sqlite3

from transforms.io.sqlite import open_profile_db, upsert_profiles
from transforms.profile_store import PROFILE_COLUMNS


def _open_and_write(path, barrier, i, errors):
    barrier.wait()  # every process opens the file at the same moment
    try:
        conn = open_profile_db(path)
        row = {c: "x" for c in PROFILE_COLUMNS}
        row.update(profile_id=f"p{i}", version=1, identities="[]")
        upsert_profiles(conn, [row])
        conn.close()
    except Exception as e:  # reported to the test, not lost in a child's stderr
        errors.put(repr(e))


def test_workers_opening_the_profile_db_at_once_all_write(tmp_path):
    """Switching a new file to WAL makes SQLite answer "database is locked" to the others at
    once (no busy wait); before the retry, most runs of this test lost a worker that way."""
    path = str(tmp_path / "profiles.sqlite")
    n = 8
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_and_write, args=(path, barrier, i, errors)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    rows = sqlite3.connect(path).execute("SELECT profile_id FROM profiles").fetchall()
    assert sorted(r[0] for r in rows) == sorted(f"p{i}" for i in range(n))


def test_a_record_that_does_not_encode_is_a_dead_letter_and_the_rest_is_written(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from tests.conftest import make_pipeline
    from transforms.sinks import WriteRecordsAsJson

    records = [{"n": 1}, {"n": {2: "int key"}}, {"n": 3}]  # JSON keys are text
    with make_pipeline() as p:
        failed = p | beam.Create(records) | WriteRecordsAsJson(str(tmp_path / "out"))
        assert_that(failed | beam.Map(lambda d: d[0]["n"]), equal_to([{2: "int key"}]))
    written = sorted(
        line for f in (tmp_path / "out").glob("part-*") for line in f.read_text().splitlines()
    )
    assert written == ['{"n":1}', '{"n":3}']


def test_a_row_that_is_not_a_row_is_a_dead_letter_and_the_rest_is_upserted(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from tests.conftest import make_pipeline
    from transforms.profile_store import StoreSpec, WriteProfiles

    good = {c: "x" for c in PROFILE_COLUMNS} | {
        "version": 1,
        "profile_id": "p1",
        "identities": "[]",
    }
    bad = {**good, "profile_id": "p2", "traits": {"not": "text"}}
    missing = {"profile_id": "p3"}
    db = tmp_path / "p.sqlite"
    with make_pipeline() as p:
        failed = (
            p | beam.Create([good, bad, missing]) | WriteProfiles(StoreSpec("sqlite", path=str(db)))
        )
        assert_that(failed | beam.Map(lambda d: d[0]["profile_id"]), equal_to(["p2", "p3"]))
    conn = open_profile_db(db)
    assert [r[0] for r in conn.execute("SELECT profile_id FROM profiles")] == ["p1"]
