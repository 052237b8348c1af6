"""Pub/Sub: a source on Dataflow (Beam's ``ReadFromPubSub``), and a destination (Beam's
``WriteToPubSub`` with an ordering key per person).

**Source** (``sources[].type: pubsub``, ``sources[].pubsub``): ``ReadFromPubSub`` on a
subscription with attributes; ``timestamp_attribute`` makes an attribute (RFC 3339 or epoch ms)
the element's event timestamp, so Dataflow's watermark follows the publishers' clocks;
``id_label`` names the attribute Dataflow deduplicates redeliveries by (on top of the job's own
dedup by messageId). Each message becomes a raw event ``(source, origin, payload)`` with
``origin`` = ``pubsub:<subscription>/<message id> ts=<publish time>`` and the data bytes as
payload (validation quarantines what is not a JSON object). Beam runs ``ReadFromPubSub`` on
Dataflow in streaming mode only.

Elsewhere (Prism, Flink, any streaming run not on Dataflow) the source is a native reader on
google-cloud-pubsub (:class:`ReadPubSubNative`): ``readers`` continuous readers (splittable
DoFns, transforms/io/unbounded.py) each pull up to ``max_messages`` per call from the
subscription (synchronous pull) and checkpoint. A message's event timestamp is its
``timestamp_attribute`` (RFC 3339 or epoch ms), else its publish time; the reader's watermark
trails the newest timestamp pulled by ``watermark_delay`` and moves to now - ``watermark_delay``
after ``idle_after`` without messages (Pub/Sub has no partitions: the delay is how far out of
order publishers' timestamps arrive). Messages are **acknowledged in the bundle's
finalization**, after the runner has committed the outputs; pulled messages get a 120 s ack
deadline meanwhile, and one not acknowledged by then (a job that died) is redelivered, which the
job's dedup (by messageId) absorbs.
``id_label`` has no meaning there (it is Dataflow's). Verified at the client boundary only (no
Pub/Sub or emulator here): the reader runs on Prism against a fake subscriber client that
speaks google-cloud-pubsub's request and response types.

**Destination**:

Each delivery record becomes one message: ``data`` = the Segment event as the destination's PII
policy left it (JSON), attributes ``cdi_destination``, ``cdi_message_id`` (and
``cdi_activation_key`` for activations), ``ordering_key`` = the person, so a subscriber with
message ordering enabled sees a person's records in order; ``id_label`` (``cdi_message_id``)
lets Dataflow drop a message it already published when a bundle is retried.

Not verifiable here: no Pub/Sub (or emulator) can run on this machine. The message conversion
is tested, and the write is built into a pipeline graph offline; ``WriteToPubSub`` itself runs
on Dataflow (streaming), where Beam replaces it with the service's native sink.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Duration as BeamDuration

from transforms.duration import Duration
from transforms.envelope import format_iso_ms, parse_iso_ms
from transforms.io.unbounded import (
    RESTRICTION,
    WATERMARK,
    AcceptFinalization,
    advance_watermark,
    drained,
)

_TOPIC = re.compile(r"^projects/[^/]+/topics/[^/]+$")
_SUBSCRIPTION = re.compile(r"^projects/[^/]+/subscriptions/[^/]+$")


@dataclass(frozen=True)
class PubSubSourceConfig:
    """``sources[].pubsub``: where to read (Dataflow streaming)."""

    subscription: str  # projects/<project>/subscriptions/<name>
    timestamp_attribute: str | None = None
    id_label: str | None = None  # Dataflow only
    # The native reader (every runner but Dataflow):
    readers: int = 1  # concurrent pullers
    max_messages: int = 500  # per pull
    watermark_delay: Duration = Duration(0)
    idle_after: Duration = Duration(30)

    def __post_init__(self):
        if not _SUBSCRIPTION.match(self.subscription):
            raise ValueError("subscription: projects/<project>/subscriptions/<name>")
        if self.readers < 1 or self.max_messages < 1:
            raise ValueError("readers and max_messages must be at least 1")
        if self.watermark_delay < 0 or self.idle_after <= 0:
            raise ValueError("watermark_delay must be >= 0 and idle_after > 0")


def raw_from_message(source: str, subscription: str, message) -> tuple[str, str, bytes]:
    """A Pub/Sub message as the raw event validation reads."""
    origin = f"pubsub:{subscription.rsplit('/', 1)[-1]}/{message.message_id or '?'}"
    if message.publish_time is not None:
        origin += f" ts={message.publish_time.to_utc_datetime().isoformat()}"
    return source, origin, bytes(message.data or b"")


def event_time_ms(message, timestamp_attribute: str | None) -> int | None:
    """A pulled message's event time: the attribute (RFC 3339 or epoch ms), else the publish
    time; None when neither is usable."""
    if timestamp_attribute:
        value = (message.attributes or {}).get(timestamp_attribute)
        if value:
            if value.isdigit():
                return int(value)
            parsed = parse_iso_ms(value)
            if parsed is not None:
                return parsed
    published = getattr(message, "publish_time", None)
    if published is None or not hasattr(published, "timestamp"):
        return None
    return int(published.timestamp() * 1000)


def raw_from_pulled(source: str, subscription: str, message, ts_ms: int | None):
    """A message pulled by the native reader as the raw event validation reads."""
    origin = f"pubsub:{subscription.rsplit('/', 1)[-1]}/{message.message_id or '?'}"
    if ts_ms is not None:
        origin += f" ts={format_iso_ms(ts_ms)}"
    return source, origin, bytes(message.data or b"")


def subscriber_client():
    """google-cloud-pubsub's synchronous subscriber (credentials from the environment)."""
    from google.cloud import pubsub_v1

    return pubsub_v1.SubscriberClient()


