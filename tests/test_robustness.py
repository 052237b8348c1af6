"""No input stops the job: the three crashes found by hand, and a dead letter for every step.

Each "found" test runs the line that failed the job before the fix, through both stage kinds.
The dead-letter tests make one step raise on one marked element (a fault injected into the pure
function the step calls) and check that the job finishes, that the element is one quarantine
record with ``stage``, ``reason: internal.error``, the exception and the payload, and that the
accounting still holds.
"""

from __future__ import annotations

import base64

import orjson
import pytest

from pipelines.config import IdentityConfig
from tests.conftest import JUDGE_SETTINGS, config_from, event, run_job
from transforms.identity import primary_profile_key
from transforms.validate import judge

CONFIG = """
sources: [{name: web, paths: []}]
computed_traits:
  - {name: views, aggregate: count, event: Product Viewed}
consent:
  purposes: [analytics]
  destinations: {warehouse: {purposes: [analytics], pii: {email: hash}}}
pii: {salt: s}
"""
KINDS = pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "streaming"])
# Plus one pass of a planned run (each connected part settled in one call after dedup): its
# dead letters keep each stage's name.
WITH_PLANNED = pytest.mark.parametrize(
    "bounded", [True, False, "planned"], ids=["bounded", "streaming", "planned"]
)
NOW_MS = 1_790_000_000_000  # 2026-09-21: a fixed read time for the pure tests


def line(**kw) -> bytes:
    return orjson.dumps(event(**kw))


def granted(**kw) -> bytes:
    """An event whose person granted analytics (so it reaches the warehouse)."""
    return line(context={"consent": {"categoryPreferences": {"analytics": True}}}, **kw)


def _accounted(run: dict, events: int) -> dict:
    report = run["report"]
    assert report["events_in"] == events
    assert report["valid"] + report["quarantined"] + report["duplicates"] == events
    assert report["accounted"]
    return report


# --- found 1: validation and keying agree on one identifier rule --------------------------------


def test_the_profile_key_is_the_best_usable_identifier_by_rank():
    identity = IdentityConfig()
    junk_anon = event(anonymousId="undefined", context={"device": {"id": "d1"}})
    assert primary_profile_key(junk_anon, identity) == "device_id:d1"
    # user ids first, anonymous ids second, other types in config order (email before device)
    both = event(
        anonymousId="undefined", traits={"email": "A@x.io"}, context={"device": {"id": "d1"}}
    )
    assert primary_profile_key(both, identity) == "email:a@x.io"
    assert primary_profile_key(event(userId="u1"), identity) == "user:u1"
    assert primary_profile_key(event(), identity) == "anon:anon-1"
    assert primary_profile_key(event(anonymousId="undefined"), identity) is None


def test_validation_keeps_exactly_the_events_that_have_a_key():
    keyed = ("web", "f", line(anonymousId="undefined", context={"device": {"id": "d1"}}))
    env, record = judge(keyed, None, **JUDGE_SETTINGS)
    assert record is None and primary_profile_key(env.event, IdentityConfig()) == "device_id:d1"
    keyless = ("web", "f", line(anonymousId="undefined", context={"device": {"id": "0000"}}))
    env, record = judge(keyless, None, **JUDGE_SETTINGS)
    assert env is None and record["reason"] == "identity.missing"


@KINDS
def test_an_event_keyed_by_its_device_id_runs_through_the_job(tmp_path, bounded):
    lines = [
        line(messageId="1", anonymousId="undefined", context={"device": {"id": "dev-9"}}),
        line(messageId="2", anonymousId="undefined"),  # nothing usable: identity.missing
        line(messageId="3"),
    ]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 3)
    assert report["quarantined_by_reason"] == {"identity.missing": 1}
    assert set(run["rows"]) == {"device_id:dev-9", "anon:anon-1"}


# --- found 2: a line that is not UTF-8 ------------------------------------------------------------


@KINDS
def test_a_line_that_is_not_utf8_is_quarantined_with_its_bytes(tmp_path, bounded):
    bad = b"\xff\xfe" + line(messageId="x")
    lines = [line(messageId="1"), bad, line(messageId="2")]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 3)
    assert report["valid"] == 2
    (record,) = run["outputs"]["quarantine"]
    assert record["reason"] == "decode.bad_encoding" and record["stage"] == "decode"
    assert base64.b64decode(record["payload_base64"]) == bad
    assert "x" in record["payload"]  # a readable (lossy) copy too


def test_a_utf8_byte_order_mark_is_not_part_of_the_event():
    env, record = judge(("web", "f", b"\xef\xbb\xbf" + line()), None, **JUDGE_SETTINGS)
    assert record is None and env.event["messageId"] == "m-1"


