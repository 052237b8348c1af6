"""Stitching through the whole job: chains, alias, late identify, shared devices, junk ids, the
breaker, unlink and deletion; and in streaming, a merge followed by a split (TestStream)."""

from __future__ import annotations

import functools
import sqlite3

import apache_beam as beam
import orjson
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import governed_profiles as job
from tests.conftest import config_from, event, make_pipeline
from transforms.envelope import Envelope
from transforms.stitching import StitchIdentities

CONFIG = """
sources: [{name: web, paths: [], tracking_plan: default}]
tracking_plans: {default: {path: ../tracking_plans/example.yaml}}
"""


def at(minute: int, **kw) -> dict:
    """An event ``minute`` minutes into the day (skew-free: the three clocks agree)."""
    ts = f"2026-11-01T10:{minute:02d}:00.000Z"
    return event(originalTimestamp=ts, sentAt=ts, receivedAt=ts, **kw)


def identify(minute, mid, user, anon, **kw):
    return at(
        minute,
        messageId=mid,
        type="identify",
        userId=user,
        anonymousId=anon,
        event=None,
        properties=None,
        **kw,
    )


def device(dev):
    return {"device": {"id": dev}}


@pytest.fixture(params=[True, False], ids=["grouped", "stateful"])
def runner(request):
    """Each scenario runs through both stage kinds: the bounded ones (GroupByKey per hop) and
    the streaming ones (keyed state and timers) over the same finite input."""
    return functools.partial(run, bounded=request.param)


def run(tmp_path, events, config=CONFIG, bounded=True):
    src = tmp_path / "events.ndjson"
    src.write_text("\n".join(orjson.dumps(e).decode() for e in events) + "\n")
    cfg = config_from(config)
    out = tmp_path / "out"
    with make_pipeline() as p:
        job.write_outputs(job.build(p, cfg, {"web": [str(src)]}, bounded=bounded), cfg, out)
    with sqlite3.connect(out / "profiles.sqlite") as conn:
        rows = conn.execute("SELECT profile_id, identities, event_counts FROM profiles").fetchall()
    profiles = {
        pid: (
            sorted(f"{i['type']}:{i['value']}" for i in orjson.loads(ids)),
            orjson.loads(counts),
        )
        for pid, ids, counts in rows
    }

    def records(name):
        return [
            orjson.loads(line)
            for f in sorted((out / name).glob("part-*"))
            for line in f.read_text().splitlines()
        ]

    return profiles, records("merges"), records("identity_review")


def test_chain_anon_device_anon_user_becomes_one_person(tmp_path, runner):
    profiles, merges, review = runner(
        tmp_path,
        [
            at(1, messageId="1", anonymousId="a1", context=device("d1")),
            at(2, messageId="2", anonymousId="a2", context=device("d1")),
            identify(3, "3", "u1", "a2"),
            at(4, messageId="4", anonymousId="a3"),  # a stranger
        ],
    )
    assert profiles == {
        "user:u1": (
            ["anonymous_id:a1", "anonymous_id:a2", "device_id:d1", "user_id:u1"],
            {"type:track": 2, "type:identify": 1, "event:Product Viewed": 2},
        ),
        "anon:a3": (["anonymous_id:a3"], {"type:track": 1, "event:Product Viewed": 1}),
    }
    assert {(m["from"], m["into"]) for m in merges} == {
        ("anon:a1", "user:u1"),
        ("anon:a2", "user:u1"),
    }
    assert review == []


def test_alias_and_a_late_identify_bring_anonymous_history_to_the_person(tmp_path, runner):
    profiles, merges, _ = runner(
        tmp_path,
        [
            # The identify and alias are first in the file but last in event time.
            identify(30, "i", "u2", "b1"),
            at(31, messageId="al", type="alias", userId="u1", previousId="a1", event=None),
            at(1, messageId="1", anonymousId="a1"),
            at(2, messageId="2", anonymousId="a1"),
            at(3, messageId="3", anonymousId="b1"),
        ],
    )
    assert set(profiles) == {"user:u1", "user:u2"}
    assert profiles["user:u1"][1]["type:track"] == 2
    assert profiles["user:u2"][1] == {
        "type:identify": 1,
        "type:track": 1,
        "event:Product Viewed": 1,
    }
    by_from = {m["from"]: m for m in merges}
    assert by_from["anon:a1"]["into"] == "user:u1"
    assert by_from["anon:a1"]["rule"] == "linked_by.alias"
    assert by_from["anon:a1"]["link"]["messageId"] == "al"


