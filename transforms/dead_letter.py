"""Dead letters: an element that makes a step raise costs one quarantine record, never the run.

Every per-element step of the job holds its outputs for an element until the element is done,
so an element that raises emits nothing but its dead letter ``(element, (exception class, repr,
traceback))`` under the tag :data:`FAILED`, which becomes a quarantine record here: ``stage``
(the step), ``reason: internal.error``, ``exception`` (class and message), the ``payload`` and,
for events, the same identifying fields as every other quarantine record. Errors of the job
itself are not elements and still fail the run: a sink that cannot be reached raises outside
``process`` (setup, bundle commit), a bad config exits before the start.

One mechanism for every step: a DoFn's ``process`` (or timer callback) under
:func:`dead_letter_on_raise`, a function under :func:`one_or_dead_letter` /
:func:`all_or_dead_letter` (for ``beam.FlatMap``), and :func:`guarded` to declare the tags.
Written by hand rather than Beam's ``ParDo.with_exception_handling``, which has the same
contract: that wrapper cannot carry timer callbacks (it hides them from the runner), and it
costs 2.0 us per element and step against 0.5 us for this one (measured on the in-process
runner: its delegating ``__getattribute__`` runs in Python on every attribute read), with ~20
guarded element-steps per event.

What an element *is* differs per step, and so does its record:

- an **event** (a raw line, an envelope, or every event of a person whose grouped history
  failed): one record per event, with its payload. Events that fail after dedup were already
  counted as unique, so :class:`CountEventsOnce` counts each such event once
  (``quarantined.internal.error`` and ``dead_lettered_after_dedup``, which the run report takes
  off ``valid``): ``events in = valid + quarantined + duplicates`` holds exactly even when one
  event makes two parallel steps raise (the second record says ``repeat: true``);
- anything else (an identifier group in stitching, a person in unify, a profile row at the
  sink): one record with ``subject`` naming it and the element as JSON in ``payload``; these are
  counted per stage (``internal_error.<stage>``) and reported apart, since they are not events.

Stateful DoFns compute with pure functions first and write state last, so an element that
raises has changed nothing.
Tracebacks are not kept in records (they can quote values, and payloads are restricted enough).
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import CallableWrapperDoFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.typehints import KV
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Duration, Timestamp

from transforms.envelope import Envelope, decode_text, unpack
from transforms.quarantine import Violation, quarantine_record

INTERNAL_ERROR = "internal.error"
FAILED = "failed"  # the dead-letter tag of every guarded step
EVENT, ELEMENT = "event", "element"

# Caught: Exception only (a KeyboardInterrupt or SystemExit is the job's, not the element's),
# and no failure threshold: poison is quarantined however much of it there is.

_MARK = "_cdi_dead_letters"  # set on the functions whose failures become dead letters

_MAX_MESSAGE = 2000  # an exception message can quote a whole element; the payload has it anyway


def guarded(pardo: beam.ParDo, *tags: str, main: str = "good"):
    """``pardo`` with the dead-letter output :data:`FAILED` and its own ``tags`` (as
    ``ParDo.with_outputs``: the result is indexed by tag, ``main`` its main output). Its DoFn's
    ``process`` must be under :func:`dead_letter_on_raise`, or it is a ``beam.FlatMap`` of a
    function under :func:`one_or_dead_letter` / :func:`all_or_dead_letter`: anything else
    could stop the run on one bad element, so it is refused when the job is built. The tags are
    declared as output types first, with the main output's declared type kept (later keyed
    steps take their key coder from it), so Beam knows every tag."""
    fn = pardo.fn
    process = getattr(fn, "_fn", None) if isinstance(fn, CallableWrapperDoFn) else fn.process
    if not getattr(process, _MARK, False):
        raise TypeError(
            f"guarded({type(fn).__name__}): its process is not under dead_letter_on_raise "
            "(a FlatMap: one_or_dead_letter / all_or_dead_letter)"
        )
    declared = pardo.get_type_hints().output_types
    main_type = declared[0][0] if declared and declared[0] else Any
    pardo = pardo.with_output_types(main_type, **{t: Any for t in (*tags, FAILED)})
    return pardo.with_outputs(FAILED, *tags, main=main)


def one_or_dead_letter(fn):
    """``fn(element, ...) -> output`` as a ``beam.FlatMap`` function: ``[output]``, or the
    element's dead letter when ``fn`` raises."""

    @functools.wraps(fn)
    def one(element, *args, **kwargs):
        try:
            return [fn(element, *args, **kwargs)]
        except Exception as e:
            return [dead_letter(element, e)]

    setattr(one, _MARK, True)
    return one


