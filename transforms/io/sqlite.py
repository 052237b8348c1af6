"""SQLite profile store (the embedded default): ``profiles.sqlite`` in the output directory.

The store contract and its SQL are shared with PostgreSQL (:mod:`transforms.io.sql`); here the
batch runs statement by statement in one transaction (no round trips to save). WAL mode, so
readers (``cdi profile get``, ``cdi serve``) never block the writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from transforms.io.sql import SQLITE, lookup_params, schema, statements, write_plan
from transforms.profile_store import PROFILE_COLUMNS, StoreSpec, check_row, decoded, latest_rows

_SQL = statements(SQLITE)
_OPEN_ATTEMPTS = 40  # ~40 s of waiting in all

# Rows per transaction unless the config says (profile_store.batch_size). A transaction writes
# every page it dirtied to the WAL once, and profile ids are random keys, so a batch dirties
# about one page per row of each table and index whatever its size: 5,000 rows per commit write
# far fewer pages in all than 500, and take the one write lock ten times less often (passes
# running at once share it). 1M events in passes: 108 s -> 92 s, 11.9 -> 6.3 GB written.
BATCH_SIZE = 5000
# Per connection, set on open:
# - temp_store: the statement journals of a multi-statement transaction in memory, not in
#   files under /var/tmp (132 MB of writes per 100k events);
# - cache_size (KiB when negative): 64 MiB of pages instead of 2 MiB, so a large store's
#   pages are not read back from the OS for every batch.
# Durability is as before (synchronous stays FULL).
_PRAGMAS = ("PRAGMA temp_store=MEMORY", "PRAGMA cache_size=-65536")


def open_profile_db(path: str | Path) -> sqlite3.Connection:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One DoFn instance uses its connection from one thread at a time, but Beam's SDK harness may
    # call setup/process and teardown on different threads (multi-process local runs do).
    conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
    for pragma in _PRAGMAS:  # no lock needed
        conn.execute(pragma)
    # Several workers (multi-process local runs) open the file at once. Switching to WAL needs
    # an exclusive lock and SQLite reports "database is locked" at once instead of waiting on
    # the busy timeout, so that first step is retried.
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            with conn:
                for ddl in schema(SQLITE):
                    conn.execute(ddl)
            return conn
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == _OPEN_ATTEMPTS - 1:
                conn.close()
                raise
            time.sleep(0.05 * (attempt + 1))


def upsert_profiles(conn: sqlite3.Connection, rows: list[dict]) -> None:
    """Rows and tombstones, checked, one transaction (the store contract,
    transforms/profile_store.py): for tools and tests; the job's writer checks rows first."""
    _write(conn, latest_rows(check_row(r) for r in rows))


def _write(conn: sqlite3.Connection, rows: list[dict]) -> None:
    with conn:
        for sql, params in write_plan(rows, _SQL):
            conn.execute(sql, params)


def read_profile(conn: sqlite3.Connection, key: str) -> dict | None:
    ident, pid = lookup_params(key)
    found = None
    if ident is not None:
        found = conn.execute(_SQL["by_identifier"], ident).fetchone()
    if found is None:
        found = conn.execute(_SQL["by_id"], (pid,)).fetchone()
    return decoded(dict(zip(PROFILE_COLUMNS, found, strict=True))) if found else None


class Store:
    def __init__(self, spec: StoreSpec):
        self._conn = open_profile_db(spec.path)

    def write(self, rows: list[dict]) -> None:
        """Rows the writer checked and reduced to each profile's newest (profile_store)."""
        _write(self._conn, rows)

    def close(self) -> None:
        self._conn.close()


class Reader:
    """Reads on a worker thread (sqlite3 blocks); one connection per thread of the pool."""

    def __init__(self, spec: StoreSpec, pool_size: int = 8):
        if not Path(spec.path).exists():
            raise FileNotFoundError(f"no profile database at {spec.path}")
        self._path = spec.path
        self._conns: dict[int, sqlite3.Connection] = {}

    def _conn(self) -> sqlite3.Connection:
        import threading

        tid = threading.get_ident()
        if tid not in self._conns:
            conn = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, check_same_thread=False)
            self._conns[tid] = conn
        return self._conns[tid]

    async def get(self, key: str) -> dict | None:
        return await asyncio.to_thread(lambda: read_profile(self._conn(), key))

    async def ping(self) -> bool:
        await asyncio.to_thread(lambda: self._conn().execute("SELECT 1").fetchone())
        return True

    async def aclose(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


class Ledger:
    """The activation ledger (transforms/audiences.py): a key is claimed by one run; the same
    run may claim it again (a retried bundle), another run may not."""

    def __init__(self, spec: StoreSpec):
        self._conn = open_profile_db(spec.path)
        with self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS activation_ledger "
                "(key TEXT PRIMARY KEY, run_id TEXT NOT NULL)"
            )

    def claim(self, keys: list[str], run_id: str) -> set[str]:
        new = set()
        with self._conn:
            for key in keys:
                got = self._conn.execute(
                    "INSERT INTO activation_ledger (key, run_id) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id "
                    "WHERE activation_ledger.run_id = excluded.run_id RETURNING key",
                    (key, run_id),
                ).fetchone()
                if got:
                    new.add(key)
        return new

    def close(self) -> None:
        self._conn.close()
