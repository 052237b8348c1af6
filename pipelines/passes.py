"""A large bounded run in passes of at most N events, with the results of one run.

    cdi run --input 'events/*.ndjson' --output out --max-events-per-pass 250000

Why: Beam's in-process runner keeps every shuffle in memory, so a backfill's peak memory grows
with its size (5.7 GiB at 1M events). Cutting the input into passes caps what one pass holds;
what must stay together is what the job's keyed steps join:

- the copies of one idempotency key (dedup keeps the first the collector received);
- the identifiers of one identifier graph (stitching resolves a group as a whole; a person's
  consent, computed traits, profile and audiences follow from its identifiers' events);
- an ``unlink`` event with the identifier it names.

Planning reads the input once with the job's own validation (:meth:`ValidateEvents.judge_locally`:
the same verdict, the same identifiers and idempotency key) and puts each valid event's key and
identifiers into one union-find; the connected parts are packed into passes in order of first
appearance, none split (a part bigger than N is a pass of its own). A second read writes each
raw event, untouched (source, origin, payload), with its part's number, to its pass's file in
the raw-input archive format; each pass is then the ordinary job over those files
(``archive_globs``; after dedup each part is settled in one call, as no identifier graph or
person reaches past it: :class:`transforms.planned_parts.ResolvePlannedParts`), all passes
writing to the same output directory and store (each pass's record files named by pass), their
counters summed into one run report. With ``--workers W`` the passes run W at a time, each in
a fresh process (pipelines/cli.py): parts share nothing, so passes need no order; without a pass
size the parts are balanced over W passes (each to the lightest). Events that fail validation
(or make it raise) take a part of their own: the pass that reads them quarantines them exactly
as one run would.
Every pass judges event times against the planning time, so the verdicts cannot drift between
planning and the passes.

Planning memory is one union-find entry per idempotency key and per distinct identifier (a
64-bit hash each: a collision only puts two parts in one pass, which changes no result), and 16
bytes per event.
"""

from __future__ import annotations

import heapq
import math
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import ConfigError, PipelineConfig
from transforms.components import find_root

PASS_PREFIX = "pass"


@dataclass
class PassPlan:
    files: list[list[str]]  # the archive files of each pass
    events: int  # raw events read
    parts: int  # connected parts (valid events' key + identifier graphs, plus invalid events)
    largest_part: int  # events in the largest part
    pass_sizes: list[int]
    now_ms: int  # the read time every pass judges event times against
    seconds: float


def read_raw(config: PipelineConfig, inputs: dict[str, list[str]]) -> Iterator[tuple]:
    """Every raw event ``(source, origin, payload)`` of the file sources, as ``ReadFileSource``
    reads them: NDJSON lines as bytes without their line break (blank lines skipped), Avro
    records as dicts; ``origin`` the matched file's path."""
    import fastavro
    from apache_beam.io.filesystems import FileSystems

    for src in config.sources:
        if src.type != "files":
            where = f"{config.filename}: sources[{config.sources.index(src)}]"
            raise ConfigError(
                [f"{where}: --max-events-per-pass and --workers read file sources, not {src.type}"]
            )
        globs = inputs.get(src.name, [])
        for result in FileSystems.match(list(globs)):
            for meta in sorted(result.metadata_list, key=lambda m: m.path):
                with FileSystems.open(meta.path) as fh:
                    if src.format == "avro":
                        for record in fastavro.reader(fh):
                            yield src.name, meta.path, record
                        continue
                    for line in fh:
                        # Beam's text source splits on \n and on \r\n.
                        line = line[:-1] if line.endswith(b"\n") else line
                        line = line[:-1] if line.endswith(b"\r") else line
                        if line.strip():
                            yield src.name, meta.path, line


class _UnionFind:
    """Over 64-bit hashes of node names (the hand-written part: a dict and an array, because a
    general graph library would hold every name as an object)."""

    def __init__(self):
        self.index: dict[int, int] = {}
        self.parent = array("q")

    def node(self, name: str) -> int:
        h = hash(name)
        i = self.index.get(h)
        if i is None:
            i = self.index[h] = len(self.parent)
            self.parent.append(i)
        return i

    def find(self, i: int) -> int:
        return find_root(self.parent, i)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def event_nodes(env, config: PipelineConfig) -> list[str]:
    """What one valid event must share a pass with: its idempotency key, its identifiers and
    the identifier an ``unlink`` names."""
    from transforms.dedup import dedup_key
    from transforms.identity import id_key, identifiers_of
    from transforms.stitching import UNLINK_TYPE, unlink_target

    identity = config.identity
    nodes = ["k\x1e" + dedup_key(env.source, env.event, config.dedup.key)]
    nodes += ["i\x1e" + id_key(t, v) for t, v in identifiers_of(env, identity)]
    if env.event.get("type") == UNLINK_TYPE:
        other = unlink_target(env.event, identity)
        if other:
            nodes.append("i\x1e" + other)
    return nodes


def _in_order(sizes: list[int], max_events: int) -> list[int]:
    """Each part's pass: in order of first appearance, a new pass when the next would not fit."""
    assign, load, k = [], 0, 0
    for size in sizes:
        if load and load + size > max_events:
            k, load = k + 1, 0
        load += size
        assign.append(k)
    return assign


