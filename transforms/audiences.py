"""Audiences: who is in, when they enter and exit, and the records destinations receive.

**Predicates** (config ``audiences[].when``), a small structured form, never ``eval``::

    {all: [P, ...]}  {any: [P, ...]}  {not: P}
    {<subject>: <name>, <operator>: <value>}

subjects: ``trait`` (a profile trait), ``computed`` (a computed trait's current value), ``count``
(an ``event_counts`` key: ``event:Order Completed``, ``type:page``), ``consent`` (a purpose:
granted ``true``/``false``), and for event triggers ``property`` (a dotted path under the event's
``properties``); operators: ``eq``, ``ne``, ``gt``, ``gte``, ``lt``, ``lte``, ``in``
(a list), ``exists`` (``true``/``false``). A comparison with a missing or incomparable value is
false (``ne`` and ``exists: false`` are true for a missing value). A missing count is 0.

**Membership** is per audience *and destination*: the predicate holds on the person's profile and
the person has granted every consent purpose the destination needs (the profile's consent: most
restrictive across identifiers). So a consent withdrawal exits the person from that destination's
copy of the audience at once, and no entry ever reaches a destination without consent.

**Transitions** compare a person's membership before and after a profile change
(:func:`transitions`); a tombstone (merged away, deleted) exits every membership. Each transition
becomes two records in Segment's conventions: an ``Audience Entered``/``Audience Exited`` track
and an identify setting the audience trait to ``true``/``false`` (:func:`activation_records`),
identified by the profile's identifiers as the destination's PII policy allows. The activation
key, used as ``messageId``, is deterministic: person, audience, destination, transition and the
membership's *epoch* (how many times the person entered it before), so a re-run, a retried
bundle or a replay produces the same keys for the same transitions, and a consumer or the
delivery ledger can drop the ones already delivered.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.typehints import KV

from transforms.dead_letter import FAILED, dead_letter_on_raise, guarded
from transforms.identity_graph import split_key
from transforms.unify import CAUSE, RAW_MEMBERS

SLUG = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SUBJECTS = ("trait", "computed", "count", "consent", "property")
OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "exists")
ENTERED, EXITED = "entered", "exited"

Predicate = Callable[[dict], bool]


# --- predicates ----------------------------------------------------------------------------------


PROFILE_SUBJECTS = ("trait", "computed", "count", "consent")
EVENT_SUBJECTS = ("property",)


def compile_predicate(
    node: Any, path: str = "when", subjects: tuple[str, ...] = PROFILE_SUBJECTS
) -> Predicate:
    """A function of a profile view (:func:`profile_view`), or with ``subjects`` =
    :data:`EVENT_SUBJECTS` of an event's properties (an event trigger's ``where``); raises
    ValueError naming the path of the first problem."""
    if not isinstance(node, dict) or not node:
        raise ValueError(f"{path}: a predicate is a mapping: all, any, not, or a comparison")
    if set(node) == {"all"} or set(node) == {"any"}:
        (op, items), = node.items()  # fmt: skip
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}.{op}: a non-empty list of predicates")
        parts = [compile_predicate(x, f"{path}.{op}[{i}]", subjects) for i, x in enumerate(items)]
        if op == "all":
            return lambda v: all(p(v) for p in parts)
        return lambda v: any(p(v) for p in parts)
    if set(node) == {"not"}:
        inner = compile_predicate(node["not"], f"{path}.not", subjects)
        return lambda v: not inner(v)
    allowed = subjects
    subjects = [k for k in node if k in SUBJECTS]
    operators = [k for k in node if k in OPERATORS]
    unknown = [k for k in node if k not in SUBJECTS and k not in OPERATORS]
    if unknown:
        raise ValueError(
            f"{path}.{unknown[0]}: unknown key; subjects: {', '.join(SUBJECTS)}; "
            f"operators: {', '.join(OPERATORS)}; or all, any, not"
        )
    if len(subjects) != 1 or len(operators) != 1:
        raise ValueError(f"{path}: a comparison names one subject and one operator")
    subject, op = subjects[0], operators[0]
    if subject not in allowed:
        raise ValueError(f"{path}.{subject}: not here; use {', '.join(allowed)}")
    name, value = node[subject], node[op]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}.{subject}: a name")
    if op == "in" and not isinstance(value, list):
        raise ValueError(f"{path}.in: a list of values")
    if op == "exists" and not isinstance(value, bool):
        raise ValueError(f"{path}.exists: true or false")
    if op in ("gt", "gte", "lt", "lte") and not _orderable(value):
        raise ValueError(f"{path}.{op}: a number or a string")
    return _comparison(subject, name, op, value)


def _orderable(value: Any) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


_MISSING = object()


def _comparison(subject: str, name: str, op: str, expected: Any) -> Predicate:
    def actual(view: dict) -> Any:
        if subject == "count":
            return view["counts"].get(name, 0)
        if subject == "property":  # an event's properties, by dotted path (event triggers)
            node = view.get("property", {})
            for part in name.split("."):
                if not isinstance(node, dict) or part not in node:
                    return _MISSING
                node = node[part]
            return node
        return view[subject].get(name, _MISSING)

    def test(view: dict) -> bool:
        got = actual(view)
        if op == "exists":
            return (got is not _MISSING and got is not None) == expected
        if got is _MISSING or got is None:
            return op == "ne"
        if op == "eq":
            return _same(got, expected)
        if op == "ne":
            return not _same(got, expected)
        if op == "in":
            return any(_same(got, x) for x in expected)
        if not _orderable(got) or isinstance(got, str) != isinstance(expected, str):
            return False
        return {"gt": got > expected, "gte": got >= expected, "lt": got < expected}.get(
            op, got <= expected
        )

    return test


def _same(a: Any, b: Any) -> bool:
    # true == 1 in Python; a trait `true` must not match `eq: 1`
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


# --- profiles and membership ---------------------------------------------------------------------


def profile_view(row: dict) -> dict:
    """The parts of a profile row predicates read (JSON columns decoded once)."""
    computed = orjson.loads(row["computed_traits"])
    return {
        "trait": orjson.loads(row["traits"]),
        "computed": {k: v.get("value") for k, v in computed.items()},
        "counts": orjson.loads(row["event_counts"]),
        "consent": orjson.loads(row["consent"]),
    }


@dataclass(frozen=True)
class Audience:
    name: str
    predicate: Predicate
    destinations: tuple[str, ...]
    # A threshold trigger: fires on each entry (the predicate becoming true), silent on exits.
    trigger: bool = False

    @classmethod
    def from_config(cls, cfg) -> Audience:
        return cls(cfg.name, compile_predicate(cfg.when), tuple(cfg.destinations))

    @classmethod
    def from_trigger(cls, cfg) -> Audience:
        return cls(cfg.name, compile_predicate(cfg.when), tuple(cfg.destinations), trigger=True)


def memberships(
    row: dict, audiences: Iterable[Audience], purposes: dict[str, tuple[str, ...]]
) -> frozenset[tuple[str, str]]:
    """``(audience, destination)`` pairs the profile row is in; none for a tombstone.
    ``purposes``: destination -> the consent purposes it needs."""
    if row.get("deleted"):
        return frozenset()
    view = profile_view(row)
    granted = view["consent"]
    out = set()
    for aud in audiences:
        if not aud.predicate(view):
            continue
        for dest in aud.destinations:
            if all(granted.get(p) is True for p in purposes.get(dest, ())):
                out.add((aud.name, dest))
    return frozenset(out)


@dataclass(frozen=True)
class Transition:
    audience: str
    destination: str
    kind: str  # entered | exited
    epoch: int  # how many times the person entered this membership before this entry


def transitions(
    before: frozenset, after: frozenset, epochs: dict[tuple[str, str], int]
) -> list[Transition]:
    """What changed, in a stable order. ``epochs`` (membership -> entries so far) is updated."""
    out = []
    for aud, dest in sorted(before - after):
        out.append(Transition(aud, dest, EXITED, epochs.get((aud, dest), 1) - 1))
    for aud, dest in sorted(after - before):
        n = epochs.get((aud, dest), 0)
        out.append(Transition(aud, dest, ENTERED, n))
        epochs[(aud, dest)] = n + 1
    return out


# --- records -------------------------------------------------------------------------------------


def activation_key(person: str, t: Transition) -> str:
    text = "\x1f".join((person, t.audience, t.destination, t.kind, str(t.epoch)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def activation_records(
    person: str,
    t: Transition,
    row: dict,
    identifiers: list[tuple[str, str]],
) -> list[dict]:
    """The two Segment-convention records of one transition: an ``Audience Entered``/``Audience
    Exited`` track and an identify with the audience trait. ``identifiers``: the person's
    ``(type, value)`` as the destination's PII policy leaves them; ``row``: the profile after the
    change (for a tombstone, only its version)."""
    key = activation_key(person, t)
    ids = dict(sorted(identifiers))
    by_type: dict[str, list[str]] = {}
    for typ, value in sorted(identifiers):
        by_type.setdefault(typ, []).append(value)
    cause = row.get(CAUSE)
    when = row.get("updated_at") or None
    context = {
        "traits": {k: v[0] if len(v) == 1 else v for k, v in by_type.items()},
        "personas": {"computation_key": t.audience, "computation_class": "audience"},
        "cdi": {
            "activation_key": key,
            "person": person,
            "destination": t.destination,
            "transition": t.kind,
            "epoch": t.epoch,
            "profile_version": row.get("version"),
            "cause": {"event_time_ms": cause[0], "message_id": cause[1]} if cause else None,
        },
    }
    who = {}
    if "user_id" in ids:
        who["userId"] = ids["user_id"]
    if "anonymous_id" in ids:
        who["anonymousId"] = ids["anonymous_id"]
    track = {
        "type": "track",
        "event": "Audience Entered" if t.kind == ENTERED else "Audience Exited",
        "messageId": f"{key}-t",
        **who,
        "timestamp": when,
        "properties": {"audience_key": t.audience, t.audience: t.kind == ENTERED},
        "context": context,
    }
    identify = {
        "type": "identify",
        "messageId": f"{key}-i",
        **who,
        "timestamp": when,
        "traits": {t.audience: t.kind == ENTERED},
        "context": context,
    }
    return [track, identify]


def delivery_records(
    person: str, t: Transition, row: dict, identifiers: list[tuple[str, str]]
) -> list[dict]:
    """The transition's records as a destination receives them (the same envelope as event
    deliveries: ``destination``, ``profile_key``, ``event_time``, ``event``) plus
    ``activation``."""
    out = []
    for record in activation_records(person, t, row, identifiers):
        out.append(
            {
                "destination": t.destination,
                "profile_key": person,
                "event_time": record["timestamp"],
                "event": record,
                "activation": {
                    "key": record["context"]["cdi"]["activation_key"],
                    "audience": t.audience,
                    "transition": t.kind,
                },
            }
        )
    return out


# --- triggers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventTrigger:
    """Fires on one track event named ``event`` whose ``where`` predicate holds (over its
    ``properties``), for each of ``destinations`` the event was delivered to (so consent and the
    destination's PII policy already apply to it)."""

    name: str
    event: str
    where: Predicate | None
    destinations: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg) -> EventTrigger:
        where = (
            compile_predicate(cfg.where, "where", EVENT_SUBJECTS) if cfg.where is not None else None
        )
        return cls(cfg.name, cfg.event, where, tuple(cfg.destinations))

    def matches(self, event: dict) -> bool:
        if event.get("type") != "track" or event.get("event") != self.event:
            return False
        props = event.get("properties")
        view = {"property": props if isinstance(props, dict) else {}}
        return self.where is None or self.where(view)


