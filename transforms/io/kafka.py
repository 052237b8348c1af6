"""Kafka as a source, on confluent-kafka (a native Python reader: it runs on every runner, the
local ones included; Beam's ``ReadFromKafka`` is a Java cross-language transform), and as a
delivery destination.

Two reads share the planning and the record format:

- **Bounded** (a batch run, ``cdi replay``, or any ``stop``): each partition's offset range
  ``[start, stop)``; ``stop`` is ``end`` (the partition's end when the job plans the read) or an
  ISO instant (the first offset at or after it, by record timestamp). Nothing is committed: a
  re-read must not move the group's position.
- **Continuous** (a streaming run, ``--streaming``, with no ``stop``): one splittable DoFn
  element per partition, restriction ``[start, infinity)``; each call polls up to
  ``_BATCH`` records, claims their offsets, and checkpoints (the runner resumes it at once
  after a full batch, after ``_IDLE_RESUME`` when the partition had nothing). Runner-initiated
  splits are refused: a partition is read by one reader, in offset order.

Planning (one step, at run time): the topics' partitions are listed and each gets its start
from ``earliest`` / ``latest`` / ``committed`` (the group's committed offset, else earliest) / an
ISO instant (``offsets_for_times``) / a map ``{partition: offset}`` (others from earliest).
Pure rule: :func:`plan_range`.

Event-time watermark (continuous): per partition, the newest record timestamp read minus
``watermark_delay`` (records are stamped by their producer, CreateTime, or by the broker,
LogAppendTime). Idle-partition rule: a partition that has had nothing to read for ``idle_after``
moves its watermark to wall-clock now minus ``watermark_delay``, so one quiet partition does not
hold every window and consent buffer back. A record behind the watermark is still read and
governed; the event-time steps downstream treat it by ``event_time`` / ``allowed_lateness``
(late records: see the README). Pure rule: :func:`partition_watermark`; the state rides in the
splittable DoFn's watermark-estimator state, so it survives checkpoints.

Offsets (continuous, with a ``group_id``): the offset after the last record of a bundle is
committed in that bundle's finalization, which the runner calls only once the bundle's outputs
are committed (Flink: after the checkpoint that holds them; Dataflow: after they are durable;
Prism: after they are in its store). The group's position therefore never passes a record whose
outputs could be lost by the runner; it is the group's progress for ``start: committed`` and lag
monitoring. State (dedup, profiles) is the runner's: restart a Flink job from its savepoint,
a Dataflow job by update; a local runner keeps state in memory, so a restarted local job
rebuilds it by reading from ``earliest`` (or an instant) again, and its outputs are idempotent
(profile versions, the activation ledger).

Drain: Dataflow's drain truncates the restriction (nothing more is read). A local continuous run
(``cdi run --streaming``) drains on SIGINT/SIGTERM through a drain file: every reader stops at
its next poll, the watermark goes to the end of time, timers fire and every buffer is flushed.

Elements: raw events ``(source, origin, payload)`` with ``origin`` =
``kafka:<topic>/<partition>@<offset>`` and the record's Kafka timestamp (``ts=<ISO instant>``),
so quarantine records cite where each event came from; ``payload`` is the value's bytes
(``value_format: json``) or the decoded Avro record of the canonical envelope (``avro``,
optionally in the Confluent wire format: magic byte 0 + 4-byte schema id). A value that cannot
be decoded is passed on as its bytes, and validation quarantines it; a null value (a compaction
tombstone) is an empty payload, quarantined the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Literal

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Duration as BeamDuration

from transforms.duration import Duration
from transforms.envelope import format_iso_ms
from transforms.envelope import parse_iso_ms as parse_instant_ms
from transforms.io.unbounded import (
    RESTRICTION,
    WATERMARK,
    AcceptFinalization,
    advance_watermark,
    drained,
)

EARLIEST, LATEST, COMMITTED, END = "earliest", "latest", "committed", "end"
_RESERVED_CONSUMER_KEYS = frozenset(
    {"bootstrap.servers", "group.id", "enable.auto.commit", "auto.offset.reset"}
)


@dataclass(frozen=True)
class KafkaSourceConfig:
    """``sources[].kafka``: where to read and which range."""

    bootstrap_servers: str
    topics: tuple[str, ...]
    # Used for `start: committed` and committed to by the continuous read (after its outputs
    # are committed); never committed to by a bounded read.
    group_id: str | None = None
    # Passed to the consumer as is (SASL/SSL: security.protocol, sasl.mechanism, sasl.username,
    # ssl.ca.location...). Secrets belong in the environment: `${VAR}` values are expanded at
    # run time on the worker and never logged.
    consumer: dict[str, Any] = field(default_factory=dict)
    # earliest | latest | committed | an ISO instant | {partition: offset}
    start: Any = EARLIEST
    # end | an ISO instant: a bounded read. None (the default): continuous in a streaming run,
    # `end` in a batch run.
    stop: str | None = None
    value_format: Literal["json", "avro"] = "json"
    # Avro values framed as the Confluent Schema Registry writes them.
    confluent_wire_format: bool = False
    # Continuous read: the watermark trails the newest record timestamp by this much (how far
    # out of order producers stamp records), and a partition with nothing to read for
    # `idle_after` moves its watermark to now - watermark_delay.
    watermark_delay: Duration = Duration(0)
    idle_after: Duration = Duration(30)
    # native (this module's reader, every runner) | beam (Beam's cross-language ReadFromKafka,
    # continuous only, through the Java expansion service at `expansion_service`, host:port)
    reader: Literal["native", "beam"] = "native"
    expansion_service: str | None = None

    def __post_init__(self):
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers: required")
        if not self.topics:
            raise ValueError("topics: at least one topic is required")
        bad = sorted(_RESERVED_CONSUMER_KEYS & set(self.consumer))
        if bad:
            raise ValueError(f"consumer: {bad[0]!r} is set by the source itself; use its own key")
        if isinstance(self.start, dict):
            for p, o in self.start.items():
                if not str(p).isdigit() or not isinstance(o, int) or isinstance(o, bool) or o < 0:
                    raise ValueError("start: a map must give {partition number: offset >= 0}")
        elif self.start not in (EARLIEST, LATEST, COMMITTED) and (
            not isinstance(self.start, str) or parse_instant_ms(self.start) is None
        ):
            raise ValueError(
                f"start: expected earliest, latest, committed, an ISO instant or "
                f"{{partition: offset}}, got {self.start!r}"
            )
        if self.start == COMMITTED and not self.group_id:
            raise ValueError("start: committed needs a group_id")
        if self.reader == "beam":
            if not self.expansion_service:
                raise ValueError("reader: beam needs expansion_service (host:port)")
            if self.stop is not None or isinstance(self.start, dict) or self.start == COMMITTED:
                raise ValueError(
                    "reader: beam reads continuously from earliest, latest or an instant "
                    "(the group's committed offsets when a group_id is set); no stop, no "
                    "{partition: offset}"
                )
            if self.value_format != "json" or self.confluent_wire_format:
                raise ValueError("reader: beam reads json values")
        if self.watermark_delay < 0 or self.idle_after <= 0:
            raise ValueError("watermark_delay must be >= 0 and idle_after > 0")
        if self.stop is not None and self.stop != END and parse_instant_ms(self.stop) is None:
            raise ValueError(f"stop: expected end or an ISO instant, got {self.stop!r}")


# --- pure core ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionFacts:
    """What the broker says about one partition when the read is planned."""

    low: int  # the first offset still stored
    high: int  # the offset the next record will get (the end)
    committed: int | None = None  # the group's committed offset, if any
    start_time_offset: int | None = None  # offsets_for_times(start): first at/after, or None
    stop_time_offset: int | None = None  # offsets_for_times(stop): first at/after, or None


def plan_range(config: KafkaSourceConfig, partition: int, facts: PartitionFacts) -> tuple[int, int]:
    """``[start, stop)`` offsets of one partition (empty when start >= stop). A time with no
    record at or after it resolves to the end; offsets are kept within what is stored."""
    start_spec = config.start
    if isinstance(start_spec, dict):
        start = int(start_spec.get(partition, start_spec.get(str(partition), facts.low)))
    elif start_spec == EARLIEST:
        start = facts.low
    elif start_spec == LATEST:
        start = facts.high
    elif start_spec == COMMITTED:
        start = facts.committed if facts.committed is not None else facts.low
    else:
        start = facts.start_time_offset if facts.start_time_offset is not None else facts.high
    if config.stop in (END, None):
        stop = facts.high
    else:
        stop = facts.stop_time_offset if facts.stop_time_offset is not None else facts.high
    start = min(max(start, facts.low), facts.high)
    stop = min(max(stop, facts.low), facts.high)
    return start, max(start, stop)


def time_bounds(config: KafkaSourceConfig) -> tuple[int | None, int | None]:
    """``[start, stop)`` as epoch ms where the range is given by record time, else None."""
    start = config.start
    lo = (
        parse_instant_ms(start)
        if isinstance(start, str) and start not in (EARLIEST, LATEST, COMMITTED)
        else None
    )
    hi = parse_instant_ms(config.stop) if config.stop not in (END, None) else None
    return lo, hi


def in_time_range(timestamp_ms: int | None, bounds: tuple[int | None, int | None]) -> bool:
    """Whether a record of the planned offsets belongs to a range given by record time. The
    offsets come from ``offsets_for_times`` (the first record at or after each time), so with
    producer timestamps out of order some records between them are outside the range: those are
    not read. (Records inside the range but stored after the stop offset are not reached: with
    the broker's log-append time, offsets and times agree and the range is exact.) A record
    without a timestamp is read."""
    if timestamp_ms is None or timestamp_ms <= 0:
        return True
    lo, hi = bounds
    return (lo is None or timestamp_ms >= lo) and (hi is None or timestamp_ms < hi)


def origin_of(topic: str, partition: int, offset: int, timestamp_ms: int | None) -> str:
    where = f"kafka:{topic}/{partition}@{offset}"
    if timestamp_ms is None or timestamp_ms <= 0:
        return where
    return f"{where} ts={format_iso_ms(timestamp_ms)}"


def decode_value(value: bytes | None, value_format: str, wire_format: bool, schema) -> Any:
    """The payload validation judges: the JSON bytes, or the Avro record of the canonical
    envelope; undecodable values are passed on as their bytes (and quarantined there)."""
    if value is None:
        return b""
    if value_format == "json":
        return value
    import fastavro

    data = value
    if wire_format:
        if len(data) < 5 or data[0] != 0:
            return value
        data = data[5:]
    try:
        record = fastavro.schemaless_reader(io.BytesIO(data), schema)
    except Exception:  # any malformed binary: validation quarantines the raw bytes
        return value
    return record if isinstance(record, dict) else value


def _passthrough(settings: dict[str, Any], environ) -> dict[str, Any]:
    """Client settings as given, a ``"${VAR}"`` value read from the environment."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
            value = environ.get(value[2:-1], "")
        out[key] = value
    return out


def consumer_settings(config: KafkaSourceConfig, environ) -> dict[str, Any]:
    """The consumer's configuration: passthrough keys with ``${VAR}`` expanded from the
    environment, then what the source needs (no auto commit: a bounded read never commits)."""
    out = _passthrough(config.consumer, environ)
    # Each reader instance prefetches into its own queue (librdkafka's default is 64 MB per
    # consumer); a smaller default keeps several readers per worker cheap.
    out.setdefault("queued.max.messages.kbytes", 16384)
    out.update(
        {
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": config.group_id or "cdi-pipelines-bounded-read",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    return out


# --- Beam shell --------------------------------------------------------------------------------

_POLL_SECONDS = 1.0
_EMPTY_POLLS_BEFORE_GIVING_UP = 60  # a range the broker stops serving: fail, do not hang


# Answers to a group's committed offsets that only say "not yet": the group coordinator is
# loading, moving or not elected (a broker just started, the offsets topic is being created).
# librdkafka hands them to the caller of committed() instead of retrying them itself.
_COORDINATOR_NOT_READY = frozenset({14, 15, 16})  # *_LOAD_IN_PROGRESS, *_NOT_AVAILABLE, NOT_*


def committed_offsets(consumer, partitions: list, timeout: float = 30.0, pause: float = 0.2):
    """``consumer.committed(partitions)``, asked again while the broker answers that the group's
    coordinator is not ready (or with another retriable error), until ``timeout`` seconds have
    passed; then, or on any other error, the error is raised."""
    import time

    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.committed(partitions, timeout=max(deadline - time.monotonic(), 1.0))
        except KafkaException as e:
            error = e.args[0] if e.args else None
            again = error is not None and (
                error.code() in _COORDINATOR_NOT_READY or error.retriable()
            )
            if not again or time.monotonic() >= deadline:
                raise
            time.sleep(pause)


class _PlanRangesFn(beam.DoFn):
    """``(topic, partition, start, stop)`` per partition with records to read; continuous:
    ``(topic, partition, start)`` per partition."""

    def __init__(self, config: KafkaSourceConfig, continuous: bool = False):
        self._config = config
        self._continuous = continuous

    def process(self, _):
        import os

        from confluent_kafka import Consumer, TopicPartition

        config = self._config
        consumer = Consumer(consumer_settings(config, os.environ))
        try:
            for topic in config.topics:
                meta = consumer.list_topics(topic, timeout=30).topics[topic]
                if meta.error is not None:
                    raise RuntimeError(f"kafka topic {topic!r}: {meta.error}")
                partitions = sorted(meta.partitions)
                committed = {}
                if config.start == COMMITTED:
                    tps = [TopicPartition(topic, p) for p in partitions]
                    for tp in committed_offsets(consumer, tps):
                        committed[tp.partition] = tp.offset if tp.offset >= 0 else None
                starts = self._offsets_for(consumer, topic, partitions, config.start)
                stops = self._offsets_for(consumer, topic, partitions, config.stop)
                for p in partitions:
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                    facts = PartitionFacts(low, high, committed.get(p), starts.get(p), stops.get(p))
                    start, stop = plan_range(config, p, facts)
                    if self._continuous:
                        yield (topic, p, start)
                    elif start < stop:
                        yield (topic, p, start, stop)
        finally:
            consumer.close()

    @staticmethod
    def _offsets_for(consumer, topic: str, partitions: list[int], spec) -> dict[int, int | None]:
        from confluent_kafka import TopicPartition

        ms = parse_instant_ms(spec) if isinstance(spec, str) else None
        if ms is None:
            return {}
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in partitions], timeout=30
        )
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}