_PULL_TIMEOUT = 5.0  # seconds a pull may wait for messages
_HOLD_SECONDS = 120  # the ack deadline of pulled messages until their bundle is finalized
_IDLE_RESUME = 0.2


@dataclass
class _Ack:
    """A bundle-finalization callback: acknowledges what the bundle pulled."""

    reader: _PullFn
    subscription: str
    ack_ids: list = field(default_factory=list)

    def __call__(self):
        if self.ack_ids:
            self.reader.acknowledge(self.subscription, self.ack_ids)


class _PullFn(beam.DoFn):
    """One continuous puller (see the module doc). ``client_factory`` makes the subscriber
    client (tests pass a fake speaking the same request and response types)."""

    def __init__(self, source_name, config: PubSubSourceConfig, drain_file, client_factory):
        self._name, self._config = source_name, config
        self._drain_file, self._factory = drain_file, client_factory
        self._pulled = Metrics.counter("cdi", "pubsub.messages_pulled")
        self._acked = Metrics.counter("cdi", "pubsub.messages_acked")

    def setup(self):
        self._client = self._factory()

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element,
        finalizer=beam.DoFn.BundleFinalizerParam,
        tracker=RESTRICTION,
        watermark=WATERMARK,
    ):
        config = self._config
        ack = _Ack(self, config.subscription)
        finalizer.register(ack)  # every call: see transforms/io/unbounded.py
        position = tracker.current_restriction().start
        if drained(tracker, self._drain_file) or not tracker.try_claim(position):
            return
        try:
            response = self._client.pull(
                request={"subscription": config.subscription, "max_messages": config.max_messages},
                timeout=_PULL_TIMEOUT,
            )
            received = list(response.received_messages)
        except Exception as e:  # no message within the timeout is an error in some versions
            if type(e).__name__ not in ("DeadlineExceeded", "RetryError"):
                raise
            received = []
        if received:
            # Hold the messages until the bundle's finalization acknowledges them: without this a
            # finalization later than the subscription's ack deadline (10 s by default) would
            # have them redelivered (dedup would absorb them, but late).
            self._client.modify_ack_deadline(
                request={
                    "subscription": config.subscription,
                    "ack_ids": [item.ack_id for item in received],
                    "ack_deadline_seconds": _HOLD_SECONDS,
                }
            )
        newest = None
        for item in received:
            message = item.message
            ts = event_time_ms(message, config.timestamp_attribute)
            if ts is not None:
                newest = ts if newest is None else max(newest, ts)
            ack.ack_ids.append(item.ack_id)
            self._pulled.inc()
            raw = raw_from_pulled(self._name, config.subscription, message, ts)
            yield beam.window.TimestampedValue(raw, (ts or 0) / 1000.0)
        advance_watermark(watermark, newest, config.watermark_delay, config.idle_after)
        tracker.defer_remainder(None if received else BeamDuration(_IDLE_RESUME))

    def acknowledge(self, subscription: str, ack_ids: list) -> None:
        self._client.acknowledge(request={"subscription": subscription, "ack_ids": ack_ids})
        self._acked.inc(len(ack_ids))