def matching_triggers(record: dict, triggers: Iterable[EventTrigger]) -> list[str]:
    """Names of the event triggers a delivery record fires (for its destination)."""
    event = record.get("event")
    if not isinstance(event, dict):
        return []
    return [
        t.name for t in triggers if record["destination"] in t.destinations and t.matches(event)
    ]


def trigger_record(
    trigger: str,
    destination: str,
    person: str,
    row: dict | None,
    profile: dict,
    identifiers: list[tuple[str, str]],
    event: dict | None = None,
) -> dict:
    """A ``Trigger Fired`` track for ``destination``: the trigger, the event that fired it (as
    delivered to the destination) or the profile change that did, and the person's current
    profile (``profile``: traits, computed traits and counts as the destination's PII policy
    leaves them). Its ``messageId`` is deterministic (trigger, destination, person, and the
    firing event's id or the profile version)."""
    cause = str(event.get("messageId")) if event else "profile"
    key = hashlib.sha256("\x1f".join((trigger, destination, person, cause)).encode()).hexdigest()
    key = key[:32]
    ids = dict(sorted(identifiers))
    who = {
        k: ids[t] for k, t in (("userId", "user_id"), ("anonymousId", "anonymous_id")) if t in ids
    }
    when = (event or {}).get("timestamp") or (row or {}).get("updated_at")
    return {
        "destination": destination,
        "profile_key": person,
        "event_time": when,
        "event": {
            "type": "track",
            "event": "Trigger Fired",
            "messageId": key,
            **who,
            "timestamp": when,
            "properties": {"trigger": trigger, **({"event": event} if event else {})},
            "context": {
                "traits": profile.get("traits", {}),
                "cdi": {
                    "trigger": trigger,
                    "person": person,
                    "destination": destination,
                    "profile_version": (row or {}).get("version"),
                    "computed_traits": profile.get("computed_traits", {}),
                    "event_counts": profile.get("event_counts", {}),
                },
            },
        },
        "trigger": {"key": key, "name": trigger},
    }