# --- found 3: event time without receivedAt -------------------------------------------------------


def test_without_received_at_the_read_time_bounds_event_time():
    far = ("web", "f", line(receivedAt=None, timestamp="9999-12-31T23:59:59Z"))
    env, record = judge(far, None, now_ms=NOW_MS, **JUDGE_SETTINGS)
    assert env is None and record["reason"] == "timestamp.out_of_range"
    assert "after the time the job read it" in record["message"]
    # A backfill of old files without receivedAt: past event times are untouched.
    old = ("web", "f", line(receivedAt=None, sentAt=None, timestamp="2021-03-01T00:00:00Z"))
    env, record = judge(old, None, now_ms=NOW_MS, **JUDGE_SETTINGS)
    assert record is None and env.event_time_ms == 1614556800000


def test_a_received_at_in_the_future_of_the_read_does_not_lift_the_bound():
    lying = ("web", "f", line(receivedAt="9999-12-31T00:00:00Z", timestamp="9999-12-31T00:00:00Z"))
    env, record = judge(lying, None, now_ms=NOW_MS, **JUDGE_SETTINGS)
    assert env is None and record["reason"] == "timestamp.out_of_range"


@KINDS
def test_far_future_events_do_not_reach_profiles(tmp_path, bounded):
    lines = [
        line(messageId="1", receivedAt=None, sentAt=None, timestamp="9999-12-31T23:59:59Z"),
        line(messageId="2", receivedAt="9999-12-31T23:59:59Z", timestamp="9999-12-31T23:59:59Z"),
        line(messageId="3"),
    ]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 3)
    assert report["quarantined_by_reason"] == {"timestamp.out_of_range": 2}
    assert run["rows"]["anon:anon-1"]["last_seen"].startswith("2026-11-01")


# --- a dead letter for every step ----------------------------------------------------------------

POISON = "poison"


def _poisoned(original, *, on_arg: int = 0):
    """``original``, raising on the marked element (its ``on_arg``-th argument mentions it)."""

    def fn(*args, **kwargs):
        if POISON in repr(args[on_arg])[:100_000]:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    return fn


# (stage expected in the record, [(module, function, argument to look at)], stage kinds)
FAULTS = {
    "validate": ("validate", [("transforms.validate", "envelope_violations", 0)]),
    "dedup": ("dedup", [("transforms.dedup", "fingerprint", 0)]),
    "key": ("key", [("pipelines.governed_profiles", "primary_profile_key", 0)]),
    "stitching": ("stitching", [("transforms.stitching", "stitch_messages", 0)]),
    "consent": (
        {True: "person_history", False: "consent"},
        [
            ("transforms.person_history", "judge_history", 0),
            ("transforms.consent", "consent_observation", 0),
        ],
    ),
    "pii": (
        {True: "person_history", False: "pii"},
        # Both stage kinds redact through one compiled Redaction (args: self, event, names).
        [("transforms.pii", "Redaction.apply", 1)],
    ),
    "computed_traits": (
        {True: "person_history", False: "computed_traits"},
        [
            ("transforms.person_history", "history_panes", 1),
            ("transforms.computed_traits", "extract_value", 1),
        ],
    ),
    "profile": (
        {True: "person_history", False: "profile"},
        [("transforms.person_history", "fold_event", 1), ("transforms.profile", "fold_event", 1)],
    ),
}


@WITH_PLANNED
@pytest.mark.parametrize("step", list(FAULTS))
def test_an_event_that_makes_a_step_raise_costs_one_record(tmp_path, monkeypatch, bounded, step):
    stage, patches = FAULTS[step]
    stage = stage[bool(bounded)] if isinstance(stage, dict) else stage
    for module, name, arg in patches:
        owner = __import__(module, fromlist=[name])
        *path, name = name.split(".")  # "Class.method" patches a method
        for attr in path:
            owner = getattr(owner, attr)
        monkeypatch.setattr(owner, name, _poisoned(getattr(owner, name), on_arg=arg))
    lines = [
        granted(messageId="1", anonymousId="a1"),
        granted(messageId=POISON, anonymousId="a2"),
        granted(messageId="3", anonymousId="a3"),
        granted(messageId="3", anonymousId="a3"),  # a duplicate, still counted as one
    ]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 4)
    assert report["quarantined_by_reason"] == {"internal.error": 1}
    assert report["duplicates"] == 1 and report["valid"] == 2
    (record,) = run["outputs"]["quarantine"]
    assert (record["stage"], record["reason"]) == (stage, "internal.error")
    assert record["exception"] == {
        "class": "RuntimeError",
        "message": "RuntimeError('injected fault')",
    }
    assert record["message_id"] == POISON and POISON in record["payload"]
    assert report["internal_errors"] == {stage: 1}
    # Everyone else is untouched: their profiles and deliveries are there.
    assert {"anon:a1", "anon:a3"} <= set(run["rows"])
    delivered = {r["event"]["messageId"] for r in run["outputs"]["destinations"]["warehouse"]}
    assert {"1", "3"} <= delivered


