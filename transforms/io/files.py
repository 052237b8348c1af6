"""Source adapters: each turns one configured source into raw events ``(source, origin, payload)``.

The payload is an NDJSON line as bytes (decoded by validation, which quarantines what is not
UTF-8) or an Avro record of the canonical envelope.

The governed core (``transforms/``) sees only raw events and does not know where they came from.
Files use Beam's own IOs, so globs may name local paths or any Beam filesystem (gs://, hdfs://...).
"""

from __future__ import annotations

import re

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io import fileio


class ReadFileSource(beam.PTransform):
    """NDJSON lines or Avro records of the canonical envelope from files matching ``globs``."""

    def __init__(self, source_name: str, fmt: str, globs: list[str]):
        super().__init__()
        if fmt not in ("ndjson", "avro"):
            raise ValueError(f"unknown file format {fmt!r}")
        if not globs:
            raise ValueError(f"source {source_name!r} has no input paths")
        self._name, self._fmt, self._globs = source_name, fmt, list(globs)

    def expand(self, pbegin):
        name = self._name
        globs = pbegin | "Globs" >> beam.Create(self._globs)
        if self._fmt == "ndjson":
            # Lines as bytes: a line that is not UTF-8 is one event's problem (quarantined by
            # validation as decode.bad_encoding, raw bytes kept), not a reason to fail the read.
            lines = globs | "ReadLines" >> beam.io.ReadAllFromText(
                with_filename=True, coder=BytesCoder()
            )
            return (
                lines
                # A blank line is a separator, not an event: nothing to quarantine.
                | "SkipBlank" >> beam.Filter(lambda fl: fl[1].strip() != b"")
                | "Tag" >> beam.Map(lambda fl: (name, fl[0], fl[1]))
            )
        records = globs | "ReadAvro" >> beam.io.ReadAllFromAvro(with_filename=True)
        return records | "Tag" >> beam.Map(lambda fr: (name, fr[0], fr[1]))


# --- the raw-input archive: history that outlives topic retention ------------------------------

ARCHIVE_SCHEMA = {
    "type": "record",
    "name": "RawEvent",
    "namespace": "dev.cdi_pipelines.v1",
    "doc": "One raw input element exactly as the job read it, before any governance.",
    "fields": [
        {"name": "source", "type": "string"},
        {"name": "origin", "type": "string"},
        {"name": "payload", "type": "bytes", "doc": "the NDJSON line, or an Avro envelope as JSON"},
        {"name": "avro", "type": "boolean", "doc": "payload is an Avro envelope record (JSON)"},
        {
            "name": "part",
            "type": ["null", "long"],
            "default": None,
            "doc": "a planned run's pass files only: the event's connected part (passes.py)",
        },
    ],
}
UNDATED = "undated"


def event_hour(payload) -> str:
    """``YYYY-MM-DDTHH`` (UTC) of the event's own time (``timestamp``, else
    ``originalTimestamp``, else ``receivedAt``), or ``undated`` when the payload has none: a
    light read of the raw element, governance judges it later."""
    import datetime as dt

    import orjson

    from transforms.envelope import parse_iso_ms

    if isinstance(payload, (bytes, str)):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return UNDATED
    if not isinstance(payload, dict):
        return UNDATED
    for name in ("timestamp", "originalTimestamp", "receivedAt"):
        ms = parse_iso_ms(payload.get(name))
        if ms is not None and 0 <= ms < 253_402_300_800_000:  # years 1970-9999
            return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H")
    return UNDATED


def archive_record(raw) -> dict:
    import orjson

    source, origin, payload = raw[:3]
    is_avro = isinstance(payload, dict)
    data = orjson.dumps(payload) if is_avro else payload
    return {"source": source, "origin": str(origin), "payload": bytes(data), "avro": is_avro}


def raw_from_archive(record: dict, path: str):
    """The archived element back as the raw event the job first read (with its part, when a
    planned run's pass file carries one)."""
    import orjson

    payload = orjson.loads(record["payload"]) if record["avro"] else record["payload"]
    part = record.get("part")
    if part is not None:
        return record["source"], record["origin"] or path, payload, part
    return record["source"], record["origin"] or path, payload


class _AvroSink(fileio.FileSink):
    """Avro container files of archive records (fastavro; Beam's Avro sink has no per-record
    destination)."""

    def open(self, fh):
        import fastavro

        self._writer = fastavro.write.Writer(fh, fastavro.parse_schema(ARCHIVE_SCHEMA))

    def write(self, record):
        self._writer.write(record)

    def flush(self):
        self._writer.flush()


