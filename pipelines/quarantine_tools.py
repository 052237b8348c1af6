"""`cdi quarantine summarize DIR` and `cdi quarantine replay DIR OUT`: work with dead letters.

Input: the quarantine output, NDJSON shards ``DIR/part-*.ndjson`` of records made by
:func:`transforms.quarantine.quarantine_record`. DIR may also be a run's output directory (its
``quarantine/`` subdirectory is used) or a single shard file. Shards are read in sorted name order;
a line that is not a JSON object with ``reason`` and ``payload`` is an error naming the file and
line (blank lines are skipped). Messages never quote a payload: payloads may carry PII.

Replay: the user repairs ``payload`` texts in place, then ``replay`` writes each payload that now
parses as a JSON object as one NDJSON line, ready to feed back into ``cdi run``. Only ``source`` is
ever added (the record's, when the payload has none, which is what validation would add anyway, so
the dedup fingerprint does not change); ``messageId`` and everything else are untouched, so an
event that was already accepted is caught as a duplicate on re-submission, never counted twice.
Payloads that still do not parse are counted and reported, not written.

The pipeline's dedup key reads the payload's ``source`` field (the configured source name only
when the payload has none), so a replayed event keeps its key through any input.

Exit codes follow ``cdi``: 0 success, 2 nothing found or an unreadable quarantine file.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

EXIT_OK, EXIT_USAGE = 0, 2
SHARD_GLOB = "part-*.ndjson"
UNKNOWN = "(unknown)"  # a record without a reason or source, so JSON keys stay strings
_REQUIRED_KEYS = ("reason", "payload")


# --- reading -----------------------------------------------------------------------------------


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The quarantine shards at ``path`` (see the module docstring), sorted; raises
    FileNotFoundError ``<path>: no quarantine files found`` when there are none."""
    p = Path(path)
    if p.is_file():
        return [p]
    directory = p / "quarantine" if (p / "quarantine").is_dir() else p
    files = sorted(f for f in directory.glob(SHARD_GLOB) if f.is_file()) if p.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path}: no quarantine files found")
    return files


