"""Pairwise stitching accuracy against a hand-made truth."""

from __future__ import annotations

import orjson
import pytest

from benchmarks.identity_accuracy import format_scores, main, pairwise_scores
from pipelines.explain import PROFILES_FILE
from tests.test_explain import row
from transforms.io.sqlite import open_profile_db, upsert_profiles

# p1 identified on two devices; its second device never logged in (its own group). p2 identified,
# p3 anonymous. Pairs: p1 group 1 has C(4, 2) = 6, the rest 1 + 1 + 1: 9 true pairs.
TRUTH = {
    "identities": [
        {"person": "p1", "user_id": "u1"},
        {"person": "p2", "user_id": "u2"},
        {"person": "p3", "user_id": None},
    ],
    "linked_identities": [
        {
            "person": "p1",
            "groups": [
                ["anon:a1", "device_id:d1", "email:x@y.io", "user:u1"],
                ["anon:a2", "device_id:d2"],
            ],
        },
        {"person": "p2", "groups": [["anon:b1", "user:u2"]]},
        {"person": "p3", "groups": [["anon:c1", "anon:c2"]]},
    ],
}
PERFECT = [
    ["anon:a1", "device_id:d1", "email:x@y.io", "user:u1"],
    ["anon:a2", "device_id:d2"],
    ["anon:b1", "user:u2"],
    ["anon:c1", "anon:c2"],
]


def test_perfect_stitching():
    s = pairwise_scores(TRUTH, PERFECT)
    assert s["precision"] == s["recall"] == 1.0
    assert (s["true_pairs"], s["predicted_pairs"], s["correct_pairs"]) == (9, 9, 9)
    assert (s["profiles"], s["true_groups"], s["truth_identifiers"]) == (4, 4, 10)
    assert s["cross_identified_person_pairs"] == s["cross_person_pairs"] == 0
    assert s["missed_examples"] == s["wrong_examples"] == []
    assert s["identifiers_in_no_profile"] == 0


def test_one_missed_pair():
    rows = [r for r in PERFECT if r != ["anon:c1", "anon:c2"]] + [["anon:c1"], ["anon:c2"]]
    s = pairwise_scores(TRUTH, rows)
    assert s["precision"] == 1.0
    assert s["recall"] == pytest.approx(8 / 9)
    assert s["missed_examples"] == [["anon:c1", "anon:c2"]] and s["wrong_examples"] == []


def test_one_wrong_merge_across_identified_persons():
    rows = [PERFECT[0] + ["user:u2", "anon:b1"], PERFECT[1], PERFECT[3]]
    s = pairwise_scores(TRUTH, rows)
    # 15 predicted pairs in the 6-identifier row, 6 + 1 of them true; plus 1 + 1 elsewhere.
    assert (s["predicted_pairs"], s["correct_pairs"]) == (17, 9)
    assert s["precision"] == pytest.approx(9 / 17) and s["recall"] == 1.0
    assert s["cross_identified_person_pairs"] == s["cross_person_pairs"] == 8
    assert s["wrong_examples"][0] == ["anon:a1", "anon:b1"]
    assert len(s["wrong_examples"]) == 8


def test_a_wrong_merge_within_a_person_is_wrong_but_not_across_persons():
    # The unlogged device joined without evidence in the data: a guess, even if a lucky one.
    rows = [PERFECT[0] + PERFECT[1], PERFECT[2], PERFECT[3]]
    s = pairwise_scores(TRUTH, rows)
    assert s["correct_pairs"] == 9 and s["predicted_pairs"] == 17
    assert s["cross_person_pairs"] == 0 and len(s["wrong_examples"]) == 8


def test_unknown_identifiers_are_not_scored_and_pairs_count_once():
    rows = [r + ["anon:undefined"] for r in PERFECT] + [["anon:b1", "user:u2", "device_id:0000"]]
    s = pairwise_scores(TRUTH, rows)
    assert (s["predicted_pairs"], s["precision"], s["recall"]) == (9, 1.0, 1.0)


def test_empty_rows_score_vacuous_precision_and_zero_recall():
    s = pairwise_scores(TRUTH, [])
    assert s["precision"] == 1.0 and s["recall"] == 0.0
    assert s["identifiers_in_no_profile"] == 10 and len(s["missed_examples"]) == 9


def test_main_reads_a_run_and_writes_json(tmp_path, capsys):
    truth = tmp_path / "events.ndjson.truth.json"
    truth.write_bytes(orjson.dumps(TRUTH))
    out = tmp_path / "out"
    conn = open_profile_db(out / PROFILES_FILE)
    upsert_profiles(
        conn,
        [
            row("user:u1", ("user_id", "u1"), ("anonymous_id", "a1"), ("email", "x@y.io")),
            row("anon:a2", ("anonymous_id", "a2"), ("device_id", "d2")),
            row("user:u2", ("user_id", "u2"), ("anonymous_id", "b1"), ("anonymous_id", "c1")),
        ],
    )
    conn.close()
    scores = tmp_path / "scores.json"
    code = main(["--truth", str(truth), "--output", str(out), "--json", str(scores)])
    text = capsys.readouterr().out
    # anon:c1 (anonymous p3) joined to p2: wrong, but not across two identified persons.
    assert code == 0
    s = orjson.loads(scores.read_bytes())
    assert text == format_scores(s) + "\n"
    assert s["profiles"] == 3 and s["cross_person_pairs"] == 2
    assert s["identifiers_in_no_profile"] == 2  # device_id:d1, anon:c2
    assert "missed pairs (first" in text and "wrong pairs (first 2):" in text


def test_main_exits_1_on_a_merge_across_identified_persons(tmp_path, capsys):
    truth = tmp_path / "t.json"
    truth.write_bytes(orjson.dumps(TRUTH))
    conn = open_profile_db(tmp_path / PROFILES_FILE)
    upsert_profiles(conn, [row("user:u1", ("user_id", "u1"), ("anonymous_id", "b1"))])
    conn.close()
    assert main(["--truth", str(truth), "--output", str(tmp_path)]) == 1
    assert "pairs across identified persons" in capsys.readouterr().out


def test_main_without_linked_identities_exits_2(tmp_path, capsys):
    truth = tmp_path / "t.json"
    truth.write_bytes(orjson.dumps({"identities": []}))
    assert main(["--truth", str(truth), "--output", str(tmp_path)]) == 2
    assert "no linked_identities" in capsys.readouterr().err
