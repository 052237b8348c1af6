"""Tracking plans: which events are planned and the JSON Schema of their properties and traits.

A plan is YAML (``schemas/tracking_plans/example.yaml``)::

    plan: web-and-mobile
    version: "2026.11.1"
    types:            # accepted Segment types; identify/group may give a `traits` schema,
      identify: {traits: {...}}   # page/screen a `properties` schema
      track: {}
    events:           # track event name -> {properties: <JSON Schema>}
      Order Completed: {properties: {...}}

Validators are compiled once per process with fastjsonschema (generated Python code, ~1 µs per
simple schema) and cached by plan content, never rebuilt per element. fastjsonschema stops at the
first error, which is the one the quarantine record leads with.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson
import yaml

from transforms.envelope import CONTROL_TYPES, EVENT_TYPES
from transforms.quarantine import Violation

# JSON Schema keyword that failed -> stable reason code.
_RULE_REASONS = {
    "required": "schema.required_missing",
    "type": "schema.type_mismatch",
    "additionalProperties": "schema.additional_property",
    "enum": "schema.enum_violation",
    "const": "schema.enum_violation",
    "format": "schema.format_violation",
    "pattern": "schema.format_violation",
}


class PlanError(ValueError):
    """A tracking plan file that cannot be used: message names the file and the path in it."""


@dataclass(frozen=True)
class TrackingPlan:
    """A loaded plan: plain data, picklable, so it can travel to Dataflow and Flink workers."""

    name: str
    version: str
    types: dict[str, dict[str, Any]]
    events: dict[str, dict[str, Any]]

    @property
    def fingerprint(self) -> str:
        blob = orjson.dumps(
            [self.name, self.version, self.types, self.events], option=orjson.OPT_SORT_KEYS
        )
        return hashlib.sha256(blob).hexdigest()


def parse_plan(data: Any, filename: str) -> TrackingPlan:
    if not isinstance(data, dict):
        raise PlanError(f"{filename}: <root>: expected a mapping")
    unknown = set(data) - {"plan", "version", "types", "events"}
    if unknown:
        raise PlanError(
            f"{filename}: {sorted(unknown)[0]}: unknown key; valid keys: plan, version, types, events"
        )
    version = data.get("version")
    if not isinstance(version, (str, int)) or version == "":
        raise PlanError(f"{filename}: version: required, a string such as '2026.11.1'")
    types = data.get("types") or {}
    events = data.get("events") or {}
    if not isinstance(types, dict) or not isinstance(events, dict):
        raise PlanError(f"{filename}: types/events: expected mappings")
    for t, spec in types.items():
        if t not in EVENT_TYPES:
            raise PlanError(
                f"{filename}: types.{t}: not a Segment event type ({', '.join(sorted(EVENT_TYPES))})"
            )
        if not isinstance(spec, dict) or set(spec) - {"properties", "traits"}:
            raise PlanError(
                f"{filename}: types.{t}: expected a mapping with 'properties' and/or 'traits'"
            )
    for name, spec in events.items():
        if not isinstance(spec, dict) or set(spec) - {"properties", "description"}:
            raise PlanError(
                f"{filename}: events.{name}: expected a mapping with 'properties' (a JSON Schema)"
            )
    plan = TrackingPlan(str(data.get("plan", Path(filename).stem)), str(version), types, events)
    try:
        compile_plan(plan)
    except fastjsonschema.JsonSchemaDefinitionException as e:
        raise PlanError(f"{filename}: invalid JSON Schema: {e}") from None
    return plan


def load_plan(path: str | Path) -> TrackingPlan:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{p}: <root>: file not found") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{p}: <root>: not valid YAML: {e}") from None
    return parse_plan(data, str(p))


@dataclass(frozen=True)
class CompiledPlan:
    plan: TrackingPlan
    # (type, event name or "") -> {"properties": fn, "traits": fn}
    validators: dict[tuple[str, str], dict[str, Callable[[Any], Any]]]


def _compile(schema: dict[str, Any]) -> Callable[[Any], Any]:
    return fastjsonschema.compile(schema, use_formats=True)


# A per-process cache of generated code, keyed by plan content: not per-key state, so it is safe
# (and meant) to be shared by every DoFn instance in a worker.
_COMPILED: dict[str, CompiledPlan] = {}


def _compile_all(plan: TrackingPlan) -> CompiledPlan:
    validators: dict[tuple[str, str], dict[str, Callable]] = {}
    for t, spec in plan.types.items():
        validators[(t, "")] = {k: _compile(v) for k, v in spec.items() if isinstance(v, dict)}
    for name, spec in plan.events.items():
        props = spec.get("properties")
        validators[("track", name)] = {"properties": _compile(props)} if props else {}
    return CompiledPlan(plan, validators)


def compile_plan(plan: TrackingPlan) -> CompiledPlan:
    """Compiled validators for a plan; cached per process by the plan's content."""
    fp = plan.fingerprint
    if fp not in _COMPILED:
        _COMPILED[fp] = _compile_all(plan)
    return _COMPILED[fp]


