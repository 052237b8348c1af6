"""A large bounded run in passes of at most N events, with the results of one run.

    cdi run --input 'events/*.ndjson' --output out --max-events-per-pass 250000

Why: Beam's in-process runner keeps every shuffle in memory, so a backfill's peak memory grows
with its size (5.7 GiB at 1M events). Cutting the input into passes caps what one pass holds;
what must stay together is what the job's keyed steps join:

- the copies of one idempotency key (dedup keeps the first the collector received);
- the identifiers of one identifier graph (stitching resolves a group as a whole; a person's
  consent, computed traits, profile and audiences follow from its identifiers' events);
- an ``unlink`` event with the identifier it names.

Planning reads the input once with validation's own functions (decode, the envelope rules, the
identifiers and the idempotency key; not the event-time and plan checks, which only refuse
events, see :func:`_node_reader`) and puts each event's key and identifiers into one union-find; the
connected parts are packed into passes in order of first appearance, none split (a part bigger
than N is a pass of its own). A second read writes each raw event, untouched (source, origin,
payload), with its part's number, to its pass's file in the raw-input archive format, every part
whole in one file. Each pass is then the job over those files, with the same stages' functions:
each part is read whole and validated, deduplicated and settled in one call, as no copy of an
event, identifier graph or person reaches past it
(:class:`transforms.io.files.ReadPlannedParts`,
:class:`transforms.planned_parts.SettlePlannedParts`), all passes writing to the same output
directory and store (each pass's record files named by pass), their counters summed into one run
report. With ``--workers W`` the passes run W at a time in a pool of W processes, the one
that planned them (pipelines/cli.py): parts share nothing, so passes need no order; without a
pass size the parts are balanced over W passes (each to the lightest). Events that cannot be valid (or make reading
them raise) take a part of their own, and an event planning let through but a pass refuses only
joined a part: the pass quarantines it exactly as one run would.
Every pass judges event times against one read time, the planning's, so the passes' verdicts
are those of one run read at that time.

With ``--workers W`` above 1, planning's two reads run in W spawned processes too (they die with
``cdi run``; one that dies fails planning with that said). In the first, process j reads the
whole input but reads nodes only of the events whose index is j modulo W, and sends back their
node names' hashes; this process joins them into the union-find in input order, so the parts,
their numbers and the passes are exactly those of one process. In the second, process j writes
the parts p with p % W == j to files of its own, ``pass-KKKK-wJ.avro``: a pass has up to W
files, and every part is in one of them, in input order. Decoding and reading nodes is most of
planning's time (reading the lines is a few % of it); the union-find and packing stay in this
process.

Planning memory, in this process, is one union-find entry per idempotency key and per distinct
identifier (a 64-bit hash each, BLAKE2b: the same in every process, where ``hash()`` of a str
is not; a collision only puts two parts in one pass, which changes no result), and 16 bytes per
event. With W processes, also what they send back, until it is joined: 4 bytes per event and 8
per node name of a valid event (a generated event has 3 names); then, briefly, a copy of the
events' parts (8 bytes per event) per process it is sent to. Each of those processes holds its
own share of what is sent back while it reads nodes, and the events' parts while it writes.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from itertools import islice
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


def _refuse_other_sources(config: PipelineConfig) -> None:
    for i, src in enumerate(config.sources):
        if src.type != "files":
            where = f"{config.filename}: sources[{i}]"
            raise ConfigError(
                [f"{where}: --max-events-per-pass and --workers read file sources, not {src.type}"]
            )


def read_raw(config: PipelineConfig, inputs: dict[str, list[str]]) -> Iterator[tuple]:
    """Every raw event ``(source, origin, payload)`` of the file sources, as ``ReadFileSource``
    reads them: NDJSON lines as bytes without their line break (blank lines skipped), Avro
    records as dicts; ``origin`` the matched file's path."""
    import fastavro
    from apache_beam.io.filesystems import FileSystems

    _refuse_other_sources(config)
    for src in config.sources:
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


def node_hash(name: str) -> int:
    """A node name's 64-bit hash, the same in every process (``hash()`` of a str is salted per
    process, and planning's workers hash what the main process joins)."""
    return int.from_bytes(blake2b(name.encode(), digest_size=8).digest(), "little", signed=True)


