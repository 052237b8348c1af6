"""Messages between keyed stages in any order: Beam keeps none between two keyed steps, so every
stage that replaces what it holds must end where in-order delivery ends, whatever the arrival
order and duplication of its messages (transforms/stamps.py).

Each test plays a sender's messages in the order it sent them, then a shuffled and duplicated
arrival of the same messages, and compares the receivers' final states. The first test is the
one that fails without the stamps: the case a continuous run met (a person kept a fragment
twelve events short when a newer fragment overtook an older one on the way)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.stamps import fresh
from transforms.stitching import LABEL, NODE_UPDATE, ONE_WAY, apply_group_message, route_step
from transforms.unify import (
    ASSIGN,
    FRAGMENT,
    MEMBERS,
    apply_person_message,
    route_fragment,
)

PERSONS = ["user:a", "user:b", "user:c", None]


def _arrival(data, messages: list) -> list:
    """The messages shuffled, some of them twice."""
    again = data.draw(st.lists(st.sampled_from(messages), max_size=4)) if messages else []
    return data.draw(st.permutations(messages + again))


def _play(step, x: str, messages: list):
    """A keyed stage's pure step over ``messages``: its final state and everything it sent."""
    state, out = None, []
    for msg in messages:
        after, sent = step(x, msg, state)
        state = after if after is not None else state
        out += sent
    return state, out


def _run_router(x: str, messages: list):
    return _play(route_fragment, x, messages)


def _persons(messages: list) -> dict:
    """Each person's fragments and member lists after the messages, in the order given."""
    held: dict = {}
    for person, msg in messages:
        frags, by_group, stamps = held.setdefault(person, ({}, {}, {}))
        apply_person_message(msg, frags, by_group, stamps)
    return {p: (frags, by_group) for p, (frags, by_group, _) in held.items()}


