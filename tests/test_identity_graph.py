"""The stitching rule without a pipeline: guardrails, anchors, merges and splits, and a
hypothesis check against a naive union-find for any order and duplication."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import IdentityConfig
from tests.conftest import event
from transforms.identity_graph import (
    Link,
    StitchRules,
    changes,
    event_links,
    id_key,
    make_link,
    resolve,
    split_key,
)

RULES = StitchRules()  # user_id limit 1, breaker 50


def link(x, y, t, mid=None, etype="identify"):
    return make_link(x, y, t, mid or f"m{t}", etype)


def clusters(res):
    return sorted(res.members.values())


def test_keys_round_trip_and_profile_prefixes():
    assert id_key("user_id", "u1") == "user:u1"
    assert id_key("anonymous_id", "a1") == "anon:a1"
    assert id_key("email", "x@y.io") == "email:x@y.io"
    for key in ("user:u1", "anon:a:with:colons", "device_id:d1"):
        assert id_key(*split_key(key)) == key


def test_an_event_links_its_first_identifier_to_each_other_one():
    e = event(
        type="identify",
        userId="u1",
        anonymousId="a1",
        traits={"email": " Jane@X.io"},
        context={"device": {"id": "d1"}},
        event=None,
        properties=None,
    )
    links = event_links(e, 5, IdentityConfig())
    assert {(lk.a, lk.b) for lk in links} == {
        ("email:jane@x.io", "user:u1"),
        ("anon:a1", "user:u1"),
        ("device_id:d1", "user:u1"),
    }
    assert all(lk.time_ms == 5 and lk.event_type == "identify" for lk in links)


def test_junk_identifiers_never_link():
    e = event(anonymousId="undefined", userId="u1", context={"device": {"id": "0000-0000"}})
    assert event_links(e, 1, IdentityConfig()) == []


def test_chain_anon_device_anon_user_is_one_person_named_by_the_user():
    res = resolve(
        ["anon:a1", "device_id:d", "anon:a2", "user:u"],
        [
            link("anon:a1", "device_id:d", 1),
            link("device_id:d", "anon:a2", 2),
            link("anon:a2", "user:u", 3),
        ],
        RULES,
    )
    assert clusters(res) == [("anon:a1", "anon:a2", "device_id:d", "user:u")]
    assert set(res.person_of.values()) == {"user:u"}


def test_two_users_on_one_device_stay_two_people_earliest_link_wins():
    nodes = ["user:u1", "user:u2", "device_id:d"]
    links = [link("user:u1", "device_id:d", 10), link("user:u2", "device_id:d", 5)]
    res = resolve(nodes, links, RULES)
    assert clusters(res) == [("device_id:d", "user:u2"), ("user:u1",)]
    [refusal] = res.refused
    assert refusal.rule == "limit.user_id"
    assert refusal.link.time_ms == 10
    assert set(refusal.side_a + refusal.side_b) == {"user:u1", "user:u2", "device_id:d"}


def test_equal_times_are_decided_by_message_id_not_arrival():
    a = link("user:u1", "device_id:d", 7, "m-b")
    b = link("user:u2", "device_id:d", 7, "m-a")
    for order in ([a, b], [b, a]):
        res = resolve(["user:u1", "user:u2", "device_id:d"], order, RULES)
        assert res.person_of["device_id:d"] == "user:u2"


def test_breaker_refuses_the_link_that_would_make_a_person_too_big():
    rules = StitchRules(max_cluster_size=3)
    links = [link("anon:a", "device_id:1", 1), link("anon:a", "device_id:2", 2)]
    links.append(link("anon:a", "device_id:3", 3))
    res = resolve(["anon:a", "device_id:1", "device_id:2", "device_id:3"], links, rules)
    assert clusters(res) == [("anon:a", "device_id:1", "device_id:2"), ("device_id:3",)]
    assert [r.rule for r in res.refused] == ["breaker.cluster_size"]


def test_shared_identifiers_and_unlinks_are_refused():
    links = [link("anon:a", "device_id:s", 1), link("anon:b", "device_id:s", 2)]
    res = resolve(["anon:a", "anon:b", "device_id:s"], links, RULES, shared=["device_id:s"])
    assert len(res.members) == 3
    assert {r.rule for r in res.refused} == {"breaker.shared_identifier"}
    links = [link("anon:a", "device_id:d", 1), link("device_id:d", "user:u", 2)]
    res = resolve(
        ["anon:a", "device_id:d", "user:u"], links, RULES, unlinked=[("user:u", "anon:a")]
    )
    assert clusters(res) == [("anon:a", "device_id:d"), ("user:u",)]
    assert [r.rule for r in res.refused] == ["unlinked"]


def test_an_unlink_whose_other_end_is_in_another_group_is_ignored_here():
    # ResolveGroup sees only its candidate group; an unlink may name an identifier of another
    # group (found by the differential test: this used to raise KeyError and fail the job).
    links = [link("anon:a", "user:u", 1)]
    res = resolve(["anon:a", "user:u"], links, RULES, unlinked=[("user:u", "device_id:elsewhere")])
    assert clusters(res) == [("anon:a", "user:u")]
    assert res.refused == []


def test_anchor_prefers_user_then_anonymous_then_first_seen():
    res = resolve(
        ["anon:late", "anon:early", "email:e"],
        [link("anon:late", "email:e", 9), link("anon:early", "email:e", 3)],
        RULES,
    )
    assert set(res.person_of.values()) == {"anon:early"}


def test_changes_report_merges_with_the_joining_link_and_splits():
    before = {}
    res = resolve(["anon:a", "user:u"], [link("anon:a", "user:u", 4, "m4", "alias")], RULES)
    merges, splits = changes(before, res)
    assert splits == []
    assert merges == [
        {
            "kind": "profile_merged",
            "from": "anon:a",
            "into": "user:u",
            "rule": "linked_by.alias",
            "link": res.applied[0].record(),
        }
    ]
    # The same group after an unlink: user:u splits back into two persons.
    res2 = resolve(
        ["anon:a", "user:u"],
        [link("anon:a", "user:u", 4, "m4", "alias")],
        RULES,
        unlinked=[("anon:a", "user:u")],
    )
    merges, splits = changes(dict(res.members), res2)
    assert merges == []
    assert [(s["from"], s["into"]) for s in splits] == [("user:u", ["anon:a", "user:u"])]


def test_identifiers_that_moved_to_another_group_are_not_a_split():
    res = resolve(["anon:b"], [], RULES)
    merges, splits = changes({"anon:a": ("anon:a", "anon:b")}, res)
    assert merges == [] and splits == []


# --- hypothesis: the rule against a naive reference --------------------------------------------

NODES = [f"user:u{i}" for i in range(3)] + [f"anon:a{i}" for i in range(5)]
NODES += [f"device_id:d{i}" for i in range(3)]


def naive_clusters(links: list[Link], limit_users: int, breaker: int) -> list[tuple[str, ...]]:
    """The documented rule, written the slow obvious way: a list of sets, links in sorted order."""
    groups = [{n} for n in NODES]
    for lk in sorted(set(links)):
        ga = next(g for g in groups if lk.a in g)
        gb = next(g for g in groups if lk.b in g)
        if ga is gb:
            continue
        union = ga | gb
        if sum(n.startswith("user:") for n in union) > limit_users or len(union) > breaker:
            continue
        groups = [g for g in groups if g is not ga and g is not gb] + [union]
    return sorted(tuple(sorted(g)) for g in groups)


link_strategy = st.builds(
    lambda pair, t, m: make_link(pair[0], pair[1], t, f"m{m}", "track"),
    st.tuples(st.sampled_from(NODES), st.sampled_from(NODES)).filter(lambda p: p[0] != p[1]),
    st.integers(0, 20),
    st.integers(0, 5),
)


@settings(max_examples=300, deadline=None)
@given(
    links=st.lists(link_strategy, max_size=25),
    breaker=st.integers(2, 8),
    data=st.data(),
)
def test_resolve_equals_a_naive_union_find_for_any_order_and_duplication(links, breaker, data):
    rules = StitchRules(max_cluster_size=breaker)
    expected = naive_clusters(links, 1, breaker)
    dupes = data.draw(st.lists(st.sampled_from(links), max_size=5)) if links else []
    shuffled = data.draw(st.permutations(links + dupes))
    res = resolve(NODES, shuffled, rules)
    assert clusters(res) == expected
    # Every person has at most one user id, and no more members than the breaker allows.
    for members in res.members.values():
        assert sum(m.startswith("user:") for m in members) <= 1
        assert len(members) <= breaker
    # Person ids are members, and the same input in another order names them the same.
    again = resolve(list(reversed(NODES)), list(reversed(shuffled)), rules)
    assert again.person_of == res.person_of
    assert all(res.person_of[p] == p for p in res.members)


def test_reference_agrees_on_a_hand_example():
    links = [link(a, b, t) for t, (a, b) in enumerate(itertools.pairwise(NODES[3:8]))]
    assert naive_clusters(links, 1, 50)[0] == tuple(sorted(NODES[3:8]))


def test_a_merge_cites_the_link_that_joined_the_person_not_an_earlier_one():
    links = [
        link("anon:a", "device_id:d", 1, "screen-1", "screen"),
        link("anon:a", "user:u", 5, "identify-5", "identify"),
    ]
    res = resolve(["anon:a", "device_id:d", "user:u"], links, RULES)
    merges, _ = changes({"anon:a": ("anon:a", "device_id:d")}, res)
    assert [(m["from"], m["into"], m["rule"], m["link"]["messageId"]) for m in merges] == [
        ("anon:a", "user:u", "linked_by.identify", "identify-5")
    ]
