"""The profile-store contract (transforms/profile_store.py) on every store, on its real server:
versions only move forward, tombstones remove and stay removed, identifiers follow the newest
row, and any order, duplication or retry of the same writes ends in the same state."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms.identity import id_key
from transforms.profile_store import PROFILE_COLUMNS, StoreSpec, open_reader, open_store


def row(pid: str, version: int, *ids: str, traits: dict | None = None) -> dict:
    identities = [
        {"type": t, "value": v, "first_seen": None, "last_seen": None}
        for t, v in (i.split(":", 1) for i in sorted(ids))
    ]
    return {
        "profile_id": pid,
        "identities": orjson.dumps(identities, option=orjson.OPT_SORT_KEYS).decode(),
        "traits": orjson.dumps(traits or {"v": version}).decode(),
        "computed_traits": "{}",
        "event_counts": "{}",
        "consent": "{}",
        "first_seen": "2026-11-01T00:00:00.000Z",
        "last_seen": "2026-11-01T00:00:00.000Z",
        "version": version,
        "updated_at": "2026-11-01T00:00:00.000Z",
    }


def tomb(pid: str, version: int) -> dict:
    return {"profile_id": pid, "deleted": True, "version": version}


def snapshot(spec: StoreSpec) -> tuple[dict, dict]:
    """(live profiles by id, identifier key -> profile id) as the store holds them."""
    if spec.type == "redis":
        import redis

        from transforms.io.redis import from_hash

        client = redis.Redis.from_url(spec.url)
        profiles, pointers = {}, {}
        for k in client.scan_iter("cdi:p:*"):
            got = from_hash(None, client.hgetall(k))
            if got is not None:
                profiles[got["profile_id"]] = got
        for k in client.scan_iter("cdi:i:*"):
            claims = {p.decode(): int(v) for p, v in client.hgetall(k).items()}
            if claims:
                best = min(claims, key=lambda p: (-claims[p], p))
                pointers[k.decode()[len("cdi:i:") :]] = best
        client.close()
        return profiles, pointers
    if spec.type == "postgres":
        import psycopg

        conn = psycopg.connect(spec.url)
    else:
        conn = sqlite3.connect(spec.path)
    from transforms.profile_store import decoded

    profiles = {
        r[0]: decoded(dict(zip(PROFILE_COLUMNS, r, strict=True)))
        for r in conn.execute(f"SELECT {', '.join(PROFILE_COLUMNS)} FROM profiles").fetchall()
    }
    pointers = {}  # the claim a lookup takes: the newest, then the smallest profile id
    for t, v, p, _ in conn.execute(
        "SELECT type, value, profile_id, version FROM identifiers "
        "ORDER BY version ASC, profile_id DESC"
    ).fetchall():
        pointers[id_key(t, v)] = p
    conn.close()
    return profiles, pointers


def expected_state(rows: list[dict]) -> tuple[dict, dict]:
    """What a store must hold after ``rows`` in any order: each profile's newest row, unless it
    is a tombstone, and every listed identifier pointing at its live profile."""
    from transforms.profile_store import decoded, latest_rows, row_identifiers

    profiles = {r["profile_id"]: decoded(r) for r in latest_rows(rows) if not r.get("deleted")}
    pointers = {}
    for r in latest_rows(rows):
        for k in row_identifiers(r):
            pointers[k] = r["profile_id"]
    return profiles, pointers


def write(spec: StoreSpec, *batches: list[dict]) -> None:
    store = open_store(spec)
    try:
        for batch in batches:
            store.write(batch)
    finally:
        store.close()


def get(spec: StoreSpec, key: str):
    async def go():
        reader = open_reader(spec)
        try:
            return await reader.get(key)
        finally:
            await reader.aclose()

    return asyncio.run(go())


# --- the contract, one rule at a time ---------------------------------------------------------


def test_only_a_higher_version_replaces_a_row(store_spec):
    write(store_spec, [row("p", 5, "user_id:u1")])
    write(store_spec, [row("p", 3, "user_id:u1", traits={"stale": True})])  # a late retry
    write(store_spec, [row("p", 5, "user_id:u1", traits={"same": True})])  # equal: a re-run
    assert get(store_spec, "user:u1")["traits"] == {"v": 5}
    write(store_spec, [row("p", 6, "user_id:u1")])
    got = get(store_spec, "user:u1")
    assert got["traits"] == {"v": 6} and got["version"] == 6
    assert get(store_spec, "p")["profile_id"] == "p"  # by profile id too
    assert get(store_spec, "user:nobody") is None


def test_a_tombstone_removes_and_an_older_row_never_comes_back(store_spec):
    write(store_spec, [row("p", 5, "user_id:u1", "email:a@x.io")])
    write(store_spec, [tomb("p", 7)])
    assert get(store_spec, "p") is None and get(store_spec, "email:a@x.io") is None
    write(store_spec, [row("p", 6, "user_id:u1")])  # an older row retried after the deletion
    assert get(store_spec, "p") is None and snapshot(store_spec) == ({}, {})
    write(store_spec, [row("p", 8, "user_id:u1")])  # the person comes back with newer events
    assert get(store_spec, "user:u1")["version"] == 8


def test_a_batch_keeps_each_profiles_newest_row(store_spec):
    write(store_spec, [row("p", 9, "user_id:u1"), row("p", 4, "user_id:u1", "email:old@x.io")])
    assert get(store_spec, "p")["version"] == 9 and get(store_spec, "email:old@x.io") is None


MERGE = [  # anon:a1's profile merges into user:u1's: its identifiers move with it
    row("anon:a1", 2, "anonymous_id:a1", "device_id:d1"),
    row("user:u1", 3, "user_id:u1"),
    row("user:u1", 5, "user_id:u1", "anonymous_id:a1", "device_id:d1"),
    tomb("anon:a1", 6),
]
SPLIT = [  # then the link is undone: the anonymous identifiers go back
    row("user:u1", 8, "user_id:u1"),
    row("anon:a1", 9, "anonymous_id:a1", "device_id:d1"),
]


@pytest.mark.parametrize("history", [MERGE, MERGE + SPLIT], ids=["merge", "merge+split"])
def test_identifiers_follow_merges_and_splits_in_every_order(store_spec, history):
    want = expected_state(history)
    orders = list(itertools.permutations(history))
    # every order for SQLite; a spread of them on the servers (the same rule runs there)
    step = 1 if store_spec.type == "sqlite" else max(1, len(orders) // 12)
    for order in orders[::step]:
        reset(store_spec)
        write(store_spec, *[[r] for r in order])
        assert snapshot(store_spec) == want, order


SPLIT_OFF_OLDER = [  # a person split off another is older than it: its claim must still win
    row("user:u1", 5, "user_id:u1", "anonymous_id:a1"),
    row("user:u1", 8, "user_id:u1"),
    row("anon:a1", 4, "anonymous_id:a1"),
]


def test_an_identifier_split_off_to_an_older_profile_is_found_in_every_order(store_spec):
    want = expected_state(SPLIT_OFF_OLDER)
    assert want[1]["anon:a1"] == "anon:a1"
    for order in itertools.permutations(SPLIT_OFF_OLDER):
        for batches in ([[r] for r in order], [list(order)]):
            reset(store_spec)
            write(store_spec, *batches)
            assert snapshot(store_spec) == want, order
            assert get(store_spec, "anon:a1")["profile_id"] == "anon:a1"


def reset(spec: StoreSpec) -> None:
    if spec.type == "redis":
        import redis

        redis.Redis.from_url(spec.url).flushdb()
        return
    if spec.type == "postgres":
        import psycopg

        conn = psycopg.connect(spec.url, autocommit=True)
    else:
        conn = sqlite3.connect(spec.path, isolation_level=None)
    for table in ("profiles", "identifiers", "profile_tombstones"):
        try:
            conn.execute(f"DELETE FROM {table}")
        except Exception:  # not created yet
            pass
    conn.close()


# --- any order, duplication and retry: the same final state -------------------------------------

PERSONS = [f"user:u{i}" for i in range(4)]
IDS = [f"device_id:d{i}" for i in range(6)]


@st.composite
def histories(draw):
    """A stream of profile rows as a streaming run emits them: identifiers move between persons
    (each owned by one person at a time), persons are deleted; each person's versions rise."""
    owner: dict[str, str | None] = {}
    rows = []
    # Each person's versions rise on their own (as-of stamps of different persons do not
    # compare: a person split off another is usually older than it).
    versions = {p: draw(st.integers(0, 50)) for p in PERSONS}
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.booleans()) or not owner:
            x, to = draw(st.sampled_from(IDS)), draw(st.sampled_from(PERSONS))
            before = owner.get(x)
            owner[x] = to
            changed = {to, before} - {None}
        else:
            gone = draw(st.sampled_from(PERSONS))
            changed = {gone}
            for x, p in owner.items():
                if p == gone:
                    owner[x] = None
        for p in sorted(changed):
            versions[p] += draw(st.integers(1, 30))
            mine = sorted(x for x, o in owner.items() if o == p)
            rows.append(row(p, versions[p], *mine) if mine else tomb(p, versions[p]))
    return rows


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(history=histories(), data=st.data())
def test_any_order_duplication_and_retry_end_in_the_same_state(store_spec, history, data):
    reset(store_spec)
    replayed = data.draw(st.permutations(history + data.draw(st.lists(st.sampled_from(history)))))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(replayed)), max_size=4)))
    batches = [
        replayed[a:b] for a, b in zip([0, *cuts], [*cuts, len(replayed)], strict=True) if a < b
    ]
    write(store_spec, *batches, *batches[:1])  # the first bundle retried at the end
    assert snapshot(store_spec) == expected_state(history)