@WITH_PLANNED
def test_an_event_two_parallel_steps_fail_on_is_counted_once(tmp_path, monkeypatch, bounded):
    """Stitching and the profile branch both see every unique event: the second dead letter of
    the same event says ``repeat`` and the accounting counts the event once."""
    import pipelines.governed_profiles as job
    import transforms.stitching as stitching

    monkeypatch.setattr(stitching, "stitch_messages", _poisoned(stitching.stitch_messages))
    monkeypatch.setattr(job, "primary_profile_key", _poisoned(job.primary_profile_key))
    lines = [granted(messageId="1", anonymousId="a1"), granted(messageId=POISON, anonymousId="a2")]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 2)
    assert report["quarantined_by_reason"] == {"internal.error": 1}
    records = run["outputs"]["quarantine"]
    assert sorted(r["stage"] for r in records) == ["key", "stitching"]
    assert sorted(bool(r.get("repeat")) for r in records) == [False, True]
    assert report["internal_errors"] == {"key": 1, "stitching": 1, "repeats": 1}


@WITH_PLANNED
def test_a_person_unify_fails_on_is_one_record_and_the_others_are_written(
    tmp_path, monkeypatch, bounded
):
    import transforms.unify as unify

    monkeypatch.setattr(unify, "unify_profile", _poisoned(unify.unify_profile))
    lines = [granted(messageId="1", anonymousId="a1"), granted(messageId="2", anonymousId=POISON)]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 2)
    assert report["valid"] == 2  # the events were governed; their person could not be built
    assert set(run["rows"]) == {"anon:a1"}
    records = [r for r in run["outputs"]["quarantine"] if r["reason"] == "internal.error"]
    assert records and all(r["stage"] == "unify" and r["subject"] == "person" for r in records)
    assert all(POISON in r["payload"] for r in records)
    assert report["internal_errors"] == {"unify": len(records)}


@pytest.mark.parametrize(
    "where, on_arg",
    [("_ResolvePartFn.resolve", 2), ("_SettlePartFn._unique", 1)],
    ids=["resolution", "outside-every-guard"],
)
def test_a_part_whose_call_fails_costs_one_record_per_event(tmp_path, monkeypatch, where, on_arg):
    """A planned pass settles a part in one call: a fault in the part's resolution outside any
    stage's function quarantines each of the part's unique events once, stage ``part``; a fault
    in the call outside every stage's guard (here between validation and dedup) each of its raw
    events, stage ``part``. The other parts are written, and every event is accounted for."""
    import transforms.planned_parts as planned

    cls, name = where.split(".")
    original = getattr(getattr(planned, cls), name)
    monkeypatch.setattr(getattr(planned, cls), name, _poisoned(original, on_arg=on_arg))
    lines = [
        granted(messageId="1", anonymousId="a1"),
        granted(messageId=POISON, anonymousId="a2"),
        granted(messageId="3", anonymousId="a2"),  # the same part as the poisoned event
    ]
    run = run_job(tmp_path, lines, config_from(CONFIG), "planned")
    report = _accounted(run, 3)
    assert report["valid"] == 1 and report["quarantined_by_reason"] == {"internal.error": 2}
    records = run["outputs"]["quarantine"]
    assert sorted(r["message_id"] for r in records) == ["3", POISON]
    assert all((r["stage"], r["reason"]) == ("part", "internal.error") for r in records)
    assert set(run["rows"]) == {"anon:a1"}


def test_job_errors_still_fail_the_run(tmp_path, capsys):
    """Not an element's fault: a profile database that cannot be opened fails the run, loudly
    (exit 1), instead of dead-lettering every profile."""
    from pipelines.cli import main

    src = tmp_path / "in.ndjson"
    src.write_bytes(line() + b"\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocker").write_text("a file where the database's directory must go")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources: [{name: web}]\nsinks: {profiles: {path: blocker/x.sqlite}}\n")
    assert main(["run", "--config", str(cfg), "--input", str(src), "--output", str(out)]) == 1
    assert "pipeline failed" in capsys.readouterr().err


