"""Identity stitching in keyed Beam state, with no cycle and no key holding the whole graph.

    events -> links (+ unlink / delete notices) -> Propagate[1] -> ... -> Propagate[K] -> ResolveGroup
                                                       |                                   |
                                   identity_review <---+---- shared identifiers            +-> assignments
                                                                                           +-> merges
                                                                                           +-> identity_review

Two steps (DESIGN.md section 4, designs 1 + exact resolution):

1. **Candidate groups by unrolled label propagation.** ``Propagate[k]`` is keyed by identifier and
   keeps its neighbours (with the earliest link evidence of each pair) and its label: the smallest
   identifier key within ``k`` hops. Each stage tells the next one about every new neighbour and
   every label improvement, so stage ``K`` holds, for each identifier, the smallest key within
   ``K`` hops of it; stored state lets later links continue a wave. ``K`` is
   ``identity.max_hops``. A group whose diameter exceeds ``K`` ends up in two candidate groups: the
   links between them are counted (``identity.unresolved_links``) and reported, never silently
   applied or dropped. An identifier with more distinct neighbours than ``max_cluster_size`` is
   *shared*: it stops propagating and all its links are refused, so a junk id that escaped the
   blocklist cannot glue thousands of people into one group (its state stays bounded by the cap).
2. **Exact resolution per group.** ``ResolveGroup`` is keyed by the candidate label and holds its
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

from transforms.dead_letter import FAILED, dead_letter_on_raise, guarded
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

MERGES = "merges"
REVIEW = "identity_review"
ASSIGNMENTS = "assignments"
IDENTITIES = "identities"
FAILED_EVENTS = "failed_events"

UNLINK_TYPE = "unlink"
DELETE_TYPE = "delete"

# Messages into Propagate[k], keyed by identifier:
NEIGHBOUR = "n"  # ("n", neighbour, neighbour's label, Link | None)
UNLINK = "u"  # ("u", other identifier, Link): never one person with ``other``
DELETED = "x"  # ("x", time_ms): the identifier was deleted
SHARED = "h"  # ("h",): the identifier is shared (too many neighbours)


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


def stitch_messages(event: dict[str, Any], time_ms: int, identity) -> list[tuple[str, tuple]]:
    """What one event tells ``Propagate[1]``: its links (to both ends), or an unlink / delete."""
    etype = event.get("type")
    ids = [id_key(t, v) for t, v in extract_identifiers(event, identity)]
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
    for link in event_links(event, time_ms, identity):
        # Evidence travels and is stored as a plain tuple: FastPrimitivesCoder encodes a
        # NamedTuple ~5x slower (and ~60% bigger) than the same fields as a tuple.
        evidence = tuple(link)
        out.append((link.a, (NEIGHBOUR, link.b, link.b, evidence)))
        out.append((link.b, (NEIGHBOUR, link.a, link.a, evidence)))
    return out


def blocked_links(event: dict[str, Any], time_ms: int, identity) -> list[tuple[str, Link]]:
    """``("junk|other", link)`` for each junk identifier the event carries next to a real one."""
    junk = [id_key(t, v) for t, v in blocked_identifiers(event, identity)]
    if not junk:
        return []
    ids = [id_key(t, v) for t, v in extract_identifiers(event, identity)]
    mid, etype = str(event.get("messageId", "")), str(event.get("type", ""))
    return [
        (f"{j}|{o}", make_link(j, o, time_ms, mid, etype)) for j in sorted(set(junk)) for o in ids
    ]


def _ts(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


# --- Propagate[k] -----------------------------------------------------------------------------


class _PropagateFn(beam.DoFn):
    """One hop of label propagation (module doc). Not the last stage: forwards to the next."""

    # One state cell per identifier, ``(label, neighbours, attrs)``: on the local runner every
    # cell costs a keyed entry of its own (and a round trip per read), so fewer is leaner.
    NODE = ReadModifyWriteStateSpec("node", FastPrimitivesCoder())

    def __init__(self, first: bool, last: bool, cap: int):
        self._first, self._last, self._cap = first, last, cap
        self._shared = Metrics.counter("cdi", "identity.shared_identifiers")

    @dead_letter_on_raise
    def process(
        self,
        element,
        node_state=beam.DoFn.StateParam(NODE),
    ):
        x, msg = element
        label, nbrs, attrs = node_state.read() or (x, {}, {})
        out, changed, new_label, review = self._step(x, msg, label, nbrs, attrs)
        if changed or new_label != label:
            node_state.write((new_label, nbrs, attrs))
        for record in review:
            yield beam.pvalue.TaggedOutput(REVIEW, record)
        if not self._last:
            yield from out
        elif changed or new_label != label:
            # Last stage: hand the identifier (with its evidence) to its group's resolver.
            yield (new_label, ("node", (x, nbrs, attrs)))
            if new_label != label:
                yield (label, ("drop", x))

    def _step(self, x, msg, label, nbrs, attrs):
        """Apply one message to the identifier (mutates ``nbrs``/``attrs``); returns the messages
        for the next stage, whether the evidence changed, the new label, and review records."""
        kind = msg[0]
        out: list[tuple[str, tuple]] = []  # messages for the next stage
        review: list[dict] = []
        changed = False
        new_label = label
        if kind == NEIGHBOUR:
            _, nbr, nbr_label, link = msg
            known = nbrs.get(nbr)
            if attrs.get(SHARED):
                if self._first and known is None and link is not None:
                    review.append(_shared_record(x, link))
                return out, False, label, review
            if known is None and len(nbrs) >= self._cap:
                # Shared identifier: it stops here, its neighbour list stays at the cap, and
                # ResolveGroup refuses every link it has. Every stage applies the same cap (a
                # neighbour learns of the link before it can know the other end is shared); only
                # the first one reports the refused links.
                attrs[SHARED] = True
                if self._first:
                    self._shared.inc()
                    if link is not None:
                        review.append(_shared_record(x, link))
                out.append((x, (SHARED,)))
                changed = True
            else:
                best = known if link is None else earlier(known, link)
                if best != known or nbr not in nbrs:
                    nbrs[nbr] = best
                    changed = True
                new_label = min(label, nbr_label)
                if new_label < label:
                    for z in nbrs:
                        if z != nbr:
                            out.append((z, (NEIGHBOUR, x, new_label, None)))
                if changed or new_label < label:
                    out.append((nbr, (NEIGHBOUR, x, new_label, nbrs[nbr])))
        elif kind == UNLINK:
            _, other, link = msg
            unl = attrs.setdefault(UNLINK, {})
            best = earlier(unl.get(other), link)
            if unl.get(other) != best:
                unl[other] = best
                changed = True
                out.append((x, msg))
        elif kind == DELETED:
            if attrs.get(DELETED) is None or msg[1] < attrs[DELETED]:
                attrs[DELETED] = msg[1]
                changed = True
                out.append((x, msg))
        elif kind == SHARED:
            if not attrs.get(SHARED):
                attrs[SHARED] = True
                changed = True
                out.append((x, msg))
        return out, changed, new_label, review


def _shared_record(x: str, link: tuple) -> dict:
    link = Link(*link)
    return {
        "kind": "link_refused",
        "rule": "breaker.shared_identifier",
        "identifier": x,
        "link": link.record(),
        "clusters": None,
    }


def _message_order(msg: tuple) -> tuple:
    """The order a bounded stage applies an identifier's messages in: neighbours by earliest
    evidence first (so a shared identifier keeps the earliest ``max_cluster_size`` links, as if
    they had arrived first), then the notices."""
    if msg[0] == NEIGHBOUR:
        return (0, msg[3] or (), msg[1], msg[2])
    return (1, msg[0], repr(msg[1:]))


class _PropagateGroupedFn(_PropagateFn):
    """One hop in a bounded run: ``(identifier, all its messages from the previous hop)`` in.

    The messages are applied with the streaming stage's own rule (``_step``) in
    :func:`_message_order`, and the identifier's settled state goes out once: its label and the
    pair's evidence to each neighbour, its notices to itself (or, from the last hop, the node to
    its group). A streaming stage's final state is the same function of the same messages, so
    the groups are the same; the difference is one shuffle per hop instead of a state read and
    write per message."""

    def process(self, element):
        x, messages = element
        label, nbrs, attrs = x, {}, {}
        for msg in sorted(messages, key=_message_order):
            _, _, label, review = self._step(x, msg, label, nbrs, attrs)
            for record in review:
                yield beam.pvalue.TaggedOutput(REVIEW, record)
        if self._last:
            yield (label, ("node", (x, nbrs, attrs)))
            return
        for nbr, evidence in nbrs.items():
            yield (nbr, (NEIGHBOUR, x, label, evidence))
        if attrs.get(SHARED):
            yield (x, (SHARED,))
        for other, link in attrs.get(UNLINK, {}).items():
            yield (x, (UNLINK, other, link))
        if attrs.get(DELETED) is not None:
            yield (x, (DELETED, attrs[DELETED]))


class EarliestLinkPerPair(beam.PTransform):
    """Bounded runs: one ``NEIGHBOUR`` message per (identifier, neighbour) with the pair's
    earliest evidence, instead of one per event that carries the pair.

    ``Propagate[1]`` keeps exactly that (``earlier`` of all it is told), so its state, and every
    later stage's, is the same; what changes is that a person's thousand events no longer cost a
    thousand stateful calls each side (a combiner lifted before the shuffle costs ~3 µs each).
    Unlink and delete notices pass through. Streaming runs keep every message: there the earliest
    evidence so far must reach the graph as soon as it arrives."""

    def expand(self, messages):
        pairs = messages | "Pairs" >> beam.FlatMap(
            lambda kv: [((kv[0], kv[1][1]), kv[1][3])] if kv[1][0] == NEIGHBOUR else []
        ).with_output_types(KV[tuple[str, str], tuple])
        # Evidence tuples sort as Links do: min is ``earlier`` (time, then messageId).
        earliest = (
            pairs
            | "Earliest" >> beam.CombinePerKey(min)
            | "AsMessages"
            >> beam.Map(
                lambda kv: (kv[0][0], (NEIGHBOUR, kv[0][1], kv[0][1], kv[1]))
            ).with_output_types(KV[str, Any])
        )
        notices = messages | "Notices" >> beam.Filter(lambda kv: kv[1][0] != NEIGHBOUR)
        return (earliest, notices) | "Merge" >> beam.Flatten()


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

    def _resolution(self, key: str, nodes: dict, before: dict[str, tuple], sent: set):
        """Resolve the group's nodes; returns ``(outputs, members per person, refusals sent)``,
        the outputs being only what changed since ``before`` / ``sent``."""
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
                elif nbr not in nodes and nbr not in self._deleted:
                    self._unresolved.inc()  # the other end is in another candidate group
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
            k = (refusal.link.a, refusal.link.b, refusal.rule)
            new_sent.add(k)
            if k not in sent:
                self._refused.inc()
                out.append(beam.pvalue.TaggedOutput(REVIEW, refusal.record()))
        # Assignments (identifier -> person) and member lists, only what changed.
        old_person = {m: p for p, ms in before.items() for m in ms}
        for x, person in res.person_of.items():
            if old_person.get(x) != person:
                out.append(beam.pvalue.TaggedOutput(ASSIGNMENTS, (x, (key, person))))
        for x in old_person:
            if x not in res.person_of:
                out.append(beam.pvalue.TaggedOutput(ASSIGNMENTS, (x, (key, None))))
        for person, members in res.members.items():
            if before.get(person) != members:
                out.append(beam.pvalue.TaggedOutput(IDENTITIES, (person, (key, members))))
        for person in before:
            if person not in res.members:
                out.append(beam.pvalue.TaggedOutput(IDENTITIES, (person, (key, None))))
        return out, dict(res.members), new_sent


class _ResolveGroupFn(beam.DoFn, _GroupResolver):
    NODES = ReadModifyWriteStateSpec("nodes", FastPrimitivesCoder())
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
        nodes = nodes_state.read() or {}
        if kind == "node":
            x, nbrs, attrs = payload
            nodes[x] = (nbrs, attrs)
        else:
            nodes.pop(payload, None)
        nodes_state.write(nodes)
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
        outputs, members, sent = self._resolution(
            key,
            nodes_state.read() or {},
            emitted_state.read() or {},
            refused_state.read() or set(),
        )
        refused_state.write(sent)
        emitted_state.write(members)
        yield from outputs


class _ResolveGroupedFn(beam.DoFn, _GroupResolver):
    """Bounded runs: ``(group, all its node messages)`` in, resolved once (nothing emitted
    before, so every assignment, member list, merge and refusal is new)."""

    def __init__(self, rules: StitchRules, deleted: frozenset[str]):
        _GroupResolver.__init__(self, rules, deleted)

    def process(self, element):
        key, messages = element
        nodes = {x: (nbrs, attrs) for _, (x, nbrs, attrs) in messages}
        outputs, _, _ = self._resolution(key, nodes, {}, set())
        yield from outputs


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
        link = Link(*cur)
        yield {
            "kind": "link_refused",
            "rule": "blocklist",
            "identifier": key.split("|", 1)[0],  # the junk end (a link's ends are sorted)
            "link": link.record(),
            "clusters": None,
        }


class StitchIdentities(beam.PTransform):
    """Unique envelopes in; ``{assignments, identities, merges, identity_review}`` out.

    - ``assignments``: ``(identifier, (group, person | None))`` whenever an identifier's person
      changes (``None``: it left the group);
    - ``identities``: ``(person, (group, members | None))`` whenever a person's members change;
    - ``merges``: ``profile_merged`` / ``profile_split`` records;
    - ``identity_review``: refused links with their evidence and rule;
    - ``failed_events``: dead letters of the per-event steps (envelopes the step raised on);
    - ``failed``: dead letters of the keyed steps (an identifier's or a group's messages, a
      timer's key): not events, see transforms/dead_letter.py.
    """

    def __init__(self, identity, deleted_identifiers=(), max_hops: int = 5, bounded=False):
        super().__init__()
        self._bounded = bounded
        if max_hops < 2:
            raise ValueError("max_hops must be at least 2")
        self._identity = identity
        self._rules = StitchRules.from_config(identity)
        self._deleted = frozenset(_config_key(d) for d in deleted_identifiers)
        self._hops = max_hops

    def expand(self, envelopes):
        identity = self._identity
        bounded = self._bounded

        def dead_lettered(pardo, *tags, main):
            """Beam's dead-letter wrapper where the step keeps no state; the stateful DoFns
            route their own (``dead_letter_on_raise``), as Beam's cannot carry timers."""
            if bounded:
                return guarded(pardo, *tags, main=main)
            return pardo.with_outputs(*tags, FAILED, main=main)

        messages = envelopes | "StitchMessages" >> guarded(
            beam.FlatMap(
                lambda env: stitch_messages(env.event, env.event_time_ms, identity)
            ).with_output_types(KV[str, Any])
        )
        failed_events = [messages[FAILED]]
        messages = messages.good
        if bounded:
            messages = messages | "EarliestLinkPerPair" >> EarliestLinkPerPair()
        reviews, failed = [], []
        stage = messages
        cap = self._rules.max_cluster_size
        for k in range(1, self._hops + 1):
            last = k == self._hops
            if bounded:
                # One shuffle per hop: each identifier's messages grouped and settled at once.
                stage = stage | f"Hop[{k}]" >> beam.GroupByKey()
                fn = _PropagateGroupedFn(first=k == 1, last=last, cap=cap)
            else:
                fn = _PropagateFn(first=k == 1, last=last, cap=cap)
            pardo = beam.ParDo(fn).with_input_types(KV[str, Any]).with_output_types(KV[str, Any])
            result = stage | f"Propagate[{k}]" >> dead_lettered(pardo, REVIEW, main="next")
            if k == 1:
                reviews.append(result[REVIEW])
            failed.append(result[FAILED])
            stage = result.next
        if bounded:
            resolver = _ResolveGroupedFn(self._rules, self._deleted)
            stage = stage | "Members" >> beam.GroupByKey()
        else:
            resolver = _ResolveGroupFn(self._rules, self._deleted)
        resolved = stage | "ResolveGroup" >> dead_lettered(
            beam.ParDo(resolver).with_input_types(KV[str, Any]),
            ASSIGNMENTS,
            IDENTITIES,
            MERGES,
            REVIEW,
            main="unused",
        )
        failed.append(resolved[FAILED])
        blocked_links_ = envelopes | "BlockedLinks" >> guarded(
            beam.FlatMap(
                lambda env: blocked_links(env.event, env.event_time_ms, identity)
            ).with_output_types(KV[str, Any])
        )
        failed_events.append(blocked_links_[FAILED])
        blocked = blocked_links_.good | "ReportBlocked" >> beam.ParDo(
            _ReportBlockedFn()
        ).with_input_types(KV[str, Any]).with_outputs(FAILED, main="review")
        failed.append(blocked[FAILED])
        review = (*reviews, resolved[REVIEW], blocked.review) | "MergeReview" >> beam.Flatten()
        return {
            ASSIGNMENTS: resolved[ASSIGNMENTS],
            IDENTITIES: resolved[IDENTITIES],
            MERGES: resolved[MERGES],
            REVIEW: review,
            FAILED_EVENTS: tuple(failed_events) | "MergeFailedEvents" >> beam.Flatten(),
            FAILED: tuple(failed) | "MergeFailed" >> beam.Flatten(),
        }


def _config_key(item: str) -> str:
    """``privacy.deleted_identifiers`` entries are ``type:value``; keys use short prefixes."""
    t, v = item.split(":", 1)
    return id_key(t, v)