# --- the job into all three stores ------------------------------------------------------------

STORES_CONFIG = """
sources: [{{name: web, format: ndjson}}]
computed_traits:
  - {{name: orders_lifetime, aggregate: count, event: Order Completed}}
consent: {{purposes: [analytics, marketing, advertising]}}
pii: {{salt: test-salt}}
sinks:
  profiles:
    pii: {{email: hash}}
    also:
      - {{type: postgres, url: "{pg}"}}
      - {{type: redis, url: "{redis}", batch_size: 7}}
"""


def stored(spec: StoreSpec) -> tuple[dict, dict]:
    profiles, pointers = snapshot(spec)
    return profiles, pointers


@pytest.mark.parametrize("bounded", [True, False], ids=["batch", "streaming-stages"])
def test_the_job_fills_every_store_with_the_same_profiles(
    tmp_path, postgres_url, redis_url, bounded
):
    from pipelines.generate import generate
    from pipelines.lookup import get_profile
    from tests.conftest import config_from, run_job

    config = config_from(STORES_CONFIG.format(pg=postgres_url, redis=redis_url))
    lines, truth = generate(400, 40, seed=5)
    run = run_job(tmp_path / "first", [x.encode() for x in lines], config, bounded=bounded)
    assert run["report"]["accounted"] and not run["report"]["internal_errors"]
    sqlite_spec = StoreSpec(
        "sqlite",
        path=str(tmp_path / "first" / ("bounded" if bounded else "streaming") / "profiles.sqlite"),
    )
    pg, rd = StoreSpec("postgres", url=postgres_url), StoreSpec("redis", url=redis_url)
    want = stored(sqlite_spec)
    assert len(want[0]) == len(run["rows"]) > 10
    assert stored(pg) == want and stored(rd) == want  # row by row, pointers too

    # Every identity value is stored as the PII policy says: emails hashed, and found by
    # the raw address all the same.
    email = next(
        i["value"] for p in want[0].values() for i in p["identities"] if i["type"] == "email"
    )
    assert "@" not in email
    raw = next(
        orjson.loads(x)["traits"]["email"]
        for x in lines
        if '"email"' in x
        and orjson.loads(x).get("type") == "identify"
        and isinstance(orjson.loads(x).get("traits", {}).get("email"), str)
    )
    found = [get_profile(f"email:{raw.upper()}", s, config) for s in (sqlite_spec, pg, rd)]
    assert found[0] is not None and found[0] == found[1] == found[2]
    assert raw.lower() not in orjson.dumps(found[0]).decode()

    # A re-run of the same input changes nothing in any store.
    versions = {pid: p["version"] for pid, p in want[0].items()}
    run_job(tmp_path / "again", [x.encode() for x in lines], config, bounded=bounded)
    assert stored(pg) == want and stored(rd) == want
    assert {pid: p["version"] for pid, p in stored(pg)[0].items()} == versions


