"""Connected components in a fixed number of keyed stages: Hash-to-Min.

Pure functions, no Beam; ``transforms/stitching.py`` wires them to ``Connect[1..R]``.

Rastogi, Machanavajjhala, Chitnis, Das Sarma, "Finding Connected Components in Map-Reduce in
Logarithmic Rounds" (ICDE 2013). Every node ``v`` holds a *cluster* ``C(v)``, a set of nodes of
its own component, first ``{v}`` plus its neighbours. One round: ``v`` sends its whole cluster to
``m = min(C(v))`` and ``{m}`` to every member; a node's next cluster is the union of what it
received. The minimum of a component gathers the component and every other node learns it: a
path of ``n`` nodes needs about ``log2(n) + 2`` rounds (the paper proves ``O(log n)`` for paths;
measured here on chains, stars and random graphs by ``tests/test_components.py``), where label
propagation needs ``n``. ``rounds_for(n)`` is what the tests use to check that bound.

Why not a library: Beam has no connected-components transform, and the graph libraries
(networkx, graphframes) need the whole graph in one process or in Spark.

The streaming form keeps each stage's cluster as keyed state and applies every message as it
comes: :func:`absorb` grows the cluster (a union: order, duplication and bundling cannot change
it) and sends only what the receivers have not been sent before (the whole cluster when its
minimum changes, else the new members). A receiver's state is then the union of every message an
earlier version of the sender's cluster produced, each of them a set of nodes of the same
component: more than the bounded round gets, never anything from another component, and the
minimum still wins (the tests run random arrival orders against union-find).

Bounded runs stop early (:func:`settle`): every message also carries its sender's closed
neighbourhood to the sender's minimum; a minimum that holds the neighbourhoods of all its
cluster's members, each inside the cluster, knows its cluster is a whole component (a set that
contains ``v`` and is closed under adjacency is ``v``'s component) and tells every member, who
leave the rounds with their label. Small components (most persons) finish in 2-3 rounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableSequence
from functools import partial
from typing import Any


def absorb(
    v: str, cluster: frozenset[str] | None, incoming: Iterable[str]
) -> tuple[frozenset[str], list[tuple[str, tuple[str, ...]]]]:
    """One streaming message into ``v``'s cluster: ``(new cluster, messages for the next stage)``.

    ``cluster`` is None before the first message. The messages sent over time add up to what
    one round would send from the final cluster (the whole cluster to its minimum, the minimum
    to each member)."""
    cur = cluster if cluster is not None else frozenset((v,))
    new = cur.union(incoming)
    if cluster is not None and len(new) == len(cur):
        return cluster, []
    m = min(new)
    if cluster is None or m != min(cur):
        fresh = new
    else:
        fresh = new - cur
    out = [(m, tuple(sorted(fresh)))]
    # (The minimum learns itself from its own cluster message: no singleton for it.)
    out.extend((u, (m,)) for u in sorted(fresh) if u != m)
    return new, out


def hash_to_min_round(clusters: dict[str, set[str]]) -> dict[str, set[str]]:
    """One bounded round over every node's cluster (the reference the tests compare with)."""
    out: dict[str, set[str]] = {}
    for cluster in clusters.values():
        m = min(cluster)
        out.setdefault(m, set()).update(cluster)
        for u in cluster:
            out.setdefault(u, set()).add(m)
    return out


def initial_clusters(edges: Iterable[tuple[str, str]], nodes: Iterable[str] = ()) -> dict:
    clusters: dict[str, set[str]] = {v: {v} for v in nodes}
    for a, b in edges:
        clusters.setdefault(a, {a}).add(b)
        clusters.setdefault(b, {b}).add(a)
    return clusters


def labels(clusters: dict[str, set[str]]) -> dict[str, str]:
    return {v: min(c) for v, c in clusters.items()}


# --- bounded rounds with early exit ----------------------------------------------------------

# A bounded round's messages into a node ``(kind, payload)``:
CLUSTER = "c"  # ("c", nodes): part of the receiver's next cluster
ADJACENCY = "a"  # ("a", (node, its closed neighbourhood)): for the receiver as a minimum
SELF = "s"  # ("s", closed neighbourhood): the receiver's own, carried from round to round
DONE = "d"  # ("d", label): the receiver's component is complete, its label is ``label``


