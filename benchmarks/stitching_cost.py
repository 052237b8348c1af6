"""What identity stitching costs: state bytes per identifier and time per event, on generated data.

    python -m benchmarks.stitching_cost --events 100000 --persons 5000

- **State per identifier**: the ``Propagate`` cell of every identifier (label, neighbours with the
  earliest evidence of each link, flags), built by the same ``_step`` the stage runs and encoded
  with the stage's coder, so the bytes are what the runner stores; ``ResolveGroup`` keeps the same
  neighbour lists once more per group, so a run stores about ``max_hops + 1`` times this.
- **Time per event**: ``StitchIdentities`` alone on the offline local runner, minus a baseline
  pipeline over the same elements (create + a pass-through map) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import apache_beam as beam
import orjson
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import TimestampedValue

from pipelines.config import load_default_config
from pipelines.generate import generate
from runners.local import runner_flag
from transforms.envelope import Envelope, corrected_event_time_ms
from transforms.stitching import StitchIdentities, _PropagateFn, stitch_messages


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


def state_sizes(envelopes: list[Envelope], identity, cap: int) -> list[int]:
    """Encoded bytes of each identifier's Propagate[1] cell after every event is applied."""
    fn = _PropagateFn(first=True, last=False, cap=cap)
    cells: dict[str, tuple] = {}
    for env in envelopes:
        for x, msg in stitch_messages(env.event, env.event_time_ms, identity):
            label, nbrs, attrs = cells.get(x) or (x, {}, {})
            _, _, new_label, _ = fn._step(x, msg, label, nbrs, attrs)
            cells[x] = (new_label, nbrs, attrs)
    coder = FastPrimitivesCoder()
    return [len(coder.encode(cell)) for cell in cells.values()]


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
    sizes = sorted(state_sizes(envs, identity, identity.max_cluster_size))
    print(f"unique events {len(envs):,}; identifiers in the graph {len(sizes):,}")
    print(
        f"Propagate cell per identifier: mean {statistics.mean(sizes):.0f} B, "
        f"median {sizes[len(sizes) // 2]} B, p99 {sizes[int(len(sizes) * 0.99)]} B, "
        f"max {sizes[-1]} B; all cells {sum(sizes) / 2**20:.1f} MiB per stage, "
        f"~{sum(sizes) * (identity.max_hops + 1) / 2**20:.1f} MiB for {identity.max_hops} "
        f"stages + ResolveGroup"
    )
    base = _timed_run(envs, lambda pc: pc | beam.Map(lambda e: e))
    stitch = StitchIdentities(identity, config.privacy.deleted_identifiers, identity.max_hops)
    stitched = _timed_run(envs, lambda pc: (pc | stitch)["assignments"])
    per_event = (stitched - base) / len(envs) * 1e6
    print(
        f"baseline (create + map) {base:.1f} s; with StitchIdentities {stitched:.1f} s; "
        f"stitching {per_event:.0f} us/event ({len(envs) / max(stitched - base, 1e-9):,.0f} "
        f"events/s on one core)"
    )


if __name__ == "__main__":
    main()