class ReadPubSubNative(beam.PTransform):
    """Raw events from a subscription, continuously, on any runner (see the module doc)."""

    def __init__(
        self,
        source_name: str,
        config: PubSubSourceConfig,
        drain_file: str | None = None,
        client_factory=subscriber_client,
    ):
        super().__init__()
        self._name, self._config = source_name, config
        self._drain_file, self._factory = drain_file, client_factory

    def expand(self, pbegin):
        c = self._config
        return (
            pbegin
            | "Readers" >> beam.Create([(c.subscription, i, 0) for i in range(c.readers)])
            | "Finalizable" >> beam.ParDo(AcceptFinalization())
            | "Pull" >> beam.ParDo(_PullFn(self._name, c, self._drain_file, self._factory))
        )


class ReadPubSubSource(beam.PTransform):
    def __init__(self, source_name: str, config: PubSubSourceConfig):
        super().__init__()
        self._name, self._config = source_name, config

    def expand(self, pbegin):
        from apache_beam.io.gcp.pubsub import ReadFromPubSub

        c, name = self._config, self._name
        return (
            pbegin
            | "Read"
            >> ReadFromPubSub(
                subscription=c.subscription,
                with_attributes=True,
                timestamp_attribute=c.timestamp_attribute,
                id_label=c.id_label,
            )
            | "Raw" >> beam.Map(lambda m: raw_from_message(name, c.subscription, m))
        )


@dataclass(frozen=True)
class PubSubDeliveryConfig:
    """``consent.destinations.<name>.delivery`` with ``type: pubsub``."""

    topic: str  # projects/<project>/topics/<topic>
    ordering_key: bool = True

    def __post_init__(self):
        if not _TOPIC.match(self.topic):
            raise ValueError("topic: projects/<project>/topics/<topic>")


def to_message(record: dict, ordering: bool = True):
    from apache_beam.io.gcp.pubsub import PubsubMessage

    event = record["event"]
    attributes = {"cdi_destination": record["destination"]}
    if isinstance(event, dict) and event.get("messageId"):
        attributes["cdi_message_id"] = str(event["messageId"])
    if "activation" in record:
        attributes["cdi_activation_key"] = record["activation"]["key"]
    return PubsubMessage(
        orjson.dumps(event), attributes, ordering_key=record["profile_key"] if ordering else ""
    )


class DeliverToPubSub(beam.PTransform):
    """Delivery record lists in; no dead letters of its own (the service retries)."""

    def __init__(self, config: PubSubDeliveryConfig):
        super().__init__()
        self._config = config

    def expand(self, records):
        from apache_beam.io.gcp.pubsub import WriteToPubSub

        ordering = self._config.ordering_key
        (
            records
            | "Flatten" >> beam.FlatMap(lambda rs: rs if isinstance(rs, list) else [rs])
            | "ToMessage" >> beam.Map(to_message, ordering)
            | "Publish"
            >> WriteToPubSub(
                self._config.topic,
                with_attributes=True,
                id_label="cdi_message_id",
                publish_with_ordering_key=ordering,
            )
        )
        return records.pipeline | "NoDeadLetters" >> beam.Create([])
