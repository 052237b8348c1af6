"""Identifiers: where they are read, how they are normalized, which values are junk.

Pure functions over the ``identity`` config. The stitching stages build on these; the first
profile stage uses them to list a profile's identities and to pick its key.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from transforms.envelope import get_path

_NON_DIGITS = re.compile(r"\D+")


def normalize(value: Any, normalizer: str) -> str | None:
    """The canonical text of an identifier, or None when it is not a usable scalar."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    if normalizer == "none":
        return value
    v = value.strip()
    if normalizer in ("lowercase", "email"):
        v = v.lower()
    elif normalizer == "phone":
        v = _NON_DIGITS.sub("", v)
    return v


@lru_cache(maxsize=32)
def _compiled_patterns(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p) for p in patterns)


def is_blocked(value: str, blocklist: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Junk identifiers ("undefined", all-zero device ids...) that must never link people."""
    if value.lower() in blocklist:
        return True
    return any(p.search(value) for p in _compiled_patterns(patterns))


# A person's identifiers recur on every event of theirs, and each event is read for identifiers
# by several stages: the verdict is remembered per value (the lists are the config's, a few).
_is_blocked_memo = lru_cache(maxsize=1 << 16)(is_blocked)


def extract_identifiers(event: dict[str, Any], identity) -> list[tuple[str, str]]:
    """Every usable ``(type, value)`` the event carries, in config priority order, no duplicates.

    ``identity`` is an :class:`pipelines.config.IdentityConfig`; blocked values are left out.
    """
    seen: set[tuple[str, str]] = set()
    out = []
    for t in identity.types:
        for path in t.paths:
            v = normalize(get_path(event, path), t.normalizer)
            if not v or _is_blocked_memo(v, identity.blocklist, identity.blocklist_patterns):
                continue
            item = (t.name, v)
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


def read_identifiers(event: dict[str, Any], identity) -> tuple[tuple, tuple]:
    """``(usable, blocked)``: :func:`extract_identifiers` and :func:`blocked_identifiers` in one
    pass over the identifier paths. Validation reads them once and the envelope carries them."""
    seen: set[tuple[str, str]] = set()
    usable, blocked = [], []
    for t in identity.types:
        for path in t.paths:
            v = normalize(get_path(event, path), t.normalizer)
            if v is None:
                continue
            item = (t.name, v)
            if _is_blocked_memo(v, identity.blocklist, identity.blocklist_patterns):
                blocked.append(item)
            elif v and item not in seen:
                seen.add(item)
                usable.append(item)
    return tuple(usable), tuple(blocked)


def identifiers_of(env, identity) -> tuple | list:
    """The envelope's usable identifiers: as validation read them, else read now."""
    ids = env.identifiers
    return ids if ids is not None else extract_identifiers(env.event, identity)


def junk_of(env, identity) -> tuple | list:
    """The envelope's blocklisted identifiers: as validation read them, else read now."""
    junk = env.junk_identifiers
    return junk if junk is not None else blocked_identifiers(env.event, identity)


def blocked_identifiers(event: dict[str, Any], identity) -> list[tuple[str, str]]:
    """The ``(type, value)`` pairs the event carries that the blocklist refuses."""
    out = []
    for t in identity.types:
        for path in t.paths:
            v = normalize(get_path(event, path), t.normalizer)
            if v is not None and is_blocked(v, identity.blocklist, identity.blocklist_patterns):
                out.append((t.name, v))
    return out


# Identifier types whose keys are short (``user:<v>``, ``anon:<v>``); others are ``<type>:<v>``.
PREFIX = {"user_id": "user", "anonymous_id": "anon"}


def id_key(id_type: str, value: str) -> str:
    """The identifier key of a ``(type, value)``: the profile key and the stitching key."""
    return f"{PREFIX.get(id_type, id_type)}:{value}"


def type_rank(id_type: str, type_order: tuple[str, ...]) -> int:
    """How well an identifier type names a person: user ids first, anonymous ids second, other
    types in config order. The one ranking behind both the profile key of an event and the
    anchor (the id) of a stitched person."""
    if id_type in PREFIX:
        return 0 if id_type == "user_id" else 1
    try:
        return 2 + type_order.index(id_type)
    except ValueError:
        return 2 + len(type_order)


def primary_profile_key(event: dict[str, Any], identity, ids=None) -> str | None:
    """The key an event's profile fragment is folded under: the identifier key of its best
    usable identifier (:func:`type_rank`, then the config's path order), or None when it has no
    usable identifier at all. Validation quarantines such events (``identity.missing``) with
    the same :func:`extract_identifiers`, so every valid event has a key: the device id of an
    event whose anonymous id is blocklisted junk, for instance."""
    if ids is None:
        ids = extract_identifiers(event, identity)
    if not ids:
        return None
    order = tuple(t.name for t in identity.types)
    best = min(range(len(ids)), key=lambda i: (type_rank(ids[i][0], order), i))
    return id_key(*ids[best])
