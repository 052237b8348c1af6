"""Destinations as real delivery: webhooks (a local HTTP server in the test), Kafka (the local
broker) and Pub/Sub (at the client boundary: no server can run here)."""

from __future__ import annotations

import http.server
import threading
import time
import uuid

import apache_beam as beam
import orjson
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.conftest import make_pipeline, service_address, service_unavailable
from transforms.io.webhook import (
    SIGNATURE,
    TIMESTAMP,
    DeliverToWebhook,
    WebhookConfig,
    retry_wait,
    verify,
)


def record(i: int, person: str = "user:u1") -> dict:
    return {
        "destination": "crm",
        "profile_key": person,
        "event_time": "2026-11-01T10:00:00.000Z",
        "event": {"type": "track", "event": "Audience Entered", "messageId": f"m{i}"},
        "activation": {"key": f"k{i}", "audience": "pros", "transition": "entered"},
    }


class Hook:
    """A local webhook receiver: answers ``fail_first`` requests with ``status``, then 200."""

    def __init__(self, fail_first: int = 0, status: int = 500, retry_after: str | None = None):
        self.requests: list[tuple[int, dict, bytes]] = []  # (answer, headers, body)
        self.accepted: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = status if len(hook.requests) < fail_first else 200
                hook.requests.append((answer, dict(self.headers), body))
                if answer == 200:
                    hook.accepted.extend(orjson.loads(body)["batch"])
                self.send_response(answer)
                if answer != 200 and retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hook_factory():
    hooks = []

    def make(**kw):
        hooks.append(Hook(**kw))
        return hooks[-1]

    yield make
    for h in hooks:
        h.close()


def deliver(config, batches):
    with make_pipeline() as p:
        failed = p | beam.Create(batches) | DeliverToWebhook(config)
        ids = failed | beam.Map(lambda d: d[0]["event"]["messageId"])
        return p, ids


@pytest.mark.parametrize("status", [500, 520])
def test_webhook_retries_5xx_and_each_record_is_accepted_once(hook_factory, monkeypatch, status):
    monkeypatch.setenv("CDI_TEST_HOOK_SECRET", "s3cret")
    hook = hook_factory(fail_first=3, status=status)
    config = WebhookConfig(
        hook.url,
        batch_size=10,
        max_attempts=5,
        backoff_seconds=0.01,
        secret_env="CDI_TEST_HOOK_SECRET",
    )
    batches = [[record(i) for i in range(3)], [record(3)]]
    with make_pipeline() as p:
        failed = p | beam.Create(batches) | DeliverToWebhook(config)
        assert_that(failed, equal_to([]))
    assert sorted(e["messageId"] for e in hook.accepted) == ["m0", "m1", "m2", "m3"]
    assert [a for a, _, _ in hook.requests].count(status) == 3
    for _, headers, body in hook.requests:  # every try signed, with the batch's stable key
        assert verify(b"s3cret", headers, body, time.time())
        assert not verify(b"wrong", headers, body, time.time())
    keys = {h["Idempotency-Key"] for _, h, b in hook.requests if b == hook.requests[-1][2]}
    assert len(keys) == 1


