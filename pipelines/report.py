"""The run report: counts per output and reason, from Beam metrics and the written outputs.

Printed as a summary after `cdi run` and written as ``run_report.json`` in the output directory.
The accounting identity it checks, ``events_in == valid + quarantined + duplicates``, is the
project's promise that nothing is dropped without a record.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from apache_beam.metrics.metric import MetricsFilter


def counters(result, live: bool = False) -> dict[str, int]:
    """Committed (else attempted) values of the ``cdi`` namespace counters. ``live``: of a job
    still running, the larger of the two (runners differ in which one they fill meanwhile)."""
    out: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace("cdi"))
    for c in query["counters"]:
        if live:
            value = max(int(c.attempted or 0), int(c.committed or 0))
        else:
            value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def count_profiles(db_path: Path) -> int | None:
    """Live profiles in the run's SQLite store; ``None`` when the run wrote none (the profile
    store is a server: its rows written are in ``profile_updates_written``)."""
    if not db_path.exists():
        return None
    with sqlite3.connect(str(db_path)) as conn:
        return conn.execute("SELECT COUNT(*) FROM profiles").fetchone()[0]


def build_report(
    metrics: dict[str, int], paths: dict[str, Path], wall_seconds: float
) -> dict[str, Any]:
    quarantined = {
        name[len("quarantined.") :]: n
        for name, n in sorted(metrics.items())
        if name.startswith("quarantined.") and n
    }
    events_in = metrics.get("events_in", 0)
    # Unique events a later step dead-lettered are quarantined (internal.error), not valid.
    valid = metrics.get("dedup.first", 0) - metrics.get("dead_lettered_after_dedup", 0)
    internal_errors = {
        name[len("internal_error.") :]: n
        for name, n in sorted(metrics.items())
        if name.startswith("internal_error.") and n
    }
    duplicates = metrics.get("dedup.duplicates", 0)
    total_q = sum(quarantined.values())
    return {
        "events_in": events_in,
        "valid": valid,
        "quarantined": total_q,
        "quarantined_by_reason": quarantined,
        "duplicates": duplicates,
        "late": metrics.get("late", 0),
        "consent_denied": metrics.get("consent.denied", 0),
        "deleted": metrics.get("privacy.deleted", 0),
        "deliveries": metrics.get("delivered", 0),
        # Audience transitions (each a track + an identify per destination) and triggers fired;
        # activation records a ledger had already seen are not delivered again.
        "activations": {
            "entered": metrics.get("activation.entered", 0),
            "exited": metrics.get("activation.exited", 0),
            "triggers_fired": metrics.get("trigger.fired", 0),
            "already_delivered": metrics.get("activation.already_delivered", 0),
        },
        "computed_trait_panes": metrics.get("computed_trait_panes", 0),
        "profiles": count_profiles(paths["profiles"]),
        # Row versions and tombstones written, per store type (a store refuses the stale ones).
        "profile_updates_written": {
            name[len("profiles_written.") :]: n
            for name, n in sorted(metrics.items())
            if name.startswith("profiles_written.")
        },
        "identity": {
            "merges": metrics.get("identity.merges", 0),
            "splits": metrics.get("identity.splits", 0),
            "links_refused": metrics.get("identity.links_refused", 0)
            + metrics.get("identity.shared_identifiers", 0),
            "shared_identifiers": metrics.get("identity.shared_identifiers", 0),
            # Links between candidate groups that propagation did not join (max_hops too low).
            "unresolved_links": metrics.get("identity.unresolved_links", 0),
        },
        # Per step: records of elements a step raised on (events, identifier groups, persons;
        # "repeats": events another step had already dead-lettered). Zero in a healthy run.
        "internal_errors": internal_errors,
        "accounted": events_in == valid + total_q + duplicates,
        "wall_seconds": round(wall_seconds, 3),
        "outputs": {k: str(v) for k, v in paths.items()},
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def format_summary(report: dict[str, Any]) -> str:
    lines = [
        f"events in         {report['events_in']:>10,}",
        f"valid (unique)    {report['valid']:>10,}",
        f"quarantined       {report['quarantined']:>10,}",
    ]
    for reason, n in report["quarantined_by_reason"].items():
        lines.append(f"  {reason:<28}{n:>8,}")
    lines += [
        f"duplicates        {report['duplicates']:>10,}",
        f"late (too late)   {report['late']:>10,}",
        f"deliveries        {report['deliveries']:>10,}  (event x destination, profile store included)",
        f"consent denied    {report['consent_denied']:>10,}  (event x destination)",
        f"audience entries  {report['activations']['entered']:>10,}"
        f"  (exits {report['activations']['exited']:,}, triggers fired"
        f" {report['activations']['triggers_fired']:,}, already delivered"
        f" {report['activations']['already_delivered']:,})",
        f"deleted (privacy) {report['deleted']:>10,}",
        f"internal errors   {sum(report['internal_errors'].values()):>10,}"
        + "".join(f"  {k} {v:,}" for k, v in report["internal_errors"].items()),
        (
            f"profiles          {report['profiles']:>10,}"
            if report["profiles"] is not None
            else "profiles          (no SQLite store in this run)"
        )
        + (
            "  (rows written: "
            + ", ".join(f"{k} {v:,}" for k, v in report["profile_updates_written"].items())
            + ")"
            if report["profile_updates_written"]
            else ""
        ),
        f"identity merges   {report['identity']['merges']:>10,}"
        f"  (splits {report['identity']['splits']:,}, links refused"
        f" {report['identity']['links_refused']:,}, unresolved {report['identity']['unresolved_links']:,})",
        "accounted         "
        + (
            "yes: in = valid + quarantined + duplicates"
            if report["accounted"]
            else "NO: counts do not add up"
        ),
        f"wall time         {report['wall_seconds']:>10.1f} s",
        "outputs:",
    ]
    for name, path in report["outputs"].items():
        lines.append(f"  {name:<16}{path}")
    return "\n".join(lines)