def _filled(sizes: list[int], order, n: int, max_events: float = math.inf) -> list[int]:
    """Parts in ``order``, each to the lightest of ``n`` passes when it fits there (else to a
    new pass: placed largest first, nothing fits anywhere else either), so no pass exceeds
    ``max_events`` and the passes stay near-equal (without a cap: ``n`` passes, the largest at
    most one part above the mean). O(parts x log passes)."""
    heap = [(0, k) for k in range(n)]
    assign = [0] * len(sizes)
    for i in order:
        load, k = heap[0]
        if load and load + sizes[i] > max_events:
            k, load = n, 0
            n += 1
        else:
            heapq.heappop(heap)
        assign[i] = k
        heapq.heappush(heap, (load + sizes[i], k))
    return assign


def pack_parts(sizes: list[int], max_events: int | None, workers: int = 1) -> list[int]:
    """The pass of each part (``sizes``: events per part, in order of first appearance).

    - one process (``workers`` 1): passes of at most ``max_events``, in order (a part bigger
      than that is a pass of its own);
    - ``workers`` W, no ``max_events``: W passes of near-equal size;
    - both: near-equal passes of at most ``max_events``, at least as many as the events need
      rounded up to a multiple of W (so every wave of W passes keeps every process busy),
      parts placed largest first; a part bigger than ``max_events`` is a pass of its own.
    Pass numbers are dense from 0 (no empty pass)."""
    if max_events is None:
        assign = _filled(sizes, range(len(sizes)), max(workers, 1))
    elif workers <= 1:
        assign = _in_order(sizes, max_events)
    else:
        small = [i for i, n in enumerate(sizes) if n <= max_events]
        total = sum(sizes[i] for i in small)
        n = max(workers, -(-total // max_events))
        n = -(-n // workers) * workers
        largest_first = sorted(small, key=lambda i: -sizes[i])
        assign = _filled(sizes, largest_first, n, max_events)
        used = max(assign, default=-1) + 1
        if used % workers:  # parts that fit nowhere opened passes: whole waves again, once
            assign = _filled(sizes, largest_first, -(-used // workers) * workers, max_events)
        n = max(assign, default=-1) + 1
        for i, size in enumerate(sizes):
            if size > max_events:
                assign[i], n = n, n + 1
    renumber: dict[int, int] = {}
    return [renumber.setdefault(k, len(renumber)) for k in assign]


def plan_passes(
    config: PipelineConfig,
    inputs: dict[str, list[str]],
    max_events: int | None,
    workdir: Path,
    *,
    balanced: int | None = None,
) -> PassPlan:
    """Read the input twice: parts by union-find, then each raw event to its pass's file, the
    passes as :func:`pack_parts` makes them (``balanced``: the number of processes)."""
    import fastavro

    from pipelines.governed_profiles import _validate, tracking_plans
    from transforms.io.files import ARCHIVE_SCHEMA, archive_record

    if max_events is not None and max_events < 1:
        raise ConfigError(["--max-events-per-pass: must be at least 1"])
    if max_events is None and (balanced is None or balanced < 1):
        raise ConfigError(["--workers: must be at least 1"])
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    judge = _validate(config, tracking_plans(config)).judge_locally()
    uf = _UnionFind()
    event_node = array("q")  # per raw event: its node, or -1 (invalid: a part of its own)
    for raw in read_raw(config, inputs):
        try:
            env, _ = judge(raw, now_ms)
            nodes = event_nodes(env, config) if env is not None else None
        except Exception:  # noqa: BLE001 (the pass judges it again: a dead letter, as in one run)
            nodes = None
        if nodes is None:
            event_node.append(-1)
            continue
        ids = [uf.node(n) for n in nodes]
        for other in ids[1:]:
            uf.union(ids[0], other)
        event_node.append(ids[0])
    # Parts in order of first appearance (an invalid event: a part of its own, key -1 - index).
    part_of: dict[int, int] = {}
    sizes: list[int] = []
    event_part = array("q")
    for n, i in enumerate(event_node):
        root = uf.find(i) if i >= 0 else -1 - n
        part = part_of.get(root)
        if part is None:
            part = part_of[root] = len(sizes)
            sizes.append(0)
        sizes[part] += 1
        event_part.append(part)
    del part_of, uf, event_node
    pass_of_part = pack_parts(sizes, max_events, balanced or 1)
    event_pass = array("l", (pass_of_part[part] for part in event_part))
    loads = [0] * (max(pass_of_part, default=0) + 1)  # an empty input: one empty pass
    for part, k in enumerate(pass_of_part):
        loads[k] += sizes[part]
    workdir.mkdir(parents=True, exist_ok=True)
    schema = fastavro.parse_schema(ARCHIVE_SCHEMA)
    paths = [workdir / f"{PASS_PREFIX}-{k:04d}.avro" for k in range(len(loads))]
    handles = [open(p, "wb") for p in paths]  # noqa: SIM115 (closed below, all at once)
    try:
        writers = [fastavro.write.Writer(h, schema) for h in handles]
        for k, part, raw in zip(event_pass, event_part, read_raw(config, inputs), strict=True):
            writers[k].write({**archive_record(raw), "part": part})
        for w in writers:
            w.flush()
    finally:
        for h in handles:
            h.close()
    return PassPlan(
        files=[[str(p)] for p in paths],
        events=len(event_pass),
        parts=len(sizes),
        largest_part=max(sizes, default=1),
        pass_sizes=loads,
        now_ms=now_ms,
        seconds=time.perf_counter() - started,
    )
