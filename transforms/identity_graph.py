"""Identity stitching rules: which identifiers are one person, decided from link evidence alone.

Pure functions, no Beam. ``transforms/stitching.py`` wires them to keyed state.

Vocabulary:

- An *identifier key* is ``"<prefix>:<value>"``: ``user:<v>`` for ``user_id``, ``anon:<v>`` for
  ``anonymous_id`` (the same strings as the profile key of an event), ``<type>:<v>`` otherwise.
- A *link* is evidence that two identifiers belong together: both appeared in one event. An event
  links its first identifier (config priority order) to each other one it carries (a star, so an
  identify with userId, anonymousId, email and device id yields three links). Only the earliest
  evidence of a pair matters (see below), so state keeps one :class:`Link` per pair.
- A *person* is a cluster of identifiers; its id is its *anchor*'s key: the member with the best
  ``(type rank, first seen, key)``, where user ids rank first, anonymous ids second, other types
  in config order. So a person keeps its id as it grows, an anonymous person that logs in takes
  the user's id (reported as a merge), and two persons that merge keep the better anchor's id.

The rule (:func:`resolve`): links are applied one by one in event-time order (then messageId,
then the pair), greedily, union-find style. A link that would join two clusters is refused when
the union would exceed a per-type limit (``limit.<type>``, default: one user id per person), the
cluster-size breaker (``breaker.cluster_size``), or an ``unlink`` constraint between the two sides
(``unlinked``); links touching a *shared* identifier (linked to more distinct identifiers than the
breaker allows: a kiosk, a household device, a buggy SDK) are all refused
(``breaker.shared_identifier``). Clusters only grow during the pass and every check is monotone,
so a refused link would be refused again later: the earliest evidence of a pair decides, and the
result is a function of the evidence *set*: arrival order, duplication and bundling cannot change
it. Unlinks and deletions remove evidence or add constraints; re-running the rule on what is
retained splits a person cleanly (no history is recounted: profiles are merged from per-identifier
fragments downstream).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from transforms.components import find_root
from transforms.identity import PREFIX, extract_identifiers, id_key, type_rank

_TYPE_OF_PREFIX = {v: k for k, v in PREFIX.items()}


def split_key(key: str) -> tuple[str, str]:
    """``"anon:a1"`` -> ``("anonymous_id", "a1")``."""
    prefix, value = key.split(":", 1)
    return _TYPE_OF_PREFIX.get(prefix, prefix), value


class Link(NamedTuple):
    """The earliest known evidence that identifiers ``a`` < ``b`` belong together.

    A tuple so Beam encodes it natively and it sorts: the sort order *is* the rule's order."""

    time_ms: int
    message_id: str
    a: str
    b: str
    event_type: str

    def record(self) -> dict[str, Any]:
        from transforms.envelope import format_iso_ms

        return {
            "a": self.a,
            "b": self.b,
            "event_time": format_iso_ms(self.time_ms),
            "messageId": self.message_id,
            "event_type": self.event_type,
        }


def make_link(x: str, y: str, time_ms: int, message_id: str, event_type: str) -> Link:
    a, b = (x, y) if x < y else (y, x)
    return Link(time_ms, message_id, a, b, event_type)


def earlier(a: Link | None, b: Link) -> Link:
    """The evidence to keep for one pair: the earlier one (ties: the smaller messageId)."""
    return b if a is None or b < a else a


def event_links(event: dict[str, Any], time_ms: int, identity, ids=None) -> list[Link]:
    """The links one event is evidence for (a star from its highest-priority identifier).
    ``ids``: the event's identifier keys when already read."""
    if ids is None:
        ids = [id_key(t, v) for t, v in extract_identifiers(event, identity)]
    if len(ids) < 2:
        return []
    mid, etype = str(event.get("messageId", "")), str(event.get("type", ""))
    hub = ids[0]
    return [make_link(hub, other, time_ms, mid, etype) for other in ids[1:] if other != hub]


@dataclass(frozen=True)
class StitchRules:
    """The guardrails, from the ``identity`` config section."""

    limits: tuple[tuple[str, int], ...] = (("user_id", 1),)
    max_cluster_size: int = 50
    type_order: tuple[str, ...] = ("user_id", "email", "anonymous_id", "device_id")

    @classmethod
    def from_config(cls, identity) -> StitchRules:
        return cls(
            limits=tuple((t.name, t.limit) for t in identity.types if t.limit > 0),
            max_cluster_size=identity.max_cluster_size,
            type_order=tuple(t.name for t in identity.types),
        )

    def rank(self, id_type: str) -> int:
        return type_rank(id_type, self.type_order)


class Refusal(NamedTuple):
    link: Link
    rule: str
    side_a: tuple[str, ...]  # the cluster of link.a when the link was refused
    side_b: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        return {
            "kind": "link_refused",
            "rule": self.rule,
            "link": self.link.record(),
            "clusters": {"a": list(self.side_a), "b": list(self.side_b)},
        }


@dataclass
class Resolution:
    """The persons of one connected group of identifiers."""

    person_of: dict[str, str] = field(default_factory=dict)  # identifier -> person id
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)  # person -> identifiers
    applied: list[Link] = field(default_factory=list)  # links that joined two clusters
    refused: list[Refusal] = field(default_factory=list)


