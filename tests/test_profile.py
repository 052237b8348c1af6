import functools

import apache_beam as beam
import orjson
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import IdentityConfig
from tests.conftest import event, make_pipeline
from transforms.envelope import Envelope
from transforms.identity import extract_identifiers, is_blocked, normalize, primary_profile_key
from transforms.profile import (
    BuildProfiles,
    as_of_version,
    empty_profile,
    fold_event,
    merge_profiles,
    next_version,
    profile_row,
)

IDENTITY = IdentityConfig()


def test_normalizers_and_blocklist():
    assert normalize("  Jane.Doe@Example.COM ", "email") == "jane.doe@example.com"
    assert normalize("+1 (555) 010-9999", "phone") == "15550109999"
    assert normalize(42, "trim") == "42"
    assert normalize({"a": 1}, "trim") is None and normalize(True, "trim") is None
    for junk in (
        "undefined",
        "NULL",
        "0",
        "",
        "00000000-0000-0000-0000-000000000000",
        "1111",
        "guest",
    ):
        assert is_blocked(junk, IDENTITY.blocklist, IDENTITY.blocklist_patterns), junk
    for ok in ("u_1a2b", "7", "device-123", "110"):
        assert not is_blocked(ok, IDENTITY.blocklist, IDENTITY.blocklist_patterns), ok


def test_extract_identifiers_and_primary_key():
    e = event(
        userId="u1",
        anonymousId="undefined",
        context={"device": {"id": "0000000000000000"}, "traits": {"email": " A@B.com"}},
    )
    assert extract_identifiers(e, IDENTITY) == [("user_id", "u1"), ("email", "a@b.com")]
    assert primary_profile_key(e, IDENTITY) == "user:u1"
    assert primary_profile_key(event(), IDENTITY) == "anon:anon-1"
    alias = {"type": "alias", "previousId": "anon-9", "userId": "u9"}
    assert extract_identifiers(alias, IDENTITY) == [("user_id", "u9"), ("anonymous_id", "anon-9")]


def _fold(events):
    acc = empty_profile()
    for e, t in events:
        fold_event(acc, e, t, extract_identifiers(e, IDENTITY))
    return acc


def test_set_trait_latest_event_time_wins_regardless_of_order():
    older = (event(type="identify", messageId="m1", traits={"plan": "free"}), 1000)
    newer = (event(type="identify", messageId="m2", traits={"plan": "pro"}), 2000)
    for order in ([older, newer], [newer, older]):
        row = profile_row("p", _fold(order))
        assert orjson.loads(row["traits"]) == {"plan": "pro"}
        assert row["version"] == as_of_version(2000, 2)


def test_group_traits_are_not_person_traits_but_context_traits_are():
    g = event(
        type="group",
        groupId="g1",
        traits={"plan": "enterprise"},
        context={"traits": {"name": "Ann"}},
    )
    row = profile_row("p", _fold([(g, 5)]))
    assert orjson.loads(row["traits"]) == {"name": "Ann"}


profile_events = st.lists(
    st.tuples(
        st.sampled_from(["identify", "track", "page"]),
        st.sampled_from(["m1", "m2", "m3", "m4", "m5"]),
        st.sampled_from(["free", "pro", "enterprise"]),
        st.integers(0, 5),  # event time: ties happen and must break by messageId
    ),
    min_size=1,
    max_size=12,
)


def _make(spec):
    etype, mid, plan, t = spec
    kw = {
        "type": etype,
        "messageId": mid,
        "traits": {"plan": plan} if etype == "identify" else None,
    }
    if etype != "track":
        kw.update(event=None, properties=None)
    return event(**kw), t


@settings(max_examples=60, deadline=None)
@given(profile_events, st.randoms(use_true_random=False), st.integers(1, 4))
def test_fold_and_merge_are_order_and_partition_independent(specs, rnd, parts):
    events = [_make(s) for s in specs]
    expected = profile_row("p", _fold(events))
    shuffled = list(events)
    rnd.shuffle(shuffled)
    chunks = [shuffled[i::parts] for i in range(parts)]
    merged = functools.reduce(merge_profiles, [_fold(c) for c in chunks], empty_profile())
    assert profile_row("p", merged) == expected