def test_retry_waits_back_off_from_the_first_retry_honour_retry_after_and_stop():
    c = WebhookConfig("http://h/x", max_attempts=4, backoff_seconds=0.5, max_wait_seconds=30)
    now = 1_800_000_000.0
    # Exponential from the first retry on (urllib3 retries the first time at once).
    assert [retry_wait(c, n, 503, None, now) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert retry_wait(c, 4, 503, None, now) is None  # the last try
    assert retry_wait(c, 1, None, None, now) == 0.5  # no answer at all: retried
    assert retry_wait(c, 1, 429, None, now) == 0.5
    assert retry_wait(c, 1, 400, "5", now) is None  # the request's fault: not retried
    assert retry_wait(c, 1, 503, "7", now) == 7.0  # Retry-After longer than the backoff wins
    assert retry_wait(c, 3, 503, "1", now) == 2.0  # ...and shorter does not shorten it
    assert retry_wait(c, 1, 503, "3600", now) == 30.0  # capped at max_wait_seconds
    date = "Wed, 15 Jan 2027 08:00:12 GMT"  # 12 s after now
    assert retry_wait(c, 1, 503, date, 1_800_000_000.0) == pytest.approx(12.0)
    assert retry_wait(c, 1, 503, "Wed, 15 Jan 2027 07:00:00 GMT", now) == 0.5  # past: backoff
    assert retry_wait(c, 1, 503, "soon", now) == 0.5  # unreadable: backoff
    with pytest.raises(ValueError):
        WebhookConfig("http://h/x", max_wait_seconds=-1)


def test_each_webhook_try_is_signed_when_sent_after_the_wait_retry_after_asks(
    hook_factory, monkeypatch
):
    monkeypatch.setenv("CDI_TEST_HOOK_SECRET", "s3cret")
    hook = hook_factory(fail_first=1, status=503, retry_after="1")
    config = WebhookConfig(
        hook.url, max_attempts=2, backoff_seconds=0, secret_env="CDI_TEST_HOOK_SECRET"
    )
    with make_pipeline() as p:
        failed = p | beam.Create([[record(1)]]) | DeliverToWebhook(config)
        assert_that(failed, equal_to([]))
    (a1, h1, b1), (a2, h2, b2) = hook.requests
    assert (a1, a2) == (503, 200) and b1 == b2
    # The retry waited the second Retry-After asked and carries its own timestamp and signature.
    assert int(h2[TIMESTAMP]) >= int(h1[TIMESTAMP]) + 1
    assert h2[SIGNATURE] != h1[SIGNATURE]
    assert verify(b"s3cret", h2, b2, int(h2[TIMESTAMP]))
    assert [e["messageId"] for e in hook.accepted] == ["m1"]


def test_webhook_dead_letters_after_the_last_try_and_at_once_on_4xx(hook_factory):
    down = hook_factory(fail_first=10**6, status=503)
    with make_pipeline() as p:
        failed = (
            p
            | beam.Create([[record(1), record(2)]])
            | DeliverToWebhook(WebhookConfig(down.url, max_attempts=3, backoff_seconds=0.01))
        )
        assert_that(
            failed | beam.Map(lambda d: (d[0]["event"]["messageId"], "HTTP 503" in d[1][1])),
            equal_to([("m1", True), ("m2", True)]),
        )
    assert len(down.requests) == 3
    rejected = hook_factory(fail_first=10**6, status=400)
    with make_pipeline() as p:
        failed = (
            p
            | beam.Create([[record(1)]])
            | DeliverToWebhook(WebhookConfig(rejected.url, max_attempts=5, backoff_seconds=0.01))
        )
        assert_that(failed | beam.Map(lambda d: d[0]["event"]["messageId"]), equal_to(["m1"]))
    assert len(rejected.requests) == 1  # a 400 is not retried


def test_kafka_delivery_keys_by_person_and_round_trips(tmp_path):
    from confluent_kafka import Consumer, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from transforms.io.kafka import DeliverToKafka, KafkaDeliveryConfig

    bootstrap = service_address("CDI_KAFKA_BOOTSTRAP")
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    try:
        admin.list_topics(timeout=3)
    except KafkaException:
        service_unavailable(f"no Kafka broker at {bootstrap}")
    topic = f"cdi-deliver-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(10)
    records = [record(i, f"user:u{i % 4}") for i in range(40)]
    with make_pipeline() as p:
        failed = (
            p
            | beam.Create([records[:25], records[25:]])
            | DeliverToKafka(KafkaDeliveryConfig(bootstrap, topic))
        )
        assert_that(failed, equal_to([]))
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    got = []
    for _ in range(120):
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg)
        if len(got) == len(records):
            break
    consumer.close()
    assert sorted(orjson.loads(m.value())["messageId"] for m in got) == sorted(
        f"m{i}" for i in range(40)
    )
    partitions: dict[bytes, set] = {}
    for m in got:
        partitions.setdefault(m.key(), set()).add(m.partition())
        assert dict(m.headers())["cdi-destination"] == b"crm"
    assert all(len(ps) == 1 for ps in partitions.values())  # a person stays on one partition
    assert set(partitions) == {f"user:u{i}".encode() for i in range(4)}


def test_kafka_delivery_that_cannot_be_acknowledged_is_a_dead_letter():
    from transforms.io.kafka import DeliverToKafka, KafkaDeliveryConfig

    config = KafkaDeliveryConfig("127.0.0.1:1", "nowhere", delivery_timeout_ms=1000)
    with make_pipeline() as p:
        failed = p | beam.Create([[record(1), record(2)]]) | DeliverToKafka(config)
        assert_that(failed | beam.Map(lambda d: d[0]["event"]["messageId"]), equal_to(["m1", "m2"]))


def test_pubsub_messages_carry_the_event_ids_and_an_ordering_key():
    pytest.importorskip("apache_beam.io.gcp.pubsub")
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.io.pubsub import DeliverToPubSub, PubSubDeliveryConfig, to_message

    msg = to_message(record(7, "user:u9"))
    assert orjson.loads(msg.data)["messageId"] == "m7"
    assert msg.attributes == {
        "cdi_destination": "crm", "cdi_message_id": "m7", "cdi_activation_key": "k7",
    }  # fmt: skip
    assert msg.ordering_key == "user:u9"
    with pytest.raises(ValueError):
        PubSubDeliveryConfig("my-topic")
    from tests.test_dataflow import DATAFLOW

    # id_label (dedup of retried publishes) exists on Dataflow only: built there, offline.
    p = beam.Pipeline(options=PipelineOptions([*DATAFLOW, "--streaming"]))
    _ = (
        p
        | beam.Create([[record(1)]])
        | DeliverToPubSub(PubSubDeliveryConfig("projects/demo-project/topics/activations"))
    )
    p.run()
    names = {t.unique_name for t in p.runner.proto_pipeline.components.transforms.values()}
    assert any("Publish" in n for n in names)