class _ReadRangeFn(beam.DoFn):
    def __init__(self, source_name: str, config: KafkaSourceConfig):
        self._name, self._config = source_name, config
        self._records = Metrics.counter("cdi", "kafka.records_read")
        self._outside = Metrics.counter("cdi", "kafka.records_outside_time_range")

    def process(self, planned):
        import os

        from confluent_kafka import Consumer, TopicPartition

        topic, partition, start, stop = planned
        config = self._config
        bounds = time_bounds(config)
        schema = _avro_schema(config)
        consumer = Consumer(consumer_settings(config, os.environ))
        try:
            consumer.assign([TopicPartition(topic, partition, start)])
            offset, empty = start, 0
            while offset < stop:
                msg = consumer.poll(_POLL_SECONDS)
                if msg is None:
                    # Offsets may have gaps (compaction, transaction markers): the range is done
                    # when the consumer's position has reached its end.
                    (position,) = consumer.position([TopicPartition(topic, partition)])
                    if position.offset >= stop:
                        break
                    empty += 1
                    if empty >= _EMPTY_POLLS_BEFORE_GIVING_UP:
                        raise RuntimeError(
                            f"kafka {topic}/{partition}: no record at offset {offset} "
                            f"(planned up to {stop}) after {empty} polls"
                        )
                    continue
                if msg.error() is not None:
                    raise RuntimeError(f"kafka {topic}/{partition}: {msg.error()}")
                empty = 0
                offset = msg.offset() + 1
                if msg.offset() >= stop:
                    break
                _, ts = msg.timestamp()
                if not in_time_range(ts, bounds):
                    self._outside.inc()
                    continue
                payload = decode_value(
                    msg.value(), config.value_format, config.confluent_wire_format, schema
                )
                self._records.inc()
                yield self._name, origin_of(topic, partition, msg.offset(), ts), payload
        finally:
            consumer.close()


