"""Hash-to-Min (transforms/components.py) against a reference union-find: chains and stars of
2..500 nodes, random graphs, the bounded rounds with early exit, and the streaming form under any
arrival order and duplication."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.components import (
    absorb,
    component_minimums,
    final_label,
    first_round,
    hash_to_min_round,
    initial_clusters,
    labels,
    settle,
)

ROUNDS = 16  # the config default (identity.rounds)


def union_find(nodes, edges) -> dict[str, str]:
    """Each node's component minimum, the plain way."""
    parent = {v: v for v in nodes}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {v: find(v) for v in nodes}


def bounded(nodes, edges, rounds=ROUNDS):
    """The bounded stages' rounds (as Connect[k] runs them, one GroupByKey each); returns the
    labels, the rounds in which any node was still active, and the elements shuffled."""
    nbrs = {v: set() for v in nodes}
    for a, b in edges:
        nbrs[a].add(b)
        nbrs[b].add(a)
    messages = [m for v in nodes if nbrs[v] for m in first_round(v, nbrs[v])]
    out = {v: v for v in nodes if not nbrs[v]}  # no neighbour: no group message, itself
    active = shuffled = 0
    for k in range(1, rounds + 1):
        inbox: dict[str, list] = {}
        for key, msg in messages:
            inbox.setdefault(key, []).append(msg)
        shuffled += len(messages)
        if not inbox:
            break
        active = k
        if k == rounds:
            out.update((v, final_label(v, ms)) for v, ms in inbox.items())
            break
        messages = []
        for v, ms in inbox.items():
            label, sent = settle(v, ms, first=k == 1)
            if label is not None:
                out[v] = label
            messages.extend(sent)
    return out, active, shuffled


def streaming(nodes, edges, rng, rounds=ROUNDS, duplicate=0.0):
    """The streaming stages: every message applied alone, in a random global order (any stage's
    messages may overtake any other's), some sent twice."""
    state: list[dict] = [{} for _ in range(rounds + 1)]
    queue = [(1, a, (a, b)) for a, b in edges] + [(1, b, (b, a)) for a, b in edges]
    label: dict[str, str] = {v: v for v in nodes}
    while queue:
        i = rng.randrange(len(queue))
        queue[i], queue[-1] = queue[-1], queue[i]
        k, v, msg = queue.pop()
        if rng.random() < duplicate:
            queue.append((k, v, msg))
        before = state[k].get(v)
        new, out = absorb(v, before, msg)
        state[k][v] = new
        if k == rounds:
            label[v] = min(new)
        else:
            queue.extend((k + 1, key, m) for key, m in out)
    return label


def names(n: int, seed: int) -> list[str]:
    """Identifier keys in an order unrelated to the chain's (as real keys are)."""
    rng = random.Random(seed)
    return [f"anon:{rng.getrandbits(48):012x}" for _ in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64, 200, 500])
def test_chains_and_stars_are_whole_components_in_bounded_rounds(n):
    ids = names(n, n)
    chain = list(zip(ids, ids[1:], strict=False))
    star = [(ids[0], x) for x in ids[1:]]
    sorted_chain = list(
        zip(sorted(ids), sorted(ids)[1:], strict=False)
    )  # the worst order for label propagation
    for edges in (chain, star, sorted_chain, sorted_chain[::-1]):
        got, active, _ = bounded(ids, edges)
        assert got == union_find(ids, edges)
        assert active < ROUNDS  # finished early: the early exit saw the whole component
    # Stars finish in three rounds: the centre sees the whole star in the second (the first
    # round sends each node's neighbourhood to its neighbours), the third only delivers DONE.
    # Chains in about log2(n) + 5.
    assert bounded(ids, star)[1] <= 3
    assert bounded(ids, chain)[1] <= n.bit_length() + 5


@pytest.mark.parametrize("n", [2, 5, 64, 500])
def test_chains_and_stars_in_streaming_stages_any_order(n):
    ids = names(n, n + 1)
    chain = list(zip(ids, ids[1:], strict=False))
    star = [(ids[0], x) for x in ids[1:]]
    rng = random.Random(n)
    for edges in (chain, star):
        assert streaming(ids, edges, rng) == union_find(ids, edges)


def test_too_few_rounds_leave_a_long_chain_split_and_visible():
    ids = names(500, 7)
    chain = list(zip(ids, ids[1:], strict=False))
    got, _, _ = bounded(ids, chain, rounds=4)
    # Several groups: exactly what the resolver counts as unresolved links (an edge whose ends
    # have different labels); never two components under one label.
    assert len(set(got.values())) > 1
    assert sum(got[a] != got[b] for a, b in chain) > 0
    truth = union_find(ids, chain)
    assert all(truth[v] == truth[got[v]] for v in ids)