class _UnionFind:
    """Over 64-bit hashes of node names (the hand-written part: a dict and an array, because a
    general graph library would hold every name as an object)."""

    def __init__(self):
        self.index: dict[int, int] = {}
        self.parent = array("q")

    def join(self, hashes: Iterable[int]) -> int:
        """Add one event's nodes, all into one part; its first node's index. Written out (no
        node/union calls): it runs for every node name read, and a new node (about half of
        them) needs no find, only its parent."""
        index, parent = self.index, self.parent
        first = root = -1
        for h in hashes:
            i = index.get(h)
            if i is None:  # new: a child of the event's root (its own root when the first)
                i = index[h] = len(parent)
                parent.append(root if root >= 0 else i)
                root = root if root >= 0 else i
            else:
                r = find_root(parent, i)
                if root < 0:
                    root = r
                elif r != root:  # two parts become one: the later root under the earlier
                    parent[max(r, root)] = root = min(r, root)
            if first < 0:
                first = i
        return first

    def find(self, i: int) -> int:
        return find_root(self.parent, i)


def event_nodes(env, config: PipelineConfig) -> list[str]:
    """What one valid event must share a pass with: its idempotency key, its identifiers and
    the identifier an ``unlink`` names."""
    from transforms.identity import identifiers_of

    return event_nodes_of(env.source, env.event, identifiers_of(env, config.identity), config)


def event_nodes_of(source: str, event: dict, identifiers, config: PipelineConfig) -> list[str]:
    """:func:`event_nodes` of an event read from ``source`` with its usable ``identifiers``."""
    from transforms.dedup import dedup_key
    from transforms.identity import id_key
    from transforms.stitching import UNLINK_TYPE, unlink_target

    nodes = ["k\x1e" + dedup_key(source, event, config.dedup.key)]
    nodes += ["i\x1e" + id_key(t, v) for t, v in identifiers]
    if event.get("type") == UNLINK_TYPE:
        other = unlink_target(event, config.identity)
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


# Fields validation itself writes into an event (a clamped event time, rule-mode notes): a key
# or identifier read from there is known only to the whole verdict.
_WRITTEN_BY_VALIDATION = "context.cdi"


def _node_reader(config: PipelineConfig):
    """``nodes(raw, now_ms)``: the node names of one raw event, or None (a part of its own).

    Planning needs every event that the passes will judge valid to meet its idempotency key,
    identifiers and unlink target, no more: more only joins parts (coarser passes, the same
    results). So it reads what validation reads them from, the decoded event, and drops an
    event only on what keeps it out of every part: a payload that does not decode, the
    envelope rules (type, messageId, an identifier: without a messageId every such event would
    share one key and their persons one part) or no usable identifier. The event time and the
    tracking plan, most of the verdict's cost, are left to the passes: an event they refuse
    only joined a part. A rule mode (``omit``) can remove a field the key is read from, so the
    passes key the event by its ``messageId`` instead: a source with rule modes gives both
    keys. Where the config reads a key or an identifier from what validation writes into the
    event, the whole verdict is taken instead."""
    from pipelines.governed_profiles import _validate, tracking_plans

    identity, key_paths = config.identity, config.dedup.key
    paths = [*key_paths, *(p for t in identity.types for p in t.paths)]
    if any(p.startswith(_WRITTEN_BY_VALIDATION) for p in paths):
        verdict = _validate(config, tracking_plans(config)).judge_locally()

        def judged(raw, now_ms: int) -> list[str] | None:
            env, _ = verdict(raw, now_ms)
            return None if env is None else event_nodes(env, config)

        return judged

    from transforms.dedup import message_id_key
    from transforms.validate import read_envelope

    max_bytes = config.validation.max_event_bytes
    moded = {s.name for s in config.sources if s.violations}

    def nodes(raw, now_ms: int) -> list[str] | None:
        _, event, _, ids, _, refusal = read_envelope(raw[2], max_bytes, identity)
        if refusal is not None:
            return None
        names = event_nodes_of(raw[0], event, ids, config)
        if raw[0] in moded:
            names.append("k\x1e" + message_id_key(raw[0], event))
        return names

    return nodes


def _node_hashes(nodes_of, raw, now_ms: int) -> list[int] | None:
    """The hashes of what one raw event must share a pass with (``nodes_of``:
    :func:`_node_reader`'s), or None: it cannot be valid, or reading it raised (the pass judges
    it: a dead letter, as in one run)."""
    try:
        nodes = nodes_of(raw, now_ms)
        return None if nodes is None else [node_hash(n) for n in nodes]
    except Exception:  # noqa: BLE001
        return None


