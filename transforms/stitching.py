r"""Identity stitching in keyed Beam state, with no cycle and no key holding the whole graph.

    events -> links (+ unlink / delete notices) -> Link -> Pair -> Connect[1] -> ... -> Connect[R]
                                                   |  \                          |
               identity_review <- shared ids <----+   +-> evidence -> Route <-----+ group
                                                                        |
                                                                   ResolveGroup -> assignments,
                                                                                   merges, review

Three steps (DESIGN.md section 4):

1. **Evidence.** ``Link`` is keyed by identifier and keeps its neighbours (with the earliest
   link evidence of each pair) and its unlink / delete notices. An identifier with more distinct
   neighbours than ``max_cluster_size`` is *shared*: its list stops at the cap and all its links
   are refused, so a junk id that escaped the blocklist cannot grow without bound. ``Pair``
   (keyed by link) lets a link into the component stages only when both ends accepted it: the
   links past a shared identifier's cap never glue groups, and the adjacency ``Connect`` sees
   is symmetric. (Bounded runs skip the pair's key: each end tells the other it accepted, and
   ``Connect[1]`` keeps the neighbours that accepted an identifier it accepted itself,
   :func:`accepted_neighbours`.)
2. **Groups: connected components in a fixed number of stages.** ``Connect[1..R]`` (``R`` =
   ``identity.rounds``, default 16) run Hash-to-Min (``transforms/components.py``): each stage
   doubles the reach of the one before, so chains of ~2^(R-4) identifiers (measured: 5,000 at
   16) end with one label, the component's smallest key, where one-hop label propagation needed
   a stage per link. A bounded run's round is a ``GroupByKey`` and a component whose minimum sees
   it closed leaves early (most persons after 3-4 rounds); a streaming stage keeps each
   identifier's cluster as state and sends only what grew. If ``R`` does not suffice, the links
   between the parts are counted (``identity.unresolved_links``), never silently applied or
   dropped. ``Route`` (keyed by identifier) joins each identifier's evidence with its group and
   moves it when the group changes.
3. **Exact resolution per group.** ``ResolveGroup`` is keyed by the group label and holds its
   identifiers' neighbour lists. When the watermark passes the group's newest evidence it applies
   :func:`transforms.identity_graph.resolve` (guardrails, event-time order) to the whole group and
   emits what changed: ``identifier -> person`` assignments, ``profile_merged`` /
   ``profile_split`` records and refused links with their evidence. The result depends only on the
   evidence set, so any order, duplication and bundling of the input gives the same persons.

Blocked (junk) identifiers never enter the graph; each distinct ``(junk id, other id)`` pair is
reported once to ``identity_review`` with its earliest evidence.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.typehints import KV
from apache_beam.utils.timestamp import Timestamp

from transforms.components import (
    absorb,
    component_minimums,
    final_label,
    first_round,
    settle,
)
from transforms.dead_letter import FAILED, all_or_dead_letter, dead_letter_on_raise, guarded
from transforms.identity import blocked_identifiers, extract_identifiers, normalize
from transforms.identity_graph import (
    Link,
    StitchRules,
    changes,
    earlier,
    event_links,
    id_key,
    make_link,
    resolve,
)
from transforms.stamps import fresh, upgraded

MERGES = "merges"
REVIEW = "identity_review"
ASSIGNMENTS = "assignments"
IDENTITIES = "identities"
FAILED_EVENTS = "failed_events"

UNLINK_TYPE = "unlink"
DELETE_TYPE = "delete"

# Messages into Link, keyed by identifier:
NEIGHBOUR = "n"  # ("n", neighbour, Link as a tuple)
UNLINK = "u"  # ("u", other identifier, Link): never one person with ``other``
DELETED = "x"  # ("x", time_ms): the identifier was deleted
SHARED = "h"  # attrs flag: the identifier is shared (too many neighbours)

# Elements between the stages (outputs of Link / Connect[R] into Route):
NODES = "nodes"  # (x, ("node", nbrs, attrs)): the identifier's evidence
LABELS = "labels"  # (x, ("label", group)): the identifier's group
NODE_UPDATE = "node"
LABEL = "label"
ONE_WAY = "w"  # (y, ("w", x)) into Route; attrs key: neighbours whose end refused the link
# Link's acceptance of a neighbour: streaming, keyed by the pair ("a\x1fb", acceptor) for Pair;
# bounded, keyed by the accepted end (ACCEPTS, OWN below) for Connect[1]
PAIRS = "pairs"
NOTICES = "notices"  # bounded runs: unlink / delete messages, beside the links keyed by pair
# Bounded runs: Link's acceptances, keyed by the accepted identifier (``Connect[1]``'s input)
ACCEPTS = "y"  # (y, ("y", x)): x accepted its link with y
OWN = "o"  # (x, ("o", accepted neighbours)): sent by a shared x only (it refused some)


# --- pure helpers ------------------------------------------------------------------------------


def unlink_target(event: dict[str, Any], identity) -> str | None:
    """An ``unlink`` control event names the identifier to detach from the event's person in
    ``properties.identifier: {type, value}``."""
    props = event.get("properties")
    ident = props.get("identifier") if isinstance(props, dict) else None
    if not isinstance(ident, dict):
        return None
    t, v = ident.get("type"), ident.get("value")
    for it in identity.types:
        if it.name == t:
            value = normalize(v, it.normalizer)
            return id_key(t, value) if value else None
    return None


def stitch_messages(
    event: dict[str, Any], time_ms: int, identity, identifiers=None
) -> list[tuple[str, tuple]]:
    """What one event tells ``Link``: its links (to both ends), or an unlink / delete.
    ``identifiers``: the event's ``(type, value)`` pairs when already read (the envelope's)."""
    etype = event.get("type")
    if identifiers is None:
        identifiers = extract_identifiers(event, identity)
    ids = [id_key(t, v) for t, v in identifiers]
    if etype == DELETE_TYPE:
        return [(ids[0], (DELETED, time_ms))] if ids else []
    if etype == UNLINK_TYPE:
        other = unlink_target(event, identity)
        if not ids or not other or other == ids[0]:
            return []
        link = make_link(ids[0], other, time_ms, str(event.get("messageId", "")), UNLINK_TYPE)
        evidence = tuple(link)
        return [(ids[0], (UNLINK, other, evidence)), (other, (UNLINK, ids[0], evidence))]
    out = []
    for link in event_links(event, time_ms, identity, ids):
        # Evidence travels and is stored as a plain tuple: FastPrimitivesCoder encodes a
        # NamedTuple ~5x slower (and ~60% bigger) than the same fields as a tuple.
        evidence = tuple(link)
        out.append((link.a, (NEIGHBOUR, link.b, evidence)))
        out.append((link.b, (NEIGHBOUR, link.a, evidence)))
    return out


def blocked_links(
    event: dict[str, Any], time_ms: int, identity, identifiers=None, junk=None
) -> list[tuple[str, Link]]:
    """``("junk|other", link)`` for each junk identifier the event carries next to a real one.
    ``identifiers`` / ``junk``: the event's pairs when already read (the envelope's)."""
    if junk is None:
        junk = blocked_identifiers(event, identity)
    if not junk:
        return []
    junk = [id_key(t, v) for t, v in junk]
    if identifiers is None:
        identifiers = extract_identifiers(event, identity)
    ids = [id_key(t, v) for t, v in identifiers]
    mid, etype = str(event.get("messageId", "")), str(event.get("type", ""))
    return [
        (f"{j}|{o}", make_link(j, o, time_ms, mid, etype)) for j in sorted(set(junk)) for o in ids
    ]


def _ts(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


def bounded_stitch_messages(
    event: dict[str, Any], time_ms: int, identity, identifiers=None
) -> tuple[list[tuple[tuple[str, str], tuple]], list[tuple[str, tuple]]]:
    """Bounded runs: what :func:`stitch_messages` says, with each link once, keyed by its pair
    ``((a, b), evidence)`` with ``a < b``, instead of twice (once to each end): a bounded run
    keeps the earliest evidence per pair before sending it to both ends
    (:class:`EarliestLinkPerPair`). Returns ``(links, notices)``."""
    links, notices = [], []
    for key, msg in stitch_messages(event, time_ms, identity, identifiers):
        if msg[0] != NEIGHBOUR:
            notices.append((key, msg))
        elif key < msg[1]:
            links.append(((key, msg[1]), msg[2]))
    return links, notices


# --- Link: each identifier's neighbours and notices ---------------------------------------------


class _LinkFn(beam.DoFn):
    """Keyed by identifier: its neighbours (with the earliest evidence of each pair, at most
    ``max_cluster_size``) and its unlink / delete / shared notices.

    Out: ``(x, ("node", nbrs, attrs, stamp))`` to ``Route`` when they change (the stamp counts
    the changes: ``Route`` keeps the newest, transforms/stamps.py), ``(x, (x, nbr))`` to
    ``Connect[1]`` for each new neighbour, shared-identifier refusals to ``identity_review``."""

    # One state cell per identifier, ``(neighbours, attrs, changes)``: on the local runner every
    # cell costs a keyed entry of its own (and a round trip per read), so fewer is leaner.
    NODE = ReadModifyWriteStateSpec("node", FastPrimitivesCoder())

    def __init__(self, cap: int):
        self._cap = cap
        self._shared = Metrics.counter("cdi", "identity.shared_identifiers")

    @dead_letter_on_raise
    def process(self, element, node_state=beam.DoFn.StateParam(NODE)):
        x, msg = element
        nbrs, attrs, stamp = upgraded(node_state.read(), ({}, {}, 0))
        changed, new_nbr, refused, review = self._step(x, msg, nbrs, attrs)
        for record in review:
            yield beam.pvalue.TaggedOutput(REVIEW, record)
        if changed:
            node_state.write((nbrs, attrs, stamp + 1))
            yield beam.pvalue.TaggedOutput(NODES, (x, (NODE_UPDATE, nbrs, attrs, stamp + 1)))
        if new_nbr is not None:
            yield (pair_key(x, new_nbr), x)
        if refused is not None:
            yield beam.pvalue.TaggedOutput(NODES, (refused, (ONE_WAY, x)))

    def _step(self, x, msg, nbrs, attrs):
        """Apply one message to the identifier (mutates ``nbrs``/``attrs``); returns whether its
        evidence changed, the neighbour it newly accepted (or None), the neighbour it refused
        for being past its cap (or None) and review records."""
        kind = msg[0]
        review: list[dict] = []
        if kind == NEIGHBOUR:
            _, nbr, link = msg
            known = nbrs.get(nbr)
            if attrs.get(SHARED):
                if known is None:
                    review.append(_shared_record(x, link))
                    return False, None, nbr, review
                return False, None, None, review
            if known is None and len(nbrs) >= self._cap:
                # Shared identifier: its neighbour list stays at the cap and ResolveGroup
                # refuses every link it has; the links past the cap are reported here.
                attrs[SHARED] = True
                self._shared.inc()
                review.append(_shared_record(x, link))
                return True, None, nbr, review
            best = earlier(known, link)
            if best != known:
                nbrs[nbr] = best
                return True, (nbr if known is None else None), None, review
            return False, None, None, review
        if kind == UNLINK:
            _, other, link = msg
            unl = attrs.setdefault(UNLINK, {})
            best = earlier(unl.get(other), link)
            if unl.get(other) != best:
                unl[other] = best
                return True, None, None, review
        elif kind == DELETED:
            if attrs.get(DELETED) is None or msg[1] < attrs[DELETED]:
                attrs[DELETED] = msg[1]
                return True, None, None, review
        return False, None, None, review


SHARED_RULE = "breaker.shared_identifier"


def _accepted_by_shared(link: Link, nodes: dict) -> bool:
    """Whether every shared end of ``link`` holds it among its (capped) neighbours: a link
    past a shared identifier's cap is reported by ``Link`` when it arrives, the others by the
    group's resolution (with both sides' clusters)."""
    for end, other in ((link.a, link.b), (link.b, link.a)):
        nbrs, attrs = nodes[end]
        if attrs.get(SHARED) and other not in nbrs:
            return False
    return True


def _shared_record(x: str, link: tuple) -> dict:
    link = Link(*link)
    return {
        "kind": "link_refused",
        "rule": SHARED_RULE,
        "identifier": x,
        "link": link.record(),
        "clusters": None,
    }


def _message_order(msg: tuple) -> tuple:
    """The order a bounded stage applies an identifier's messages in: neighbours by earliest
    evidence first (so a shared identifier keeps the earliest ``max_cluster_size`` links, as if
    they had arrived first), then the notices."""
    if msg[0] == NEIGHBOUR:
        return (0, msg[2], msg[1])
    return (1, msg[0], repr(msg[1:]))


class _LinkGroupedFn(_LinkFn):
    """Bounded runs: ``(identifier, all its messages)`` in, applied with the streaming stage's
    own rule (``_step``) in :func:`_message_order`; the settled identifier goes out once: to
    ``Route``, and its acceptance of each neighbour to that neighbour in ``Connect[1]`` (a
    shared identifier also tells itself which it accepted: :func:`accepted_neighbours`)."""

    @dead_letter_on_raise
    def process(self, element):
        x, messages = element
        nbrs, attrs = {}, {}
        for msg in sorted(messages, key=_message_order):
            _, _, refused, review = self._step(x, msg, nbrs, attrs)
            for record in review:
                yield beam.pvalue.TaggedOutput(REVIEW, record)
            if refused is not None:
                yield beam.pvalue.TaggedOutput(NODES, (refused, (ONE_WAY, x)))
        yield beam.pvalue.TaggedOutput(NODES, (x, (NODE_UPDATE, nbrs, attrs, 1)))
        for nbr in nbrs:
            yield (nbr, (ACCEPTS, x))
        if attrs.get(SHARED):
            yield (x, (OWN, tuple(nbrs)))


# --- Pair: a link joins groups only when both ends accept it -------------------------------------


def pair_key(x: str, y: str) -> str:
    return f"{x}\x1f{y}" if x < y else f"{y}\x1f{x}"


class _PairFn(beam.DoFn):
    """Keyed by the pair: which ends accepted the link. When both have, the edge goes into
    ``Connect[1]``, once. A shared identifier refuses the links past its cap, so they never
    reach ``Connect``: a junk id that escaped the blocklist glues at most its first
    ``max_cluster_size`` neighbours into one group (as the ones it accepted), never everyone it
    was seen with, and every adjacency ``Connect`` sees is symmetric (its bounded early exit
    relies on it)."""

    ENDS = ReadModifyWriteStateSpec("ends", FastPrimitivesCoder())

    @dead_letter_on_raise
    def process(self, element, ends_state=beam.DoFn.StateParam(ENDS)):
        key, end = element
        ends = ends_state.read() or ()
        if end in ends:
            return
        ends_state.write((*ends, end))
        if len(ends) == 1:
            a, b = key.split("\x1f", 1)
            yield (a, (a, b))
            yield (b, (a, b))


def accepted_neighbours(v: str, messages) -> tuple[str, ...]:
    """Bounded runs, at identifier ``v``: its neighbours over links both ends accepted, from
    Link's ``ACCEPTS`` (and, when ``v`` is shared, its own ``OWN``) messages. Both ends of a
    link hear of it, and an identifier that is not shared accepts every link it hears of, so
    the identifiers that accepted ``v`` are its neighbours, less, when ``v`` is shared, those
    it refused itself (past its cap): what ``Pair`` lets through in a streaming run."""
    accepted_by: set[str] = set()
    own: set[str] | None = None
    for kind, payload in messages:
        if kind == ACCEPTS:
            accepted_by.add(payload)
        else:
            own = set(payload)
    return tuple(sorted(accepted_by if own is None else accepted_by & own))


def _links_and_notices(split: tuple[list, list]) -> list:
    links, notices = split
    return [*links, *(beam.pvalue.TaggedOutput(NOTICES, n) for n in notices)]


# --- Connect[1..R]: each identifier's component (transforms/components.py) ------------------------


class _ConnectFn(beam.DoFn):
    """One Hash-to-Min stage in keyed state: the identifier's cluster, grown by every message
    (:func:`transforms.components.absorb`). The last stage sends ``Route`` the cluster's
    minimum, the identifier's group, whenever it changes."""

    CLUSTER = ReadModifyWriteStateSpec("cluster", FastPrimitivesCoder())

    def __init__(self, last: bool):
        self._last = last

    @dead_letter_on_raise
    def process(self, element, cluster_state=beam.DoFn.StateParam(CLUSTER)):
        v, nodes = element
        cluster = cluster_state.read()
        new, out = absorb(v, cluster, nodes)
        if not out:
            return
        cluster_state.write(new)
        if not self._last:
            yield from out
        elif cluster is None or min(new) != min(cluster):
            yield (v, (LABEL, min(new)))