def all_or_dead_letter(fn):
    """``fn(element, ...) -> outputs`` as a ``beam.FlatMap`` function: all of them, or only the
    element's dead letter when ``fn`` raises on the way."""

    @functools.wraps(fn)
    def each(element, *args, **kwargs):
        try:
            return list(fn(element, *args, **kwargs))
        except Exception as e:
            return [dead_letter(element, e)]

    setattr(each, _MARK, True)
    return each


def dead_letter_on_raise(method):
    """A DoFn's ``process`` (or timer callback) whose outputs for an element are held until it
    returns; if it raises, the element goes to the :data:`FAILED` output as ``(element, (type,
    repr, traceback))``. For a timer callback, which takes no element, the dead letter names the
    timer and the key (the callback's ``key`` parameter, if it has one). A stateful DoFn must
    write its state only after the part that can raise (its pure rule).
    """
    signature = inspect.signature(method)
    is_timer = not _takes_element(signature)

    @functools.wraps(method)  # keeps the signature: Beam reads the state and timer params there
    def wrapper(self, *args, **kwargs):
        try:
            return list(method(self, *args, **kwargs) or ())
        except Exception as e:
            if is_timer:
                key = signature.bind(self, *args, **kwargs).arguments.get("key")
                element = {"timer": method.__name__, "key": key if isinstance(key, str) else None}
            else:
                element = args[0] if args else next(iter(kwargs.values()), None)
            return [dead_letter(element, e)]

    setattr(wrapper, _MARK, True)
    return wrapper


def dead_letter(element: Any, e: Exception) -> beam.pvalue.TaggedOutput:
    """The :data:`FAILED` output for ``element``, in the shape of Beam's own dead letters
    (``with_exception_handling``); also for a loop inside a DoFn that must go on past one bad
    item (a timer releasing held events)."""
    return beam.pvalue.TaggedOutput(
        FAILED, (element, (type(e), repr(e), traceback.format_exception(e)))
    )


def at_bundle_end(output: beam.pvalue.TaggedOutput) -> beam.pvalue.TaggedOutput:
    """``output`` yielded from ``finish_bundle``, which has no element to take a window from:
    in the global window (the delivery adapters, whose inputs are global-window records)."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    return beam.pvalue.TaggedOutput(output.tag, WindowedValue(output.value, 0, [GlobalWindow()]))


def failures_of(records, label: str, fn: beam.DoFn):
    """Apply a DoFn that outputs only dead letters (a delivery adapter); return them."""
    return (records | label >> beam.ParDo(fn).with_outputs(FAILED, main="none"))[FAILED]


def _takes_element(signature: inspect.Signature) -> bool:
    """A process method: its first parameter after self has no Beam default (the element)."""
    params = list(signature.parameters.values())[1:]
    return bool(params) and params[0].default is inspect.Parameter.empty


# --- pure core: what a failed element becomes -------------------------------------------------


def exception_fields(error: tuple) -> tuple[str, str]:
    """``(class name, message)`` of Beam's ``(type, repr, traceback)`` error triple."""
    exc_type, exc_repr = error[0], error[1]
    name = getattr(exc_type, "__name__", str(exc_type))
    return name, str(exc_repr)[:_MAX_MESSAGE]


def _record(stage: str, error: tuple, subject: str, **fields) -> dict[str, Any]:
    """A quarantine record with ``reason: internal.error``, the exception and ``subject``."""
    cls, message = exception_fields(error)
    record = quarantine_record(
        stage=stage, violations=[Violation(INTERNAL_ERROR, "", f"{cls}: {message}")], **fields
    )
    record["subject"] = subject
    record["exception"] = {"class": cls, "message": message}
    return record


