"""The synthetic event generator: determinism, exact counts, a truth that matches the lines."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict

import fastjsonschema
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import IdentityConfig
from pipelines.generate import (
    INVALID_REASONS,
    JUNK_ANONYMOUS_IDS,
    JUNK_DEVICE_IDS,
    generate,
    split_counts,
    write,
)
from tests.conftest import PLAN
from transforms.dedup import fingerprint
from transforms.tracking_plan import compile_plan, load_plan
from transforms.validate import judge

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
JUNK = set(JUNK_ANONYMOUS_IDS) | set(JUNK_DEVICE_IDS.values())


def ms(text: str) -> int:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(milliseconds=1)


def parse(line: str):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


class Stream:
    """One generated stream, split the way a correct pipeline would split it."""

    def __init__(self, events: int, persons: int, seed: int):
        self.lines, self.truth = generate(events, persons, seed)
        self.parsed = [parse(line) for line in self.lines]
        times = self.truth["event_times"]
        self.first: dict[str, int] = {}  # messageId -> index of its first (original) line
        self.repeats: list[int] = []  # indexes of duplicate lines
        for i, e in enumerate(self.parsed):
            if isinstance(e, dict) and e.get("messageId") in times:
                if e["messageId"] in self.first:
                    self.repeats.append(i)
                else:
                    self.first[e["messageId"]] = i
        self.valid = [self.parsed[i] for i in sorted(self.first.values())]
        judged = set(self.first.values()) | set(self.repeats)
        self.invalid = [i for i in range(len(self.lines)) if i not in judged]
        # Who is who, by the truth: non-junk ids first, then user ids (junk anonymousIds only ever
        # travel with a userId).
        self.person_of: dict[str, str] = {}
        for ident in self.truth["identities"]:
            for anon in ident["anonymous_ids"]:
                self.person_of[anon] = ident["person"]
            if ident["user_id"]:
                self.person_of[ident["user_id"]] = ident["person"]

    def person(self, e: dict) -> str:
        anon = e.get("anonymousId")
        return self.person_of[anon if anon not in JUNK else e["userId"]]


@pytest.fixture(scope="module")
def s10k() -> Stream:
    return Stream(10_000, 500, 7)


@pytest.fixture(scope="module")
def plan_validators():
    plan = yaml.safe_load(PLAN.read_text())
    compiled = {
        ("track", name): ("properties", fastjsonschema.compile(spec["properties"]))
        for name, spec in plan["events"].items()
    }
    for t, spec in plan["types"].items():
        for field_name, schema in spec.items():
            compiled[(t, "")] = (field_name, fastjsonschema.compile(schema, use_formats=True))
    return compiled


# --- determinism and counts --------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs():
    a = generate(2000, 100, 5)
    assert generate(2000, 100, 5) == a
    b = generate(2000, 100, 6)
    assert b[0] != a[0]
    assert set(b[1]["event_times"]).isdisjoint(a[1]["event_times"])


@pytest.mark.parametrize(
    "events, persons", [(0, 1), (1, 1), (10, 3), (50, 10), (50, 200), (1000, 100), (3333, 40)]
)
def test_exact_line_count_and_counts_add_up(events, persons):
    lines, truth = generate(events, persons, 11)
    assert len(lines) == events == truth["events"]
    assert truth["valid_unique"] + truth["duplicates"] + sum(truth["invalid"].values()) == events
    assert len(truth["event_times"]) == truth["valid_unique"]
    assert len(truth["identities"]) == persons == truth["persons"]
    assert all("\n" not in line for line in lines)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 400), st.integers(1, 60), st.integers(0, 2**32))
def test_counts_add_up_for_any_size(events, persons, seed):
    lines, truth = generate(events, persons, seed)
    assert len(lines) == events
    valid, dups, invalid = split_counts(events)
    assert (truth["valid_unique"], truth["duplicates"], sum(truth["invalid"].values())) == (
        valid,
        dups,
        invalid,
    )


def test_shares(s10k):
    t = s10k.truth
    assert t["duplicates"] == 500 and sum(t["invalid"].values()) == 100
    assert 0.015 <= t["late"] / t["valid_unique"] <= 0.03
    assert t["consent_changes"] > 0


def test_counts_match_the_lines(s10k):
    t = s10k.truth
    assert len(s10k.first) == t["valid_unique"]
    assert len(s10k.repeats) == t["duplicates"]
    assert len(s10k.invalid) == sum(t["invalid"].values())
    consent = sum(1 for e in s10k.valid if e.get("event") == "Consent Updated")
    assert consent == t["consent_changes"]
    primary = {e.get("userId") or e["anonymousId"] for e in s10k.valid}
    assert len(primary) == t["profiles_by_primary_id"]


# --- duplicates and invalid lines --------------------------------------------------------------


def test_duplicates_follow_their_original_and_differ_at_most_in_received_at(s10k):
    exact = shifted = 0
    for i in s10k.repeats:
        copy = s10k.parsed[i]
        j = s10k.first[copy["messageId"]]
        assert j < i
        if s10k.lines[i] == s10k.lines[j]:
            exact += 1
            continue
        original = s10k.parsed[j]
        delay = ms(copy["receivedAt"]) - ms(original["receivedAt"])
        assert 1_000 <= delay <= 600_000
        assert {**copy, "receivedAt": original["receivedAt"]} == original
        assert s10k.lines[i] == s10k.lines[j].replace(original["receivedAt"], copy["receivedAt"])
        # The dedup stage must see the same event, not a collision.
        assert fingerprint(copy) == fingerprint(original)
        shifted += 1
    assert exact and shifted and 0.35 < exact / (exact + shifted) < 0.65


def test_invalid_lines_have_unique_ids_and_are_never_duplicated(s10k):
    ids = Counter(
        e["messageId"]
        for e in (s10k.parsed[i] for i in s10k.invalid)
        if isinstance(e, dict) and "messageId" in e
    )
    assert ids and max(ids.values()) == 1
    assert set(ids).isdisjoint(s10k.truth["event_times"])


def test_every_invalid_reason_at_10k_evenly(s10k):
    counts = s10k.truth["invalid"]
    assert set(counts) == set(INVALID_REASONS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_pipeline_validation_agrees_with_the_truth(s10k):
    """The job's own stateless verdict: exactly the planned reasons, and every other line valid."""
    plan = compile_plan(load_plan(PLAN))
    limits = dict(max_event_bytes=32768, max_depth=16, max_future_skew_ms=3600_000)
    reasons = Counter()
    valid_ids = []
    for line in s10k.lines:
        env, record = judge(
            ("web", "events.ndjson", line),
            plan,
            floor_ms=1420070400000,
            identity=IdentityConfig(),
            **limits,
        )
        if record is not None:
            reasons[record["reason"]] += 1
        else:
            valid_ids.append(env.event["messageId"])
    assert dict(reasons) == s10k.truth["invalid"]
    assert set(valid_ids) == set(s10k.truth["event_times"])
    assert len(valid_ids) == s10k.truth["valid_unique"] + s10k.truth["duplicates"]


