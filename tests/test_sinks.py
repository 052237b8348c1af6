"""The SQLite profile sink when several workers open it at once (multi-process local runs)."""

import multiprocessing as mp
import sqlite3

from transforms.sinks import PROFILE_COLUMNS, open_profile_db, upsert_profiles


def _open_and_write(path, barrier, i, errors):
    barrier.wait()  # every process opens the file at the same moment
    try:
        conn = open_profile_db(path)
        row = {c: "x" for c in PROFILE_COLUMNS}
        row.update(profile_id=f"p{i}", version=1)
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