def _depth(value: Any, limit: int) -> bool:
    """True when ``value`` nests containers deeper than ``limit`` (iterative: only containers are
    visited, this runs on every event)."""
    stack = [(value, 0)]
    container = (dict, list)
    while stack:
        node, level = stack.pop()
        if level > limit:
            return True
        children = node.values() if type(node) is dict else node
        for child in children:
            if isinstance(child, container):
                stack.append((child, level + 1))
    return False


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def envelope_violations(event: dict[str, Any]) -> list[Violation]:
    """Checks every event must pass whatever the plan: type, idempotency key, identity."""
    etype = event.get("type")
    if not isinstance(etype, str) or (etype not in EVENT_TYPES and etype not in CONTROL_TYPES):
        return [Violation("event.unknown_type", "type", f"unknown event type {etype!r}")]
    out = []
    if not _nonempty_str(event.get("messageId")):
        out.append(Violation("event.missing_message_id", "messageId", "messageId is required"))
    if not (_nonempty_str(event.get("userId")) or _nonempty_str(event.get("anonymousId"))):
        out.append(Violation("identity.missing", "userId", "userId or anonymousId is required"))
    if etype == "track" and not _nonempty_str(event.get("event")):
        out.append(
            Violation("event.missing_event_name", "event", "a track event needs an event name")
        )
    return out


# A ``max_depth`` that skips the nesting check: the caller knows the event is shallow enough.
NO_DEPTH_CHECK = 0


def cannot_be_too_deep(text: str, max_depth: int) -> bool:
    """Whether an event parsed from ``text`` cannot nest deeper than ``max_depth``: that takes
    ``max_depth + 1`` opening brackets (brackets inside strings only add to the count). Two
    C-level counts instead of a walk over every container of every event."""
    return text.count("{") + text.count("[") < max_depth


def depth_violations(event: dict[str, Any], max_depth: int) -> list[Violation]:
    """The nesting limit, which applies with or without a plan."""
    if max_depth == NO_DEPTH_CHECK:
        return []
    if _depth(event, max_depth - 1):
        return [Violation("schema.too_deep", "", f"nesting deeper than {max_depth} levels")]
    return []


def plan_violations(
    event: dict[str, Any], compiled: CompiledPlan, max_depth: int
) -> list[Violation]:
    """Checks against the tracking plan; assumes :func:`envelope_violations` passed."""
    too_deep = depth_violations(event, max_depth)
    if too_deep:
        return too_deep
    etype = event["type"]
    plan = compiled.plan
    if etype not in plan.types:
        return [Violation("event.unplanned", "type", f"type {etype!r} is not in plan {plan.name}")]
    if etype == "track":
        name = event["event"]
        key = ("track", name)
        if key not in compiled.validators:
            return [
                Violation("event.unplanned", "event", f"event {name!r} is not in plan {plan.name}")
            ]
    else:
        key = (etype, "")
    out = []
    for field_name, validate in compiled.validators[key].items():
        value = event.get(field_name, {})
        try:
            validate(value)
        except fastjsonschema.JsonSchemaValueException as e:
            out.append(_violation_from(e, field_name))
    return out