def test_an_older_fragment_that_overtakes_a_newer_one_changes_nothing():
    x = "anon:1"
    older, newer = {"inputs": 22}, {"inputs": 34}
    _, sent = _run_router(x, [(FRAGMENT, older), (FRAGMENT, newer)])
    assert [m[1][2] for m in sent] == [older, newer]
    assert _persons(sent[::-1])[x][0] == {x: newer}
    # and at the router itself
    state, _ = _run_router(x, [(FRAGMENT, newer), (FRAGMENT, older)])
    assert state[1] == newer


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_routers_and_persons_end_where_in_order_delivery_ends(data):
    """Two identifiers, each with a growing fragment, assigned over time by two groups'
    resolutions: the routers' and the persons' final states equal those of in-order delivery."""
    expected_persons, arrived_persons = [], []
    finals = {}
    for x in ("anon:1", "anon:2"):
        sent = []
        for group in ("g1", "g2"):
            resolutions = data.draw(st.integers(0, 4))
            for k in range(1, resolutions + 1):
                person = data.draw(st.sampled_from(PERSONS))
                sent.append((ASSIGN, (group, person, k)))
        for i in range(1, data.draw(st.integers(0, 4)) + 1):
            sent.append((FRAGMENT, {"inputs": i, "of": x}))
        # `sent` is in order: each sender's messages as it sent them (which sender goes first
        # does not matter: each replaces only its own)
        expected, expected_out = _run_router(x, sent)
        arrived, arrived_out = _run_router(x, _arrival(data, sent))
        if expected is None:
            assert arrived is None
            continue
        assert arrived[:3] == expected[:3], x  # groups, fragment, person routed to
        finals[x] = expected
        expected_persons += expected_out
        arrived_persons += _arrival(data, arrived_out)
    want = _persons(expected_persons)
    got = _persons(arrived_persons)
    for person in set(want) | set(got):
        assert got.get(person, ({}, {}))[0] == want.get(person, ({}, {}))[0], person
    for x, (_, frag, routed, _, _) in finals.items():
        if frag is not None:
            assert got[routed][0][x] == frag


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_persons_member_lists_end_where_in_order_delivery_ends(data):
    messages = []
    for group in ("g1", "g2", "g3"):
        for k in range(1, data.draw(st.integers(0, 4)) + 1):
            members = data.draw(st.one_of(st.none(), st.lists(st.sampled_from("uvw"), max_size=3)))
            messages.append(("user:p", (MEMBERS, (group, members, k))))
    want = _persons(messages)  # each group's resolutions in the order they were made
    got = _persons(_arrival(data, messages))
    assert got == want


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_route_and_resolvers_end_where_in_order_delivery_ends(data):
    """An identifier's Route: Link snapshots (stamped), component labels (only decreasing),
    one-way notices; then the resolvers of the groups it was sent to."""
    x = "anon:x"
    sent = []
    snapshots = data.draw(st.integers(1, 4))
    for k in range(1, snapshots + 1):
        # Link's snapshots only grow: every neighbour so far
        sent.append((NODE_UPDATE, {f"user:{i}": (i,) for i in range(1, k + 1)}, {"n": k}, k))
    # an identifier with a link both ends accepted gets a label from Connect (at least one)
    labels = sorted(data.draw(st.sets(st.sampled_from(["anon:a", "anon:b", "anon:c"]), min_size=1)))
    sent += [(LABEL, label) for label in reversed(labels)]  # each smaller than the last
    sent += [(ONE_WAY, w) for w in data.draw(st.sets(st.sampled_from(["user:1", "user:9"])))]

    expected, expected_out = _play(route_step, x, sent)
    arrived, arrived_out = _play(route_step, x, _arrival(data, sent))
    label, group_sent, node, _, _ = expected
    assert arrived[0] == label and arrived[1] == group_sent
    assert arrived[2][0] == node[0]
    assert set(arrived[2][1].get(ONE_WAY, ())) == set(node[1].get(ONE_WAY, ()))

    def resolvers(messages):
        groups: dict = {}
        for group, (kind, payload) in messages:
            nodes, stamps = groups.setdefault(group, ({}, {}))
            apply_group_message(nodes, stamps, kind, payload)
        return {g: nodes for g, (nodes, _) in groups.items()}

    got = resolvers(_arrival(data, arrived_out))
    want = resolvers(expected_out)
    holding = {g for g, nodes in got.items() if x in nodes}
    assert holding == {g for g, nodes in want.items() if x in nodes} == {group_sent}
    assert got[group_sent][x][0] == node[0]


def test_a_stamp_is_fresh_once():
    stamps: dict = {}
    assert fresh(stamps, "s", 2) and not fresh(stamps, "s", 2) and not fresh(stamps, "s", 1)
    assert fresh(stamps, "s", 3) and fresh(stamps, "t", 0)


def test_state_written_before_stamps_is_read_and_goes_on():
    """A job restored from a savepoint of the version without stamps: each stage's cell of that
    shape is padded, its stamps start from nothing, and the next message applies."""
    from transforms.stamps import upgraded

    assert upgraded(None, ({}, 0)) == ({}, 0)
    assert upgraded({"p": ["x"]}, ({}, 0)) == ({"p": ["x"]}, 0)  # ResolveGroup's bare dict
    assert upgraded(({"n": 1}, {}), ({}, {}, 0)) == ({"n": 1}, {}, 0)  # Link's pair
    # Route: (label, sent, node) -> a newer snapshot and the group's label apply
    state, out = route_step("anon:x", (NODE_UPDATE, {"user:1": (1,)}, {}, 1),
                            ("anon:b", "anon:b", ({}, {})))  # fmt: skip
    assert state[2] == ({"user:1": (1,)}, {}) and out == [
        ("anon:b", ("node", ("anon:x", {"user:1": (1,)}, {}, 1)))
    ]
    # Router: (groups, fragment, routed) -> a fragment pane applies and goes to the person
    state, out = route_fragment(
        "anon:x", (FRAGMENT, {"inputs": 1}), ({"g": "user:a"}, {}, "user:a")
    )
    assert state[1] == {"inputs": 1} and out == [("user:a", (FRAGMENT, "anon:x", {"inputs": 1}, 1))]