def _cited(event: Any) -> dict[str, str | None]:
    """The messageId and receivedAt an event's record cites, when they are text."""
    event = event if isinstance(event, dict) else {}
    mid, received = event.get("messageId"), event.get("receivedAt")
    return {
        "message_id": mid if isinstance(mid, str) else None,
        "received_at": received if isinstance(received, str) else None,
    }


def event_record(stage: str, error: tuple, env: Envelope) -> dict[str, Any]:
    """The quarantine record of one event a step failed on."""
    return _record(
        stage,
        error,
        EVENT,
        payload=env.payload or json_text(env.event),
        source=env.source,
        origin=env.origin,
        plan_version=env.plan_version or None,
        **_cited(env.event),
    )


def raw_record(stage: str, error: tuple, raw: tuple) -> dict[str, Any]:
    """The quarantine record of a raw input ``(source, origin, payload)`` a step failed on."""
    source, origin, payload = (list(raw) + [None, None, None])[:3]
    text, data = payload, None
    if isinstance(payload, bytes):
        text, bad = decode_text(payload)
        if bad is not None:  # not UTF-8: keep the bytes, as validation would
            text, data = payload.decode("utf-8", "replace"), payload
    elif not isinstance(payload, str):
        text = json_text(payload)
    return _record(
        stage,
        error,
        EVENT,
        payload=text,
        source=str(source),
        origin=str(origin),
        raw=data,
        **_cited(_parsed(payload)),
    )


def _parsed(payload: Any) -> dict:
    """The payload's JSON object, to cite its messageId; {} when it is none."""
    if isinstance(payload, dict):
        return payload
    try:
        value = orjson.loads(payload)
    except Exception:  # not JSON, not text: nothing to cite
        return {}
    return value if isinstance(value, dict) else {}


def element_record(stage: str, subject: str, error: tuple, element: Any) -> dict[str, Any]:
    """The quarantine record of a failed element that is not an event (a group, a person...)."""
    return _record(stage, error, subject, payload=json_text(element), source=None, origin=None)


def envelopes_in(element: Any) -> list[Envelope]:
    """Every event an element carries: an envelope, packed envelope bytes, or tuples and lists of
    them (``(key, envelope)``, a person's ``(key, [packed...])``, a delivery ``(names, key, env)``).
    A packed value that does not unpack is kept as an envelope around its bytes."""
    if isinstance(element, Envelope):
        return [element]
    if isinstance(element, bytes):
        try:
            return [unpack(element)]
        except Exception:  # the failure being reported may be this very value
            text = element.decode("utf-8", "replace")
            return [Envelope("", "", text, {}, 0, "")]
    if isinstance(element, Iterable) and not isinstance(element, (str, dict)):
        return [env for item in element for env in envelopes_in(item)]
    return []


def json_text(value: Any) -> str:
    """Any element as JSON text, whatever it holds (tuples, bytes, sets, NamedTuples)."""
    return orjson.dumps(
        value,
        default=_fallback,
        option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS,
    ).decode()


