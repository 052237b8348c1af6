"""Profile stores: one interface for every store profile rows are written to and read from.

``sinks.profiles.type: sqlite | postgres | redis | bigquery`` picks an adapter in
``transforms/io/`` (imported only when chosen: the core imports no client library). Every
adapter keeps the same contract, tested on each against its real server:

- **Versions.** A row replaces the stored one only when its ``version`` is higher
  (:func:`transforms.profile.as_of_version`: newest event time, then event count, then deletion),
  so a retried bundle, a duplicated or reordered write, a re-run of the same input and a replay of
  older history never move a profile backwards, and a re-run changes nothing.
- **Tombstones.** ``{"profile_id", "deleted": True, "version"}`` (a merged-away or deleted person)
  removes the profile and its identifier claims and leaves a version marker, so an older live
  row of that person arriving later is not written back. Reads never return a tombstone.
- **Identifier claims.** Each ``(type, value)`` in a stored row's identity list is claimed by
  that profile (key :func:`transforms.identity.id_key`, e.g. ``email:jane@example.com``); a
  profile's claims are replaced only when one of its rows is actually written (its version
  won), and removed with its tombstone. So the claims are a function of each profile's newest
  row alone, in any arrival order of rows of different profiles (a merge, a split: whichever
  row lands first). A lookup by identifier takes the newest claim (in a settled state there is
  one). Claims hold the identity values as stored: what the profile sink's PII policy made of
  them (a hashed email is looked up by its hash).
- **Batches.** Rows are checked one by one (a row that is not one is a dead letter), buffered
  and written per bundle in one transaction or pipeline; a batch keeps only each profile's
  highest version (:func:`latest_rows`).

Reads (``get``) take an identifier key or a profile id and return the stored profile with its
JSON columns decoded, or ``None``; they are async so the lookup API serves them from a pool.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

from transforms.dead_letter import FAILED, dead_letter_on_raise, guarded
from transforms.identity import id_key

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
JSON_COLUMNS = ("identities", "traits", "computed_traits", "event_counts", "consent")
_TEXT_COLUMNS = frozenset(PROFILE_COLUMNS) - {"version"}

# Rows per write where neither the config nor the adapter says: a round trip per 500 rows.
DEFAULT_BATCH_SIZE = 500

# type -> adapter module (each defines ``Store`` and ``Reader``, and may define ``BATCH_SIZE``),
# imported when chosen.
ADAPTERS = {
    "sqlite": "transforms.io.sqlite",
    "postgres": "transforms.io.postgres",
    "redis": "transforms.io.redis",
    "bigquery": "transforms.io.bigquery",
}


@dataclass(frozen=True)
class StoreSpec:
    """Where profiles go. ``url``: ``postgresql://...``, ``redis://...``, ``bigquery://project/
    dataset.table``; ``${VAR}`` in it is read from the environment when the store is opened, so
    credentials never sit in a config file or a log. ``path``: the SQLite file."""

    type: str
    url: str | None = None
    path: str | None = None
    # Rows per write; None: the adapter's BATCH_SIZE, else DEFAULT_BATCH_SIZE (batch_size()).
    batch_size: int | None = None

    def __post_init__(self):
        if self.type not in ADAPTERS:
            raise ValueError(f"unknown profile store {self.type!r}; one of {', '.join(ADAPTERS)}")
        if self.type == "sqlite" and not self.path:
            raise ValueError("a SQLite store needs a path")
        if self.type != "sqlite" and not self.url:
            raise ValueError(f"a {self.type} store needs a url")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")

    def resolved_url(self) -> str:
        return expand_env(self.url or "")

    def describe(self) -> str:
        """For logs and status lines: the password never appears."""
        return self.path if self.type == "sqlite" else redact_url(self.url or "")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(text: str) -> str:
    def value(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise ValueError(f"environment variable {m.group(1)} (named in a store url) is not set")
        return os.environ[m.group(1)]

    return _ENV.sub(value, text)


def redact_url(url: str) -> str:
    """``scheme://user:***@host/...``: safe to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=netloc[0].split(":", 1)[0] + ":***@" + netloc[1]))


