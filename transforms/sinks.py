"""Record sinks: NDJSON files for the side outputs (quarantine, duplicates, late, ...).

Profiles go to the profile stores (:mod:`transforms.profile_store`, adapters in
``transforms/io/``)."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import orjson

from transforms.dead_letter import (
    FAILED,
    all_or_dead_letter,
    guarded,
    json_text,
    one_or_dead_letter,
)

# Unbounded runs (a topic read continuously) write each record output as files cut every minute
# of processing time, and once more when the run drains.
FLUSH_EVERY_SECONDS = 60


class UniqueFileNaming:
    """``<prefix>-<run>-<unique>.ndjson``: a name of its own for every file an unbounded write
    moves into place. Beam's naming (and the pane it is given, always None for unsharded
    writes) repeats across firings, and a later firing's file would replace an earlier one."""

    def __init__(self, prefix: str, run: str, suffix: str):
        self._prefix, self._run, self._suffix = prefix, run, suffix

    def __call__(self, window, pane, shard_index, total_shards, compression, destination):
        import uuid

        return f"{self._prefix}-{self._run}-{uuid.uuid4().hex[:16]}{self._suffix}"


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
            to_json = beam.FlatMap(all_or_dead_letter(lambda batch: _lines(batch, encode)))
        else:
            to_json = beam.FlatMap(one_or_dead_letter(encode))
        encoded = records | "ToJson" >> guarded(to_json)
        if records.is_bounded:
            encoded.good | "Write" >> beam.io.WriteToText(
                str(Path(self._directory) / self._prefix),
                file_name_suffix=".ndjson",
                shard_name_template="-SSSSS-of-NNNNN",
            )
        else:
            # Beam's file writes for streaming (a GroupByKey per firing, no side inputs: the
            # side-input path of WriteToText failed a drained Prism job with an empty
            # initialization result).
            import time

            from apache_beam.io import fileio
            from apache_beam.options.value_provider import StaticValueProvider
            from apache_beam.transforms import trigger, window

            run = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            (
                encoded.good
                | "Panes"
                >> beam.WindowInto(
                    window.GlobalWindows(),
                    trigger=trigger.Repeatedly(trigger.AfterProcessingTime(FLUSH_EVERY_SECONDS)),
                    accumulation_mode=trigger.AccumulationMode.DISCARDING,
                )
                | "Write"
                >> fileio.WriteToFiles(
                    self._directory,
                    file_naming=UniqueFileNaming(self._prefix, run, ".ndjson"),
                    shards=1,
                    # (read with .get(): a ValueProvider, not a str)
                    temp_directory=StaticValueProvider(str, str(Path(self._directory) / ".tmp")),
                )
            )
        return encoded[FAILED]