class DestinationRedactor:
    """A profile's traits and identifiers as each destination's PII policy allows: the traits go
    through :func:`transforms.pii.apply_policy` as an identify's traits would; identifiers through
    each destination's identifier redactor (raw key -> key, or None: dropped)."""

    def __init__(self, rules, policies: dict, salt: str, identifier_redactors: dict):
        self._rules, self._policies, self._salt = rules, policies, salt
        self._ids = identifier_redactors

    def identifiers(self, destination: str, raw_members) -> list[tuple[str, str]]:
        redact = self._ids[destination]
        return [split_key(r) for r in map(redact, raw_members or ()) if r is not None]

    def profile(self, destination: str, row: dict | None) -> dict:
        from transforms.pii import apply_policy

        if not row or row.get("deleted"):
            return {}
        policy, default = self._policies[destination]
        traits = orjson.loads(row["traits"])
        redacted = apply_policy({"traits": traits}, self._rules, policy, self._salt, default)[0]
        return {
            "traits": redacted.get("traits", {}),
            "computed_traits": orjson.loads(row["computed_traits"]),
            "event_counts": orjson.loads(row["event_counts"]),
        }


# --- Beam shells ---------------------------------------------------------------------------------


class _Activator:
    """What both stage kinds share: memberships of a row and the records of transitions."""

    def __init__(self, audiences, purposes, redactors):
        self._counters = {
            kind: Metrics.counter("cdi", name)
            for kind, name in (
                (ENTERED, "activation.entered"),
                (EXITED, "activation.exited"),
                ("trigger", "trigger.fired"),
            )
        }
        self._audiences = tuple(audiences)
        self._purposes = dict(purposes)
        if isinstance(redactors, dict):  # identifier redactors only (no trigger profiles)
            redactors = DestinationRedactor((), {}, "", redactors)
        self._redactors = redactors

    def members_of(self, row):
        return memberships(row, self._audiences, self._purposes)

    def records(self, person, changes, row, raw_members):
        triggers = {a.name for a in self._audiences if a.trigger}
        for t in changes:
            ids = self._redactors.identifiers(t.destination, raw_members)
            if t.audience not in triggers:
                self._counters[t.kind].inc()
                out = delivery_records(person, t, row, ids)
            elif t.kind == ENTERED:  # a threshold trigger fires on crossing, not on leaving
                self._counters["trigger"].inc()
                profile = self._redactors.profile(t.destination, row)
                out = [trigger_record(t.audience, t.destination, person, row, profile, ids)]
                out[0]["event"]["messageId"] += f"-{t.epoch}"
                out[0]["event"]["context"]["cdi"]["epoch"] = t.epoch
                out[0]["trigger"]["key"] = out[0]["event"]["messageId"]
            else:
                continue
            yield beam.pvalue.TaggedOutput(t.destination, out)


