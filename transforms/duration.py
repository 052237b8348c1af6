"""Durations as written in config: ``500ms``, ``30s``, ``10m``, ``2h``, ``7d``, ``1h30m``. Here,
not in the config loader, so the adapters' config dataclasses can declare duration fields."""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Duration(float):
    """A duration in seconds, written in config as ``500ms``, ``30s``, ``10m``, ``2h``, ``7d``, ``1h30m``."""

    @classmethod
    def parse(cls, text: str) -> Duration:
        s = text.strip().replace(" ", "") if isinstance(text, str) else ""
        if not s or _DURATION_PART.sub("", s) != "":
            raise ValueError(
                f"malformed duration {text!r} (expected a number and a unit, e.g. 500ms, 30s, 10m, 2h, 7d, 1h30m)"
            )
        return cls(sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(s)))

    def __repr__(self) -> str:
        return f"Duration({float(self)}s)"
