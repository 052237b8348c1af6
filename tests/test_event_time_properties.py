"""Results are a function of the events and their event times alone: TestStream scenarios across
the dedup -> computed traits -> profile chain, and a hypothesis property over the whole job."""

import sqlite3

import apache_beam as beam
import orjson
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import governed_profiles as job
from pipelines.config import IdentityConfig
from tests.conftest import config_from, event, make_pipeline
from transforms.computed_traits import ComputedTraitSpec, ComputeTraits
from transforms.dedup import DeduplicateEvents
from transforms.envelope import Envelope
from transforms.profile import BuildProfiles, TraitRules

IDENTITY = IdentityConfig()
S = 1000


def ident(mid, t_s, **traits):
    e = event(
        messageId=mid, type="identify", userId="u1", traits=traits, event=None, properties=None
    )
    return Envelope("web", "f", mid, e, t_s * S, "v")


def track(mid, t_s):
    return Envelope("web", "f", mid, event(messageId=mid, userId="u1"), t_s * S, "v")


def tv(env):
    return TimestampedValue(env, env.event_time_ms / S)


def test_out_of_order_set_set_once_and_duplicates_across_windows_and_replay():
    stream = (
        TestStream()
        .add_elements([tv(ident("late-plan", 30, plan="pro", first_plan="pro"))])
        .add_elements([tv(track("t1", 5)), tv(track("t2", 9))])
        .advance_watermark_to(10)  # window [0, 10) fires ON_TIME with 2
        .add_elements([tv(track("t2", 9))])  # a retry of t2 after its window fired: a duplicate
        .add_elements(
            [tv(ident("early-plan", 20, plan="free", first_plan="free"))]
        )  # older, arrives later
        .advance_watermark_to(40)
        .add_elements(
            [tv(track("t1", 5)), tv(ident("late-plan", 30, plan="pro", first_plan="pro"))]
        )  # a replay
        .add_elements([tv(ident("unset", 35, plan=None))])
        .advance_watermark_to_infinity()
    )
    spec = ComputedTraitSpec(
        name="tracks_10s", aggregate="count", event="Product Viewed", window="fixed", size_ms=10 * S
    )
    with make_pipeline(streaming=True) as p:
        dd = p | stream | DeduplicateEvents()
        keyed = dd["unique"] | beam.Map(lambda e: ("user:u1", e)).with_output_types(
            beam.typehints.KV[str, object]
        )
        traits = keyed | ComputeTraits([spec], allowed_lateness_ms=100 * S)
        built = {"events": keyed, "computed": traits.computed} | BuildProfiles(
            IDENTITY, TraitRules(set_once=frozenset({"first_plan"}))
        )
        rows = built["profiles"]
        latest = (
            rows
            | beam.Map(lambda r: (r["profile_id"], r))
            | beam.CombinePerKey(lambda rs: max(rs, key=lambda r: r["version"]))
            | beam.Values()
        )
        assert_that(
            latest
            | beam.Map(
                lambda r: (
                    orjson.loads(r["traits"]),
                    orjson.loads(r["computed_traits"])["tracks_10s"]["value"],
                )
            ),
            # plan: set at 20 (free), 30 (pro), unset at 35 -> absent; first_plan: earliest (free).
            equal_to([({"first_plan": "free"}, 2)]),
            label="profile",
        )
        assert_that(
            dd["duplicates"] | "n" >> beam.Map(lambda r: r["message_id"]),
            equal_to(["t2", "t1", "late-plan"]),
            label="dups",
        )


# --- the whole job: any permutation and duplication gives identical profiles ----------------------

CONFIG = """
sources: [{name: web, paths: [], tracking_plan: default}]
tracking_plans: {default: {path: ../tracking_plans/example.yaml}}
profile: {set_once: [first_plan], increment: [logins]}
computed_traits:
  - {name: views_1h, aggregate: count, event: Product Viewed, window: {type: fixed, size: 1h}}
  - {name: revenue, aggregate: sum, event: Order Completed, property: properties.revenue}
  - {name: products, aggregate: distinct_count, event: Product Viewed, property: properties.product_id,
     window: {type: session, gap: 30m}}
"""

event_specs = st.lists(
    st.tuples(
        st.sampled_from(["u1", "u2"]),
        st.sampled_from(["view", "order", "identify"]),
        st.integers(0, 7200),  # seconds
        st.sampled_from(["p1", "p2", "p3"]),
    ),
    min_size=1,
    max_size=14,
)


def _line(i, spec):
    user, kind, t, product = spec
    ts = f"2026-11-01T{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}.000Z"
    base = {"messageId": f"m{i}", "userId": user, "timestamp": ts}
    if kind == "view":
        base.update(type="track", event="Product Viewed", properties={"product_id": product})
    elif kind == "order":
        base.update(
            type="track",
            event="Order Completed",
            properties={"order_id": f"o{i}", "revenue": 10.5, "currency": "EUR"},
        )
    else:
        base.update(
            type="identify",
            traits={"plan": "pro" if t % 2 else "free", "first_plan": product, "logins": 1},
        )
    return orjson.dumps(base).decode()


def _run(lines, tmp_path, name):
    src = tmp_path / f"{name}.ndjson"
    src.write_text("\n".join(lines) + "\n")
    cfg = config_from(CONFIG)
    out = tmp_path / name
    with make_pipeline() as p:
        outputs = job.build(p, cfg, {"web": [str(src)]})
        job.write_outputs(outputs, cfg, out)
    with sqlite3.connect(out / "profiles.sqlite") as conn:
        rows = conn.execute(
            "SELECT profile_id, identities, traits, computed_traits, event_counts, first_seen, last_seen FROM profiles ORDER BY 1"
        ).fetchall()
    return rows


@settings(max_examples=6, deadline=None)
@given(event_specs, st.randoms(use_true_random=False))
def test_any_permutation_and_duplication_gives_identical_profiles(tmp_path_factory, specs, rnd):
    tmp_path = tmp_path_factory.mktemp("perm")
    lines = [_line(i, s) for i, s in enumerate(specs)]
    shuffled = lines + [rnd.choice(lines) for _ in range(rnd.randint(0, len(lines)))]
    rnd.shuffle(shuffled)
    assert _run(lines, tmp_path, "a") == _run(shuffled, tmp_path, "b")