_BATCH = 500  # records per call: then a checkpoint, so outputs flow and offsets commit
_IDLE_RESUME = 0.2  # seconds before a partition that had nothing is polled again
_CONSUME_TIMEOUT = 0.1


class _ReadPartitionFn(beam.DoFn):
    """The continuous read of one partition (see the module doc). The consumers are connections
    kept per worker for the partitions it reads, re-positioned to each restriction's start;
    they hold no data state."""

    def __init__(self, source_name: str, config: KafkaSourceConfig, drain_file: str | None):
        self._name, self._config, self._drain_file = source_name, config, drain_file
        self._records = Metrics.counter("cdi", "kafka.records_read")
        self._commits = Metrics.counter("cdi", "kafka.offsets_committed")
        self._lag = Metrics.gauge("cdi", "kafka.watermark_lag_ms")

    def setup(self):
        self._consumers: dict = {}
        self._schema = _avro_schema(self._config)

    def _consumer_at(self, topic: str, partition: int, offset: int):
        import os

        from confluent_kafka import Consumer, TopicPartition

        key = (topic, partition)
        entry = self._consumers.get(key)
        if entry is None:
            entry = [Consumer(consumer_settings(self._config, os.environ)), None]
            self._consumers[key] = entry
        if entry[1] != offset:
            entry[0].assign([TopicPartition(topic, partition, offset)])
            entry[1] = offset
        return entry

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element,
        # (before the restriction and watermark parameters: Beam passes those by keyword)
        finalizer=beam.DoFn.BundleFinalizerParam,
        tracker=RESTRICTION,
        watermark=WATERMARK,
    ):
        topic, partition, _ = element
        config = self._config
        # Registered on every call, even with nothing to commit: Prism asks every bundle of a
        # stage that can request finalization to finalize, and the SDK fails a bundle that
        # registered nothing.
        commit = _Commit(self, topic, partition)
        finalizer.register(commit)
        if drained(tracker, self._drain_file):
            return
        start = tracker.current_restriction().start
        entry = self._consumer_at(topic, partition, start)
        messages = entry[0].consume(_BATCH, _CONSUME_TIMEOUT)
        newest, next_offset, errors = None, None, False
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise RuntimeError(f"kafka {topic}/{partition}: {err}")
                errors = True
                continue  # transient (the client retries): the next poll goes on
            if msg.offset() < start:
                # The broker reset the position below where this reader stands: the partition
                # was truncated or recreated. Reading on would claim offsets twice.
                raise RuntimeError(
                    f"kafka {topic}/{partition}: offset {msg.offset()} is below the reader's "
                    f"position {start}: the partition was truncated or recreated; restart the "
                    "job with a new start"
                )
            if not tracker.try_claim(msg.offset()):
                entry[1] = None  # the rest belongs to another restriction: re-position
                return
            _, ts = msg.timestamp()
            if ts is not None and ts > 0:
                newest = ts if newest is None else max(newest, ts)
            next_offset = msg.offset() + 1
            if config.group_id:
                commit.offset = next_offset
            self._records.inc()
            payload = decode_value(
                msg.value(), config.value_format, config.confluent_wire_format, self._schema
            )
            record = (self._name, origin_of(topic, partition, msg.offset(), ts), payload)
            yield beam.window.TimestampedValue(record, (ts if ts and ts > 0 else 0) / 1000.0)
        caught_up = not errors and _caught_up(entry, topic, partition)
        lag = advance_watermark(
            watermark, newest, config.watermark_delay, config.idle_after, caught_up
        )
        if lag is not None:
            self._lag.set(lag)
        if next_offset is not None:
            entry[1] = next_offset
        tracker.defer_remainder(None if next_offset is not None else BeamDuration(_IDLE_RESUME))

    def commit(self, topic: str, partition: int, offset: int) -> None:
        from confluent_kafka import TopicPartition

        entry = self._consumers.get((topic, partition))
        if entry is None:
            return  # the reader moved on; a later bundle commits a later offset
        # Finalizations may arrive out of order: the group's position (kept by the broker) only
        # moves forward.
        (current,) = committed_offsets(entry[0], [TopicPartition(topic, partition)])
        if current.offset >= offset:
            return
        entry[0].commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
        self._commits.inc()

    def teardown(self):
        for consumer, _ in getattr(self, "_consumers", {}).values():
            consumer.close()