def spec_from_url(url: str) -> StoreSpec:
    """``cdi profile get/serve --sink URL``: a URL or a SQLite file path."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgres", "postgresql"):
        return StoreSpec("postgres", url=url)
    if scheme in ("redis", "rediss", "unix"):
        return StoreSpec("redis", url=url)
    if scheme == "bigquery":
        return StoreSpec("bigquery", url=url)
    if scheme == "sqlite":
        return StoreSpec("sqlite", path=url.split("://", 1)[1])
    return StoreSpec("sqlite", path=url)


# --- pure core ---------------------------------------------------------------------------------


def check_row(row: dict) -> dict:
    """``row`` if it is a profile row or a tombstone; raises (the row's fault, a dead letter)
    on a missing column or a wrong type."""
    version = row["version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**63:
        raise TypeError("version must be a non-negative 64-bit integer")
    if not isinstance(row["profile_id"], str) or not row["profile_id"]:
        raise TypeError("profile_id must be non-empty text")
    if row.get("deleted"):
        return row
    for column in PROFILE_COLUMNS:
        value = row[column]
        if column in _TEXT_COLUMNS and not (value is None or isinstance(value, str)):
            raise TypeError(f"column {column} must be text, got {type(value).__name__}")
    row_identifiers(row)  # the identity list must parse
    return row


def latest_rows(rows: Iterable[dict]) -> list[dict]:
    """Each profile's highest version (ties: the later one), in first-seen order."""
    best: dict[str, dict] = {}
    for row in rows:
        cur = best.get(row["profile_id"])
        if cur is None or row["version"] >= cur["version"]:
            best[row["profile_id"]] = row
    return list(best.values())


def row_identifiers(row: dict) -> list[str]:
    """The identifier keys a live row lists (none for a tombstone)."""
    if row.get("deleted"):
        return []
    ids = orjson.loads(row["identities"])
    if not isinstance(ids, list):
        raise TypeError("identities must be a JSON array")
    return sorted({id_key(i["type"], i["value"]) for i in ids})


def decoded(stored: dict) -> dict[str, Any]:
    """A stored row as a reader returns it: JSON columns decoded, version an integer."""
    out = {c: stored.get(c) for c in PROFILE_COLUMNS}
    for c in JSON_COLUMNS:
        if isinstance(out[c], (str, bytes)):
            out[c] = orjson.loads(out[c])
    out["version"] = int(out["version"])
    return out


# --- the interface adapters implement -----------------------------------------------------------


class Store(Protocol):
    """A writer, opened once per DoFn instance (``setup``)."""

    def write(self, rows: list[dict]) -> None: ...

    def close(self) -> None: ...


class Reader(Protocol):
    """An async reader over a connection pool."""

    async def get(self, key: str) -> dict | None: ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...


def adapter(spec: StoreSpec):
    return importlib.import_module(ADAPTERS[spec.type])


def batch_size(spec: StoreSpec) -> int:
    """Rows per write: the spec's, else the adapter's ``BATCH_SIZE``, else
    :data:`DEFAULT_BATCH_SIZE`."""
    if spec.batch_size is not None:
        return spec.batch_size
    return getattr(adapter(spec), "BATCH_SIZE", DEFAULT_BATCH_SIZE)


def open_store(spec: StoreSpec) -> Store:
    return adapter(spec).Store(spec)


def open_reader(spec: StoreSpec, pool_size: int = 8) -> Reader:
    return adapter(spec).Reader(spec, pool_size)


# --- Beam shell --------------------------------------------------------------------------------


class _WriteProfilesFn(beam.DoFn):
    def __init__(self, spec: StoreSpec):
        self._spec = spec
        self._written = Metrics.counter("cdi", f"profiles_written.{spec.type}")

    def setup(self):
        self._store = open_store(self._spec)
        # An adapter may refuse rows its store cannot hold (e.g. NUL in PostgreSQL text).
        self._check = getattr(adapter(self._spec), "check_row", None)
        self._batch_size = batch_size(self._spec)

    def start_bundle(self):
        self._rows: list[dict] = []

    @dead_letter_on_raise
    def process(self, row: dict):
        # Checked here, per row: a bad row is its own dead letter; what fails at the write
        # (the store) fails the bundle, which the runner retries, and then the run.
        check_row(row)
        if self._check is not None:
            self._check(row)
        self._rows.append(row)
        return ()  # no output (dead_letter_on_raise lists what process returns)

    def finish_bundle(self):
        # Written here, outside the per-row dead-letter wrapper: a store failure fails the
        # bundle (the runner retries it), never one row's dead letter. Chunks of batch_size.
        rows = latest_rows(self._rows)
        size = self._batch_size
        for i in range(0, len(rows), size):
            self._store.write(rows[i : i + size])
        self._written.inc(len(self._rows))
        self._rows = []

    def teardown(self):
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


class WriteProfiles(beam.PTransform):
    """Profile rows and tombstones into the store ``spec`` names; returns the dead letters
    (rows that are not rows). BigQuery's adapter supplies its own transform (Beam's
    ``WriteToBigQuery``)."""

    def __init__(self, spec: StoreSpec):
        super().__init__()
        self._spec = spec

    def expand(self, rows):
        custom = getattr(adapter(self._spec), "write_transform", None)
        if custom is not None:
            return rows | "Write" >> custom(self._spec)
        return (rows | "Upsert" >> guarded(beam.ParDo(_WriteProfilesFn(self._spec))))[FAILED]
