"""Audiences: predicates (pure), membership with consent, transitions and their records, and the
job's activation output on both stage kinds against the reference oracle's profiles."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import config_from, run_job
from transforms.audiences import (
    ENTERED,
    EXITED,
    Audience,
    Transition,
    activation_key,
    activation_records,
    compile_predicate,
    memberships,
    transitions,
)


def view(trait=None, computed=None, counts=None, consent=None):
    return {
        "trait": trait or {},
        "computed": computed or {},
        "counts": counts or {},
        "consent": consent or {},
    }


def row(pid="user:u1", version=1, **parts):
    computed = {k: {"value": v} for k, v in (parts.get("computed") or {}).items()}
    return {
        "profile_id": pid,
        "version": version,
        "traits": orjson.dumps(parts.get("trait") or {}).decode(),
        "computed_traits": orjson.dumps(computed).decode(),
        "event_counts": orjson.dumps(parts.get("counts") or {}).decode(),
        "consent": orjson.dumps(parts.get("consent") or {}).decode(),
        "updated_at": "2026-11-01T10:00:00.000Z",
    }


@pytest.mark.parametrize(
    "when, v, expected",
    [
        ({"trait": "plan", "eq": "pro"}, view(trait={"plan": "pro"}), True),
        ({"trait": "plan", "eq": "pro"}, view(trait={"plan": "free"}), False),
        ({"trait": "plan", "ne": "pro"}, view(), True),  # missing: ne holds
        ({"trait": "plan", "in": ["pro", "team"]}, view(trait={"plan": "team"}), True),
        ({"trait": "vip", "eq": 1}, view(trait={"vip": True}), False),  # true is not 1
        ({"trait": "vip", "eq": True}, view(trait={"vip": True}), True),
        ({"trait": "age", "gte": 18}, view(trait={"age": "twenty"}), False),  # incomparable
        ({"trait": "age", "gte": 18}, view(trait={"age": 18}), True),
        ({"trait": "age", "lt": 18}, view(), False),  # missing: false
        ({"computed": "orders", "gt": 2}, view(computed={"orders": 3}), True),
        ({"count": "event:Order Completed", "gte": 1}, view(), False),  # missing count is 0
        ({"count": "event:Order Completed", "lt": 1}, view(), True),
        ({"consent": "marketing", "eq": True}, view(consent={"marketing": True}), True),
        ({"trait": "email", "exists": True}, view(trait={"email": None}), False),
        ({"trait": "email", "exists": False}, view(), True),
        (
            {"all": [{"trait": "plan", "eq": "pro"}, {"not": {"count": "type:page", "gte": 5}}]},
            view(trait={"plan": "pro"}, counts={"type:page": 2}),
            True,
        ),
        (
            {"any": [{"trait": "plan", "eq": "pro"}, {"computed": "orders", "gte": 9}]},
            view(trait={"plan": "free"}, computed={"orders": 1}),
            False,
        ),
    ],
)
def test_predicates(when, v, expected):
    assert compile_predicate(when)(v) is expected


@pytest.mark.parametrize(
    "when, message",
    [
        ("plan == pro", "when: a predicate is a mapping"),
        ({"all": []}, "when.all: a non-empty list"),
        ({"trait": "plan", "like": "p%"}, "when.like: unknown key"),
        ({"trait": "plan"}, "when: a comparison names one subject and one operator"),
        ({"trait": "plan", "eq": 1, "ne": 2}, "when: a comparison names one subject and one"),
        ({"any": [{"trait": "a", "in": "x"}]}, "when.any[0].in: a list"),
        ({"not": {"computed": "x", "gt": [1]}}, "when.not.gt: a number or a string"),
    ],
)
def test_predicate_errors_name_the_path(when, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compile_predicate(when)


def test_config_error_is_one_line():
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from(
            "sources: [{name: web}]\n"
            "consent: {destinations: {crm: {}}}\n"
            "audiences: [{name: pros, when: {trait: plan, equals: pro}, destinations: [crm]}]\n"
        )
    assert e.value.problems[0].startswith("test.yaml: audiences[0]: when.equals: unknown key")


def test_membership_needs_the_destinations_consent():
    aud = Audience("pros", compile_predicate({"trait": "plan", "eq": "pro"}), ("crm", "ads"))
    purposes = {"crm": (), "ads": ("advertising",)}
    r = row(trait={"plan": "pro"}, consent={"advertising": False})
    assert memberships(r, [aud], purposes) == {("pros", "crm")}
    r = row(trait={"plan": "pro"}, consent={"advertising": True})
    assert memberships(r, [aud], purposes) == {("pros", "crm"), ("pros", "ads")}
    assert memberships({"profile_id": "x", "deleted": True, "version": 3}, [aud], purposes) == set()


def test_transitions_count_epochs_and_keys_are_deterministic():
    epochs: dict = {}
    m = frozenset({("pros", "crm")})
    first = transitions(frozenset(), m, epochs)
    assert first == [Transition("pros", "crm", ENTERED, 0)]
    assert transitions(m, frozenset(), epochs) == [Transition("pros", "crm", EXITED, 0)]
    again = transitions(frozenset(), m, epochs)
    assert again == [Transition("pros", "crm", ENTERED, 1)]
    assert activation_key("p", first[0]) == activation_key(
        "p", Transition("pros", "crm", ENTERED, 0)
    )
    assert activation_key("p", first[0]) != activation_key("p", again[0])


def test_records_follow_segment_conventions():
    t = Transition("pros", "crm", ENTERED, 0)
    r = {**row(), "_cause": [1_700_000_000_000, "m-9"]}
    track, identify = activation_records(
        "user:u1", t, r, [("user_id", "u1"), ("email", "ab12"), ("anonymous_id", "a1")]
    )
    assert track["type"] == "track" and track["event"] == "Audience Entered"
    assert track["userId"] == "u1" and track["anonymousId"] == "a1"
    assert track["properties"] == {"audience_key": "pros", "pros": True}
    assert identify["type"] == "identify" and identify["traits"] == {"pros": True}
    assert track["context"]["traits"]["email"] == "ab12"
    assert track["context"]["cdi"]["cause"] == {
        "event_time_ms": 1_700_000_000_000,
        "message_id": "m-9",
    }
    assert track["messageId"] != identify["messageId"]
    assert track["timestamp"] == "2026-11-01T10:00:00.000Z"


# --- the job ---------------------------------------------------------------------------------------

JOB_CONFIG = """
sources: [{name: web, format: ndjson}]
computed_traits:
  - {name: orders_lifetime, aggregate: count, event: Order Completed}