def _parse_line(file: Path, lineno: int, line: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        # e.msg and the column only: the exception text never quotes the line (it may hold PII).
        raise ValueError(f"{file}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{file}:{lineno}: not a quarantine record (expected a JSON object)")
    for key in _REQUIRED_KEYS:
        if key not in record:
            raise ValueError(f"{file}:{lineno}: not a quarantine record (no {key!r} field)")
    return record


def read_located(path: str | os.PathLike) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """``(file, line number, record)`` for every record, shards in sorted order.

    The shards are found now (a missing directory fails at the call); lines are read lazily.
    """
    files = shard_files(path)

    def records() -> Iterator[tuple[Path, int, dict[str, Any]]]:
        for file in files:
            with open(file, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        yield file, lineno, _parse_line(file, lineno, line)

    return records()


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every quarantine record at ``path``, shards in sorted order."""
    located = read_located(path)
    return (record for _, _, record in located)


# --- summarize ---------------------------------------------------------------------------------


def _label(value: Any) -> str:
    return UNKNOWN if value is None or value == "" else str(value)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts: ``{"total", "by_reason", "by_source", "by_reason_and_source": {reason: {source}}}``,
    every mapping sorted by key."""
    pairs: Counter[tuple[str, str]] = Counter(
        (_label(r.get("reason")), _label(r.get("source"))) for r in records
    )
    by_reason: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    nested: dict[str, dict[str, int]] = {}
    for (reason, source), n in sorted(pairs.items()):
        by_reason[reason] += n
        by_source[source] += n
        nested.setdefault(reason, {})[source] = n
    return {
        "total": sum(pairs.values()),
        "by_reason": dict(sorted(by_reason.items())),
        "by_source": dict(sorted(by_source.items())),
        "by_reason_and_source": nested,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A table of reason, source and count, then per-source and overall totals."""
    if not summary["total"]:
        return "no quarantined records"
    rows = [
        (reason, source, n)
        for reason, sources in summary["by_reason_and_source"].items()
        for source, n in sources.items()
    ]
    totals = [("all reasons", source, n) for source, n in summary["by_source"].items()]
    totals.append(("total", "", summary["total"]))
    w_reason = max(len("reason"), *(len(r[0]) for r in rows + totals))
    w_source = max(len("source"), *(len(r[1]) for r in rows + totals))
    w_count = max(len("count"), *(len(f"{r[2]:,}") for r in rows + totals))

    def line(reason: str, source: str, count: str) -> str:
        return f"{reason:<{w_reason}}  {source:<{w_source}}  {count:>{w_count}}".rstrip()

    rule = line("-" * w_reason, "-" * w_source, "-" * w_count)
    out = [line("reason", "source", "count"), rule]
    out += [line(r, s, f"{n:,}") for r, s, n in rows]
    out.append(rule)
    out += [line(r, s, f"{n:,}") for r, s, n in totals]
    return "\n".join(out)


# --- replay ------------------------------------------------------------------------------------


def replay_line(record: dict[str, Any]) -> str | None:
    """The NDJSON line to re-submit for ``record``, or None if its payload is still broken."""
    payload = record.get("payload")
    if not isinstance(payload, str):
        return None
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    source = record.get("source")
    if "source" not in event and source is not None:
        event["source"] = source
    elif "\n" not in payload and "\r" not in payload:
        # Unchanged and already one line: keep the exact text (re-serialising would round big
        # integers through float, as orjson parses them, and rewrite number formats for nothing).
        return payload.strip()
    return orjson.dumps(event).decode()


def replay_lines(records: Iterable[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(lines to re-submit, records whose payload still does not parse as a JSON object)``."""
    lines: list[str] = []
    broken: list[dict[str, Any]] = []
    for record in records:
        if not is_event_record(record):
            continue
        line = replay_line(record)
        if line is None:
            broken.append(record)
        else:
            lines.append(line)
    return lines, broken


def _replay_to(
    located: Iterable[tuple[Path | None, int, dict[str, Any]]], out_path: str | os.PathLike
) -> tuple[dict[str, Any], list[tuple[Path | None, int, dict[str, Any]]]]:
    """Write the replay file atomically (temp file, then rename): an error half-way through, such
    as a corrupt quarantine line, leaves no partial replay file to be fed to a run by mistake."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    replayed: Counter[str] = Counter()
    broken: list[tuple[Path | None, int, dict[str, Any]]] = []
    skipped = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for file, lineno, record in located:
                if not is_event_record(record):
                    skipped += 1
                    continue
                line = replay_line(record)
                if line is None:
                    broken.append((file, lineno, record))
                    continue
                f.write(line + "\n")
                replayed[_label(record.get("source"))] += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    counts = {
        "replayed": sum(replayed.values()),
        "still_malformed": len(broken),
        "by_source": dict(sorted(replayed.items())),
        "not_events": skipped,
    }
    return counts, broken


def is_event_record(record: dict[str, Any]) -> bool:
    """A record whose payload is an event to re-submit: not the dead letter of an identifier
    group, a person or a sink record (``subject``), nor the second record of an event that
    two steps failed on (``repeat``: the first one is replayed)."""
    return record.get("subject", "event") == "event" and not record.get("repeat")


def write_replay(records: Iterable[dict[str, Any]], out_path: str | os.PathLike) -> dict[str, Any]:
    """Write the replayable payloads to ``out_path`` as NDJSON.

    Returns ``{"replayed": n, "still_malformed": m, "by_source": {source: n}}``.
    """
    counts, _ = _replay_to(((None, 0, r) for r in records), out_path)
    return counts


# --- command entry points ----------------------------------------------------------------------


def _fail(message: str) -> int:
    print(f"cdi quarantine: {message}", file=sys.stderr)
    return EXIT_USAGE


def main_summarize(directory: str | os.PathLike) -> int:
    """Print the summary of the quarantine at ``directory``; 0, or 2 when unreadable."""
    try:
        summary = summarize(read_records(directory))
    except (OSError, ValueError) as e:
        return _fail(str(e))
    print(format_summary(summary))
    return EXIT_OK


def main_replay(directory: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the replay file; still-malformed records are listed on stderr (file:line, reason,
    origin, never the payload). 0 even then: the repaired ones were written; 2 when unreadable."""
    try:
        files = shard_files(directory)
        resolved_out = Path(out).resolve()
        if any(f.resolve() == resolved_out for f in files):
            return _fail(f"{out}: refusing to overwrite a quarantine file being read")
        counts, broken = _replay_to(read_located(directory), out)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    print(f"replayed {counts['replayed']:,} events to {out}")
    if counts["not_events"]:
        print(
            f"cdi quarantine: skipped {counts['not_events']:,} records that are not events to "
            "re-submit (dead letters of identifier groups, persons or sink records, and repeats)",
            file=sys.stderr,
        )
    if len(counts["by_source"]) > 1:
        # The dedup key uses the configured source name, not the payload's `source` field.
        sources = ", ".join(f"{s} ({n:,})" for s, n in counts["by_source"].items())
        print(
            f"cdi quarantine: note: events from several sources: {sources}; "
            "feed each through its own source so dedup keys match",
            file=sys.stderr,
        )
    if broken:
        print(
            f"cdi quarantine: {len(broken):,} records still malformed (payload not a JSON object):",
            file=sys.stderr,
        )
        for file, lineno, record in broken:
            print(
                f"  {file}:{lineno}: {_label(record.get('reason'))} "
                f"(origin {_label(record.get('origin'))})",
                file=sys.stderr,
            )
    return EXIT_OK