def _caught_up(entry, topic: str, partition: int) -> bool:
    """Whether the reader's position has reached the partition's end as of the consumer's last
    fetch (no broker call); unknown counts as not caught up."""
    from confluent_kafka import TopicPartition

    try:
        _, high = entry[0].get_watermark_offsets(TopicPartition(topic, partition), cached=True)
    except Exception:  # no fetch yet, broker away
        return False
    return high >= 0 and entry[1] is not None and entry[1] >= high


@dataclass
class _Commit:
    """A bundle-finalization callback: commits ``offset`` (the one after the last record the
    bundle read) for the partition; nothing when the bundle read nothing."""

    reader: _ReadPartitionFn
    topic: str
    partition: int
    offset: int | None = None

    def __call__(self):
        if self.offset is not None:
            self.reader.commit(self.topic, self.partition, self.offset)


def _avro_schema(config: KafkaSourceConfig):
    if config.value_format != "avro":
        return None
    import fastavro

    from transforms.envelope import envelope_avro_schema

    return fastavro.parse_schema(envelope_avro_schema())


def beam_read_settings(config: KafkaSourceConfig, environ) -> dict[str, Any]:
    """The arguments of Beam's ``ReadFromKafka`` for ``reader: beam`` (Java's KafkaIO commits in
    finalization and stamps records by CreateTime, as the native reader does)."""
    consumer = {k: str(v) for k, v in _passthrough(config.consumer, environ).items()}
    consumer["bootstrap.servers"] = config.bootstrap_servers
    consumer["auto.offset.reset"] = "latest" if config.start == LATEST else "earliest"
    if config.group_id:
        consumer["group.id"] = config.group_id
    start_ms = parse_instant_ms(config.start) if isinstance(config.start, str) else None
    return {
        "consumer_config": consumer,
        "topics": list(config.topics),
        "with_metadata": True,
        "commit_offset_in_finalize": bool(config.group_id),
        "timestamp_policy": "CreateTime",
        "start_read_time": start_ms,
        "expansion_service": config.expansion_service,
    }


