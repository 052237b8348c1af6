"""PostgreSQL profile store (psycopg 3): ``profiles``, ``identifiers``, ``profile_tombstones``.

The schema and the write plan are the SQL adapters' shared ones (:mod:`transforms.io.sql`):
upserts ``ON CONFLICT (profile_id) DO UPDATE ... WHERE excluded.version > profiles.version``, the
JSON columns as ``json`` (kept exactly as written, queryable with ``->>``). A batch is one
transaction sent in pipeline mode: one network round trip per batch, not per row. Readers use a
``psycopg_pool`` connection pool.

``url``: a libpq URL (``postgresql://user@host:port/db``); ``${VAR}`` in it is read from the
environment, and libpq's own variables (``PGPASSWORD``, ``PGSSLMODE``, ...) apply as usual.
"""

from __future__ import annotations

from transforms.io.sql import POSTGRES, lookup_params, schema, statements, write_plan
from transforms.profile_store import PROFILE_COLUMNS, StoreSpec, decoded

_SQL = statements(POSTGRES)
# Schema creation from several workers at once: one takes the lock, the others wait for it.
_SCHEMA_LOCK = 0x6364_6970  # "cdip"


def check_row(row: dict) -> None:
    """PostgreSQL text cannot hold NUL; such a row is a dead letter here rather than a failed
    batch (every other store keeps it)."""
    for column in ("profile_id", "identities"):
        value = row.get(column)
        if isinstance(value, str) and ("\x00" in value or "\\u0000" in value):
            raise ValueError(f"{column} holds a NUL character, which PostgreSQL text cannot store")


def ensure_schema(conn) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for ddl in schema(POSTGRES):
            conn.execute(ddl)


class Store:
    def __init__(self, spec: StoreSpec):
        import psycopg

        self._conn = psycopg.connect(spec.resolved_url(), autocommit=True)
        ensure_schema(self._conn)

    def write(self, rows: list[dict]) -> None:
        ops = write_plan(rows, _SQL)
        conn = self._conn
        with conn.transaction(), conn.pipeline(), conn.cursor() as cur:
            for sql, params in ops:
                cur.execute(sql, params, prepare=True)

    def close(self) -> None:
        self._conn.close()


def _row(record) -> dict:
    return decoded(dict(zip(PROFILE_COLUMNS, record, strict=True)))


class Reader:
    def __init__(self, spec: StoreSpec, pool_size: int = 8):
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(
            spec.resolved_url(),
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": 0},
        )
        self._opened = False

    async def _open(self):
        if not self._opened:
            await self._pool.open(wait=True, timeout=10)
            self._opened = True

    async def get(self, key: str) -> dict | None:
        await self._open()
        ident, pid = lookup_params(key)
        async with self._pool.connection() as conn:
            found = None
            if ident is not None:
                found = await (await conn.execute(_SQL["by_identifier"], ident)).fetchone()
            if found is None:
                found = await (await conn.execute(_SQL["by_id"], (pid,))).fetchone()
        return _row(found) if found else None

    async def ping(self) -> bool:
        await self._open()
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1")
        return True

    async def aclose(self) -> None:
        if self._opened:
            await self._pool.close()


class Ledger:
    """The activation ledger (transforms/audiences.py): a key is claimed by one run; the same
    run may claim it again (a retried bundle), another run may not."""

    def __init__(self, spec: StoreSpec):
        import psycopg

        self._conn = psycopg.connect(spec.resolved_url(), autocommit=True)
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS activation_ledger (key TEXT PRIMARY KEY, "
                "run_id TEXT NOT NULL, claimed_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )

    def claim(self, keys: list[str], run_id: str) -> set[str]:
        if not keys:
            return set()
        rows = self._conn.execute(
            "INSERT INTO activation_ledger (key, run_id) SELECT unnest(%s::text[]), %s "
            "ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id "
            "WHERE activation_ledger.run_id = excluded.run_id RETURNING key",
            (keys, run_id),
        ).fetchall()
        return {r[0] for r in rows}

    def close(self) -> None:
        self._conn.close()