class _ConnectGroupedFn(beam.DoFn):
    """One bounded Hash-to-Min round with early exit (:func:`transforms.components.settle`):
    ``(identifier, its messages)`` in; a node whose component is complete leaves to ``Route``."""

    def __init__(self, last: bool, first: bool = False):
        self._last, self._first = last, first

    @dead_letter_on_raise
    def process(self, element):
        v, messages = element
        if self._first:  # Link's acceptances: the round starts from v's closed neighbourhood
            nbrs = accepted_neighbours(v, messages)
            if not nbrs:
                return
            messages = [msg for _, msg in first_round(v, nbrs)]
        if self._last:
            yield beam.pvalue.TaggedOutput(LABELS, (v, (LABEL, final_label(v, messages))))
            return
        label, out = settle(v, messages, first=self._first)
        if label is not None:
            yield beam.pvalue.TaggedOutput(LABELS, (v, (LABEL, label)))
        yield from out


# --- Route: each identifier's evidence to its group's resolver ------------------------------------


def route_step(x: str, msg: tuple, state: tuple | None) -> tuple[tuple | None, list]:
    """One message to an identifier's ``Route`` (pure): ``(new state or None when nothing
    changed, messages to resolvers)``.

    State: ``(label, group sent to, node, node stamp, messages sent)``. A label only ever
    decreases (a component's minimum), so the smallest one seen is the group whatever the
    arrival order; a node snapshot from ``Link`` replaces the held one only when its stamp is
    newer; a one-way notice is added. Each message to a resolver carries the count of messages
    this identifier sent, so a resolver keeps the newest ``node`` or ``drop`` of it."""
    label, sent, node, node_stamp, out = upgraded(state, (None, None, None, 0, 0))
    if msg[0] == LABEL:
        if label is not None and msg[1] >= label:
            return None, []
        label = msg[1]
    elif msg[0] == ONE_WAY:
        nbrs, attrs = node or ({}, {})
        if msg[1] in attrs.get(ONE_WAY, ()):
            return None, []
        node = (nbrs, {**attrs, ONE_WAY: (*attrs.get(ONE_WAY, ()), msg[1])})
    else:
        if msg[3] <= node_stamp:
            return None, []
        node_stamp = msg[3]
        old_way = node[1].get(ONE_WAY) if node else None
        node = (msg[1], {**msg[2], ONE_WAY: old_way} if old_way else msg[2])
    # Connect names the group of an identifier with a link both ends accepted; one whose
    # every neighbour refused its link (past their cap) never gets a name: it is a group of
    # its own. One still waiting for its name waits here, not in a group of its own.
    group = label
    if group is None and node is not None:
        nbrs, attrs = node
        if not set(nbrs).difference(attrs.get(ONE_WAY, ())):
            group = x
    messages = []
    if group is not None and node is not None:
        out += 1
        messages.append((group, ("node", (x, *node, out))))
        if sent is not None and sent != group:
            out += 1
            messages.append((sent, ("drop", (x, out))))
        sent = group
    return (label, sent, node, node_stamp, out), messages