def test_two_users_sharing_a_device_stay_two_people(tmp_path, runner):
    profiles, _, review = runner(
        tmp_path,
        [
            identify(1, "1", "u1", "a1", context=device("tablet")),
            identify(2, "2", "u2", "a2", context=device("tablet")),
            at(3, messageId="3", userId="u2", anonymousId="a2", context=device("tablet")),
        ],
    )
    assert set(profiles) == {"user:u1", "user:u2"}
    assert "device_id:tablet" in profiles["user:u1"][0]
    assert "device_id:tablet" not in profiles["user:u2"][0]
    assert profiles["user:u2"][0] == ["anonymous_id:a2", "user_id:u2"]
    refused = [r for r in review if r["rule"] == "limit.user_id"]
    assert len(refused) == 1
    assert refused[0]["link"]["messageId"] == "2"
    assert sorted(refused[0]["clusters"]["a"] + refused[0]["clusters"]["b"]) == [
        "anon:a1",
        "anon:a2",
        "device_id:tablet",
        "user:u1",
        "user:u2",
    ]


def test_junk_identifiers_never_merge_people_and_are_reported_once_per_pair(tmp_path, runner):
    profiles, merges, review = runner(
        tmp_path,
        [
            at(1, messageId="1", userId="u1", anonymousId="undefined", context=device("0000")),
            at(2, messageId="2", userId="u2", anonymousId="undefined", context=device("0000")),
            at(3, messageId="3", userId="u2", anonymousId="undefined"),
        ],
    )
    assert set(profiles) == {"user:u1", "user:u2"}
    assert merges == []
    pairs = sorted((r["link"]["a"], r["link"]["b"], r["link"]["messageId"]) for r in review)
    assert pairs == [
        ("anon:undefined", "user:u1", "1"),
        ("anon:undefined", "user:u2", "2"),
        ("device_id:0000", "user:u1", "1"),
        ("device_id:0000", "user:u2", "2"),
    ]
    assert {r["rule"] for r in review} == {"blocklist"}


SMALL = CONFIG + "identity: {max_cluster_size: 3}\n"


def test_breaker_and_shared_identifiers(tmp_path, runner):
    profiles, _, review = runner(
        tmp_path,
        [
            # A chain that grows past 3 identifiers: the 4th link is refused.
            at(1, messageId="1", anonymousId="a1", context=device("d1")),
            at(2, messageId="2", anonymousId="a2", context=device("d1")),
            at(3, messageId="3", anonymousId="a2", context=device("d2")),
            # A kiosk device seen with 4 anonymous ids: shared, never links anyone.
            *[
                at(10 + i, messageId=f"k{i}", anonymousId=f"k{i}", context=device("kiosk"))
                for i in range(4)
            ],
        ],
        SMALL,
    )
    assert profiles["anon:a1"][0] == ["anonymous_id:a1", "anonymous_id:a2", "device_id:d1"]
    assert all(f"anon:k{i}" in profiles and len(profiles[f"anon:k{i}"][0]) == 1 for i in range(4))
    rules = sorted(r["rule"] for r in review)
    assert rules == ["breaker.cluster_size"] + ["breaker.shared_identifier"] * 4


def test_config_deletion_splits_the_identifier_off(tmp_path, runner):
    config = CONFIG + "privacy: {deleted_identifiers: ['device_id:d1']}\n"
    profiles, merges, _ = runner(
        tmp_path,
        [
            at(1, messageId="1", anonymousId="a1", context=device("d1")),
            at(2, messageId="2", anonymousId="a2", context=device("d1")),
        ],
        config,
    )
    # Both events carried the deleted device id: they are suppressed, and d1 links nobody.
    assert profiles == {}
    assert merges == []


