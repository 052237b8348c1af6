"""Sinks: the profile table (SQLite, the embedded default) and NDJSON record outputs.

The profile sink upserts by ``profile_id`` and only ever moves a row forward: a row is replaced
when the incoming ``version`` is at least the stored one, so re-delivered or reordered panes (retries,
speculative execution, a replay) never roll a profile back. Rows are buffered per bundle and written
in one transaction at the end of the bundle, which is also the retry unit.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

PROFILE_COLUMNS = (
    "profile_id",
    "identities",
    "traits",
    "computed_traits",
    "event_counts",
    "consent",
    "first_seen",
    "last_seen",
    "version",
    "updated_at",
)

_CREATE = """
CREATE TABLE IF NOT EXISTS profiles (
  profile_id   TEXT PRIMARY KEY,
  identities   TEXT NOT NULL,  -- JSON array of {"type", "value", "first_seen", "last_seen"}
  traits       TEXT NOT NULL,  -- JSON object, trait -> value (set/set_once/increment by event time)
  computed_traits TEXT NOT NULL,  -- JSON object, name -> {value, window_start, window_end}
  event_counts TEXT NOT NULL,  -- JSON object, "type:<type>" / "event:<name>" -> count
  consent      TEXT NOT NULL,  -- JSON object, purpose -> granted (most restrictive identifier wins)
  first_seen   TEXT,
  last_seen    TEXT,
  version      INTEGER NOT NULL,
  updated_at   TEXT NOT NULL
)"""

_UPSERT = (
    f"INSERT INTO profiles ({', '.join(PROFILE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in PROFILE_COLUMNS)}) "
    "ON CONFLICT(profile_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in PROFILE_COLUMNS[1:])
    + " WHERE excluded.version >= profiles.version"
)


_OPEN_ATTEMPTS = 40  # ~40 s of waiting in all


def open_profile_db(path: str | Path) -> sqlite3.Connection:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One DoFn instance uses its connection from one thread at a time, but Beam's SDK harness may
    # call setup/process and teardown on different threads (multi-process local runs do).
    conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
    # Several workers (multi-process local runs) open the file at once. Switching to WAL needs
    # an exclusive lock and SQLite reports "database is locked" at once instead of waiting on
    # the busy timeout, so that first step is retried.
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_CREATE)
            return conn
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == _OPEN_ATTEMPTS - 1:
                conn.close()
                raise
            time.sleep(0.05 * (attempt + 1))


def upsert_profiles(conn: sqlite3.Connection, rows: list[dict]) -> None:
    """Upsert live rows and delete tombstoned ones (``{"profile_id", "deleted": True}``)."""
    live = [tuple(r[c] for c in PROFILE_COLUMNS) for r in rows if not r.get("deleted")]
    gone = [(r["profile_id"],) for r in rows if r.get("deleted")]
    with conn:
        conn.executemany(_UPSERT, live)
        conn.executemany("DELETE FROM profiles WHERE profile_id = ?", gone)


class _SqliteProfileWriter(beam.DoFn):
    def __init__(self, path: str):
        self._path = path
        self._written = Metrics.counter("cdi", "profiles_written")

    def setup(self):
        self._conn = open_profile_db(self._path)

    def start_bundle(self):
        self._rows: list[dict] = []

    def process(self, row: dict):
        self._rows.append(row)

    def finish_bundle(self):
        if self._rows:
            upsert_profiles(self._conn, self._rows)
            self._written.inc(len(self._rows))
            self._rows = []

    def teardown(self):
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()


class WriteProfilesToSqlite(beam.PTransform):
    def __init__(self, path: str):
        super().__init__()
        if not path:
            raise ValueError("a database path is required")
        self._path = str(path)

    def expand(self, rows):
        return rows | "Upsert" >> beam.ParDo(_SqliteProfileWriter(self._path))


def _lines(batch: list[dict]) -> list[str]:
    # One text element for the whole batch: the text sink appends the newline after it.
    return ["\n".join(orjson.dumps(r).decode() for r in batch)] if batch else []


class WriteRecordsAsJson(beam.PTransform):
    """Dict records to ``<directory>/part-SSSSS-of-NNNNN.ndjson``, one JSON object per line.
    ``batched``: the elements are lists of records, written as consecutive lines (a batch costs
    the runner one element instead of one per record)."""

    def __init__(self, directory: str, batched: bool = False):
        super().__init__()
        self._directory = str(directory)
        self._batched = batched

    def expand(self, records):
        to_json = (
            beam.FlatMap(_lines) if self._batched else beam.Map(lambda r: orjson.dumps(r).decode())
        )
        return (
            records
            | "ToJson" >> to_json
            | "Write"
            >> beam.io.WriteToText(
                str(Path(self._directory) / "part"),
                file_name_suffix=".ndjson",
                shard_name_template="-SSSSS-of-NNNNN",
            )
        )