def first_round(v: str, neighbours: Iterable[str]) -> list[tuple[str, tuple]]:
    """What node ``v`` with these neighbours sends into the first bounded round (to itself)."""
    closed = tuple(sorted({v, *neighbours}))
    return [(v, (CLUSTER, closed)), (v, (SELF, closed))]


def settle(
    v: str, messages: Iterable[tuple[str, object]], first: bool = False
) -> tuple[str | None, list]:
    """One bounded round at node ``v``: ``(label, [])`` when ``v`` is done, else ``(None,
    messages for the next round)``. :func:`final_label` reads the last round instead.
    ``first``: the first round (its messages are :func:`first_round`'s).

    Each node sends its own closed neighbourhood to its current minimum every round (and to
    itself, so a stateless round still knows it), and in the first round to each of its
    neighbours too. A node whose known nodes (its cluster, its neighbourhood and the nodes whose
    neighbourhoods it received) all sent it their neighbourhoods, each inside that set, holds a
    whole component: every message carries nodes of its own component only, and a set of them
    that contains ``v`` and is closed under adjacency is ``v``'s component. It sends ``DONE``
    with the component's minimum to every member (itself included), who leave the rounds with
    that label. The minimum gets there once it gathered every neighbourhood; a node adjacent to
    all others (most persons' graphs: a star around the identifier their events carry) already
    in the second round."""
    cluster: set[str] = {v}
    adj: dict[str, tuple[str, ...]] = {}
    own: tuple[str, ...] = (v,)
    for kind, payload in messages:
        if kind == DONE:
            return payload, []  # type: ignore[return-value]
        if kind == CLUSTER:
            cluster.update(payload)  # type: ignore[arg-type]
        elif kind == SELF:
            # Round one may get a node's closed neighbourhood in parts, later rounds in one piece.
            own = tuple(sorted({*own, *payload}))  # type: ignore[misc]
        else:
            node, nbrs = payload  # type: ignore[misc]
            adj[node] = nbrs
    adj[v] = own
    known = cluster.union(own, adj)
    if len(adj) == len(known) and all(known.issuperset(n) for n in adj.values()):
        label = min(known)
        return None, [(u, (DONE, label)) for u in sorted(known)]
    m = min(cluster)
    members = tuple(sorted(cluster))
    out: list[tuple[str, tuple]] = [(m, (CLUSTER, members)), (v, (SELF, own))]
    out.extend((u, (CLUSTER, (m,))) for u in members if u != m)
    # The neighbourhood to the minimum, and in the first round to each neighbour too.
    to = {m, *own} if first else {m}
    out.extend((u, (ADJACENCY, (v, own))) for u in sorted(to) if u != v)
    return None, out


def final_label(v: str, messages: Iterable[tuple[str, object]]) -> str:
    """The label of ``v`` after the last round: its component's minimum when the rounds
    sufficed (always, for components up to about ``2 ** (rounds - 2)`` nodes across)."""
    best = v
    for kind, payload in messages:
        if kind == DONE:
            return payload  # type: ignore[return-value]
        if kind == CLUSTER:
            best = min(best, *payload)  # type: ignore[arg-type]
    return best


def component_minimums(adjacency: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Each node's component label in one process: its component's smallest node, the label
    Hash-to-Min's rounds converge to, for every node that has a neighbour (``adjacency``:
    node -> neighbours, symmetric). For a graph known to fit one call (a planned run's part,
    ``transforms/stitching.py``), where rounds of keyed stages would only add shuffles.

    A union-find whose root is always the smaller node (the hand-written part: a dict, since
    the graph is a part's few identifiers and a library would add nothing)."""
    parent: dict[str, str] = {}
    find = partial(find_root, parent)
    for v, nbrs in adjacency.items():
        for u in nbrs:
            parent.setdefault(v, v)
            parent.setdefault(u, u)
            a, b = find(v), find(u)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {x: find(x) for x in parent}


def find_root(parent: dict | MutableSequence, x: Any) -> Any:
    """The root of ``x`` in a union-find forest (``parent``: node -> parent, a root its own;
    a dict, or an array of ints), with the path to it compressed: the find of every union-find
    in the project (stitching's resolution, planning's parts, the generator's truth)."""
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root