def _fallback(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return sorted(map(repr, value))
    if isinstance(value, Iterable):
        return list(value)
    return repr(value)


# --- Beam shells -------------------------------------------------------------------------------


class _EventRecordsFn(beam.DoFn):
    """Dead letters of an event step -> one record per event. Before dedup each record is
    counted at once; after dedup each is keyed by its event's idempotency key, for
    :class:`CountEventsOnce`."""

    def __init__(self, stage: str, raw: bool, key_paths: tuple[str, ...] | None):
        self._stage, self._raw, self._key_paths = stage, raw, key_paths
        self._stage_count = Metrics.counter("cdi", f"internal_error.{stage}")
        self._quarantined = Metrics.counter("cdi", "quarantined." + INTERNAL_ERROR)

    def process(self, dead_letter):
        element, error = dead_letter
        if self._raw:
            pairs = [("", raw_record(self._stage, error, element))]
        else:
            envs = envelopes_in(element)
            pairs = [(self._key(env), event_record(self._stage, error, env)) for env in envs]
            if not envs:  # nothing recognisable as an event: still never lost
                pairs = [(json_text(element), element_record(self._stage, ELEMENT, error, element))]
        self._stage_count.inc(len(pairs))
        if self._key_paths is None:
            self._quarantined.inc(len(pairs))
            for _, record in pairs:
                yield record
        else:
            yield from pairs

    def _key(self, env: Envelope) -> str:
        if self._key_paths is None or not isinstance(env.event, dict):
            return env.payload
        from transforms.dedup import dedup_key  # dedup guards its own steps with this module

        return dedup_key(env.source, env.event, self._key_paths)


class EventDeadLetters(beam.PTransform):
    """A guarded event step's dead letters -> quarantine records, one per event. ``raw``: the
    elements are raw inputs ``(source, origin, payload)``. ``after_dedup``: the dedup key paths
    when the events were already counted unique: the output is then ``(idempotency key,
    record)`` for :class:`CountEventsOnce`."""

    def __init__(
        self, stage: str, *, raw: bool = False, after_dedup: tuple[str, ...] | None = None
    ):
        super().__init__()
        self._fn = _EventRecordsFn(stage, raw, tuple(after_dedup) if after_dedup else None)

    def expand(self, dead_letters):
        records = beam.ParDo(self._fn)
        if self._fn._key_paths is not None:  # keyed for CountEventsOnce: a deterministic coder
            records = records.with_output_types(KV[str, Any])
        return dead_letters | "Records" >> records


class ElementDeadLetters(beam.PTransform):
    """A guarded non-event step's dead letters -> one quarantine record per element."""

    def __init__(self, stage: str, subject: str):
        super().__init__()
        self._stage, self._subject = stage, subject

    def expand(self, dead_letters):
        stage, subject = self._stage, self._subject
        counter = Metrics.counter("cdi", f"internal_error.{stage}")

        def to_record(dead_letter):
            counter.inc()
            return element_record(stage, subject, dead_letter[1], dead_letter[0])

        return dead_letters | "Records" >> beam.Map(to_record)


class _CountOnceFn(beam.DoFn):
    """Keyed by the event's idempotency key: the first record of an event is counted, any later
    one (another step failed on the same event) is marked ``repeat``. State: one flag per
    failed event, cleared by an event-time timer after the dedup TTL."""

    SEEN_STATE = ReadModifyWriteStateSpec("dead_lettered", BooleanCoder())
    EXPIRY_TIMER = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, ttl_seconds: float):
        self._ttl = Duration(seconds=ttl_seconds)
        self._quarantined = Metrics.counter("cdi", "quarantined." + INTERNAL_ERROR)
        self._after_dedup = Metrics.counter("cdi", "dead_lettered_after_dedup")
        self._repeats = Metrics.counter("cdi", "internal_error.repeats")

    def process(
        self,
        element,
        ts=beam.DoFn.TimestampParam,
        seen=beam.DoFn.StateParam(SEEN_STATE),
        expiry=beam.DoFn.TimerParam(EXPIRY_TIMER),
    ):
        _, record = element
        if seen.read():
            self._repeats.inc()
            yield {**record, "repeat": True}
            return
        seen.write(True)
        if isinstance(ts, Timestamp) and ts < MAX_TIMESTAMP - self._ttl:
            expiry.set(ts + self._ttl)
        self._quarantined.inc()
        self._after_dedup.inc()
        yield record

    @on_timer(EXPIRY_TIMER)
    def expire(self, seen=beam.DoFn.StateParam(SEEN_STATE)):
        seen.clear()


class CountEventsOnce(beam.PTransform):
    """``(idempotency key, record)`` from every guarded step after dedup in; the records out,
    each failed event counted once however many steps failed on it."""

    def __init__(self, ttl_seconds: float):
        super().__init__()
        self._ttl = ttl_seconds

    def expand(self, keyed_records):
        return keyed_records | "CountOnce" >> beam.ParDo(_CountOnceFn(self._ttl))