class _RouteFn(beam.DoFn):
    """Keyed by identifier: joins its evidence (from ``Link``, with the neighbours that refused
    its link past their cap) with its group (from the last ``Connect``) and hands the evidence to
    the group's resolver, moving it when the group changes (:func:`route_step`). An identifier
    without a link both ends accepted has no group message: its group is itself."""

    STATE = ReadModifyWriteStateSpec("route", FastPrimitivesCoder())

    @dead_letter_on_raise
    def process(self, element, state=beam.DoFn.StateParam(STATE)):
        x, msg = element
        after, messages = route_step(x, msg, state.read())
        if after is not None:
            state.write(after)
        yield from messages


def _route_grouped(element):
    """Bounded runs: ``(identifier, [its node, its label])`` -> ``(group, ("node", ...))``."""
    x, messages = element
    label, node, one_way = x, None, []
    for msg in messages:
        if msg[0] == LABEL:
            label = msg[1]
        elif msg[0] == ONE_WAY:
            one_way.append(msg[1])
        else:
            node = (msg[1], msg[2])
    if node is not None:
        if one_way:
            node = (node[0], {**node[1], ONE_WAY: tuple(sorted(set(one_way)))})
        yield (label, ("node", (x, *node, 1)))


def _to_both_ends(kv):
    (a, b), evidence = kv
    return [(a, (NEIGHBOUR, b, evidence)), (b, (NEIGHBOUR, a, evidence))]


