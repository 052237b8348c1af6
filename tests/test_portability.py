"""Portability guard: the job's graph, batch and streaming, uses only what every production runner
(Dataflow, Flink, Prism) executes, so a new stage cannot silently break one of them.

Checked on the Runner API proto Beam hands a portable runner:
- every leaf transform is a standard primitive (ParDo, GroupByKey, Flatten, Impulse,
  WindowInto); the one Python-only leaf allowed is Beam's own ``Create`` internals
  (``MaybeReshuffle``), which the SDK expands before a runner sees it;
- every stateful or timer-using ParDo reads KVs whose key coder is deterministic (state is keyed
  by the key's encoded bytes: a pickled key would scatter one key's state);
- state kinds are ReadModifyWrite, Bag or Combining, timers are in event or processing time:
  the kinds Flink's, Dataflow's and Prism's portable state APIs all serve.
"""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import governed_profiles as job
from pipelines.config import load_config
from tests.conftest import REPO

PRIMITIVES = {
    "beam:transform:pardo:v1",
    "beam:transform:group_by_key:v1",
    "beam:transform:flatten:v1",
    "beam:transform:impulse:v1",
    "beam:transform:window_into:v1",
}
# Coders whose encoding of equal values is equal bytes (Beam's deterministic standard coders).
DETERMINISTIC = {
    "beam:coder:bytes:v1",
    "beam:coder:string_utf8:v1",
    "beam:coder:varint:v1",
    "beam:coder:bool:v1",
    "beam:coder:double:v1",
    "beam:coder:kv:v1",
    "beam:coder:tuple:v1",
    "beam:coder:nullable:v1",
    "beam:coder:length_prefix:v1",
}
STATE_KINDS = {"read_modify_write_spec", "bag_spec", "combining_spec"}


def graph(bounded: bool) -> beam_runner_api_pb2.Pipeline:
    cfg = load_config(REPO / "schemas" / "configs" / "example.yaml")
    p = beam.Pipeline(options=PipelineOptions([]))
    job.write_outputs(job.build(p, cfg, {"web": ["/in/*.ndjson"]}, bounded=bounded), cfg, "/out")
    return p.to_runner_api()


def deterministic(coders, coder_id: str) -> bool:
    coder = coders[coder_id]
    return coder.spec.urn in DETERMINISTIC and all(
        deterministic(coders, c) for c in coder.component_coder_ids
    )


@pytest.mark.parametrize("bounded", [True, False], ids=["batch", "streaming"])
def test_only_portable_primitives(bounded):
    proto = graph(bounded)
    for t in proto.components.transforms.values():
        if t.subtransforms:
            continue
        if t.spec.urn == "beam:transform:pickled_python:v1":
            assert t.unique_name.endswith("/MaybeReshuffle"), t.unique_name
        else:
            assert t.spec.urn in PRIMITIVES, (t.unique_name, t.spec.urn)


def stateful_pardos(proto):
    for t in proto.components.transforms.values():
        if t.spec.urn != "beam:transform:pardo:v1":
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
        if payload.state_specs or payload.timer_family_specs:
            yield t, payload


@pytest.mark.parametrize("bounded", [True, False], ids=["batch", "streaming"])
def test_keyed_state_is_keyed_by_deterministic_bytes_with_portable_state_kinds(bounded):
    proto = graph(bounded)
    comps = proto.components
    seen = []
    for t, payload in stateful_pardos(proto):
        seen.append(t.unique_name)
        main = next(
            pc for tag, pc in t.inputs.items() if tag not in payload.side_inputs
        )  # the main input
        kv = comps.coders[comps.pcollections[main].coder_id]
        assert kv.spec.urn == "beam:coder:kv:v1", t.unique_name
        assert deterministic(comps.coders, kv.component_coder_ids[0]), (
            t.unique_name,
            comps.coders[kv.component_coder_ids[0]].spec.urn,
        )
        for name, spec in payload.state_specs.items():
            assert spec.WhichOneof("spec") in STATE_KINDS, (t.unique_name, name)
        for name, spec in payload.timer_family_specs.items():
            assert spec.time_domain in (
                beam_runner_api_pb2.TimeDomain.EVENT_TIME,
                beam_runner_api_pb2.TimeDomain.PROCESSING_TIME,
            ), (t.unique_name, name)
    if not bounded:  # the streaming stages are the stateful ones: the check must see them
        names = " ".join(seen)
        for stage in ("DeduplicateEvents", "EnforceConsent", "ComputeTraits", "UnifyProfiles"):
            assert stage in names, stage
