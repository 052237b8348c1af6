"""The local services `make services` starts (infra/local/services.sh) answer as the real servers
they are: a Kafka broker (KRaft) that takes an idempotent, acks=all produce and serves it to a
consumer group, a PostgreSQL that upserts under a version guard, a Redis that runs Lua.

These are the servers the adapters' integration tests run against (Kafka source, profile sinks).
Without them each test skips with a one-line reason; with CDI_REQUIRE_SERVICES=1 (CI) it fails.
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import service_address, service_unavailable


def test_kafka_broker_round_trip():
    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap = service_address("CDI_KAFKA_BOOTSTRAP")
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    try:
        admin.list_topics(timeout=3)
    except KafkaException:
        service_unavailable(f"no Kafka broker at {bootstrap}")
    topic = f"cdi-smoke-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(10)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    sent = [f"event-{i}".encode() for i in range(10)]
    for i, value in enumerate(sent):
        producer.produce(topic, value=value, key=f"person-{i % 3}".encode())
    assert producer.flush(10) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cdi-smoke-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got = []
    for _ in range(60):
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg.value())
        if len(got) == len(sent):
            break
    consumer.close()
    assert sorted(got) == sorted(sent)


def test_postgres_upsert_keeps_the_newest_version():
    psycopg = pytest.importorskip("psycopg")
    url = service_address("CDI_POSTGRES_URL")
    try:
        conn = psycopg.connect(url, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        service_unavailable(f"no PostgreSQL at {url}: {str(e).splitlines()[0]}")
    table = f"smoke_{uuid.uuid4().hex[:8]}"
    upsert = (
        f"INSERT INTO {table} (id, version, body) VALUES (%s, %s, %s) "
        f"ON CONFLICT (id) DO UPDATE SET version = excluded.version, body = excluded.body "
        f"WHERE excluded.version > {table}.version"
    )
    with conn:
        conn.execute(f"CREATE TEMP TABLE {table} (id text PRIMARY KEY, version int, body text)")
        for version in (1, 3, 2):  # a late retry of version 2 arrives after version 3
            conn.execute(upsert, ("p1", version, f"v{version}"))
        assert conn.execute(f"SELECT version, body FROM {table}").fetchall() == [(3, "v3")]


def test_redis_runs_a_version_guarded_lua_write():
    redis = pytest.importorskip("redis")
    url = service_address("CDI_REDIS_URL")
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        service_unavailable(f"no Redis at {url}: {e}")
    key = f"cdi:smoke:{uuid.uuid4().hex[:8]}"
    newer_only = client.register_script(
        "local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1') "
        "if tonumber(ARGV[1]) > v then "
        "redis.call('HSET', KEYS[1], 'version', ARGV[1], 'body', ARGV[2]) return 1 end "
        "return 0"
    )
    assert [newer_only(keys=[key], args=[v, f"v{v}"]) for v in (1, 3, 2)] == [1, 1, 0]
    assert client.hgetall(key) == {b"version": b"3", b"body": b"v3"}
    client.delete(key)