# --- streaming: merge, then split by an unlink -------------------------------------------------


def _env(ev: dict, minute: int) -> Envelope:
    return Envelope("web", "test", "", ev, 1_700_000_000_000 + minute * 60_000, "v")


def test_streaming_merge_then_unlink_split():
    from transforms.stitching import ASSIGNMENTS, MERGES

    base = 1_700_000_000
    first = [_env(identify(1, "1", "u1", "a1"), 1), _env(at(2, messageId="2", anonymousId="a1"), 2)]
    unlink = _env(
        at(
            5,
            messageId="5",
            type="unlink",
            userId="u1",
            event=None,
            properties={"identifier": {"type": "anonymous_id", "value": "a1"}},
        ),
        5,
    )
    stream = (
        TestStream()
        .add_elements(
            [window.TimestampedValue(e, base + 60 * (i + 1)) for i, e in enumerate(first)]
        )
        .advance_watermark_to(base + 180)
        .add_elements([window.TimestampedValue(unlink, base + 300)])
        .advance_watermark_to(base + 600)
        .advance_watermark_to_infinity()
    )
    with make_pipeline(streaming=True) as p:
        out = p | stream | StitchIdentities(config_from(CONFIG).identity)
        assert_that(
            out[MERGES] | beam.Map(lambda r: (r["kind"], r["from"], r.get("into"))),
            equal_to(
                [
                    ("profile_merged", "anon:a1", "user:u1"),
                    ("profile_split", "user:u1", ["anon:a1", "user:u1"]),
                ]
            ),
            label="merges",
        )
        assert_that(
            out[ASSIGNMENTS] | beam.Map(lambda kv: (kv[0], kv[1][1])),
            equal_to(
                [
                    ("anon:a1", "user:u1"),
                    ("user:u1", "user:u1"),
                    ("anon:a1", "anon:a1"),
                ]
            ),
            label="assignments",
        )


# --- any order, any duplication: the same persons ----------------------------------------------

USERS, ANONS, DEVICES = ["u0", "u1", "u2"], ["a0", "a1", "a2", "a3"], ["d0", "d1"]

event_strategy = st.builds(
    lambda minute, user, anon, dev: at(
        minute,
        messageId=f"m{minute}-{user}-{anon}-{dev}",
        userId=user,
        anonymousId=anon,
        context=device(dev) if dev else {},
    ),
    st.integers(0, 50),
    st.sampled_from([None, *USERS]),
    st.sampled_from(ANONS),
    st.sampled_from([None, *DEVICES]),
)


@settings(max_examples=4, deadline=None)
@given(events=st.lists(event_strategy, min_size=1, max_size=12), data=st.data())
def test_persons_do_not_depend_on_order_or_duplication(tmp_path_factory, events, data):
    dupes = data.draw(st.lists(st.sampled_from(events), max_size=4))
    shuffled = data.draw(st.permutations(events + dupes))
    a, _, _ = run(tmp_path_factory.mktemp("a"), events)
    b, _, _ = run(tmp_path_factory.mktemp("b"), shuffled)
    assert a == b
    for ids, _ in a.values():
        assert sum(i.startswith("user_id:") for i in ids) <= 1


# --- any chain length: whole components in a fixed number of stages -----------------------------

WIDE = CONFIG + "identity: {max_cluster_size: 2000}\n"


def bipartite_events(edges: list[tuple[int, int]]) -> list[dict]:
    """One event per (anonymous id, device id) pair, minutes spread over the day."""
    return [
        at(i % 60, messageId=f"e{i}", anonymousId=f"a{a}", context=device(f"d{d}"))
        for i, (a, d) in enumerate(edges)
    ]


def expected_persons(edges) -> list[list[str]]:
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for a, d in edges:
        parent[find(f"anonymous_id:a{a}")] = find(f"device_id:d{d}")
    groups: dict[str, list[str]] = {}
    for x in list(parent):
        groups.setdefault(find(x), []).append(x)
    return sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("n", [2, 40, 500])