class _ActivateFn(beam.DoFn):
    """Streaming: per person, the memberships in force, their entry counts (epochs), the last
    row version seen and the raw identifiers (for exits after a deletion). A row older than the
    last one seen is ignored (rows of a person may be reordered by a shuffle)."""

    # (last version, memberships, epochs, raw identifiers)
    MEMBERSHIP_STATE = ReadModifyWriteStateSpec("membership", FastPrimitivesCoder())

    def __init__(self, activator: _Activator):
        self._a = activator

    @dead_letter_on_raise
    def process(self, element, state=beam.DoFn.StateParam(MEMBERSHIP_STATE)):
        person, row = element
        version, members, epochs, raw = state.read() or (-1, [], {}, [])
        if row["version"] <= version:
            return
        before = frozenset(tuple(m) for m in members)
        after = self._a.members_of(row)
        epochs = {tuple(k): n for k, n in epochs}
        changes = transitions(before, after, epochs)
        if not row.get("deleted"):
            raw = row.get(RAW_MEMBERS) or raw
        out = list(self._a.records(person, changes, row, raw))
        if row.get("deleted"):
            raw = []  # a deleted or merged-away person: keep no identifiers
        state.write((row["version"], sorted(after), sorted(epochs.items()), raw))
        yield from out


class _ActivateBoundedFn(beam.DoFn):
    """Bounded: a person's one (final) row; every membership is an entry (first epoch)."""

    def __init__(self, activator: _Activator):
        self._a = activator

    @dead_letter_on_raise
    def process(self, element):
        person, row = element
        changes = transitions(frozenset(), self._a.members_of(row), {})
        yield from self._a.records(person, changes, row, row.get(RAW_MEMBERS) or [])


