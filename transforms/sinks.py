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

from transforms.dead_letter import FAILED, guarded, json_text

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


_TEXT_COLUMNS = frozenset(PROFILE_COLUMNS) - {"version"}


def row_values(row: dict) -> tuple:
    """A profile row as the statement's parameters: ``(profile_id,)`` for a tombstone, else one
    value per column; raises on a row that is not one (a missing column, a wrong type), which
    is that row's fault, not the database's."""
    if row.get("deleted"):
        if not isinstance(row["profile_id"], str):
            raise TypeError(f"profile_id must be text, got {type(row['profile_id']).__name__}")
        return (row["profile_id"],)
    values = tuple(row[c] for c in PROFILE_COLUMNS)
    for column, value in zip(PROFILE_COLUMNS, values, strict=True):
        if column in _TEXT_COLUMNS and not (value is None or isinstance(value, str)):
            raise TypeError(f"column {column} must be text, got {type(value).__name__}")
    if not isinstance(row["version"], int) or not -(2**63) <= row["version"] < 2**63:
        raise TypeError("version must be a 64-bit integer")
    return values


def upsert_profiles(conn: sqlite3.Connection, rows: list[dict]) -> None:
    """Upsert live rows and delete tombstoned ones (``{"profile_id", "deleted": True}``)."""
    write_values(conn, [row_values(r) for r in rows])


def write_values(conn: sqlite3.Connection, values: list[tuple]) -> None:
    """One transaction: upserts (full rows) and deletes (``(profile_id,)``)."""
    live = [v for v in values if len(v) > 1]
    gone = [v for v in values if len(v) == 1]
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
        self._rows: list[tuple] = []

    def process(self, row: dict):
        # Checked here, per row: a bad row is its own dead letter; what fails at the commit
        # (the database) fails the bundle and the run, as a job error should.
        self._rows.append(row_values(row))
        return ()  # no output; Beam's dead-letter wrapper iterates what process returns

    def finish_bundle(self):
        if self._rows:
            write_values(self._conn, self._rows)
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
        """Returns the dead letters: rows that are not rows (transforms/dead_letter.py)."""
        return (rows | "Upsert" >> guarded(beam.ParDo(_SqliteProfileWriter(self._path))))[FAILED]


def _lines(batch: list[dict], encode) -> list[str]:
    # One text element for the whole batch: the text sink appends the newline after it.
    return ["\n".join(encode(r) for r in batch)] if batch else []


class WriteRecordsAsJson(beam.PTransform):
    """Dict records to ``<directory>/<prefix>-SSSSS-of-NNNNN.ndjson``, one JSON object per line.
    ``batched``: the elements are lists of records, written as consecutive lines (a batch costs
    the runner one element instead of one per record). Returns the dead letters (records that do
    not encode). ``lenient``: encode anything (bytes, tuples, big integers) rather than fail, for
    the quarantine itself, whose records have nowhere else to go."""

    def __init__(
        self, directory: str, batched: bool = False, lenient: bool = False, prefix: str = "part"
    ):
        super().__init__()
        self._directory = str(directory)
        self._batched, self._lenient, self._prefix = batched, lenient, prefix

    def expand(self, records):
        encode = json_text if self._lenient else (lambda r: orjson.dumps(r).decode())
        if self._batched:
            to_json = beam.FlatMap(lambda batch: _lines(batch, encode))
        else:
            to_json = beam.Map(encode)
        encoded = records | "ToJson" >> guarded(to_json)
        encoded.good | "Write" >> beam.io.WriteToText(
            str(Path(self._directory) / self._prefix),
            file_name_suffix=".ndjson",
            shard_name_template="-SSSSS-of-NNNNN",
        )
        return encoded[FAILED]