def test_chains_and_stars_of_any_length_are_one_person(tmp_path, runner, n):
    """A chain of ``n`` identifiers (a0-d0-a1-d1-...) and a star (one device, ``n`` - 1
    anonymous ids): one person each, in both stage kinds. Label propagation stopped at 5."""
    half = n // 2
    chain = [(i, i) for i in range(half)] + [(i + 1, i) for i in range(half - 1)]
    star = [(1000 + i, 1000) for i in range(n - 1)]
    events = bipartite_events(chain + star)
    profiles, merges, review = runner(tmp_path, events, WIDE)
    got = sorted(ids for ids, _ in profiles.values())
    assert got == expected_persons(chain + star)
    assert len(got) == 2 and review == []


@settings(max_examples=3, deadline=None)
@given(
    edges=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=60),
    bounded=st.booleans(),
)
def test_random_identifier_graphs_are_their_components(tmp_path_factory, edges, bounded):
    """Without limits or breakers, persons are exactly the connected components (union-find)."""
    profiles, _, _ = run(
        tmp_path_factory.mktemp("g"), bipartite_events(edges), WIDE, bounded=bounded
    )
    assert sorted(ids for ids, _ in profiles.values()) == expected_persons(edges)


# --- a shared identifier: every refused link reported, no glue past its cap ---------------------


def test_a_valid_link_beside_a_shared_device_is_applied_in_both_stage_kinds(tmp_path, runner):
    """A device over the cap (2) refuses its third link, so the lists of its neighbours and its
    own disagree; the identify that links a1 and u still makes one person, and every refused
    link of the device is reported once (a bounded run once split this person)."""
    profiles, _, review = runner(
        tmp_path,
        [
            at(1, messageId="1", anonymousId="a1", context=device("d")),
            at(2, messageId="2", anonymousId=None, userId="u", context=device("d")),
            identify(3, "3", "u", "a1"),
            at(4, messageId="4", anonymousId="a0", context=device("d")),
        ],
        CONFIG + "identity: {max_cluster_size: 2}\n",
    )
    assert profiles["user:u"][0] == ["anonymous_id:a1", "user_id:u"]
    assert profiles["anon:a0"][0] == ["anonymous_id:a0"]
    pairs = sorted((r["rule"], r["link"]["a"], r["link"]["b"]) for r in review)
    assert pairs == [
        ("breaker.shared_identifier", "anon:a0", "device_id:d"),
        ("breaker.shared_identifier", "anon:a1", "device_id:d"),
        ("breaker.shared_identifier", "device_id:d", "user:u"),
    ]


def test_identifiers_past_a_shared_identifiers_cap_are_not_glued_into_its_group():
    """A kiosk seen with 6 anonymous ids, cap 3: the 3 it accepted may share its group, the
    links past its cap never reach the component stages, so those 3 stay groups of their own
    (one key never gathers everyone a junk id was seen with)."""
    from transforms.stitching import ASSIGNMENTS

    envs = [
        _env(at(10 + i, messageId=f"k{i}", anonymousId=f"k{i}", context=device("kiosk")), i)
        for i in range(6)
    ]
    identity = config_from(CONFIG + "identity: {max_cluster_size: 3}\n").identity
    with make_pipeline() as p:
        out = p | beam.Create(envs) | StitchIdentities(identity, bounded=True)
        groups = out[ASSIGNMENTS] | beam.Map(lambda kv: (kv[0], kv[1][0]))
        assert_that(
            groups,
            equal_to(
                [(f"anon:k{i}", "anon:k0") for i in range(3)]
                + [("device_id:kiosk", "anon:k0")]
                + [(f"anon:k{i}", f"anon:k{i}") for i in range(3, 6)]
            ),
        )