class EarliestLinkPerPair(beam.PTransform):
    """Bounded runs: ``((a, b), evidence)`` per link in, one ``NEIGHBOUR`` message to each end
    with the pair's earliest evidence out, instead of one per event that carries the pair.

    ``Link`` keeps exactly that (``earlier`` of all it is told), so its state, and every
    later stage's, is the same; what changes is that a person's thousand events no longer cost a
    thousand stateful calls each side (a combiner lifted before the shuffle costs ~3 µs each).
    Streaming runs keep every message: there the earliest evidence so far must reach the graph
    as soon as it arrives."""

    def expand(self, pairs):
        # Evidence tuples sort as Links do: min is ``earlier`` (time, then messageId).
        return (
            pairs
            | "Earliest" >> beam.CombinePerKey(min)
            | "ToBothEnds" >> beam.FlatMap(_to_both_ends).with_output_types(KV[str, Any])
        )


# --- ResolveGroup ------------------------------------------------------------------------------


class _GroupResolver:
    """Resolution of one candidate group with its counters, shared by the stateful resolver and
    the grouped one of bounded runs."""

    def __init__(self, rules: StitchRules, deleted: frozenset[str]):
        self._rules = rules
        self._deleted = deleted
        self._unresolved = Metrics.counter("cdi", "identity.unresolved_links")
        self._merges = Metrics.counter("cdi", "identity.merges")
        self._splits = Metrics.counter("cdi", "identity.splits")
        self._refused = Metrics.counter("cdi", "identity.links_refused")
        self._group_size = Metrics.distribution("cdi", "identity.group_size")

    def _resolution(
        self, key: str, nodes: dict, before: dict[str, tuple], sent: set, stamp: int = 1
    ):
        """Resolve the group's nodes; returns ``(outputs, members per person, refusals sent)``,
        the outputs being only what changed since ``before`` / ``sent``. Assignments and member
        lists carry ``stamp``, the group's count of resolutions: a receiver keeps the newest
        (transforms/stamps.py)."""
        # Deleted identifiers stay in the group as single persons without links, so the person
        # they leave is reported as split.
        owned = {
            x
            for x, (_, attrs) in nodes.items()
            if attrs.get(DELETED) is None and x not in self._deleted
        }
        links: dict[tuple[str, str], Link] = {}
        unlinked, shared = [], []
        for x in owned:
            nbrs, attrs = nodes[x]
            if attrs.get(SHARED):
                shared.append(x)
            for nbr, evidence in nbrs.items():
                link = Link(*evidence)
                if nbr in owned:
                    links[(link.a, link.b)] = earlier(links.get((link.a, link.b)), link)
                elif (
                    nbr not in nodes
                    and nbr not in self._deleted
                    and nbr not in attrs.get(ONE_WAY, ())
                ):
                    # The other end is in another group: Connect's rounds did not suffice.
                    # (A one-way neighbour refused the link past its cap: Link reported it.)
                    self._unresolved.inc()
            for other in attrs.get(UNLINK, {}):
                unlinked.append((x, other))
        res = resolve(nodes, links.values(), self._rules, unlinked, shared)
        if owned:
            self._group_size.update(len(owned))
        out: list = []
        merges, splits = changes(before, res)
        for rec in merges:
            self._merges.inc()
            out.append(beam.pvalue.TaggedOutput(MERGES, rec))
        for rec in splits:
            self._splits.inc()
            out.append(beam.pvalue.TaggedOutput(MERGES, rec))
        new_sent = set()
        for refusal in res.refused:
            if refusal.rule == SHARED_RULE and not _accepted_by_shared(refusal.link, nodes):
                continue  # past the shared end's cap: the Link stage reported it
            k = (refusal.link.a, refusal.link.b, refusal.rule)
            new_sent.add(k)
            if k not in sent:
                self._refused.inc()
                out.append(beam.pvalue.TaggedOutput(REVIEW, refusal.record()))
        # Assignments (identifier -> person) and member lists, only what changed.
        old_person = {m: p for p, ms in before.items() for m in ms}
        for x, person in res.person_of.items():
            if old_person.get(x) != person:
                out.append(beam.pvalue.TaggedOutput(ASSIGNMENTS, (x, (key, person, stamp))))
        for x in old_person:
            if x not in res.person_of:
                out.append(beam.pvalue.TaggedOutput(ASSIGNMENTS, (x, (key, None, stamp))))
        for person, members in res.members.items():
            if before.get(person) != members:
                out.append(beam.pvalue.TaggedOutput(IDENTITIES, (person, (key, members, stamp))))
        for person in before:
            if person not in res.members:
                out.append(beam.pvalue.TaggedOutput(IDENTITIES, (person, (key, None, stamp))))
        return out, dict(res.members), new_sent