def _nodes_share(
    config: PipelineConfig, inputs: dict[str, list[str]], now_ms: int, j: int, w: int
) -> tuple[array, array]:
    """Worker ``j`` of ``w``: the events whose index is ``j`` modulo ``w`` (reading the lines is
    cheap, their nodes are not), as each one's number of node hashes (-1: invalid) and all of
    them in order; two flat arrays, as a list per event would cost far more to hold and send."""
    nodes_of = _node_reader(config)
    counts, hashes = array("i"), array("q")
    for raw in islice(read_raw(config, inputs), j, None, w):
        nodes = _node_hashes(nodes_of, raw, now_ms)
        counts.append(-1 if nodes is None else len(nodes))
        hashes.extend(nodes or ())
    return counts, hashes


def _interleaved(shares: list[tuple[array, array]]) -> Iterator[Sequence[int] | None]:
    """Each event's node hashes (None: invalid) in input order, from ``_nodes_share``'s shares
    (event ``i`` is in share ``i % len(shares)``): what the serial read yields."""
    w, cursors = len(shares), [0] * len(shares)
    for i in range(sum(len(counts) for counts, _ in shares)):
        counts, hashes = shares[i % w]
        n = counts[i // w]
        if n < 0:
            yield None
            continue
        at = cursors[i % w]
        cursors[i % w] = at + n
        yield hashes[at : at + n]


def _connected(judged: Iterable[Sequence[int] | None]) -> tuple[_UnionFind, array]:
    """The union-find of every valid event's nodes, and per event its first node (or -1)."""
    uf = _UnionFind()
    event_node = array("q")
    for hashes in judged:
        event_node.append(-1 if hashes is None else uf.join(hashes))
    return uf, event_node


def _parts(uf: _UnionFind, event_node: array) -> tuple[array, list[int]]:
    """Each event's part and each part's size, parts numbered in order of first appearance (an
    invalid event: a part of its own, key -1 - index)."""
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
    return event_part, sizes


def _pass_files(workdir: Path, pass_of_part: Sequence[int], passes: int, w: int) -> list[dict]:
    """Per writer ``j`` of ``w``: pass -> the file of that pass's parts ``p`` with ``p % w ==
    j`` (so a part is always in one file), only where it has some; one writer: every pass's
    one file (an empty input: pass 0's, empty)."""
    if w == 1:
        return [{k: str(workdir / f"{PASS_PREFIX}-{k:04d}.avro") for k in range(passes)}]
    used = {(k, p % w) for p, k in enumerate(pass_of_part)} or {(0, 0)}
    files: list[dict] = [{} for _ in range(w)]
    for k, j in sorted(used):
        files[j][k] = str(workdir / f"{PASS_PREFIX}-{k:04d}-w{j}.avro")
    return files


def _write_share(
    config: PipelineConfig,
    inputs: dict[str, list[str]],
    event_part: array,
    pass_of_part: array,
    paths: dict[int, str],
    j: int,
    w: int,
) -> int:
    """Writer ``j`` of ``w``: each raw event of a part ``p`` with ``p % w == j``, untouched,
    with its part, to ``paths[its pass]``, in input order; how many it wrote."""
    import fastavro

    from transforms.io.files import ARCHIVE_SCHEMA, archive_record

    schema = fastavro.parse_schema(ARCHIVE_SCHEMA)
    written = 0
    with contextlib.ExitStack() as files:
        writers = {
            k: fastavro.write.Writer(files.enter_context(open(path, "wb")), schema)
            for k, path in paths.items()
        }
        # strict: the input changed between the two reads (the plan would not match it).
        for part, raw in zip(event_part, read_raw(config, inputs), strict=True):
            if part % w == j:
                writers[pass_of_part[part]].write({**archive_record(raw), "part": part})
                written += 1
        for writer in writers.values():
            writer.flush()
    return written


@contextlib.contextmanager
def worker_pool(w: int, initializer=None, initargs: tuple = ()):
    """``w`` spawned processes (no forked Beam threads) that die with this one, however it dies
    (``initializer``, default :func:`runners.local.die_with_parent`, must do that). ``cdi run``
    plans and runs its passes in one such pool (pipelines/cli.py): each process pays Python's
    and Beam's start once."""
    import concurrent.futures
    import multiprocessing

    from runners.local import die_with_parent

    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=w,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=initializer or die_with_parent,
        initargs=initargs,
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _on_workers(pool, fn, jobs: list[tuple]) -> list:
    """``fn(*job)`` of each job, in the pool, the results in order. A process that dies (killed,
    out of memory) breaks the pool, which fails every pending call: planning stops with that
    said, never waits on it nor goes on with a partial plan."""
    from concurrent.futures.process import BrokenProcessPool

    try:  # a process that died while idle, between the reads, fails the next submit
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]
    except BrokenProcessPool as e:
        raise RuntimeError(f"planning the passes: a worker process died: {e}") from e