def raw_from_beam_record(source: str, record) -> tuple[str, str, Any]:
    """A record of Beam's ReadFromKafka (with metadata: a row with topic, partition, offset,
    timestamp, value) as the raw event validation reads."""
    value = record.value
    return (
        source,
        origin_of(record.topic, record.partition, record.offset, record.timestamp),
        (b"" if value is None else bytes(value)),
    )


class _BeamReadFromKafka(beam.PTransform):
    def __init__(self, source_name: str, config: KafkaSourceConfig):
        super().__init__()
        self._name, self._config = source_name, config

    def expand(self, pbegin):
        import os

        from apache_beam.io import kafka as beam_kafka

        name = self._name
        return (
            pbegin
            | "ReadFromKafka"
            >> beam_kafka.ReadFromKafka(**beam_read_settings(self._config, os.environ))
            | "Raw" >> beam.Map(lambda r: raw_from_beam_record(name, r))
        )


class ReadKafka(beam.PTransform):
    """Raw events ``(source, origin, payload)`` from every partition of the configured topics:
    continuous when ``continuous`` and no ``stop`` is configured, else a bounded range (see the
    module doc). ``drain_file``: a continuous read stops when this path exists."""

    def __init__(
        self,
        source_name: str,
        config: KafkaSourceConfig,
        continuous: bool = False,
        drain_file: str | None = None,
    ):
        super().__init__()
        self._name, self._config = source_name, config
        self._continuous = continuous and config.stop is None
        self._drain_file = drain_file

    def expand(self, pbegin):
        if self._config.reader == "beam":
            if not self._continuous:
                raise ValueError("reader: beam reads continuously (a --streaming run)")
            return pbegin | "Beam" >> _BeamReadFromKafka(self._name, self._config)
        planned = (
            pbegin
            | "Impulse" >> beam.Impulse()
            | "PlanRanges" >> beam.ParDo(_PlanRangesFn(self._config, self._continuous))
            # Each partition to any worker: partitions are read in parallel.
            | "SpreadRanges" >> beam.Reshuffle()
        )
        if self._continuous:
            return (
                planned
                | "Finalizable" >> beam.ParDo(AcceptFinalization())
                | "ReadPartitions"
                >> beam.ParDo(_ReadPartitionFn(self._name, self._config, self._drain_file))
            )
        return planned | "ReadRanges" >> beam.ParDo(_ReadRangeFn(self._name, self._config))