def apply_group_message(nodes: dict, stamps: dict, kind: str, payload: tuple) -> bool:
    """A ``node`` (``(x, nbrs, attrs, stamp)``) or ``drop`` (``(x, stamp)``) from an identifier's
    ``Route`` to a group (pure; mutates ``nodes`` and ``stamps``): applied only when newer than
    the last one applied of that identifier (transforms/stamps.py). Returns whether it was."""
    if not fresh(stamps, payload[0], payload[-1]):
        return False
    if kind == "node":
        x, nbrs, attrs, _ = payload
        nodes[x] = (nbrs, attrs)
    else:
        nodes.pop(payload[0], None)
    return True


class _ResolveGroupFn(beam.DoFn, _GroupResolver):
    # ``(nodes by identifier, stamp of the newest message applied per identifier)``: a node
    # or drop that is not newer than that (reordered on the way) changes nothing.
    NODES = ReadModifyWriteStateSpec("nodes", FastPrimitivesCoder())
    # ``(members per person as last emitted, resolutions so far)``.
    EMITTED = ReadModifyWriteStateSpec("emitted", FastPrimitivesCoder())
    REFUSED = ReadModifyWriteStateSpec("refused", FastPrimitivesCoder())
    ARMED = ReadModifyWriteStateSpec("armed", VarIntCoder())
    RESOLVE_TIMER = TimerSpec("resolve", TimeDomain.WATERMARK)

    def __init__(self, rules: StitchRules, deleted: frozenset[str]):
        _GroupResolver.__init__(self, rules, deleted)

    @dead_letter_on_raise
    def process(
        self,
        element,
        ts=beam.DoFn.TimestampParam,
        nodes_state=beam.DoFn.StateParam(NODES),
        armed=beam.DoFn.StateParam(ARMED),
        timer=beam.DoFn.TimerParam(RESOLVE_TIMER),
    ):
        _, (kind, payload) = element
        nodes, stamps = upgraded(nodes_state.read(), ({}, {}))
        if not apply_group_message(nodes, stamps, kind, payload):
            return
        nodes_state.write((nodes, stamps))
        # Resolve once the watermark passes the newest evidence of the group.
        t = int(ts.micros // 1000)
        current = armed.read()
        if current is None or t > current:
            armed.write(t)
            timer.set(ts)

    @on_timer(RESOLVE_TIMER)
    @dead_letter_on_raise
    def on_resolve(
        self,
        key=beam.DoFn.KeyParam,
        nodes_state=beam.DoFn.StateParam(NODES),
        emitted_state=beam.DoFn.StateParam(EMITTED),
        refused_state=beam.DoFn.StateParam(REFUSED),
        armed=beam.DoFn.StateParam(ARMED),
    ):
        armed.clear()
        before, resolutions = upgraded(emitted_state.read(), ({}, 0))
        outputs, members, sent = self._resolution(
            key,
            upgraded(nodes_state.read(), ({}, {}))[0],
            before,
            refused_state.read() or set(),
            resolutions + 1,
        )
        refused_state.write(sent)
        emitted_state.write((members, resolutions + 1))
        yield from outputs


class _ResolveGroupedFn(beam.DoFn, _GroupResolver):
    """Bounded runs: ``(group, all its node messages)`` in, resolved once (nothing emitted
    before, so every assignment, member list, merge and refusal is new)."""

    def __init__(self, rules: StitchRules, deleted: frozenset[str]):
        _GroupResolver.__init__(self, rules, deleted)

    @dead_letter_on_raise
    def process(self, element):
        key, messages = element
        nodes = {x: (nbrs, attrs) for _, (x, nbrs, attrs, _) in messages}
        outputs, _, _ = self._resolution(key, nodes, {}, set())
        yield from outputs


# --- Planned runs: each part in one call ----------------------------------------------------------


class _StitchPartFn(beam.DoFn):
    """Planned runs: ``(part, (links, notices))`` in, what :func:`bounded_stitch_messages` says
    of the part's events; the part's assignments, members, merges and review out, exactly what
    the bounded stages give for it.

    Planning put every event whose idempotency key or identifiers meet into one part, so no
    identifier's graph reaches past its part and the part is known whole here. It is settled in
    memory with the bounded stages' own functions, in their order: the earliest evidence per
    pair (``EarliestLinkPerPair``), each identifier's messages through ``Link``
    (``_LinkGroupedFn``), the accepted adjacency (:func:`accepted_neighbours`), its components
    by union-find (:func:`transforms.components.component_minimums`: the labels Hash-to-Min
    converges to, without rounds, so no chain is too long), ``Route`` (:func:`_route_grouped`)
    and each group's resolution (``_ResolveGroupedFn``): one call per part instead of ~8 shuffles
    and a call per identifier and step. An identifier whose ``Link`` step
    raises is a dead letter as in the stages; a failure past that loses the part's call."""

    def __init__(self, rules: StitchRules, deleted: frozenset[str]):
        self._link = _LinkGroupedFn(rules.max_cluster_size)
        self._resolver = _ResolveGroupedFn(rules, deleted)

    @dead_letter_on_raise
    def process(self, element):
        _, (links, notices) = element
        earliest: dict[tuple[str, str], tuple] = {}
        for pair, evidence in links:
            known = earliest.get(pair)
            if known is None or evidence < known:  # evidence tuples sort as Links do
                earliest[pair] = evidence
        inbox: dict[str, list] = {}
        for x, msg in notices:
            inbox.setdefault(x, []).append(msg)
        for pair_evidence in earliest.items():
            for x, msg in _to_both_ends(pair_evidence):
                inbox.setdefault(x, []).append(msg)
        accepted: dict[str, list] = {}
        routed: dict[str, list] = {}
        for x, messages in inbox.items():
            for out in self._link.process((x, messages)):
                if not isinstance(out, beam.pvalue.TaggedOutput):
                    to, msg = out
                    accepted.setdefault(to, []).append(msg)
                elif out.tag == NODES:
                    to, msg = out.value
                    routed.setdefault(to, []).append(msg)
                else:
                    yield out  # review records, dead letters
        adjacency = {v: accepted_neighbours(v, msgs) for v, msgs in accepted.items()}
        for v, label in component_minimums(adjacency).items():
            routed.setdefault(v, []).append((LABEL, label))
        groups: dict[str, list] = {}
        for x, messages in routed.items():
            for group, msg in _route_grouped((x, messages)):
                groups.setdefault(group, []).append(msg)
        for group, messages in groups.items():
            yield from self._resolver.process((group, messages))


class _ReportBlockedFn(beam.DoFn):
    """One review record per distinct (junk id, other id) pair, with its earliest evidence, once
    the watermark passes it."""

    BEST = ReadModifyWriteStateSpec("best", FastPrimitivesCoder())
    DONE = ReadModifyWriteStateSpec("done", VarIntCoder())
    TIMER = TimerSpec("report", TimeDomain.WATERMARK)

    @dead_letter_on_raise
    def process(
        self,
        element,
        best=beam.DoFn.StateParam(BEST),
        done=beam.DoFn.StateParam(DONE),
        timer=beam.DoFn.TimerParam(TIMER),
    ):
        key, link = element
        if done.read():
            return
        cur = best.read()
        keep = earlier(Link(*cur) if cur else None, link)
        if cur is None:
            timer.set(_ts(keep.time_ms))
        best.write(tuple(keep))

    @on_timer(TIMER)
    @dead_letter_on_raise
    def report(
        self,
        key=beam.DoFn.KeyParam,
        best=beam.DoFn.StateParam(BEST),
        done=beam.DoFn.StateParam(DONE),
    ):
        cur = best.read()
        if cur is None or done.read():
            return
        done.write(1)
        best.clear()
        yield _blocked_record(key, Link(*cur))


def _blocked_record(key: str, link: Link) -> dict:
    """The review record of a ``junk|other`` pair with its earliest evidence."""
    return {
        "kind": "link_refused",
        "rule": "blocklist",
        "identifier": key.split("|", 1)[0],  # the junk end
        "link": link.record(),
        "clusters": None,
    }


def review_blocked_links(envelopes, identity, bounded: bool) -> dict:
    """One ``identity_review`` record per distinct (junk id, other id) pair with its earliest
    evidence (``REVIEW``), with ``FAILED_EVENTS`` (envelopes the step raised on) and, in
    streaming runs, ``FAILED`` (the keyed step's dead letters). Junk identifiers never enter
    the graph, so this needs no part of stitching's other steps. Applied in the caller's scope
    (not a composite of its own): ``ReportBlocked`` keeps its label, part of the streaming
    update contract."""
    blocked_links_ = envelopes | "BlockedLinks" >> guarded(
        beam.FlatMap(
            all_or_dead_letter(
                lambda env: blocked_links(
                    env.event,
                    env.event_time_ms,
                    identity,
                    env.identifiers,
                    env.junk_identifiers,
                )
            )
        ).with_output_types(KV[str, Any])
    )
    out = {FAILED_EVENTS: blocked_links_[FAILED]}
    if bounded:
        out[REVIEW] = report_blocked(blocked_links_.good)
    else:
        blocked = blocked_links_.good | "ReportBlocked" >> beam.ParDo(
            _ReportBlockedFn()
        ).with_input_types(KV[str, Any]).with_outputs(FAILED, main="review")
        out[REVIEW], out[FAILED] = blocked.review, blocked[FAILED]
    return out


def report_blocked(pairs):
    """A bounded run's review of ``("junk|other", link)`` pairs (:func:`blocked_links`): it
    knows every pair's evidence at once, so the earliest per pair, by a combiner (no state, no
    timer). Applied in the caller's scope: the labels are those of :func:`review_blocked_links`."""
    return (
        pairs
        | "EarliestBlocked" >> beam.CombinePerKey(min)
        | "ReportBlocked" >> beam.Map(lambda kv: _blocked_record(kv[0], Link(*kv[1])))
    )


class StitchIdentities(beam.PTransform):
    """Unique envelopes in; ``{assignments, identities, merges, identity_review}`` out.

    - ``assignments``: ``(identifier, (group, person | None, stamp))`` whenever an identifier's
      person changes (``None``: it left the group);
    - ``identities``: ``(person, (group, members | None, stamp))`` whenever a person's members
      change (``stamp``: the group's count of resolutions; receivers keep the newest message per
      group, transforms/stamps.py);
    - ``merges``: ``profile_merged`` / ``profile_split`` records;
    - ``identity_review``: refused links with their evidence and rule;
    - ``failed_events``: dead letters of the per-event steps (envelopes the step raised on);
    - ``failed``: dead letters of the keyed steps (an identifier's or a group's messages, a
      timer's key): not events, see transforms/dead_letter.py.
    """

    def __init__(self, identity, deleted_identifiers=(), rounds: int = 16, bounded=False):
        super().__init__()
        self._bounded = bounded
        if rounds < 2:
            raise ValueError("rounds must be at least 2")
        self._identity = identity
        self._rules = StitchRules.from_config(identity)
        self._deleted = frozenset(config_key(d) for d in deleted_identifiers)
        self._rounds = rounds

    def expand(self, envelopes):
        identity = self._identity
        bounded = self._bounded

        if bounded:
            # Each link once, keyed by its pair; the earliest evidence per pair then goes to
            # both ends (half the elements of sending every link to both ends first).
            def read(env):
                return _links_and_notices(
                    bounded_stitch_messages(env.event, env.event_time_ms, identity, env.identifiers)
                )

            tags, main, out_type = (NOTICES,), "links", KV[tuple[str, str], tuple]
        else:

            def read(env):
                return stitch_messages(env.event, env.event_time_ms, identity, env.identifiers)

            tags, main, out_type = (), "good", KV[str, Any]
        stitch = envelopes | "StitchMessages" >> guarded(
            beam.FlatMap(all_or_dead_letter(read)).with_output_types(out_type), *tags, main=main
        )
        if bounded:
            messages = (
                stitch["links"] | "EarliestLinkPerPair" >> EarliestLinkPerPair(),
                stitch[NOTICES],
            ) | "Messages" >> beam.Flatten().with_output_types(KV[str, Any])
        else:
            messages = stitch.good
        failed_events = [stitch[FAILED]]
        failed = []
        cap = self._rules.max_cluster_size
        if bounded:
            # Each identifier's messages grouped and settled at once.
            messages = messages | "LinkGroups" >> beam.GroupByKey()
            link_fn = _LinkGroupedFn(cap)
        else:
            link_fn = _LinkFn(cap)
        linked = messages | "Link" >> guarded(
            beam.ParDo(link_fn).with_input_types(KV[str, Any]).with_output_types(KV[str, Any]),
            REVIEW,
            NODES,
            main=PAIRS,
        )
        failed.append(linked[FAILED])
        # Pair: a link reaches Connect only when both of its ends accepted it.

        def keyed(pcoll, name, grouped, stateful):
            """One keyed step: a bounded run groups each key's elements and applies the pure
            ``grouped``; a streaming run applies the stateful DoFn (its dead letters kept)."""
            if bounded:
                return (
                    pcoll
                    | f"{name}Groups" >> beam.GroupByKey()
                    | name >> beam.FlatMap(grouped).with_output_types(KV[str, Any])
                )
            result = pcoll | name >> guarded(
                beam.ParDo(stateful).with_input_types(KV[str, Any]).with_output_types(KV[str, Any]),
                main="next",
            )
            failed.append(result[FAILED])
            return result["next"]

        if bounded:
            # Link's acceptances go straight to the accepted ends: Connect[1] reads each
            # identifier's links that both ends accepted from them (accepted_neighbours).
            stage = linked[PAIRS]
        else:
            stage = keyed(linked[PAIRS], "Pair", None, _PairFn())
        labels = []
        for k in range(1, self._rounds + 1):
            last = k == self._rounds
            if bounded:
                stage = stage | f"Round[{k}]" >> beam.GroupByKey()
                fn = _ConnectGroupedFn(last, first=k == 1)
            else:
                fn = _ConnectFn(last)
            pardo = beam.ParDo(fn).with_input_types(KV[str, Any]).with_output_types(KV[str, Any])
            result = stage | f"Connect[{k}]" >> guarded(pardo, LABELS, main="next")
            failed.append(result[FAILED])
            labels.append(result["next"] if last and not bounded else result[LABELS])
            stage = result["next"]
        routed = (linked[NODES], *labels) | "RouteInputs" >> beam.Flatten().with_output_types(
            KV[str, Any]
        )
        stage = keyed(routed, "Route", _route_grouped, _RouteFn())
        reviews = [linked[REVIEW]]
        if bounded:
            resolver = _ResolveGroupedFn(self._rules, self._deleted)
            stage = stage | "Members" >> beam.GroupByKey()
        else:
            resolver = _ResolveGroupFn(self._rules, self._deleted)
        resolved = stage | "ResolveGroup" >> guarded(
            beam.ParDo(resolver).with_input_types(KV[str, Any]),
            ASSIGNMENTS,
            IDENTITIES,
            MERGES,
            REVIEW,
            main="unused",
        )
        failed.append(resolved[FAILED])
        blocked = review_blocked_links(envelopes, identity, bounded)
        failed_events.append(blocked[FAILED_EVENTS])
        if FAILED in blocked:
            failed.append(blocked[FAILED])
        blocked_review = blocked[REVIEW]
        review = (*reviews, resolved[REVIEW], blocked_review) | "MergeReview" >> beam.Flatten()
        return {
            ASSIGNMENTS: resolved[ASSIGNMENTS],
            IDENTITIES: resolved[IDENTITIES],
            MERGES: resolved[MERGES],
            REVIEW: review,
            FAILED_EVENTS: tuple(failed_events) | "MergeFailedEvents" >> beam.Flatten(),
            FAILED: tuple(failed) | "MergeFailed" >> beam.Flatten(),
        }


def config_key(item: str) -> str:
    """``privacy.deleted_identifiers`` entries are ``type:value``; keys use short prefixes."""
    t, v = item.split(":", 1)
    return id_key(t, v)
