"""Pub/Sub as a destination: Beam's ``WriteToPubSub`` with an ordering key per person.

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