@pytest.mark.parametrize("configured", [None, 500], ids=["store-default", "configured"])
def test_a_bundle_is_written_in_batches_of_the_configured_or_the_store_s_size(
    store_spec, configured
):
    """The writer's chunks: ``batch_size`` when the config sets it, else the adapter's own
    (SQLite: 5,000 rows per transaction; the others: 500 per round trip)."""
    from dataclasses import replace

    from transforms.profile_store import _WriteProfilesFn

    spec = replace(store_spec, batch_size=configured)
    fn = _WriteProfilesFn(spec)
    fn.setup()
    sizes, write = [], fn._store.write
    fn._store.write = lambda rows: (sizes.append(len(rows)), write(rows))
    fn.start_bundle()
    for i in range(1200):
        assert list(fn.process(row(f"p{i:04d}", 1, f"user_id:u{i}"))) == []
    fn.finish_bundle()
    fn.teardown()
    one = configured is None and spec.type == "sqlite"
    assert sizes == ([1200] if one else [500, 500, 200])
    assert len(snapshot(spec)[0]) == 1200


def test_the_sqlite_store_keeps_statement_journals_in_memory_and_64_mib_of_pages(tmp_path):
    from transforms.io.sqlite import open_profile_db

    conn = open_profile_db(tmp_path / "profiles.sqlite")
    assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -65536  # KiB
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: durability unchanged
    conn.close()


