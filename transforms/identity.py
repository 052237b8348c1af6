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


def blocked_identifiers(event: dict[str, Any], identity) -> list[tuple[str, str]]:
    """The ``(type, value)`` pairs the event carries that the blocklist refuses."""
    out = []
    for t in identity.types:
        for path in t.paths:
            v = normalize(get_path(event, path), t.normalizer)
            if v is not None and is_blocked(v, identity.blocklist, identity.blocklist_patterns):
                out.append((t.name, v))
    return out


def primary_profile_key(event: dict[str, Any], identity) -> str | None:
    """Profile key before stitching exists: the user id, else the anonymous id, else None."""
    ids = dict(reversed(extract_identifiers(event, identity)))
    if "user_id" in ids:
        return "user:" + ids["user_id"]
    if "anonymous_id" in ids:
        return "anon:" + ids["anonymous_id"]
    return None