consent:
  purposes: [analytics, marketing, advertising]
  destinations:
    crm: {purposes: [], pii: {email: keep}}
    ads: {purposes: [advertising], pii: {email: hash}}
pii: {salt: s}
audiences:
  - {name: buyers, when: {computed: orders_lifetime, gte: 1}, destinations: [crm, ads]}
  - {name: browsers, when: {count: "event:Product Viewed", gte: 3}, destinations: [crm]}
  - {name: known, when: {trait: email, exists: true}, destinations: [ads]}
"""


def activations(outputs) -> list[dict]:
    return [
        r for d, records in outputs["destinations"].items() for r in records if "activation" in r
    ]


def net_members(records) -> set:
    """(person, audience, destination) in at the end: entered more often than exited."""
    from collections import Counter

    n = Counter()
    for r in records:
        if r["event"]["type"] != "track":
            continue
        k = (r["profile_key"], r["activation"]["audience"], r["destination"])
        n[k] += 1 if r["activation"]["transition"] == ENTERED else -1
    assert set(n.values()) <= {0, 1}, "entered twice without an exit, or exited unentered"
    return {k for k, v in n.items() if v == 1}


@pytest.fixture(scope="module")
def job_runs(tmp_path_factory):
    from pipelines.generate import generate

    config = config_from(JOB_CONFIG)
    lines, _ = generate(1500, 120, seed=11)
    raw = [x.encode() for x in lines]
    tmp = tmp_path_factory.mktemp("audiences")
    return (
        config,
        lines,
        {
            "bounded": run_job(tmp / "b", raw, config, bounded=True),
            "streaming": run_job(tmp / "s", raw, config, bounded=False),
        },
    )


def test_both_stage_kinds_end_with_the_oracles_memberships(job_runs, tmp_path):
    from benchmarks.oracle import run_oracle
    from pipelines.governed_profiles import PROFILES_DESTINATION  # noqa: F401
    from transforms.audiences import Audience as A

    config, lines, runs = job_runs
    src = tmp_path / "in.ndjson"
    src.write_text("\n".join(lines) + "\n")
    oracle = run_oracle(config, {"web": [str(src)]})
    audiences = [A.from_config(a) for a in config.audiences]
    purposes = {n: tuple(d.purposes) for n, d in config.consent.destinations.items()}
    reference = {
        (pid, aud, dest)
        for pid, r in oracle["profiles"].items()
        for aud, dest in memberships({**r, "version": 0}, audiences, purposes)
    }
    assert len(reference) > 20
    for kind, run in runs.items():
        records = activations(run["outputs"])
        assert net_members(records) == reference, kind
    # bounded: one entry per membership and nothing else
    bounded = [r for r in activations(runs["bounded"]["outputs"]) if r["event"]["type"] == "track"]
    assert len(bounded) == len(reference)
    assert {r["activation"]["transition"] for r in bounded} == {ENTERED}


def test_each_transition_once_with_its_identify(job_runs):
    _, _, runs = job_runs
    for run in runs.values():
        records = activations(run["outputs"])
        keys = [r["event"]["messageId"] for r in records]
        assert len(keys) == len(set(keys))  # re-sent events in the input never re-enter
        tracks = sum(r["event"]["type"] == "track" for r in records)
        assert tracks * 2 == len(records)


def test_governance_on_every_activation(job_runs):
    config, _, runs = job_runs
    for run in runs.values():
        for r in activations(run["outputs"]):
            ev = r["event"]
            if r["destination"] == "ads":
                email = ev["context"]["traits"].get("email")
                assert email is None or "@" not in email  # hashed for ads
            if r["destination"] == "crm" and r["activation"]["audience"] == "buyers":
                pass
    # No entry reaches ads for a person whose final profile denies advertising
    bounded_rows = runs["bounded"]["rows"]
    for r in activations(runs["bounded"]["outputs"]):
        if r["destination"] == "ads":
            consent = orjson.loads(bounded_rows[r["profile_key"]]["consent"])
            assert consent.get("advertising") is True


def test_streaming_membership_enters_exits_reenters_and_exits_on_deletion():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from tests.conftest import make_pipeline
    from transforms.audiences import ActivateAudiences

    aud = Audience("pros", compile_predicate({"trait": "plan", "eq": "pro"}), ("crm", "ads"))
    purposes = {"crm": (), "ads": ("advertising",)}
    redactors = {"crm": lambda k: k, "ads": lambda k: None if k.startswith("email:") else k}
    yes = {"advertising": True}

    def r(v, plan, consent=yes):
        return {**row("user:u1", v, trait={"plan": plan}, consent=consent),
                "_members": ["user:u1", "email:a@x.io"], "_cause": [v, f"m{v}"]}  # fmt: skip

    rows = [
        r(1, "free"),
        r(2, "pro"),  # enters both
        r(3, "pro", {"advertising": False}),  # consent withdrawn: exits ads at once
        r(4, "free"),  # exits crm
        r(3, "pro"),  # a stale row after a reshuffle: ignored
        r(5, "pro"),  # re-enters both (second epoch)
        {"profile_id": "user:u1", "deleted": True, "version": 6},  # deleted: exits both
    ]
    with make_pipeline() as p:
        out = p | beam.Create(rows) | ActivateAudiences([aud], purposes, redactors, bounded=False)
        for dest in ("crm", "ads"):
            got = (
                out[dest]
                | f"Flat{dest}" >> beam.FlatMap(lambda rs: rs)
                | f"Track{dest}" >> beam.Filter(lambda x: x["event"]["type"] == "track")
                | f"Key{dest}"
                >> beam.Map(
                    lambda x: (
                        x["activation"]["transition"],
                        x["event"]["context"]["cdi"]["epoch"],
                        x["event"]["context"]["cdi"]["profile_version"],
                        sorted(x["event"]["context"]["traits"]),
                    )
                )
            )
            want = {
                "crm": [
                    ("entered", 0, 2, ["email", "user_id"]),
                    ("exited", 0, 4, ["email", "user_id"]),
                    ("entered", 1, 5, ["email", "user_id"]),
                    ("exited", 1, 6, ["email", "user_id"]),  # identifiers kept for the exit
                ],
                "ads": [
                    ("entered", 0, 2, ["user_id"]),  # email dropped by the ads policy
                    ("exited", 0, 3, ["user_id"]),
                    ("entered", 1, 5, ["user_id"]),
                    ("exited", 1, 6, ["user_id"]),
                ],
            }[dest]
            assert_that(got, equal_to(want), label=f"Check{dest}")


def test_the_run_report_counts_transitions(job_runs):
    _, _, runs = job_runs
    for run in runs.values():
        tracks = [r for r in activations(run["outputs"]) if r["event"]["type"] == "track"]
        counted = run["report"]["activations"]
        assert counted["entered"] == sum(r["activation"]["transition"] == ENTERED for r in tracks)
        assert counted["exited"] == sum(r["activation"]["transition"] == EXITED for r in tracks)
