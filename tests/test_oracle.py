"""Differential tests: the pipeline's profile rows equal the reference oracle's.

The oracle (``benchmarks/oracle.py``) answers every question of the job with a plain loop over
all events at once; the pipeline answers them in keyed state, stage by stage. Random generated
streams (identify/alias flows, multi-device persons, consent changes, junk ids, duplicates,
invalid lines) plus random ``delete`` and ``unlink`` control events, shuffled and partly
duplicated, must give the same rows, ``version`` aside (it counts panes, so it depends on
bundling).
"""

from __future__ import annotations

import dataclasses
import os
import random

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from benchmarks.oracle import _latest_pane, _session_windows, differences, run_oracle, sink_rows
from pipelines import governed_profiles as job
from pipelines.config import load_default_config
from pipelines.generate import generate
from tests.conftest import make_pipeline
from transforms.computed_traits import ComputedTraitSpec
from transforms.identity import extract_identifiers


def _objects(lines: list[str]) -> list[dict]:
    """The lines that parse as JSON objects (the generated stream has invalid lines too)."""
    out = []
    for line in lines:
        try:
            e = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(e, dict):
            out.append(e)
    return out


def _control_events(lines: list[str], rng: random.Random, deletes: int, unlinks: int) -> list[str]:
    """``delete`` and ``unlink`` events about identifiers the generated stream really uses."""
    events = [e for e in _objects(lines) if isinstance(e.get("originalTimestamp"), str)]
    users = [e for e in events if e.get("userId")]
    devices = [e for e in events if (e.get("context") or {}).get("device", {}).get("id")]
    out = []
    for i in range(deletes):
        e = rng.choice(events)
        who = {"userId": e["userId"]} if e.get("userId") else {"anonymousId": e.get("anonymousId")}
        out.append(
            {"type": "delete", "messageId": f"del-{i}", "timestamp": e["originalTimestamp"], **who}
        )
    for i in range(unlinks):
        if not users:
            break
        u = rng.choice(users)
        if devices and rng.random() < 0.5:
            target = {"type": "device_id", "value": rng.choice(devices)["context"]["device"]["id"]}
        else:
            target = {"type": "anonymous_id", "value": rng.choice(events).get("anonymousId")}
        out.append(
            {
                "type": "unlink",
                "messageId": f"unl-{i}",
                "userId": u["userId"],
                "timestamp": u["originalTimestamp"],
                "properties": {"identifier": target},
            }
        )
    return [orjson.dumps(e).decode() for e in out if e.get("userId") or e.get("anonymousId")]


def _pipeline_rows(tmp_path, config, src) -> dict[str, dict]:
    out = tmp_path / "out"
    with make_pipeline() as p:
        job.write_outputs(job.build(p, config, {"web": [str(src)]}), config, out)
    return sink_rows(out / "profiles.sqlite")


@settings(
    max_examples=int(os.environ.get("CDI_DIFF_EXAMPLES", "6")),  # more: CDI_DIFF_EXAMPLES=40
    deadline=None,
    # Each example runs a whole pipeline (~3 s): report the failing example, do not shrink it.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10_000),
    events=st.integers(60, 240),
    persons=st.integers(4, 30),
    deletes=st.integers(0, 2),
    unlinks=st.integers(0, 3),
    dup_share=st.sampled_from([0.0, 0.2]),
    listed=st.booleans(),
)
def test_pipeline_profiles_equal_the_oracle(
    tmp_path_factory, seed, events, persons, deletes, unlinks, dup_share, listed
):
    tmp_path = tmp_path_factory.mktemp("diff")
    rng = random.Random(seed)
    lines, _ = generate(events, persons, seed)
    lines += _control_events(lines, rng, deletes, unlinks)
    lines += [x for x in lines if rng.random() < dup_share]  # replayed copies
    rng.shuffle(lines)
    src = tmp_path / "events.ndjson"
    src.write_text("\n".join(lines) + "\n")
    config = load_default_config()
    if listed:  # a person deleted by configuration, not by a delete event
        who = next(
            (
                f"{t}:{v}"
                for e in _objects(lines)
                for t, v in extract_identifiers(e, config.identity)
            ),
            None,
        )
        privacy = dataclasses.replace(config.privacy, deleted_identifiers=(who,) if who else ())
        config = dataclasses.replace(config, privacy=privacy)
    expected = run_oracle(config, {"web": [str(src)]})["profiles"]
    actual = _pipeline_rows(tmp_path, config, src)
    assert differences(expected, actual) == []
    assert expected  # the comparison was about something


def test_the_comparison_sees_a_changed_trait_and_a_missing_row():
    a = {"p1": {"profile_id": "p1", "traits": "{}"}, "p2": {"profile_id": "p2"}}
    b = {"p1": {"profile_id": "p1", "traits": '{"plan":"pro"}'}}
    diff = differences(a, b)
    assert len(diff) == 2 and "traits" in diff[0] and "only in oracle" in diff[1]


def test_oracle_sessions_and_latest_window():
    assert _session_windows([10, 0, 25, 100], 15) == [(0, 40), (100, 115)]
    spec = ComputedTraitSpec("n", "count", window="session", gap_ms=15)
    assert _latest_pane(spec, [(0, None), (10, None), (100, None)]) == [
        115,
        100,
        0,
        1,
        "accumulating",
    ]
    fixed = ComputedTraitSpec("n", "count", window="fixed", size_ms=100)
    assert _latest_pane(fixed, [(5, None), (150, None), (199, None)])[:2] == [200, 100]
    assert _latest_pane(fixed, [(5, None), (150, None), (199, None)])[3] == 2