# --- the job delivering activations ---------------------------------------------------------------

JOB = """
sources: [{{name: web, format: ndjson}}]
computed_traits:
  - {{name: orders_lifetime, aggregate: count, event: Order Completed}}
consent:
  purposes: [analytics, marketing, advertising]
  destinations:
    crm:
      purposes: [marketing]
      pii: {{email: hash}}
      delivery: {{type: webhook, webhook: {{url: "{url}", batch_size: 25, backoff_seconds: 0.01}}}}
pii: {{salt: s}}
audiences:
  - {{name: buyers, when: {{computed: orders_lifetime, gte: 1}}, destinations: [crm]}}
"""


def test_the_job_delivers_governed_activations_to_a_webhook(tmp_path, hook_factory):
    from pipelines import governed_profiles as job
    from pipelines.generate import generate
    from tests.conftest import config_from, run_job

    hook = hook_factory(fail_first=2, status=502)
    config = config_from(JOB.format(url=hook.url))
    lines, _ = generate(800, 80, seed=3)
    run = run_job(tmp_path, [x.encode() for x in lines], config)
    assert run["report"]["accounted"] and not run["report"]["internal_errors"]
    activations = [e for e in hook.accepted if e.get("event") == "Audience Entered"]
    assert activations, "no activation delivered"
    ids = [e["messageId"] for e in hook.accepted]
    assert len(ids) == len(set(ids))  # each record once, despite the 502s
    for e in hook.accepted:  # governance: hashed emails only, and marketing consent
        email = (e.get("context") or {}).get("traits", {}).get("email")
        assert email is None or "@" not in email
    rows = run["rows"]
    for e in activations:
        person = e["context"]["cdi"]["person"]
        assert orjson.loads(rows[person]["consent"]).get("marketing") is True

    # A replay without --activate delivers nothing.
    quiet = hook_factory()
    config = config_from(JOB.format(url=quiet.url))
    p = make_pipeline()
    src = tmp_path / "again.ndjson"
    src.write_text("\n".join(lines) + "\n")
    job.write_outputs(
        job.build(p, config, {"web": [str(src)]}), config, tmp_path / "replay", activate=False
    )
    p.run().wait_until_finish()
    assert quiet.requests == []


def test_a_rerun_sharing_the_ledger_delivers_no_activation_again(
    tmp_path, hook_factory, postgres_url
):
    from pipelines.generate import generate
    from tests.conftest import config_from, run_job

    lines, _ = generate(500, 50, seed=9)
    counts = []
    for attempt in range(2):
        hook = hook_factory()
        text = (
            JOB.format(url=hook.url)
            + f'sinks: {{profiles: {{type: postgres, url: "{postgres_url}"}}}}\n'
        )
        run = run_job(tmp_path / str(attempt), [x.encode() for x in lines], config_from(text))
        assert run["report"]["accounted"]
        counts.append(sum(e.get("event") == "Audience Entered" for e in hook.accepted))
    assert counts[0] > 0 and counts[1] == 0, counts


def test_webhook_redirects_are_failures_not_deliveries(hook_factory):
    moved = hook_factory(fail_first=10**6, status=302)
    with make_pipeline() as p:
        failed = (
            p
            | beam.Create([[record(1)]])
            | DeliverToWebhook(WebhookConfig(moved.url, max_attempts=3, backoff_seconds=0.01))
        )
        assert_that(
            failed | beam.Map(lambda d: (d[0]["event"]["messageId"], "HTTP 302" in d[1][1])),
            equal_to([("m1", True)]),
        )
    assert len(moved.requests) == 1 and moved.accepted == []


def test_webhook_with_a_missing_secret_refuses_to_send_unsigned(hook_factory, monkeypatch):
    monkeypatch.delenv("CDI_TEST_NO_SUCH_SECRET", raising=False)
    hook = hook_factory()
    with pytest.raises(Exception, match="CDI_TEST_NO_SUCH_SECRET"):
        with make_pipeline() as p:
            _ = (
                p
                | beam.Create([[record(1)]])
                | DeliverToWebhook(WebhookConfig(hook.url, secret_env="CDI_TEST_NO_SUCH_SECRET"))
            )
    assert hook.requests == []
    assert not verify(
        b"k", {"X-CDI-Timestamp": str(int(time.time())), "X-CDI-Signature": "é"}, b"", time.time()
    )


def test_a_record_kafka_refuses_to_produce_is_a_dead_letter():
    from transforms.io.kafka import DeliverToKafka, KafkaDeliveryConfig

    config = KafkaDeliveryConfig(
        "127.0.0.1:1", "nowhere", producer={"message.max.bytes": 1000}, delivery_timeout_ms=1000
    )
    big = record(1)
    big["event"]["properties"] = {"blob": "x" * 5000}
    with make_pipeline() as p:
        failed = p | beam.Create([[big]]) | DeliverToKafka(config)
        assert_that(
            failed | beam.Map(lambda d: (d[0]["event"]["messageId"], "refused" in d[1][1])),
            equal_to([("m1", True)]),
        )