def test_hash_to_min_reference_round_and_labels():
    clusters = initial_clusters([("b", "c"), ("c", "d")], nodes=["a"])
    assert clusters == {"a": {"a"}, "b": {"b", "c"}, "c": {"b", "c", "d"}, "d": {"c", "d"}}
    after = hash_to_min_round(clusters)
    assert after["b"] == {"b", "c", "d"} and after["d"] == {"b", "c"}
    assert labels(hash_to_min_round(after)) == {"a": "a", "b": "b", "c": "b", "d": "b"}


def test_absorb_sends_only_what_is_new_until_the_minimum_changes():
    c, out = absorb("m", None, ("m", "x"))
    assert c == {"m", "x"} and out == [("m", ("m", "x")), ("x", ("m",))]
    c, out = absorb("m", c, ("y",))
    assert out == [("m", ("y",)), ("y", ("m",))]  # same minimum: the new member only
    c2, out = absorb("m", c, ("x",))
    assert c2 is c and out == []  # nothing new: nothing sent (a duplicate costs a state read)
    c, out = absorb("m", c, ("a",))
    assert out[0] == ("a", ("a", "m", "x", "y"))  # a new minimum gets the whole cluster
    assert sorted(k for k, _ in out[1:]) == ["m", "x", "y"]  # "a" has its cluster already


def test_settle_reports_done_only_for_a_closed_cluster():
    # Minimum "a" holding b's and its own neighbourhood, both inside: done.
    label, out = settle("a", [("c", ("a", "b")), ("s", ("a", "b")), ("a", ("b", ("a", "b")))])
    assert label is None and sorted(out) == [("a", ("d", "a")), ("b", ("d", "a"))]
    # b's neighbourhood reaches c, outside the cluster: not done, rounds go on.
    label, out = settle("a", [("c", ("a", "b")), ("s", ("a", "b")), ("a", ("b", ("a", "b", "c")))])
    assert label is None and ("a", ("c", ("a", "b"))) in out
    assert settle("b", [("d", "a"), ("c", ("x",))]) == ("a", [])
    # Not the minimum: a centre that holds every neighbour's neighbourhood, each inside what it
    # knows, names the component by its minimum.
    label, out = settle(
        "c",
        [("c", ("a",)), ("s", ("a", "b", "c")), ("a", ("a", ("a", "c"))), ("a", ("b", ("b", "c")))],
    )
    assert label is None and sorted(out) == [(u, ("d", "a")) for u in ("a", "b", "c")]
    # Missing b's neighbourhood: b may have neighbours c does not know, rounds go on.
    label, out = settle("c", [("c", ("a",)), ("s", ("a", "b", "c")), ("a", ("a", ("a", "c")))])
    assert label is None and all(msg[0] != "d" for _u, msg in out)
    # The first round also sends the node's neighbourhood to each neighbour.
    _, out = settle("b", [("c", ("a", "b", "c")), ("s", ("a", "b", "c"))], first=True)
    assert ("c", ("a", ("b", ("a", "b", "c")))) in out and (
        "a",
        ("a", ("b", ("a", "b", "c"))),
    ) in out
    assert final_label("c", [("c", ("c", "e")), ("c", ("b",))]) == "b"


edges_strategy = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 40)).filter(lambda e: e[0] != e[1]),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(edges=edges_strategy, seed=st.integers(0, 2**32 - 1))
def test_random_graphs_equal_union_find_bounded_and_streaming(edges, seed):
    key = names(41, seed)
    edges = [(key[a], key[b]) for a, b in edges]
    nodes = sorted({v for e in edges for v in e})
    truth = union_find(nodes, edges)
    assert bounded(nodes, edges)[0] == truth
    rng = random.Random(seed)
    assert streaming(nodes, edges, rng, duplicate=0.2) == truth


@settings(max_examples=300, deadline=None)
@given(edges=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=80))
def test_component_minimums_are_each_components_smallest_node(edges):
    """One call (a planned run's part): every node with a neighbour gets its component's
    smallest node, found here by a breadth-first search, not by union-find."""
    adjacency: dict[str, set[str]] = {}
    for a, b in edges:
        if a != b:
            adjacency.setdefault(f"n{a:02d}", set()).add(f"n{b:02d}")
            adjacency.setdefault(f"n{b:02d}", set()).add(f"n{a:02d}")
    expected = {}
    for start in adjacency:
        seen, frontier = {start}, [start]
        while frontier:
            frontier = [u for v in frontier for u in adjacency[v] if u not in seen]
            seen.update(frontier)
        expected[start] = min(seen)
    assert component_minimums(adjacency) == expected