def _violation_from(e: fastjsonschema.JsonSchemaValueException, field_name: str) -> Violation:
    reason = _RULE_REASONS.get(e.rule or "", "schema.constraint_violation")
    # fastjsonschema names the value "data.x.y"; re-root it at the event field.
    path = field_name + (e.name[4:] if e.name and e.name.startswith("data") else "")
    msg = e.message.replace(e.name or "data", path, 1) if e.name else e.message
    keys: tuple[str, ...] = ()
    if (
        e.rule == "additionalProperties"
        and isinstance(e.value, dict)
        and isinstance(e.definition, dict)
    ):
        declared = set(e.definition.get("properties", {}))
        keys = tuple(sorted(k for k in e.value if k not in declared))
    return Violation(reason, path, msg, keys)


# --- block / omit / allow ----------------------------------------------------------------------

BLOCK, OMIT, ALLOW = "block", "omit", "allow"
# The rules a source may relax; envelope rules (type, messageId, identity) always block.
CONFIGURABLE_RULES = (
    "event.unplanned",
    "schema.required_missing",
    "schema.type_mismatch",
    "schema.additional_property",
    "schema.enum_violation",
    "schema.format_violation",
    "schema.constraint_violation",
)


def _split(path: str) -> list[str]:
    return path.split(".") if path else []


def _remove_path(event: dict, path: str, keys: tuple[str, ...] = ()) -> bool:
    """Delete the value at ``path`` (or only ``keys`` under it); False when nothing can be removed."""
    parts = _split(path)
    if keys:
        target = event
        for part in parts:
            target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            return False
        for k in keys:
            target.pop(k, None)
        return True
    if len(parts) < 2:  # the whole properties/traits object is wrong: nothing partial to strip
        return False
    parent = event
    for part in parts[:-1]:
        parent = parent.get(part) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or parts[-1] not in parent:
        return False
    del parent[parts[-1]]
    return True


def apply_rule_modes(
    event: dict[str, Any], compiled: CompiledPlan, max_depth: int, modes: dict[str, str]
) -> tuple[list[Violation], list[dict[str, str]]]:
    """Judge ``event`` under per-rule modes; mutates it for ``omit``.

    Returns ``(blocking violations, notes)``; notes list what was omitted or allowed, for the
    event's ``context.cdi``. fastjsonschema reports one error at a time, so each non-blocking
    violation is removed from a scratch copy and validation runs again, until the event is clean,
    blocked, or a violation cannot be stepped over (then it blocks, or with ``allow`` the rest is
    left unchecked and said so).
    """
    default = modes.get("default", BLOCK)
    scratch = copy.deepcopy(event)
    notes: list[dict[str, str]] = []
    for _ in range(64):
        violations = plan_violations(scratch, compiled, max_depth)
        if not violations:
            return [], notes
        v = violations[0]
        mode = modes.get(v.reason, default) if v.reason in CONFIGURABLE_RULES else BLOCK
        if mode == BLOCK:
            return violations, notes
        if v.reason == "event.unplanned" or v.reason == "schema.required_missing":
            if mode == OMIT:  # nothing to strip: the event cannot be repaired by omission
                return violations, notes
            notes.append(
                {"reason": v.reason, "path": v.path, "mode": ALLOW, "note": "rest unchecked"}
            )
            return [], notes
        if not _remove_path(scratch, v.path, v.keys):
            return violations, notes
        if mode == OMIT:
            _remove_path(event, v.path, v.keys)
        note = {"reason": v.reason, "path": v.path, "mode": mode}
        if v.keys:
            note["keys"] = ",".join(v.keys)
        notes.append(note)
    return [Violation("schema.constraint_violation", "", "too many violations to step over")], notes
