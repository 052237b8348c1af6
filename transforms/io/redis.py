"""Redis profile store (redis-py): one hash per profile, one hash per identifier.

Keys (prefix ``cdi:``):

- ``cdi:p:<profile_id>``: a hash of the profile's columns (JSON columns as JSON text, absent
  for ``null``) and ``version``; a tombstone keeps only ``version`` and ``deleted``;
- ``cdi:i:<identifier key>`` (e.g. ``cdi:i:email:jane@example.com``): ``p`` (profile id) and
  ``v`` (the version of the row that set it);
- ``cdi:s:<profile_id>``: the set of identifier keys the profile's row claimed (to release them).

Each row is written by one Lua script, atomic in Redis, that applies the store contract of
:mod:`transforms.profile_store`: it writes only if the row's version is higher than the stored
one, releases the profile's old pointers that still point at it, and claims the listed ones
unless a newer row holds them. Versions are compared as decimal strings in the script (Lua's
numbers are doubles: 63-bit versions would lose their low bits). A batch is one pipeline in a
``MULTI``/``EXEC`` transaction: one round trip per batch.

The script touches identifier keys it is not given as ``KEYS`` (they depend on the stored row),
which a single Redis server allows and Redis Cluster does not: this adapter is for a standalone
server or a primary with replicas.
"""

from __future__ import annotations

from transforms.profile_store import PROFILE_COLUMNS, StoreSpec, decoded, row_identifiers

PREFIX = "cdi:"

# Hand-written because the version check, the pointer release and the claim must be one atomic
# step in the server (WATCH/MULTI would retry whole batches under contention); no library
# implements this contract.
_WRITE = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local pkey, skey = KEYS[1], KEYS[2]
local v, deleted, pid, nf = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local cur = redis.call('HGET', pkey, 'version')
if cur and not newer(v, cur) then return 0 end
for _, ik in ipairs(redis.call('SMEMBERS', skey)) do
  if redis.call('HGET', ik, 'p') == pid then redis.call('DEL', ik) end
end
redis.call('DEL', pkey, skey)
local fields = {'version', v}
if deleted == '1' then fields[#fields + 1] = 'deleted'; fields[#fields + 1] = '1' end
for i = 5, 4 + 2 * nf do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', pkey, unpack(fields))
for i = 5 + 2 * nf, #ARGV do
  local ik = ARGV[i]
  local held = redis.call('HGET', ik, 'v')
  if (not held) or (not newer(held, v)) then redis.call('HSET', ik, 'p', pid, 'v', v) end
  redis.call('SADD', skey, ik)
end
return 1
"""

# One round trip per lookup: the identifier's profile, else the key as a profile id.
_READ = """
local p = redis.call('HGET', KEYS[1], 'p')
if p then
  local h = redis.call('HGETALL', ARGV[1] .. p)
  if #h > 0 then return h end
end
return redis.call('HGETALL', KEYS[2])
"""


def profile_key(pid: str) -> str:
    return f"{PREFIX}p:{pid}"


def identifier_key(key: str) -> str:
    return f"{PREFIX}i:{key}"


def script_args(row: dict) -> tuple[list[str], list]:
    """``(KEYS, ARGV)`` of the write script for one checked row."""
    pid = row["profile_id"]
    keys = [profile_key(pid), f"{PREFIX}s:{pid}"]
    if row.get("deleted"):
        return keys, [str(row["version"]), "1", pid, 0]
    fields = []
    for c in PROFILE_COLUMNS:
        if c != "version" and row[c] is not None:
            fields += [c, row[c]]
    ids = [identifier_key(k) for k in row_identifiers(row)]
    return keys, [str(row["version"]), "0", pid, len(fields) // 2, *fields, *ids]


def from_hash(pid_hint: str | None, h: dict) -> dict | None:
    """A stored hash as the reader returns it; ``None`` for nothing or a tombstone."""
    h = {(k.decode() if isinstance(k, bytes) else k): v for k, v in h.items()}
    if not h or "deleted" in h:
        return None
    h = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h.items()}
    return decoded(h)


class Store:
    def __init__(self, spec: StoreSpec):
        import redis

        self._client = redis.Redis.from_url(spec.resolved_url())
        self._client.ping()
        self._write = self._client.register_script(_WRITE)

    def write(self, rows: list[dict]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for row in rows:
            keys, args = script_args(row)
            self._write(keys=keys, args=args, client=pipe)
        pipe.execute()

    def close(self) -> None:
        self._client.close()


class Reader:
    def __init__(self, spec: StoreSpec, pool_size: int = 8):
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(spec.resolved_url(), max_connections=pool_size)
        self._read = self._client.register_script(_READ)

    async def get(self, key: str) -> dict | None:
        flat = await self._read(keys=[identifier_key(key), profile_key(key)], args=[PREFIX + "p:"])
        return from_hash(key, dict(zip(flat[::2], flat[1::2], strict=True)))

    async def ping(self) -> bool:
        return bool(await self._client.ping())

    async def aclose(self) -> None:
        await self._client.aclose()


class Ledger:
    """The activation ledger (transforms/audiences.py): a key is claimed once (``SET NX``),
    kept ``LEDGER_TTL_DAYS`` so the set does not grow forever."""

    LEDGER_TTL_DAYS = 400

    def __init__(self, spec: StoreSpec):
        import redis

        self._client = redis.Redis.from_url(spec.resolved_url())

    def claim(self, keys: list[str]) -> set[str]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.set(f"{PREFIX}a:{key}", 1, nx=True, ex=self.LEDGER_TTL_DAYS * 86400)
        return {k for k, ok in zip(keys, pipe.execute(), strict=True) if ok}

    def close(self) -> None:
        self._client.close()