# --- bounded runs: links keyed once by pair, acceptances read at each end ----------------------


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(
        st.sampled_from(["anonymousId", "userId", "device"]), min_size=0, max_size=3, unique=True
    ),
    etype=st.sampled_from(["track", "identify", "unlink", "delete"]),
)
def test_bounded_messages_are_the_streaming_ones_with_each_link_once(ids, etype):
    """Sent to both ends, the bounded run's links are exactly the streaming run's NEIGHBOUR
    messages, and its notices the rest: Link hears the same either way."""
    from transforms.stitching import NEIGHBOUR, bounded_stitch_messages, stitch_messages

    identity = config_from(CONFIG).identity
    fields = {"anonymousId": "a1", "userId": "u1"}
    ev = at(5, messageId="m", type=etype, **{k: fields[k] for k in ids if k in fields})
    if "device" in ids:
        ev["context"] = device("d1")
    if etype == "unlink":
        ev["properties"] = {"identifier": {"type": "anonymous_id", "value": "a9"}}
    streaming = stitch_messages(ev, 5, identity)
    links, notices = bounded_stitch_messages(ev, 5, identity)
    both = [(a, (NEIGHBOUR, b, e)) for (a, b), e in links] + [
        (b, (NEIGHBOUR, a, e)) for (a, b), e in links
    ]
    assert all(a < b for (a, b), _e in links)
    assert sorted(both + notices) == sorted(streaming)


def test_accepted_neighbours_are_the_links_both_ends_accepted():
    from transforms.stitching import ACCEPTS, OWN, accepted_neighbours

    heard = [(ACCEPTS, "b"), (ACCEPTS, "c"), (ACCEPTS, "b")]
    assert accepted_neighbours("a", heard) == ("b", "c")  # not shared: every link it heard of
    # Shared: only those it kept under its cap, of those that accepted it.
    assert accepted_neighbours("a", [*heard, (OWN, ("c", "d"))]) == ("c",)
    assert accepted_neighbours("a", [(OWN, ("c",))]) == ()


# --- planned runs: each part resolved in one call ------------------------------------------------


def _with_parts(envs: list[Envelope], config) -> list[Envelope]:
    """The envelopes tagged with their parts as planning finds them (pipelines/passes.py)."""
    from pipelines.passes import _UnionFind, event_nodes, node_hash

    uf = _UnionFind()
    firsts = [uf.join(map(node_hash, event_nodes(env, config))) for env in envs]
    return [env._replace(part=uf.find(i)) for env, i in zip(envs, firsts, strict=True)]


def _stitching_by_part_equals_rounds(envs: list[Envelope], config) -> None:
    """Every output of stitching each part in one call (``_StitchPartFn``, with the blocked
    links' review beside it, as transforms/planned_parts.py wires it) equals the bounded
    rounds' (``StitchIdentities``), record for record, and there is something to compare."""
    from transforms.dead_letter import FAILED
    from transforms.identity_graph import StitchRules
    from transforms.stitching import (
        ASSIGNMENTS,
        IDENTITIES,
        MERGES,
        REVIEW,
        _StitchPartFn,
        bounded_stitch_messages,
        config_key,
        review_blocked_links,
    )

    identity = config.identity
    rules = StitchRules.from_config(identity)
    deleted = frozenset(config_key(d) for d in config.privacy.deleted_identifiers)
    tags = (ASSIGNMENTS, IDENTITIES, MERGES, REVIEW)

    def canonical(tag):
        return lambda rec: orjson.dumps((tag, rec), option=orjson.OPT_SORT_KEYS)

    with make_pipeline() as p:
        events = p | beam.Create(_with_parts(envs, config))
        rounds = events | StitchIdentities(
            identity, config.privacy.deleted_identifiers, identity.rounds, bounded=True
        )

        def said(e):
            return e.part, bounded_stitch_messages(
                e.event, e.event_time_ms, identity, e.identifiers
            )

        def gathered(kv):  # a part's links and notices, as ResolvePlannedParts hands them over
            part, each = kv
            return part, ([x for s in each for x in s[0]], [x for s in each for x in s[1]])

        parts = (
            events
            | beam.Map(said)
            | beam.GroupByKey()
            | beam.Map(gathered)
            | beam.ParDo(_StitchPartFn(rules, deleted)).with_outputs(*tags, FAILED)
        )
        blocked = review_blocked_links(events, identity, bounded=True)[REVIEW]
        by_part = {tag: parts[tag] for tag in tags}
        by_part[REVIEW] = (parts[REVIEW], blocked) | "Review" >> beam.Flatten()
        counted = {}
        for name, out in (("rounds", rounds), ("parts", by_part)):
            counted[name] = (
                [out[tag] | f"{name}[{tag}]" >> beam.Map(canonical(tag)) for tag in tags]
                | f"All[{name}]" >> beam.Flatten()
                | f"Count[{name}]" >> beam.combiners.Count.PerElement()
            )
        diff = (
            counted
            | beam.CoGroupByKey()
            | beam.MapTuple(lambda rec, n: (rec, list(n["rounds"]), list(n["parts"])))
            | beam.Filter(lambda d: d[1] != d[2])
        )
        assert_that(diff, equal_to([]), label="SameRecords")
        assert_that(parts[FAILED], equal_to([]), label="NoDeadLetters")
        assert_that(
            counted["rounds"] | beam.combiners.Count.Globally(),
            lambda n: n[0] > 0 or pytest.fail("nothing stitched"),
            label="NotEmpty",
        )