@WITH_PLANNED
def test_a_group_stitching_fails_on_is_one_record_and_the_others_resolve(
    tmp_path, monkeypatch, bounded
):
    """Streaming resolves a group in an event-time timer: a timer that raises is a dead letter
    naming its key, like the grouped step's (bounded) element."""
    import transforms.stitching as stitching

    monkeypatch.setattr(stitching, "resolve", _poisoned(stitching.resolve))
    lines = [
        granted(messageId="1", anonymousId="a1"),
        granted(messageId="2", anonymousId=POISON, userId="u-poison"),  # a group with a link
    ]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 2)
    assert report["valid"] == 2
    assert "anon:a1" in run["rows"]
    (record,) = [r for r in run["outputs"]["quarantine"] if r["reason"] == "internal.error"]
    assert record["stage"] == "stitching" and record["subject"] == "identifier group"
    assert POISON in record["payload"]
    assert report["internal_errors"] == {"stitching": 1}


@KINDS
def test_a_held_event_consent_fails_on_costs_its_own_record(tmp_path, monkeypatch, bounded):
    """Streaming consent releases held events in a timer, one try per event: the event that
    raises is dead-lettered and the others held with it are released."""
    import transforms.consent as consent
    import transforms.person_history as person_history

    for module in (consent, person_history):
        monkeypatch.setattr(module, "denied_record", _poisoned(module.denied_record))
    lines = [
        granted(messageId="1", anonymousId="a1"),
        # before a1 granted anything: denied, and making the denial record raises
        line(messageId=POISON, anonymousId="a1", timestamp="2026-11-01T09:00:00Z"),
        granted(messageId="3", anonymousId="a1"),
    ]
    run = run_job(tmp_path, lines, config_from(CONFIG), bounded)
    report = _accounted(run, 3)
    records = [r for r in run["outputs"]["quarantine"] if r["reason"] == "internal.error"]
    if bounded:  # the person's grouped history is the element: all its events
        assert report["internal_errors"] == {"person_history": 3}
        assert sorted(r["message_id"] for r in records) == ["1", "3", POISON]
    else:
        assert report["internal_errors"] == {"consent": 1}
        assert [r["message_id"] for r in records] == [POISON]
        delivered = {r["event"]["messageId"] for r in run["outputs"]["destinations"]["warehouse"]}
        assert delivered == {"1", "3"}


def test_a_step_without_dead_letters_is_refused_when_the_job_is_built():
    """`guarded` takes only steps whose failures become dead letters: a plain Map or DoFn
    would stop the run on one bad element."""
    import apache_beam as beam

    from transforms.dead_letter import guarded, one_or_dead_letter

    class Plain(beam.DoFn):
        def process(self, element):
            yield element

    for step in (beam.Map(len), beam.FlatMap(lambda x: [x]), beam.ParDo(Plain())):
        with pytest.raises(TypeError, match="dead_letter_on_raise"):
            guarded(step)
    guarded(beam.FlatMap(one_or_dead_letter(len)))  # accepted


def test_an_element_that_raises_midway_emits_only_its_dead_letter():
    """Outputs are held until the element is done: one that raises after yielding some emits
    none of them, only its dead letter in Beam's shape (element, (type, repr, traceback))."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from tests.conftest import make_pipeline
    from transforms.dead_letter import (
        FAILED,
        all_or_dead_letter,
        dead_letter_on_raise,
        guarded,
        one_or_dead_letter,
    )

    def twice_unless_three(x):
        yield x
        if x == 3:
            raise ValueError("three")
        yield x

    class Halves(beam.DoFn):
        @dead_letter_on_raise
        def process(self, x):
            yield beam.pvalue.TaggedOutput("odd", x) if x % 2 else x
            yield 10 // (x - 2)

    with make_pipeline() as p:
        xs = p | beam.Create([1, 2, 3])
        many = xs | "Many" >> guarded(beam.FlatMap(all_or_dead_letter(twice_unless_three)))
        one = xs | "One" >> guarded(beam.FlatMap(one_or_dead_letter(lambda x: 6 // (x - 1))))
        fn = xs | "Fn" >> guarded(beam.ParDo(Halves()), "odd", main="even")

        def letters(pcoll, label):
            return pcoll[FAILED] | label >> beam.Map(lambda d: (d[0], d[1][0].__name__))

        assert_that(many.good, equal_to([1, 1, 2, 2]), label="many")
        assert_that(letters(many, "M"), equal_to([(3, "ValueError")]), label="many dead")
        assert_that(one.good, equal_to([6, 3]), label="one")
        assert_that(letters(one, "O"), equal_to([(1, "ZeroDivisionError")]), label="one dead")
        assert_that(fn.even, equal_to([-10, 10]), label="fn")
        assert_that(fn.odd, equal_to([1, 3]), label="fn odd")
        assert_that(letters(fn, "F"), equal_to([(2, "ZeroDivisionError")]), label="fn dead")
