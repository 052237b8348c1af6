"""Sums that do not depend on the order of their terms.

Float addition is not associative: the same amounts added in another order can differ in the last
bits (326.17 against 326.16999999999996), so a ``sum`` computed trait or an ``increment`` trait
would depend on arrival order and bundling. Found by the oracle comparison in the benchmark.

An accumulator is ``[int_total, float_partials]``: integers are added exactly; floats go into
Shewchuk's non-overlapping partials (the algorithm behind :func:`math.fsum`, which only offers the
final rounding, not a mergeable accumulator), whose exact sum is the exact sum of the floats
added. :func:`value` rounds that exact sum once, so any order, grouping or merge of the same
terms gives the same number. Written by hand because no library keeps mergeable partials; the
accumulator is plain lists, so Beam encodes it natively.
"""

from __future__ import annotations

import math
from typing import Any


def new() -> list:
    return [0, []]


def _add_float(partials: list[float], x: float) -> None:
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


def add(acc: list, x: Any) -> list:
    """Add one number (mutates and returns ``acc``)."""
    if isinstance(x, int) and not isinstance(x, bool):
        acc[0] += x
    else:
        _add_float(acc[1], float(x))
    return acc


def merge(a: list, b: list) -> list:
    """Add accumulator ``b`` into ``a`` (mutates and returns ``a``; ``b`` is left as it is)."""
    a[0] += b[0]
    for p in b[1]:
        _add_float(a[1], p)
    return a


# The integers JSON writers carry exactly (orjson: signed 64-bit up to unsigned 64-bit).
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def value(acc: list) -> int | float:
    """The sum: an ``int`` when only integers were added and it fits 64 bits, else the correctly
    rounded float (a sum of integers beyond 64 bits cannot be written as a JSON integer by the
    sinks, so it is given as the nearest float, or an infinity)."""
    ints, partials = acc
    if not partials and _INT_MIN <= ints <= _INT_MAX:
        return ints
    try:
        floats = math.fsum(partials)
    except (OverflowError, ValueError):  # an intermediate overflowed: the sum is infinite
        floats = math.inf if sum(partials) > 0 else -math.inf
    if not ints:
        return floats
    try:
        return float(ints) + floats
    except OverflowError:  # beyond the largest float
        return math.inf if ints > 0 else -math.inf