def _first_read(pool, config: PipelineConfig, inputs, now_ms: int, w: int):
    """The union-find of every valid event's nodes and each event's first node (-1: invalid),
    read in this process (no ``pool``) or in the pool's ``w`` processes."""
    if pool is None:
        nodes_of = _node_reader(config)
        return _connected(_node_hashes(nodes_of, raw, now_ms) for raw in read_raw(config, inputs))
    shares = _on_workers(pool, _nodes_share, [(config, inputs, now_ms, j, w) for j in range(w)])
    return _connected(_interleaved(shares))


def _second_read(pool, config: PipelineConfig, inputs, event_part, pass_of_part, paths) -> None:
    """Every raw event to its pass's file, ``paths`` per writer (:func:`_pass_files`): in this
    process (no ``pool``) or one writer per process."""
    w = len(paths)
    jobs = [(config, inputs, event_part, pass_of_part, mine, j, w) for j, mine in enumerate(paths)]
    jobs = [job for job in jobs if job[4]]  # a writer with no part would read for nothing
    if pool is None:
        written = [_write_share(*job) for job in jobs]
    else:
        written = _on_workers(pool, _write_share, jobs)
    if sum(written) != len(event_part):  # each event is some writer's: else a bug lost some
        raise RuntimeError(f"planning the passes: wrote {sum(written)} of {len(event_part)} events")


def plan_passes(
    config: PipelineConfig,
    inputs: dict[str, list[str]],
    max_events: int | None,
    workdir: Path,
    *,
    balanced: int | None = None,
    processes: int | None = None,
    pool=None,
) -> PassPlan:
    """Read the input twice: parts by union-find, then each raw event to its pass's file, the
    passes as :func:`pack_parts` makes them (``balanced``: the number of processes that will
    run them). ``processes`` (default: ``balanced``) do the reading; more than one spreads each
    pass over up to that many files, and changes nothing else: not the parts, their numbers, the
    passes nor their events. ``pool``: a :func:`worker_pool` of that many processes to read in
    (default: one of its own, for the time of planning)."""
    if max_events is not None and max_events < 1:
        raise ConfigError(["--max-events-per-pass: must be at least 1"])
    if max_events is None and (balanced is None or balanced < 1):
        raise ConfigError(["--workers: must be at least 1"])
    # Here, not in each worker: refused at once, before W processes start for nothing.
    _refuse_other_sources(config)
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)  # one read time for every worker and every pass
    w = max(processes or balanced or 1, 1)
    if pool is not None or w == 1:
        own = contextlib.nullcontext(pool)
    else:
        own = worker_pool(w)
    with own as pool:
        event_part, sizes = _parts(*_first_read(pool, config, inputs, now_ms, w))
        pass_of_part = array("q", pack_parts(sizes, max_events, balanced or 1))
        loads = [0] * (max(pass_of_part, default=0) + 1)  # an empty input: one empty pass
        for part, k in enumerate(pass_of_part):
            loads[k] += sizes[part]
        workdir.mkdir(parents=True, exist_ok=True)
        paths = _pass_files(workdir, pass_of_part, len(loads), w)
        _second_read(pool, config, inputs, event_part, pass_of_part, paths)
    files: list[list[str]] = [[] for _ in loads]
    for mine in paths:
        for k, path in mine.items():
            files[k].append(path)
    return PassPlan(
        files=files,
        events=len(event_part),
        parts=len(sizes),
        largest_part=max(sizes, default=1),
        pass_sizes=loads,
        now_ms=now_ms,
        seconds=time.perf_counter() - started,
    )