def test_build_profiles_pipeline():
    def envl(mid, t, **kw):
        e = event(messageId=mid, **kw)
        return Envelope("web", "f", "", e, t, "v")

    items = [
        envl("1", 1000),
        envl(
            "2",
            2000,
            type="identify",
            userId="u1",
            traits={"email": "U1@X.io"},
            event=None,
            properties=None,
        ),
        envl("3", 3000, userId="u1"),
        envl("4", 4000, anonymousId="anon-2"),
    ]
    with make_pipeline() as p:
        keyed = (
            p | beam.Create(items) | beam.Map(lambda e: (primary_profile_key(e.event, IDENTITY), e))
        )
        rows = ({"events": keyed} | BuildProfiles(IDENTITY))["profiles"]
        assert_that(
            rows | beam.Map(lambda r: (r["profile_id"], r["version"], r["traits"])),
            equal_to(
                [
                    ("anon:anon-1", as_of_version(1000, 1), "{}"),
                    ("user:u1", as_of_version(3000, 2), '{"email":"U1@X.io"}'),
                    ("anon:anon-2", as_of_version(4000, 1), "{}"),
                ]
            ),
        )


def test_unify_profile_leaves_its_fragments_unchanged():
    """Streaming keeps fragments in state and unifies them again on every change: building a row
    must not alter them (unify_profile shares their entries instead of copying them)."""
    import copy

    from transforms.unify import unify_profile

    a = _fold(
        [
            (event(type="identify", messageId="m1", traits={"plan": "free", "tags": ["x"]}), 1000),
            (event(messageId="m2", context={"traits": {"email": "a@b.io"}}), 1500),
        ]
    )
    b = _fold([(event(type="identify", messageId="m3", traits={"plan": "pro"}), 2000)])
    a["incr"]["logins"] = [2, [0.5]]
    b["incr"]["logins"] = [1, [0.25]]
    frags = {"anon:anon-1": a, "user:u1": b}
    before = copy.deepcopy(frags)
    first = unify_profile("p1", frags, ["anon:anon-1"])
    assert frags == before
    assert unify_profile("p1", frags, ["anon:anon-1"]) == first
    assert orjson.loads(first["traits"])["plan"] == "pro"
    assert orjson.loads(first["traits"])["logins"] == 3.75


def test_version_orders_by_event_time_then_count_then_deletion():
    assert as_of_version(2000, 1) > as_of_version(1999, 10**6)  # a later event wins
    assert as_of_version(2000, 3) > as_of_version(2000, 2)  # an older event added wins
    assert as_of_version(2000, 3, deleted=True) > as_of_version(2000, 3)  # deletion wins
    assert as_of_version(2000, 4) > as_of_version(2000, 3, deleted=True)  # then new events win
    assert as_of_version(None, 0) == as_of_version(0, 0) > 0
    # Saturates instead of spilling into the next field; fits a signed 64-bit column.
    assert as_of_version(2000, 2**30) < as_of_version(3000, 0)
    assert as_of_version(2**60, 2**30, True) < 2**63
    # Every version beats any the earlier layout (event time in ms << 21) wrote into a store.
    old_layout_2038 = (2_145_916_800_000 << 21) | (2**20 - 1) << 1 | 1
    assert as_of_version(0, 0) > old_layout_2038


def test_a_run_that_adds_an_event_outranks_any_changes_of_another_run():
    """A backfill that adds one event to a person outranks a streaming run's rows of that person
    at the same newest event, however many merges and computed-trait panes moved them on
    (before: they counted in the event field, so such a backfill was ignored)."""
    streamed = as_of_version(5_000, 40)
    for _ in range(255):  # changes without events: merges, splits, panes
        streamed = next_version(streamed, as_of_version(5_000, 40))
    assert streamed < as_of_version(5_000, 40, deleted=True) < as_of_version(5_000, 41)
    assert as_of_version(4_000, 41) < streamed  # one second older is older, whatever the count


def test_streaming_versions_strictly_increase_and_never_lag_the_events():
    assert next_version(0, as_of_version(5_000, 1)) == as_of_version(5_000, 1)
    same = as_of_version(5_000, 1)
    assert next_version(same, same) == same + 1  # a split at the same events still moves on
    assert next_version(same + 7, as_of_version(9_000, 1)) == as_of_version(9_000, 1)
