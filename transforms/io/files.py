"""Source adapters: each turns one configured source into raw events ``(source, origin, payload)``.

The payload is an NDJSON line as bytes (decoded by validation, which quarantines what is not
UTF-8) or an Avro record of the canonical envelope.

The governed core (``transforms/``) sees only raw events and does not know where they came from.
Files use Beam's own IOs, so globs may name local paths or any Beam filesystem (gs://, hdfs://...).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BytesCoder


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