# --- Kafka as a destination: activation and event deliveries --------------------------------------

_RESERVED_PRODUCER_KEYS = frozenset({"bootstrap.servers", "enable.idempotence", "acks"})


@dataclass(frozen=True)
class KafkaDeliveryConfig:
    """``consent.destinations.<name>.delivery`` with ``type: kafka``."""

    bootstrap_servers: str
    topic: str
    # Passed to the producer as is (SASL/SSL, compression.type, linger.ms...); `${VAR}` values
    # from the environment. Idempotence and acks=all are set by the sink and cannot be turned
    # off here.
    producer: dict[str, Any] = field(default_factory=dict)
    # How long librdkafka retries one record before it is a dead letter.
    delivery_timeout_ms: int = 120_000

    def __post_init__(self):
        if not self.bootstrap_servers or not self.topic:
            raise ValueError("bootstrap_servers and topic: required")
        bad = sorted(_RESERVED_PRODUCER_KEYS & set(self.producer))
        if bad:
            raise ValueError(f"producer: {bad[0]!r} is set by the sink itself")
        if self.delivery_timeout_ms < 1000:
            raise ValueError("delivery_timeout_ms: at least 1000")


def producer_settings(config: KafkaDeliveryConfig, environ) -> dict[str, Any]:
    out = _passthrough(config.producer, environ)
    out.update(
        {
            "bootstrap.servers": config.bootstrap_servers,
            # Exactly one copy per send in the log, in order per partition, however often
            # librdkafka retries; a retried *bundle* may send again: consumers drop repeats by
            # the messageId (deterministic for activations).
            "enable.idempotence": True,
            "acks": "all",
            "delivery.timeout.ms": config.delivery_timeout_ms,
        }
    )
    return out


