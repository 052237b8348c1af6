"""Stitching accuracy against the generator's ground truth: pairwise precision and recall.

    python -m benchmarks.identity_accuracy --truth events.ndjson.truth.json --output cdi-output
    python -m benchmarks.identity_accuracy --truth T --output DIR --json accuracy.json

True pairs: every pair of identifiers in one group of the truth's ``linked_identities`` (what the
person's own valid events connect). Predicted pairs: every pair of identifiers in one profile row
of ``DIR/profiles.sqlite``, counting only identifiers the truth knows (junk ids and anything else
outside the truth cannot be scored). Precision is the share of predicted pairs that are true,
recall the share of true pairs that are predicted; a pair set that is empty scores 1.0 (nothing
claimed, nothing wrong; nothing to find, nothing missed). A predicted pair joining two different
identified persons is the costly error (one customer sees another's data): it must be 0, and the
exit code is 1 when it is not.

Pairs, not groups, because one wrong merge of two big groups costs many pairs and one missed login
costs a few: the score scales with how much of a person is wrong.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from itertools import combinations
from math import comb
from pathlib import Path
from typing import Any

import orjson

from pipelines.explain import PROFILES_FILE, ExplainError, identity_keys, open_read_only

EXAMPLES = 10  # missed and wrong pairs listed in the result


def _truth_index(truth: dict) -> tuple[dict[str, tuple[int, str]], set[str], list[list[str]]]:
    """``(key -> (group number, person), identified persons, groups)`` from the truth."""
    identified = {i["person"] for i in truth["identities"] if i.get("user_id")}
    where: dict[str, tuple[int, str]] = {}
    groups: list[list[str]] = []
    for entry in truth["linked_identities"]:
        for group in entry["groups"]:
            for key in group:
                where[key] = (len(groups), entry["person"])
            groups.append(sorted(group))
    return where, identified, groups


def _pairs(keys: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Every unordered pair once, as a sorted tuple (so the same pair from two rows is equal)."""
    return combinations(sorted(set(keys)), 2)


def pairwise_scores(truth: dict, rows: list[list[str]]) -> dict[str, Any]:
    """Score profile rows (each a list of identifier keys) against ``truth`` (module doc).

    Only predicted pairs are materialized (rows are small, at most ``max_cluster_size``
    identifiers); true pairs are counted per group and checked against the predicted set."""
    where, identified, groups = _truth_index(truth)
    predicted: set[tuple[str, str]] = set()
    for row in rows:
        predicted.update(_pairs(k for k in row if k in where))
    wrong, cross_identified, cross_any = [], 0, 0
    for a, b in predicted:
        (ga, pa), (gb, pb) = where[a], where[b]
        if ga == gb:
            continue
        across = pa != pb and pa in identified and pb in identified
        wrong.append((not across, a, b))  # pairs across identified persons list first
        cross_any += pa != pb
        cross_identified += across
    correct = len(predicted) - len(wrong)
    true_pairs = sum(comb(len(g), 2) for g in groups)
    in_rows = {k for row in rows for k in row}
    return {
        "profiles": len(rows),
        "true_groups": len(groups),
        "truth_identifiers": len(where),
        "identifiers_in_no_profile": sum(1 for k in where if k not in in_rows),
        "true_pairs": true_pairs,
        "predicted_pairs": len(predicted),
        "correct_pairs": correct,
        "precision": correct / len(predicted) if predicted else 1.0,
        "recall": correct / true_pairs if true_pairs else 1.0,
        "cross_identified_person_pairs": cross_identified,
        "cross_person_pairs": cross_any,
        "missed_examples": _missed(groups, predicted),
        "wrong_examples": [[a, b] for _, a, b in sorted(wrong)[:EXAMPLES]],
    }


def _missed(groups: list[list[str]], predicted: set[tuple[str, str]]) -> list[list[str]]:
    """The first few true pairs no profile holds, in group order (deterministic)."""
    out: list[list[str]] = []
    for group in groups:
        for pair in _pairs(group):
            if pair not in predicted:
                out.append(list(pair))
                if len(out) == EXAMPLES:
                    return out
    return out


# --- reading a run and its truth ---------------------------------------------------------------


def profile_rows(output_dir: str | Path) -> list[list[str]]:
    """Each profile row's identities as identifier keys."""
    conn = open_read_only(Path(output_dir) / PROFILES_FILE)
    try:
        return [
            identity_keys(orjson.loads(text))
            for (text,) in conn.execute("SELECT identities FROM profiles ORDER BY profile_id")
        ]
    finally:
        conn.close()


def format_scores(s: dict[str, Any]) -> str:
    """The readable summary of :func:`pairwise_scores`."""

    def line(label: str, value: str, note: str = "") -> str:
        return f"  {label:<34}{value:>10}  {note}".rstrip()

    lines = [
        "identity stitching accuracy (pairwise)",
        line("profiles", f"{s['profiles']:,}"),
        line("true groups", f"{s['true_groups']:,}"),
        line(
            "truth identifiers",
            f"{s['truth_identifiers']:,}",
            f"({s['identifiers_in_no_profile']:,} in no profile)",
        ),
        line(
            "precision",
            f"{s['precision']:.4f}",
            f"({s['correct_pairs']:,} of {s['predicted_pairs']:,} predicted pairs)",
        ),
        line(
            "recall",
            f"{s['recall']:.4f}",
            f"({s['correct_pairs']:,} of {s['true_pairs']:,} true pairs)",
        ),
        line(
            "pairs across identified persons",
            f"{s['cross_identified_person_pairs']:,}",
            "(must be 0)",
        ),
        line("pairs across any persons", f"{s['cross_person_pairs']:,}"),
    ]
    for title, key in (("missed pairs", "missed_examples"), ("wrong pairs", "wrong_examples")):
        if s[key]:
            lines.append(f"{title} (first {len(s[key])}):")
            lines.extend(f"  {a} -- {b}" for a, b in s[key])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--truth", required=True, help="the FILE.truth.json of `cdi generate`")
    ap.add_argument("--output", required=True, help="the `cdi run` output directory")
    ap.add_argument("--json", help="also write the scores as JSON to this file")
    args = ap.parse_args(argv)
    truth = orjson.loads(Path(args.truth).read_bytes())
    if "linked_identities" not in truth:
        print(f"{args.truth}: no linked_identities (regenerate with cdi generate)", file=sys.stderr)
        return 2
    try:
        rows = profile_rows(args.output)
    except ExplainError as e:
        print(str(e), file=sys.stderr)
        return 2
    scores = pairwise_scores(truth, rows)
    print(format_scores(scores))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(scores, option=orjson.OPT_INDENT_2) + b"\n")
    return 1 if scores["cross_identified_person_pairs"] else 0


if __name__ == "__main__":
    sys.exit(main())
