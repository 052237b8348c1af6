"""Redis profile store (redis-py): one hash per profile, one hash per identifier.

Keys (prefix ``cdi:``):

- ``cdi:p:<profile_id>``: a hash of the profile's columns (JSON columns as JSON text, absent
  for ``null``) and ``version``; a tombstone keeps only ``version`` and ``deleted``;
- ``cdi:i:<identifier key>`` (e.g. ``cdi:i:email:jane@example.com``): a hash of claims,
  profile id -> version of its stored row that lists the identifier (a lookup takes the newest);
- ``cdi:s:<profile_id>``: the set of identifier keys the profile's row claimed (to release them).

Each row is written by one Lua script, atomic in Redis, that applies the store contract of
:mod:`transforms.profile_store`: it writes only if the row's version is higher than the stored
one, drops the profile's old identifier claims and claims the listed ones
(claims are per profile: the identifier's claims are always those of the profiles whose stored
rows list it). Versions are compared as decimal strings in the script (Lua's
numbers are doubles: 63-bit versions would lose their low bits). A batch is one pipeline in a
``MULTI``/``EXEC`` transaction: one round trip per batch.

The script touches identifier keys it is not given as ``KEYS`` (they depend on the stored row),
which a single Redis server allows and Redis Cluster does not: this adapter is for a standalone
server or a primary with replicas.
"""

from __future__ import annotations

from transforms.profile_store import PROFILE_COLUMNS, StoreSpec, decoded, row_identifiers

PREFIX = "cdi:"

# Hand-written because the version check, releasing and re-claiming identifiers must be one atomic
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
  redis.call('HDEL', ik, pid)
end
redis.call('DEL', pkey, skey)
local fields = {'version', v}
if deleted == '1' then fields[#fields + 1] = 'deleted'; fields[#fields + 1] = '1' end
for i = 5, 4 + 2 * nf do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', pkey, unpack(fields))
for i = 5 + 2 * nf, #ARGV do
  local ik = ARGV[i]
  redis.call('HSET', ik, pid, v)
  redis.call('SADD', skey, ik)
end
return 1
"""

# One round trip per lookup: the identifier's profile, else the key as a profile id.
_READ = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local claims = redis.call('HGETALL', KEYS[1])
local best, bv = nil, nil
for i = 1, #claims, 2 do
  local p, v = claims[i], claims[i + 1]
  if (not bv) or newer(v, bv) or (v == bv and p < best) then best, bv = p, v end
end
if best then
  local h = redis.call('HGETALL', ARGV[1] .. best)
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


_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 1
end
if cur == ARGV[1] then return 1 end
return 0
"""


class Ledger:
    """The activation ledger (transforms/audiences.py): a key is claimed by one run (the value
    is the run id; the same run may claim it again, a retried bundle), kept
    ``LEDGER_TTL_DAYS`` so the set does not grow forever."""

    LEDGER_TTL_DAYS = 400

    def __init__(self, spec: StoreSpec):
        import redis

        self._client = redis.Redis.from_url(spec.resolved_url())
        self._claim = self._client.register_script(_CLAIM)

    def claim(self, keys: list[str], run_id: str) -> set[str]:
        pipe = self._client.pipeline(transaction=False)
        ttl = self.LEDGER_TTL_DAYS * 86400
        for key in keys:
            self._claim(keys=[f"{PREFIX}a:{key}"], args=[run_id, ttl], client=pipe)
        return {k for k, ok in zip(keys, pipe.execute(), strict=True) if ok}

    def close(self) -> None:
        self._client.close()