def first_seen(links: Iterable[Link]) -> dict[str, int]:
    out: dict[str, int] = {}
    for link in links:
        for k in (link.a, link.b):
            t = out.get(k)
            if t is None or link.time_ms < t:
                out[k] = link.time_ms
    return out


def anchor(members: Iterable[str], seen: dict[str, int], rules: StitchRules) -> str:
    """The member whose key names the person (see the module doc)."""
    return min(members, key=lambda k: (rules.rank(split_key(k)[0]), seen.get(k, 0), k))


def resolve(
    nodes: Iterable[str],
    links: Iterable[Link],
    rules: StitchRules,
    unlinked: Iterable[tuple[str, str]] = (),
    shared: Iterable[str] = (),
) -> Resolution:
    """Apply the rule (module doc) to one group's nodes and evidence.

    ``nodes``: every identifier of the group (ones without a link become single persons);
    ``links``: one per pair, both ends in ``nodes``; ``unlinked``: pairs that must never be one
    person; ``shared``: identifiers whose links are all refused."""
    nodes = sorted(set(nodes))
    links = sorted(links)
    seen = first_seen(links)
    parent = {n: n for n in nodes}
    members: dict[str, list[str]] = {n: [n] for n in nodes}
    counts: dict[str, dict[str, int]] = {n: {split_key(n)[0]: 1} for n in nodes}
    apart: dict[str, set[str]] = {}
    for x, y in unlinked:
        if x not in parent or y not in parent:
            # The other end is in another candidate group: nothing here can join them.
            continue
        apart.setdefault(x, set()).add(y)
        apart.setdefault(y, set()).add(x)
    shared = set(shared)
    limits = dict(rules.limits)
    out = Resolution()

    find = partial(find_root, parent)

    for link in links:
        ra, rb = find(link.a), find(link.b)
        if ra == rb:
            continue
        rule = None
        if link.a in shared or link.b in shared:
            rule = "breaker.shared_identifier"
        elif any(find(o) == rb for m in members[ra] for o in apart.get(m, ())):
            rule = "unlinked"
        else:
            ca, cb = counts[ra], counts[rb]
            for t, limit in limits.items():
                if ca.get(t, 0) + cb.get(t, 0) > limit:
                    rule = f"limit.{t}"
                    break
            if rule is None and len(members[ra]) + len(members[rb]) > rules.max_cluster_size:
                rule = "breaker.cluster_size"
        if rule is not None:
            out.refused.append(
                Refusal(link, rule, tuple(sorted(members[ra])), tuple(sorted(members[rb])))
            )
            continue
        if len(members[ra]) < len(members[rb]):
            ra, rb = rb, ra
        parent[rb] = ra
        members[ra].extend(members.pop(rb))
        for t, n in counts.pop(rb).items():
            counts[ra][t] = counts[ra].get(t, 0) + n
        out.applied.append(link)
    for group in members.values():
        person = anchor(group, seen, rules)
        out.members[person] = tuple(sorted(group))
        for m in group:
            out.person_of[m] = person
    return out


# --- what changed between two resolutions ------------------------------------------------------


def joining_link(applied: list[Link], members, target: str) -> Link | None:
    """The applied link (in the rule's order) that first connected ``members`` to ``target``."""
    parent: dict[str, str] = {}

    def find(n: str) -> str:
        while parent.get(n, n) != n:
            n = parent[n]
        return n

    for link in sorted(applied):
        parent[find(link.a)] = find(link.b)
        root = find(target)
        if any(find(m) == root for m in members):
            return link
    return None


def _is_profile_key(key: str) -> bool:
    return key.split(":", 1)[0] in _TYPE_OF_PREFIX


def changes(
    before: dict[str, tuple[str, ...]],
    after: Resolution,
) -> tuple[list[dict], list[dict]]:
    """``profile_merged`` and ``profile_split`` records for going from ``before`` (person ->
    members, as last emitted) to ``after``.

    A person *existed* if it was a cluster in ``before`` or is a single user/anonymous id (which
    has a profile of its own before any link). It is merged when all its members now belong to one
    other person, split when they now belong to more than one person."""
    previous = dict(before)
    for node in after.person_of:
        if _is_profile_key(node) and not any(node in m for m in before.values()):
            previous.setdefault(node, (node,))
    merges, splits = [], []
    for person, old_members in sorted(previous.items()):
        # Members absent from ``after`` moved to another candidate group (the group they join
        # reports them); if the anchor itself moved, the person moved with it.
        old_members = [m for m in old_members if m in after.person_of]
        if person not in after.person_of or not old_members:
            continue
        now = sorted({after.person_of[m] for m in old_members})
        if now == [person]:
            continue
        if len(now) == 1:
            into = now[0]
            link = joining_link(after.applied, old_members, into)
            merges.append(
                {
                    "kind": "profile_merged",
                    "from": person,
                    "into": into,
                    "rule": f"linked_by.{link.event_type}" if link else "anchor_changed",
                    "link": link.record() if link else None,
                }
            )
        else:
            splits.append(
                {
                    "kind": "profile_split",
                    "from": person,
                    "into": now,
                    "members": {p: sorted(after.members.get(p, (p,))) for p in now},
                }
            )
    return merges, splits
