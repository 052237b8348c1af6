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
raw event, untouched (source, origin, payload), to its pass's file in the raw-input archive
format; each pass is then the ordinary job over those files (``archive_globs``), all passes
writing to the same output directory and store (each pass's record files named by pass), their
counters summed into one run report. With ``--workers W`` the passes run W at a time, each in
a fresh process (pipelines/cli.py): parts share nothing, so passes need no order; without a pass
size the parts are balanced over W passes (each to the lightest). Events that fail validation
take a part of their own: the pass that reads them quarantines them exactly as one run would.
Every pass judges event times against the planning time, so the verdicts cannot drift between
planning and the passes.

Planning memory is one union-find entry per idempotency key and per distinct identifier (a
64-bit hash each: a collision only puts two parts in one pass, which changes no result), and 8
bytes per event.
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import ConfigError, PipelineConfig

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
            raise ConfigError(
                [f"sources.{src.name}: --max-events-per-pass reads file sources, not {src.type}"]
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
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

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


class _InOrder:
    """Parts in order of first appearance, a new pass when the next part would not fit."""

    def __init__(self, max_events: int):
        self.max_events = max_events
        self.loads = [0]

    def place(self, size: int) -> int:
        if self.loads[-1] and self.loads[-1] + size > self.max_events:
            self.loads.append(0)
        self.loads[-1] += size
        return len(self.loads) - 1


class _Balanced:
    """Each part to the pass with the fewest events so far: ``n`` passes of near-equal size,
    for ``n`` processes that run at once (parts are small: a person's events)."""

    def __init__(self, n: int):
        self.loads = [0] * n
        self._heap = [(0, k) for k in range(n)]

    def place(self, size: int) -> int:
        load, k = heapq.heappop(self._heap)
        self.loads[k] = load + size
        heapq.heappush(self._heap, (load + size, k))
        return k


def plan_passes(
    config: PipelineConfig,
    inputs: dict[str, list[str]],
    max_events: int | None,
    workdir: Path,
    *,
    balanced: int | None = None,
) -> PassPlan:
    """Read the input twice: parts by union-find, then each raw event to its pass's file.
    Passes of at most ``max_events`` in order of first appearance, or, without it, ``balanced``
    passes of near-equal size."""
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
    invalid = 0
    for raw in read_raw(config, inputs):
        env, _ = judge(raw, now_ms)
        if env is None:
            event_node.append(-1)
            invalid += 1
            continue
        ids = [uf.node(n) for n in event_nodes(env, config)]
        for other in ids[1:]:
            uf.union(ids[0], other)
        event_node.append(ids[0])
    sizes: dict[int, int] = {}
    for i in event_node:
        if i >= 0:
            root = uf.find(i)
            sizes[root] = sizes.get(root, 0) + 1
    # Parts in order of first appearance, each placed whole.
    packer = _InOrder(max_events) if max_events is not None else _Balanced(balanced)
    pass_of_root: dict[int, int] = {}
    event_pass = array("l")
    for i in event_node:
        root = uf.find(i) if i >= 0 else -1
        if root >= 0 and root in pass_of_root:
            event_pass.append(pass_of_root[root])
            continue
        k = packer.place(sizes[root] if root >= 0 else 1)
        if root >= 0:
            pass_of_root[root] = k
        event_pass.append(k)
    # Fewer parts than balanced passes: no empty pass (but one pass for an empty input).
    kept = [k for k, n in enumerate(packer.loads) if n] or [0]
    loads = [packer.loads[k] for k in kept]
    if len(kept) < len(packer.loads):
        renumber = {k: j for j, k in enumerate(kept)}
        event_pass = array("l", (renumber[k] for k in event_pass))
    del uf, event_node, pass_of_root
    workdir.mkdir(parents=True, exist_ok=True)
    schema = fastavro.parse_schema(ARCHIVE_SCHEMA)
    paths = [workdir / f"{PASS_PREFIX}-{k:04d}.avro" for k in range(len(loads))]
    handles = [open(p, "wb") for p in paths]  # noqa: SIM115 (closed below, all at once)
    try:
        writers = [fastavro.write.Writer(h, schema) for h in handles]
        for k, raw in zip(event_pass, read_raw(config, inputs), strict=True):
            writers[k].write(archive_record(raw))
        for w in writers:
            w.flush()
    finally:
        for h in handles:
            h.close()
    return PassPlan(
        files=[[str(p)] for p in paths],
        events=len(event_pass),
        parts=len(sizes) + invalid,
        largest_part=max(sizes.values(), default=1),
        pass_sizes=loads,
        now_ms=now_ms,
        seconds=time.perf_counter() - started,
    )