class ActivateAudiences(beam.PTransform):
    """Profile rows in; ``{destination: lists of activation records}`` and ``failed`` out."""

    def __init__(self, audiences, purposes, redactors, bounded: bool):
        super().__init__()
        self._activator = _Activator(audiences, purposes, redactors)
        self._destinations = sorted({d for a in audiences for d in a.destinations})
        self._bounded = bounded

    def expand(self, rows):
        keyed = rows | "ByPerson" >> beam.Map(lambda r: (r["profile_id"], r)).with_output_types(
            KV[str, Any]
        )
        if self._bounded:
            out = keyed | "Memberships" >> guarded(
                beam.ParDo(_ActivateBoundedFn(self._activator)), *self._destinations, main="none"
            )
        else:
            out = keyed | "Memberships" >> beam.ParDo(_ActivateFn(self._activator)).with_outputs(
                FAILED, *self._destinations, main="none"
            )
        result = {d: out[d] for d in self._destinations}
        result[FAILED] = out[FAILED]
        return result


class _ClaimFn(beam.DoFn):
    """Passes a destination's record lists on, without the activation records whose key the
    ledger already holds (an earlier run, a replay, a retried bundle delivered them)."""

    def __init__(self, spec, run_id: str):
        self._spec, self._run_id = spec, run_id
        self._skipped = Metrics.counter("cdi", "activation.already_delivered")

    def setup(self):
        from transforms.profile_store import adapter

        self._ledger = adapter(self._spec).Ledger(self._spec)

    @staticmethod
    def _key(record):
        if "activation" in record:
            return record["activation"]["key"] + record["event"]["type"][0]
        if "trigger" in record:
            return "trigger:" + record["trigger"]["key"]
        return None

    def process(self, records):
        keyed = [(self._key(r), r) for r in records]
        keys = [k for k, _ in keyed if k is not None]
        if not keys:
            yield records
            return
        new = self._ledger.claim(keys, self._run_id)
        kept = [r for k, r in keyed if k is None or k in new]
        self._skipped.inc(len(records) - len(kept))
        if kept:
            yield kept

    def teardown(self):
        ledger = getattr(self, "_ledger", None)
        if ledger is not None:
            ledger.close()