# --- the event contract ------------------------------------------------------------------------


def test_valid_events_satisfy_the_tracking_plan(s10k, plan_validators):
    for e in s10k.valid:
        key = ("track", e["event"]) if e["type"] == "track" else (e["type"], "")
        if key in plan_validators:
            field_name, validate = plan_validators[key]
            validate(e.get(field_name, {}))  # raises on any violation


def test_valid_events_follow_the_segment_spec(s10k):
    types = Counter()
    for e in s10k.valid:
        types[e["type"]] += 1
        assert "timestamp" not in e
        assert e["source"] in ("web", "ios", "android")
        assert e.get("userId") or e.get("anonymousId")
        for f in ("originalTimestamp", "sentAt", "receivedAt"):
            assert ISO_MS.match(e[f]), e[f]
        assert e["sentAt"] >= e["originalTimestamp"]
        ctx = e["context"]
        assert ctx["library"]["name"] and ctx["ip"] and ctx["userAgent"]
        assert set(ctx["consent"]["categoryPreferences"]) == {
            "analytics",
            "marketing",
            "advertising",
        }
        assert ("device" in ctx) == (e["source"] != "web")
        if e["type"] == "track":
            assert e["event"] and isinstance(e["properties"], dict)
        elif e["type"] == "identify":
            assert set(e["traits"]) == {"email", "name", "plan", "age"} and e["userId"]
        elif e["type"] == "page":
            assert e["name"] and set(e["properties"]) == {"path", "url", "title", "referrer"}
        elif e["type"] == "screen":
            assert e["name"] and e["source"] != "web"
        elif e["type"] == "group":
            assert e["groupId"] and e["traits"] and e["userId"]
        elif e["type"] == "alias":
            assert e["userId"] and e["previousId"] == e["anonymousId"]
    assert set(types) == {"track", "identify", "page", "screen", "group", "alias"}


def test_skew_correction_recovers_the_true_event_time(s10k):
    times = s10k.truth["event_times"]
    late = skewed = 0
    for e in s10k.valid:
        received, sent, original = ms(e["receivedAt"]), ms(e["sentAt"]), ms(e["originalTimestamp"])
        corrected = received - (sent - original)
        assert corrected == ms(times[e["messageId"]])
        late += received - corrected >= 3600_000
        # The client clock is off by up to 120 s; the correction also absorbs <= 500 ms latency.
        assert abs(original - corrected) <= 120_500
        skewed += abs(original - corrected) > 1_000
    assert late == s10k.truth["late"]
    assert skewed > len(s10k.valid) / 2


def test_file_is_ordered_by_receive_time_with_local_jitter(s10k):
    received = [ms(s10k.parsed[i]["receivedAt"]) for i in sorted(s10k.first.values())]
    behind = [b - a for a, b in zip(received, received[1:], strict=False) if b < a]
    assert behind, "some out-of-order arrival"
    assert max(a - b for a, b in zip(received, received[1:], strict=False)) <= 2_000