def test_store_urls_take_credentials_from_the_environment_and_never_print_them(monkeypatch):
    from transforms.profile_store import expand_env, redact_url, spec_from_url

    monkeypatch.setenv("CDI_TEST_PW", "s3cret")
    spec = StoreSpec("postgres", url="postgresql://cdi:${CDI_TEST_PW}@db:5432/cdi")
    assert spec.resolved_url() == "postgresql://cdi:s3cret@db:5432/cdi"
    assert "s3cret" not in spec.describe() and "CDI_TEST_PW" not in repr(spec.describe())
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    monkeypatch.delenv("CDI_TEST_PW")
    with pytest.raises(ValueError, match="CDI_TEST_PW"):
        expand_env("postgresql://cdi:${CDI_TEST_PW}@db/cdi")
    assert spec_from_url("redis://h:1/0").type == "redis"
    assert spec_from_url("postgresql://h/db").type == "postgres"
    assert spec_from_url("out/profiles.sqlite") == StoreSpec("sqlite", path="out/profiles.sqlite")


def test_an_unreachable_store_fails_the_write_not_silently(tmp_path):
    spec = StoreSpec("redis", url="redis://127.0.0.1:1/0")
    with pytest.raises(Exception, match="(?i)connect"):
        write(spec, [row("p", 1)])


def test_the_activation_ledger_lets_a_run_reclaim_and_no_other_run(store_spec):
    from transforms.profile_store import adapter

    ledger = adapter(store_spec).Ledger(store_spec)
    try:
        assert ledger.claim(["k1", "k2"], "run-a") == {"k1", "k2"}
        assert ledger.claim(["k1", "k3"], "run-a") == {"k1", "k3"}  # a retried bundle
        assert ledger.claim(["k1", "k2", "k3", "k4"], "run-b") == {"k4"}  # a later run
    finally:
        ledger.close()
