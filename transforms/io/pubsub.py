"""Pub/Sub: a source on Dataflow (Beam's ``ReadFromPubSub``), and a destination (Beam's
``WriteToPubSub`` with an ordering key per person).

**Source** (``sources[].type: pubsub``, ``sources[].pubsub``): ``ReadFromPubSub`` on a
subscription with attributes; ``timestamp_attribute`` makes an attribute (RFC 3339 or epoch ms)
the element's event timestamp, so Dataflow's watermark follows the publishers' clocks;
``id_label`` names the attribute Dataflow deduplicates redeliveries by (on top of the job's own
dedup by messageId). Each message becomes a raw event ``(source, origin, payload)`` with
``origin`` = ``pubsub:<subscription>/<message id> ts=<publish time>`` and the data bytes as
payload (validation quarantines what is not a JSON object). Beam runs ``ReadFromPubSub`` on
Dataflow in streaming mode only; elsewhere the job refuses a Pub/Sub source with a config error
(no Pub/Sub server or emulator can run on this project's machines, and no local reader is
built).

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
from dataclasses import dataclass

import apache_beam as beam
import orjson

_TOPIC = re.compile(r"^projects/[^/]+/topics/[^/]+$")
_SUBSCRIPTION = re.compile(r"^projects/[^/]+/subscriptions/[^/]+$")


@dataclass(frozen=True)
class PubSubSourceConfig:
    """``sources[].pubsub``: where to read (Dataflow streaming)."""

    subscription: str  # projects/<project>/subscriptions/<name>
    timestamp_attribute: str | None = None
    id_label: str | None = None

    def __post_init__(self):
        if not _SUBSCRIPTION.match(self.subscription):
            raise ValueError("subscription: projects/<project>/subscriptions/<name>")


def raw_from_message(source: str, subscription: str, message) -> tuple[str, str, bytes]:
    """A Pub/Sub message as the raw event validation reads."""
    origin = f"pubsub:{subscription.rsplit('/', 1)[-1]}/{message.message_id or '?'}"
    if message.publish_time is not None:
        origin += f" ts={message.publish_time.to_utc_datetime().isoformat()}"
    return source, origin, bytes(message.data or b"")


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