# --- identities, junk, consent -----------------------------------------------------------------


def test_identified_share_and_identities(s10k):
    idents = s10k.truth["identities"]
    identified = [i for i in idents if i["user_id"]]
    assert 0.6 <= len(identified) / len(idents) <= 0.8
    assert len({i["user_id"] for i in identified}) == len(identified)
    for i in idents:
        assert all(e == e.lower() and "@" in e for e in i["emails"])
        assert not JUNK & set(i["anonymous_ids"] + i["device_ids"])
    assert sum(1 for i in identified if i["emails"]) > 0.9 * len(identified)
    # Someone typed a mixed-case email; the truth lists it lowercased.
    typed = {e["traits"]["email"] for e in s10k.valid if e["type"] == "identify"}
    assert any(t != t.lower() for t in typed)


def test_other_devices_log_in_with_their_own_anonymous_id(s10k):
    by_user = defaultdict(set)
    for e in s10k.valid:
        if e["type"] == "identify":
            by_user[e["userId"]].add(e["anonymousId"])
    assert any(len(anons) > 1 for anons in by_user.values())
    for ident in s10k.truth["identities"]:
        assert by_user.get(ident["user_id"], set()) <= set(ident["anonymous_ids"])


def test_linked_identities_partition_each_persons_identifiers(s10k):
    linked = {x["person"]: x["groups"] for x in s10k.truth["linked_identities"]}
    assert list(linked) == [i["person"] for i in s10k.truth["identities"]]
    seen: set[str] = set()
    for ident in s10k.truth["identities"]:
        groups = linked[ident["person"]]
        keys = [k for g in groups for k in g]
        assert len(keys) == len(set(keys)), "groups of one person overlap"
        assert not seen & set(keys), "two persons share an identifier"
        seen.update(keys)
        expected = {"anon:" + a for a in ident["anonymous_ids"]}
        expected |= {"email:" + e for e in ident["emails"]}
        expected |= {"device_id:" + d for d in ident["device_ids"]}
        expected |= {"user:" + ident["user_id"]} if ident["user_id"] else set()
        assert set(keys) == expected
        assert all(g == sorted(g) for g in groups) and groups == sorted(groups)
    # An anonymous id that logged in is in its user's group; one that never did stands apart.
    group_of = {k: g for groups in linked.values() for g in groups for k in g}
    logged_in = {(e["anonymousId"], e["userId"]) for e in s10k.valid if e.get("userId")}
    assert logged_in
    for anon, user in logged_in:
        if anon not in JUNK:
            assert "user:" + user in group_of["anon:" + anon]
    assert any(len(groups) > 1 for groups in linked.values())


def test_junk_identifiers_are_shared_across_persons(s10k):
    junk = s10k.truth["junk_identifiers"]
    assert set(junk) <= JUNK and any(j in JUNK_ANONYMOUS_IDS for j in junk)
    holders = defaultdict(set)
    junk_anon = 0
    for e in s10k.valid:
        if e["anonymousId"] in JUNK:
            junk_anon += 1
            assert e["userId"], "a junk anonymousId always travels with the real userId"
            holders[e["anonymousId"]].add(s10k.person(e))
        device = e["context"].get("device", {}).get("id")
        if device in JUNK:
            holders[device].add(s10k.person(e))
    assert set(holders) == set(junk)
    assert 0.01 <= junk_anon / len(s10k.valid) <= 0.03
    assert len(set().union(*holders.values())) >= 3
    assert any(len(persons) > 1 for persons in holders.values())


def test_events_after_a_consent_change_carry_it(s10k):
    times = s10k.truth["event_times"]
    timeline = defaultdict(list)
    for e in s10k.valid:
        timeline[s10k.person(e)].append((times[e["messageId"]], e))
    changed = 0
    for events in timeline.values():
        events.sort(key=lambda x: x[0])
        prefs = None
        for _, e in events:
            current = e["context"]["consent"]["categoryPreferences"]
            if e.get("event") == "Consent Updated":
                assert current == e["properties"]["categoryPreferences"] != prefs
                changed += 1
            elif prefs is not None:
                assert current == prefs
            prefs = current
    assert changed == s10k.truth["consent_changes"]


# --- files -------------------------------------------------------------------------------------


def test_write_puts_lines_and_truth_on_disk(tmp_path):
    out = tmp_path / "sub" / "events.ndjson"
    truth = write(str(out), 300, 20, 3)
    lines, expected = generate(300, 20, 3)
    assert truth == expected
    assert out.read_text(encoding="utf-8") == "".join(line + "\n" for line in lines)
    assert orjson.loads((tmp_path / "sub" / "events.ndjson.truth.json").read_bytes()) == truth
    other = tmp_path / "truth.json"
    write(str(out), 300, 20, 3, truth_path=str(other))
    assert orjson.loads(other.read_bytes()) == truth


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate(-1, 10, 1)
    with pytest.raises(ValueError):
        generate(10, 0, 1)
