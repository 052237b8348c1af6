"""Record sinks: NDJSON files for the side outputs (quarantine, duplicates, late, ...).

Profiles go to the profile stores (:mod:`transforms.profile_store`, adapters in
``transforms/io/``)."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import orjson

from transforms.dead_letter import FAILED, guarded, json_text

# Unbounded runs (a topic read continuously) write each record output as files cut every minute
# of processing time (Beam requires a frequency for global-window unbounded writes).
FLUSH_EVERY_SECONDS = 60


def _lines(batch: list[dict], encode) -> list[str]:
    # One text element for the whole batch: the text sink appends the newline after it.
    return ["\n".join(encode(r) for r in batch)] if batch else []


class WriteRecordsAsJson(beam.PTransform):
    """Dict records to ``<directory>/<prefix>-SSSSS-of-NNNNN.ndjson``, one JSON object per line.
    ``batched``: the elements are lists of records, written as consecutive lines (a batch costs
    the runner one element instead of one per record). Returns the dead letters (records that do
    not encode). ``lenient``: encode anything (bytes, tuples, big integers) rather than fail, for
    the quarantine itself, whose records have nowhere else to go."""

    def __init__(
        self, directory: str, batched: bool = False, lenient: bool = False, prefix: str = "part"
    ):
        super().__init__()
        self._directory = str(directory)
        self._batched, self._lenient, self._prefix = batched, lenient, prefix

    def expand(self, records):
        encode = json_text if self._lenient else (lambda r: orjson.dumps(r).decode())
        if self._batched:
            to_json = beam.FlatMap(lambda batch: _lines(batch, encode))
        else:
            to_json = beam.Map(encode)
        encoded = records | "ToJson" >> guarded(to_json)
        unbounded = {} if records.is_bounded else {"triggering_frequency": FLUSH_EVERY_SECONDS}
        encoded.good | "Write" >> beam.io.WriteToText(
            str(Path(self._directory) / self._prefix),
            file_name_suffix=".ndjson",
            shard_name_template="-SSSSS-of-NNNNN" if records.is_bounded else "-W-SSSSS-of-NNNNN",
            **unbounded,
        )
        return encoded[FAILED]
