"""Replacing messages between keyed stages, whatever order they arrive in.

Beam keeps no order between two keyed steps: a key's messages cross a shuffle, and bundles are
processed in parallel or retried; Prism even queues a stateful step's pending messages of a key
by timestamp (``elementHeap`` in its element manager), not in the order they were sent. A stage
that *replaces* what it holds with the message it receives (an identifier's evidence snapshot,
its profile fragment, a group's assignment of its members) would then keep an older message over
a newer one, and say so forever (seen: a continuous run whose profile kept a fragment twelve
events short, under a version higher than the complete row's).

So every replacing message carries its sender's stamp, an integer that only grows per sender
key (a counter in the sender's state, or the number of inputs of an accumulating pane), and the
receiver keeps, per subject, the stamp of the newest message it applied, removals included
(:func:`fresh`): a message that is not newer than that changes nothing. Messages that only add
to a grow-only value (a neighbour's earliest evidence, a component's smaller label) need no
stamp: they are applied as joins and commute.
"""

from __future__ import annotations

from collections.abc import Hashable


def fresh(stamps: dict, subject: Hashable, stamp: int) -> bool:
    """Whether a message about ``subject`` stamped ``stamp`` is newer than every one applied so
    far; if it is, it is recorded as the newest (``stamps`` is the receiver's state)."""
    seen = stamps.get(subject)
    if seen is not None and stamp <= seen:
        return False
    stamps[subject] = stamp
    return True


def upgraded(state, empty: tuple) -> tuple:
    """A stage's state cell as this version keeps it: ``empty`` when there is none yet, and a
    cell an earlier version wrote (before stamps: a tuple with fewer fields, or the bare first
    field) padded with ``empty``'s remaining fields, so a job restored from a savepoint of that
    version goes on, its stamps starting from nothing (every sender's count restarts as well)."""
    if state is None:
        return empty
    if not isinstance(state, tuple):
        state = (state,)
    return (*state, *empty[len(state) :]) if len(state) < len(empty) else state