class SkipDelivered(beam.PTransform):
    """The activation ledger in front of a destination (module doc): a key is claimed by the
    first run that produces it; a retried bundle of that run claims it again (so a bundle that
    failed after its claim is delivered on the retry), any later run (a re-run, a replay with
    ``--activate``) finds it taken and skips the record. ``run_id``: unique per run."""

    def __init__(self, spec, run_id: str):
        super().__init__()
        self._spec, self._run_id = spec, run_id

    def expand(self, record_lists):
        return record_lists | "Claim" >> beam.ParDo(_ClaimFn(self._spec, self._run_id))


def trigger_inputs(records, triggers):
    """A destination's delivery records -> ``(profile key, payload)`` per trigger fired."""
    for record in records:
        for name in matching_triggers(record, triggers):
            yield record["profile_key"], {"trigger": name, "record": record}


class TriggerEvents(beam.PTransform):
    """A destination's delivery record lists in; ``(profile key, payload)`` for each event
    trigger they fire, to route to the person (``UnifyProfiles``' ``triggers`` input)."""

    def __init__(self, triggers):
        super().__init__()
        self._triggers = tuple(triggers)

    def expand(self, record_lists):
        triggers = self._triggers
        return record_lists | "Match" >> beam.FlatMap(trigger_inputs, triggers).with_output_types(
            KV[str, Any]
        )


class _FireFn(beam.DoFn):
    def __init__(self, redactor: DestinationRedactor):
        self._redactor = redactor
        self._fired = Metrics.counter("cdi", "trigger.fired")

    @dead_letter_on_raise
    def process(self, element):
        row, payload = element
        record = payload["record"]
        dest = record["destination"]
        person = row["profile_id"] if row else record["profile_key"]
        members = (row or {}).get(RAW_MEMBERS) or [record["profile_key"]]
        self._fired.inc()
        fired = trigger_record(
            payload["trigger"],
            dest,
            person,
            row,
            self._redactor.profile(dest, row),
            self._redactor.identifiers(dest, members),
            event=record["event"],
        )
        yield beam.pvalue.TaggedOutput(dest, [fired])


class FireEventTriggers(beam.PTransform):
    """``(current profile row, payload)`` in; ``{destination: lists of Trigger Fired records}``
    and ``failed`` out."""

    def __init__(self, redactor: DestinationRedactor, destinations):
        super().__init__()
        self._redactor = redactor
        self._destinations = sorted(set(destinations))

    def expand(self, triggered):
        out = triggered | "Fire" >> guarded(
            beam.ParDo(_FireFn(self._redactor)), *self._destinations, main="none"
        )
        result = {d: out[d] for d in self._destinations}
        result[FAILED] = out[FAILED]
        return result