def delivery_message(record: dict) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """``(key, value, headers)`` of one delivery record: keyed by the person (one partition
    per person: a person's records stay in order), the value is the Segment event as the
    destination's PII policy left it."""
    import orjson

    event = record["event"]
    headers = [("cdi-destination", record["destination"].encode())]
    if "activation" in record:
        headers.append(("cdi-activation-key", record["activation"]["key"].encode()))
    if isinstance(event, dict) and event.get("messageId"):
        headers.append(("cdi-message-id", str(event["messageId"]).encode()))
    return record["profile_key"].encode(), orjson.dumps(event), headers


class _ProduceFn(beam.DoFn):
    """Produces every record of a bundle, then waits for all acknowledgements at the end of the
    bundle (the bundle is the retry unit). A record librdkafka could not deliver within
    ``delivery_timeout_ms`` is a dead letter, never dropped silently."""

    def __init__(self, config: KafkaDeliveryConfig):
        self._config = config
        self._delivered = Metrics.counter("cdi", "kafka.delivered")
        self._failed = Metrics.counter("cdi", "kafka.delivery_failed")

    def setup(self):
        import os

        from confluent_kafka import Producer

        self._producer = Producer(producer_settings(self._config, os.environ))

    def start_bundle(self):
        self._errors: list[tuple[dict, str]] = []

    def process(self, records):
        from confluent_kafka import KafkaException

        from transforms.dead_letter import dead_letter

        errors = self._errors  # this bundle's list: late callbacks cannot land in the next one
        for record in records if isinstance(records, list) else [records]:
            key, value, headers = delivery_message(record)

            def done(err, _msg, record=record, errors=errors):
                if err is not None:
                    errors.append((record, str(err)))

            while True:
                try:
                    self._producer.produce(
                        self._config.topic, value=value, key=key, headers=headers, on_delivery=done
                    )
                    break
                except BufferError:  # local queue full: let it drain, then go on
                    self._producer.poll(0.5)
                except KafkaException as e:  # this record (e.g. too large): its dead letter
                    self._failed.inc()
                    yield dead_letter(record, ValueError(f"kafka produce refused: {e}"))
                    break
            self._producer.poll(0)

    def finish_bundle(self):
        from transforms.dead_letter import at_bundle_end, dead_letter

        remaining = self._producer.flush(self._config.delivery_timeout_ms / 1000 + 30)
        if remaining:
            raise RuntimeError(f"kafka: {remaining} records still unacknowledged after flush")
        self._failed.inc(len(self._errors))
        for record, err in self._errors:
            yield at_bundle_end(dead_letter(record, ValueError(f"kafka delivery failed: {err}")))
        self._errors = []

    def teardown(self):
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.flush(10)


class DeliverToKafka(beam.PTransform):
    """Delivery record lists in; dead letters (records not acknowledged) out."""

    def __init__(self, config: KafkaDeliveryConfig):
        super().__init__()
        self._config = config

    def expand(self, records):
        from transforms.dead_letter import failures_of

        return failures_of(records, "Produce", _ProduceFn(self._config))
