"""What identity stitching costs: state bytes per identifier and time per event, on generated data.

    python -m benchmarks.stitching_cost --events 100000 --persons 5000

- **State per identifier** of a streaming run: the ``Link`` cell of every identifier (neighbours
  with the earliest evidence of each link, flags) and its cluster in each ``Connect[k]`` stage,
  built by the same functions the stages run (``_step``, ``absorb``) and encoded with the stages'
  coder, so the bytes are what the runner stores; ``Route`` and ``ResolveGroup`` keep the
  neighbour lists once more each.
- **Time per event**: ``StitchIdentities`` alone on the offline local runner, bounded stages and
  streaming stages, minus a baseline pipeline over the same elements (create + a pass-through
  map) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque

import apache_beam as beam
import orjson
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import TimestampedValue

from pipelines.config import load_default_config
from pipelines.generate import generate
from runners.local import runner_flag
from transforms.components import absorb
from transforms.envelope import Envelope, corrected_event_time_ms
from transforms.stitching import StitchIdentities, _LinkFn, stitch_messages


def unique_envelopes(events: int, persons: int, seed: int = 42) -> list[Envelope]:
    """Generated events that decode, once each (payload left out: stitching never reads it)."""
    lines, _ = generate(events, persons, seed)
    seen, out = set(), []
    for line in lines:
        try:
            e = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(e, dict) or e.get("messageId") in seen:
            continue
        t = corrected_event_time_ms(e)
        if t is None:
            continue
        seen.add(e.get("messageId"))
        out.append(Envelope("web", "", "", e, t))
    return out


def state_sizes(envelopes: list[Envelope], identity, cap: int, rounds: int):
    """Encoded bytes of each identifier's ``Link`` cell, and of its cluster in each
    ``Connect[k]``, after every event is applied (one message at a time, as streaming does)."""
    fn = _LinkFn(cap)
    cells: dict[str, tuple] = {}
    stages: list[dict[str, frozenset]] = [{} for _ in range(rounds)]
    queue: deque = deque()
    for env in envelopes:
        for x, msg in stitch_messages(env.event, env.event_time_ms, identity):
            nbrs, attrs = cells.get(x) or ({}, {})
            _, new, _, _ = fn._step(x, msg, nbrs, attrs)
            cells[x] = (nbrs, attrs)
            if new is not None:
                queue.append((0, x, (x, new)))
            while queue:
                k, v, nodes = queue.popleft()
                cluster, out = absorb(v, stages[k].get(v), nodes)
                stages[k][v] = cluster
                if k + 1 < rounds:
                    queue.extend((k + 1, key, m) for key, m in out)
    coder = FastPrimitivesCoder()
    link = [len(coder.encode(cell)) for cell in cells.values()]
    connect = [[len(coder.encode(c)) for c in stage.values()] for stage in stages]
    return link, connect


def _timed_run(envelopes: list[Envelope], body) -> float:
    options = PipelineOptions([f"--runner={runner_flag('local')}"])
    started = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        timed = (
            p
            | beam.Create(envelopes, reshuffle=False)
            | beam.Map(lambda e: TimestampedValue(e, e.event_time_ms / 1000))
        )
        body(timed) | beam.combiners.Count.Globally()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--persons", type=int, default=5_000)
    args = ap.parse_args(argv)
    config = load_default_config()
    identity = config.identity
    envs = unique_envelopes(args.events, args.persons)
    link, connect = state_sizes(envs, identity, identity.max_cluster_size, identity.rounds)
    sizes = sorted(link)
    print(f"unique events {len(envs):,}; identifiers in the graph {len(sizes):,}")
    print(
        f"Link cell per identifier: mean {statistics.mean(sizes):.0f} B, "
        f"median {sizes[len(sizes) // 2]} B, p99 {sizes[int(len(sizes) * 0.99)]} B, "
        f"max {sizes[-1]} B; all cells {sum(sizes) / 2**20:.1f} MiB"
    )
    total = sum(sum(stage) for stage in connect)
    largest = max((max(stage) for stage in connect if stage), default=0)
    print(
        f"Connect clusters: {identity.rounds} stages, {total / 2**20:.1f} MiB in all, "
        f"{total / max(len(sizes), 1) / identity.rounds:.0f} B per identifier per stage, "
        f"largest cell {largest} B"
    )
    base = _timed_run(envs, lambda pc: pc | beam.Map(lambda e: e))
    print(f"baseline (create + map) {base:.1f} s")
    for bounded in (True, False):
        stitch = StitchIdentities(
            identity, config.privacy.deleted_identifiers, identity.rounds, bounded=bounded
        )
        stitched = _timed_run(envs, lambda pc, s=stitch: (pc | s)["assignments"])
        per_event = (stitched - base) / len(envs) * 1e6
        print(
            f"{'bounded' if bounded else 'streaming'} stages: with StitchIdentities "
            f"{stitched:.1f} s; stitching {per_event:.0f} us/event "
            f"({len(envs) / max(stitched - base, 1e-9):,.0f} events/s on one core)"
        )


if __name__ == "__main__":
    main()