def test_stitching_by_part_equals_the_rounds_on_every_hard_case():
    """Breaker (cluster size), a shared device past its cap, a valid link beside it, unlink,
    delete, a configured deletion, junk, and a chain of 300: by part and in rounds give the same
    assignments, members, merges and review records."""
    config = config_from(
        CONFIG + "identity: {max_cluster_size: 3}\n"
        "privacy: {deleted_identifiers: ['device_id:gone']}\n"
    )
    wide = config_from(CONFIG + "identity: {max_cluster_size: 2000}\n")
    events = [
        at(1, messageId="1", anonymousId="a1", context=device("d1")),
        at(2, messageId="2", anonymousId="a2", context=device("d1")),
        at(3, messageId="3", anonymousId="a2", context=device("d2")),
        *[at(10 + i, messageId=f"k{i}", anonymousId=f"k{i}", context=device("kiosk")) for i in range(6)],
        identify(20, "i1", "u", "k1"),
        identify(21, "i2", "v", "b1"),
        at(22, messageId="x1", anonymousId="b1", context=device("gone")),
        at(23, messageId="u1", type="unlink", userId="v",
           properties={"identifier": {"type": "anonymous_id", "value": "b1"}}),
        identify(24, "i3", "w", "c1"),
        at(25, messageId="del", type="delete", anonymousId="c1"),
        at(26, messageId="j1", anonymousId="c2", context=device("00000000-0000-0000-0000-000000000000")),
    ]  # fmt: skip
    envs = [_env(ev, i) for i, ev in enumerate(events)]
    _stitching_by_part_equals_rounds(envs, config)
    chain = [(i, i) for i in range(150)] + [(i + 1, i) for i in range(149)]
    _stitching_by_part_equals_rounds(
        [_env(ev, i) for i, ev in enumerate(bipartite_events(chain))], wide
    )


@settings(max_examples=6, deadline=None)
@given(
    edges=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=40),
    cap=st.integers(2, 6),
    unlinks=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=3),
)
def test_stitching_by_part_equals_the_rounds_on_random_graphs(edges, cap, unlinks):
    config = config_from(CONFIG + f"identity: {{max_cluster_size: {cap}}}\n")
    events = bipartite_events(edges) + [
        identify(59, f"id{i}", f"u{a}", f"a{a}") for i, (a, _) in enumerate(unlinks)
    ] + [
        at(59, messageId=f"ul{i}", type="unlink", userId=f"u{a}",
           properties={"identifier": {"type": "anonymous_id", "value": f"a{b}"}})
        for i, (a, b) in enumerate(unlinks)
    ]  # fmt: skip
    _stitching_by_part_equals_rounds([_env(ev, i) for i, ev in enumerate(events)], config)