class ArchiveRawInput(beam.PTransform):
    """Raw events to ``<path>/<source>.<YYYY-MM-DDTHH>-<run>-*.avro`` by event hour (``undated``
    for what has no readable time): one flat directory, partitioned by file name, which object
    stores list by prefix as fast as by folder. Bounded runs (backfills, file and bounded Kafka
    reads); the continuous run's archive comes with the unbounded sources."""

    def __init__(self, path: str, run_id: str):
        super().__init__()
        self._path, self._run = str(path), run_id

    def expand(self, raw):
        from apache_beam.io import fileio

        run = self._run  # every run writes its own files: a later run never replaces an hour
        records = raw | "ToRecord" >> beam.Map(
            lambda r: (f"{r[0]}.{event_hour(r[2])}-{run}", archive_record(r))
        )
        return records | "Write" >> fileio.WriteToFiles(
            path=self._path,
            destination=lambda kv: kv[0],
            sink=lambda _dest: _RecordSink(),
            file_naming=fileio.destination_prefix_naming(suffix=".avro"),
        )


class _RecordSink(_AvroSink):
    def write(self, kv):
        super().write(kv[1])


class ReadArchive(beam.PTransform):
    """Raw events from archive files matching ``globs`` (see :func:`archive_globs`)."""

    def __init__(self, globs: list[str]):
        super().__init__()
        self._globs = list(globs)

    def expand(self, pbegin):
        return (
            pbegin
            | "Globs" >> beam.Create(self._globs)
            | "ReadAvro" >> beam.io.ReadAllFromAvro(with_filename=True)
            | "Raw" >> beam.Map(lambda fr: raw_from_archive(fr[1], fr[0]))
        )


class ReadPlannedParts(beam.PTransform):
    """A planned run's pass files (pipelines/passes.py) -> ``(part, [raw event, ...])`` per
    part, parts in order. Planning writes every event of a part into one file, so a file read
    whole holds each of its parts whole: the pass hands each part to one call without a shuffle
    of its events (what a file holds is bounded by the pass size)."""

    def __init__(self, files: list[str]):
        super().__init__()
        self._files = list(files)

    def expand(self, pbegin):
        return pbegin | "Files" >> beam.Create(self._files) | "Parts" >> beam.FlatMap(parts_of)


def parts_of(path: str) -> list[tuple[int, list[tuple]]]:
    """The parts of one pass file, each with its raw events in file order."""
    import fastavro
    from apache_beam.io.filesystems import FileSystems

    parts: dict[int, list[tuple]] = {}
    with FileSystems.open(path) as fh:
        for record in fastavro.reader(fh):
            raw = raw_from_archive(record, path)
            if len(raw) < 4:
                raise ValueError(f"{path}: a record without its part: not a planned pass's file")
            parts.setdefault(raw[3], []).append(raw[:3])
    return sorted(parts.items())


_ARCHIVE_NAME = re.compile(r"^(?P<source>.+)\.(?P<hour>\d{4}-\d{2}-\d{2}T\d{2})-")


def archive_hour_ms(name: str, sources) -> int | None:
    """The event hour (epoch ms) of an archive file name ``<source>.<YYYY-MM-DDTHH>-...avro``
    of one of ``sources`` (a source name may hold dots); ``None`` for other files and
    ``undated``."""
    import datetime as dt

    m = _ARCHIVE_NAME.match(name)
    if m is None or m["source"] not in sources:
        return None
    try:
        t = dt.datetime.strptime(m["hour"], "%Y-%m-%dT%H").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    return int(t.timestamp() * 1000)


def archive_files(path: str, sources, start_ms: int, stop_ms: int) -> list[str]:
    """Every archive file of ``sources`` whose event hour overlaps ``[start, stop)`` (whole
    hours: an hour's file holds events of that hour only). One listing of the archive."""
    from apache_beam.io.filesystems import FileSystems

    hour = 3_600_000
    sources = set(sources)
    found = FileSystems.match([FileSystems.join(path, "*.avro")])[0].metadata_list
    out = []
    for meta in found:
        t = archive_hour_ms(meta.path.rsplit("/", 1)[-1], sources)
        if t is not None and t + hour > start_ms and t < stop_ms:
            out.append(meta.path)
    return sorted(out)
