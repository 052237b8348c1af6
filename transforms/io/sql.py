"""The statements both SQL profile stores run (``sqlite``, ``postgres``): one schema, one write
plan, so the two keep the store contract of :mod:`transforms.profile_store` identically.

Tables: ``profiles`` (one live row per person), ``identifiers (type, value, profile_id,
version)``: one claim per identifier and live profile whose stored row lists it (a lookup takes
the newest claim), and ``profile_tombstones (profile_id, version)``. Claims are replaced with
the profile's stored row, so they are a function of each profile's newest row alone, whatever
order rows of different profiles arrive in.

Every statement of a batch is conditional in SQL on versions alone (claims change only if the
profile row now stored carries exactly this row's version, i.e. this write or an identical
earlier one won), so a batch never waits for a statement's result: PostgreSQL runs it in one
pipelined transaction, one round trip per batch rather than per row.
"""

from __future__ import annotations

from dataclasses import dataclass

from transforms.identity_graph import split_key
from transforms.profile_store import PROFILE_COLUMNS, row_identifiers


@dataclass(frozen=True)
class Dialect:
    placeholder: str  # "?" or "%s"
    json_type: str  # the JSON columns' type
    int_type: str
    casts: bool  # parameters in a SELECT list need a type (PostgreSQL)

    def p(self, sql_type: str = "text") -> str:
        return f"{self.placeholder}::{sql_type}" if self.casts else self.placeholder


SQLITE = Dialect("?", "TEXT", "INTEGER", casts=False)
POSTGRES = Dialect("%s", "JSON", "BIGINT", casts=True)

_JSON = ("identities", "traits", "computed_traits", "event_counts", "consent")


def schema(d: Dialect) -> list[str]:
    cols = ",\n  ".join(
        f"{c} {d.json_type} NOT NULL"
        if c in _JSON
        else f"{c} {d.int_type} NOT NULL"
        if c == "version"
        else "profile_id TEXT PRIMARY KEY"
        if c == "profile_id"
        # ISO-8601 UTC text (``...Z``): sorts as time does, and any input is storable
        else f"{c} TEXT"
        for c in PROFILE_COLUMNS
    )
    return [
        f"CREATE TABLE IF NOT EXISTS profiles (\n  {cols}\n)",
        # One claim per (identifier, live profile listing it); a lookup takes the newest claim.
        "CREATE TABLE IF NOT EXISTS identifiers (type TEXT NOT NULL, value TEXT NOT NULL, "
        f"profile_id TEXT NOT NULL, version {d.int_type} NOT NULL, "
        "PRIMARY KEY (type, value, profile_id))",
        "CREATE INDEX IF NOT EXISTS identifiers_by_profile ON identifiers (profile_id)",
        "CREATE TABLE IF NOT EXISTS profile_tombstones (profile_id TEXT PRIMARY KEY, "
        f"version {d.int_type} NOT NULL)",
    ]


def _types(d: Dialect) -> list[str]:
    return [
        d.json_type.lower() if c in _JSON else "bigint" if c == "version" else "text"
        for c in PROFILE_COLUMNS
    ]


def statements(d: Dialect) -> dict[str, str]:
    p = d.placeholder
    values = ", ".join(d.p(t) for t in _types(d))
    updates = ", ".join(f"{c} = excluded.{c}" for c in PROFILE_COLUMNS[1:])
    return {
        # A live row: written unless a tombstone or a stored row is at least as new.
        "upsert": f"INSERT INTO profiles ({', '.join(PROFILE_COLUMNS)}) SELECT {values} "
        f"WHERE NOT EXISTS (SELECT 1 FROM profile_tombstones WHERE profile_id = {p} "
        f"AND version >= {p}) "
        f"ON CONFLICT (profile_id) DO UPDATE SET {updates} "
        "WHERE excluded.version > profiles.version",
        "drop_tombstone": f"DELETE FROM profile_tombstones WHERE profile_id = {p} "
        f"AND version < {p}",
        # Pointers follow the row only if it is the row now stored.
        "release": f"DELETE FROM identifiers WHERE profile_id = {p} AND EXISTS "
        f"(SELECT 1 FROM profiles WHERE profile_id = {p} AND version = {p})",
        "claim": "INSERT INTO identifiers (type, value, profile_id, version) "
        f"SELECT {d.p()}, {d.p()}, {d.p()}, {d.p('bigint')} WHERE EXISTS "
        f"(SELECT 1 FROM profiles WHERE profile_id = {p} AND version = {p}) "
        "ON CONFLICT (type, value, profile_id) DO UPDATE SET version = excluded.version",
        # A tombstone: recorded unless a live row or a tombstone is at least as new.
        "bury": f"INSERT INTO profile_tombstones (profile_id, version) "
        f"SELECT {d.p()}, {d.p('bigint')} WHERE NOT EXISTS "
        f"(SELECT 1 FROM profiles WHERE profile_id = {p} AND version >= {p}) "
        "ON CONFLICT (profile_id) DO UPDATE SET version = excluded.version "
        "WHERE excluded.version > profile_tombstones.version",
        "remove": f"DELETE FROM profiles WHERE profile_id = {p} AND EXISTS "
        f"(SELECT 1 FROM profile_tombstones WHERE profile_id = {p} AND version = {p})",
        "release_buried": f"DELETE FROM identifiers WHERE profile_id = {p} AND EXISTS "
        f"(SELECT 1 FROM profile_tombstones WHERE profile_id = {p} AND version = {p})",
        "by_identifier": f"SELECT {', '.join('p.' + c for c in PROFILE_COLUMNS)} "
        "FROM identifiers i JOIN profiles p ON p.profile_id = i.profile_id "
        f"WHERE i.type = {p} AND i.value = {p} ORDER BY i.version DESC, i.profile_id LIMIT 1",
        "by_id": f"SELECT {', '.join(PROFILE_COLUMNS)} FROM profiles WHERE profile_id = {p}",
    }


def write_plan(rows: list[dict], sql: dict[str, str]) -> list[tuple[str, tuple]]:
    """The statements of one batch (rows checked, one per profile), in profile-id order so
    concurrent writers take row locks in the same order."""
    ops: list[tuple[str, tuple]] = []
    for row in sorted(rows, key=lambda r: r["profile_id"]):
        pid, v = row["profile_id"], row["version"]
        if row.get("deleted"):
            ops.append((sql["bury"], (pid, v, pid, v)))
            ops.append((sql["remove"], (pid, pid, v)))
            ops.append((sql["release_buried"], (pid, pid, v)))
            continue
        ops.append((sql["upsert"], (*(row[c] for c in PROFILE_COLUMNS), pid, v)))
        ops.append((sql["drop_tombstone"], (pid, v)))
        ops.append((sql["release"], (pid, pid, v)))
        for key in row_identifiers(row):
            t, value = split_key(key)
            ops.append((sql["claim"], (t, value, pid, v, pid, v)))
    return ops


def lookup_params(key: str) -> tuple[tuple[str, str] | None, str]:
    """``(identifier (type, value) or None, profile id)`` for a lookup key."""
    if ":" not in key:
        return None, key
    return split_key(key), key
