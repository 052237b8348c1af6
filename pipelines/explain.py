"""`cdi profile explain ID --output DIR`: why a profile holds the identifiers it holds.

Reads a run's output directory (the layout of :func:`pipelines.governed_profiles.output_paths`
with the default profile path): the profile row from ``profiles.sqlite``, the ``profile_merged`` /
``profile_split`` records from ``merges/`` and the refused links from ``identity_review/``.

``ID`` is a profile id (``user:u1``), an identifier key (``anon:a1``, ``email:x@y.io``), the same
with the config type name (``anonymous_id:a1``, ``user_id:u1``) or a bare value (any type). The
person is the row whose ``profile_id`` is ``ID`` or whose identities contain it. Printed:

- the profile id and its identifiers;
- the merges that built it: every ``profile_merged`` record into it, and into those merged into
  it (a chain A -> B -> C is followed back from C), with the link evidence of each; splits of any
  of them;
- every refused link that names one of its identifiers (as an end, in a cluster, or as the
  refused ``identifier``), with its rule.

The merge records are a history, not the whole graph: a batch run reports merges of profile keys
(user and anonymous ids) only, and each record cites one link, so identifiers such as emails and
device ids may have joined through links no record cites. They are listed as such.

Identifiers are matched as the profile store holds them: when its PII policy hashes or drops a
type, look the person up by another identifier. Merge and review records carry raw identifiers, so
a review record that names only such an identifier is not found.

Exit codes follow ``cdi``: 0 found, 1 nothing matches ``ID``, 2 no profile store in ``DIR`` (or an
unreadable output file).
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from transforms.identity_graph import id_key, split_key

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE = 0, 1, 2
# The names output_paths() gives them with the default config (tests check they agree).
PROFILES_FILE = "profiles.sqlite"
MERGES_DIR = "merges"
REVIEW_DIR = "identity_review"
SHARD_GLOB = "part-*.ndjson"
_CLUSTER_SHOWN = 5  # members of a refused link's cluster printed in text mode (JSON has all)


class ExplainError(Exception):
    """The output directory cannot be read: exit 2 with this message."""


# --- reading the profile store -----------------------------------------------------------------


def open_read_only(path: Path) -> sqlite3.Connection:
    """The profile store, read-only: a diagnostic must never create or change it (a plain
    ``connect`` would create an empty file at a mistyped path)."""
    if not path.is_file():
        raise ExplainError(f"{path}: no such profile store")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("SELECT 1 FROM profiles LIMIT 1")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise ExplainError(f"{path}: not a profile store ({e})") from None
    return conn


def identity_keys(identities: list[dict[str, Any]]) -> list[str]:
    """A profile row's identities as stitching keys (``user_id`` -> ``user:``, ``anonymous_id``
    -> ``anon:``, other types keep their name)."""
    return [id_key(i["type"], i["value"]) for i in identities]


def _candidates(ident: str) -> list[tuple[str | None, str]]:
    """``(type or None for any, value)`` pairs to look ``ident`` up by, exact form first."""
    if ":" not in ident:
        return [(None, ident)]
    id_type, value = split_key(ident)  # "anon:a1" and "anonymous_id:a1" alike
    out: list[tuple[str | None, str]] = [(id_type, value)]
    # Emails are stored normalized (trimmed, lowercased); people paste them as typed.
    if id_type == "email" and value.strip().lower() != value:
        out.append((id_type, value.strip().lower()))
    return out


_BY_IDENTIFIER = """
SELECT profile_id, identities FROM profiles p WHERE EXISTS (
  SELECT 1 FROM json_each(p.identities) j
  WHERE (?1 IS NULL OR json_extract(j.value, '$.type') = ?1)
    AND json_extract(j.value, '$.value') = ?2
) ORDER BY profile_id"""


def find_profile(conn: sqlite3.Connection, ident: str) -> dict[str, Any] | None:
    """The row ``ident`` names: ``{profile_id, identities, matched_by, also_in}`` or ``None``.

    ``also_in``: other rows holding the identifier, which stitching should never produce."""
    keys = [ident] + ([id_key(*split_key(ident))] if ":" in ident else [])
    for key in dict.fromkeys(keys):
        row = conn.execute(
            "SELECT profile_id, identities FROM profiles WHERE profile_id = ?", (key,)
        ).fetchone()
        if row:
            return {**_row(row), "matched_by": "profile_id", "also_in": []}
    for id_type, value in _candidates(ident):
        rows = conn.execute(_BY_IDENTIFIER, (id_type, value)).fetchall()
        if rows:
            found = _row(rows[0])
            matched = next(
                i["key"]
                for i in found["identities"]
                if i["value"] == value and id_type in (None, i["type"])
            )
            others = [r[0] for r in rows[1:]]
            return {**found, "matched_by": f"identifier {matched}", "also_in": others}
    return None


def _row(row: tuple[str, str]) -> dict[str, Any]:
    identities = orjson.loads(row[1])
    for i in identities:
        i["key"] = id_key(i["type"], i["value"])
    return {"profile_id": row[0], "identities": identities}


# --- reading merges and identity review --------------------------------------------------------


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record of the NDJSON shards in ``directory`` (none when it does not exist)."""
    for file in sorted(directory.glob(SHARD_GLOB)):
        with open(file, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise ExplainError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
                if isinstance(record, dict):
                    yield record


def merge_history(records: Iterable[dict[str, Any]], person: str) -> tuple[list, list]:
    """``(merges, splits)`` that built ``person``: ``profile_merged`` records into it or, through
    a chain, into a profile merged into it (oldest link first); splits of any of those."""
    records = list(records)
    into: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind") == "profile_merged":
            into.setdefault(r.get("into"), []).append(r)
    merges, chain, todo = [], {person}, [person]
    while todo:
        for r in into.get(todo.pop(), ()):
            merges.append(r)
            if r.get("from") not in chain:  # a cycle would mean a broken history: stop there
                chain.add(r["from"])
                todo.append(r["from"])
    merges.sort(key=_link_order)
    splits = [
        r
        for r in records
        if r.get("kind") == "profile_split"
        and (r.get("from") in chain or chain & set(r.get("into") or ()))
    ]
    return merges, splits


def _link_order(record: dict[str, Any]) -> tuple[str, str]:
    link = record.get("link") or {}
    # Records without a link (anchor_changed) sort last: ISO times sort as text.
    return (link.get("event_time") or "~", link.get("messageId") or "")


def refused_links(records: Iterable[dict[str, Any]], keys: set[str]) -> list[dict[str, Any]]:
    """``link_refused`` records naming any of ``keys``, oldest link first."""
    out = []
    for r in records:
        link = r.get("link") or {}
        clusters = r.get("clusters") or {}
        named = {link.get("a"), link.get("b"), r.get("identifier")}
        named.update(clusters.get("a") or ())
        named.update(clusters.get("b") or ())
        if named & keys:
            out.append(r)
    return sorted(out, key=_link_order)


# --- the explanation ---------------------------------------------------------------------------


def explain(output_dir: str | Path, ident: str) -> dict[str, Any] | None:
    """Everything ``cdi profile explain`` prints (module doc), or ``None`` when nothing matches.

    Raises :class:`ExplainError` when ``output_dir`` has no readable profile store."""
    out = Path(output_dir)
    conn = open_read_only(out / PROFILES_FILE)
    try:
        found = find_profile(conn, ident)
    finally:
        conn.close()
    if found is None:
        return None
    person = found["profile_id"]
    keys = {i["key"] for i in found["identities"]} | {person}
    merges, splits = merge_history(read_records(out / MERGES_DIR), person)
    cited = {(m.get("link") or {}).get(end) for m in merges for end in ("a", "b")}
    missing = [str(out / d) for d in (MERGES_DIR, REVIEW_DIR) if not (out / d).is_dir()]
    return {
        "query": ident,
        **found,
        "merges": merges,
        "splits": splits,
        "refused": refused_links(read_records(out / REVIEW_DIR), keys),
        # Members no cited link touches joined through links no merge record names (module doc).
        "not_in_merge_links": sorted(keys - cited - {person}),
        "missing_outputs": missing,
    }


def _link_text(link: dict[str, Any] | None) -> str:
    if not link:
        return "no link (the person's id changed, see rule)"
    return (
        f"{link.get('a')} -- {link.get('b')}, {link.get('event_type')} event "
        f"at {link.get('event_time')}, messageId {link.get('messageId')}"
    )


def _cluster_text(members: list[str]) -> str:
    shown = ", ".join(members[:_CLUSTER_SHOWN])
    more = len(members) - _CLUSTER_SHOWN
    return f"[{shown}{f', +{more} more' if more > 0 else ''}]"


def format_explanation(exp: dict[str, Any]) -> str:
    """The human-readable form of :func:`explain`'s result."""
    lines = [f"profile {exp['profile_id']}  (matched by {exp['matched_by']})"]
    if exp["also_in"]:
        lines.append(f"  WARNING: the identifier is also in {', '.join(exp['also_in'])}")
    lines.append(f"identifiers ({len(exp['identities'])}):")
    for i in exp["identities"]:
        lines.append(
            f"  {i['type']:<14} {i['value']}  (seen {i.get('first_seen')} .. {i.get('last_seen')})"
        )
    lines.append(f"merged into it ({len(exp['merges'])}), oldest link first:")
    for m in exp["merges"]:
        lines.append(f"  {m.get('from')} -> {m.get('into')}  [{m.get('rule')}]")
        lines.append(f"      link {_link_text(m.get('link'))}")
    if exp["not_in_merge_links"]:
        lines.append(
            "  joined through links no merge record cites: " + ", ".join(exp["not_in_merge_links"])
        )
    if exp["splits"]:
        lines.append(f"splits ({len(exp['splits'])}):")
        for s in exp["splits"]:
            lines.append(f"  {s.get('from')} -> {', '.join(s.get('into') or ())}")
    lines.append(f"refused links naming its identifiers ({len(exp['refused'])}):")
    for r in exp["refused"]:
        lines.append(f"  [{r.get('rule')}] {_link_text(r.get('link'))}")
        if r.get("identifier"):
            lines.append(f"      identifier {r['identifier']}")
        if r.get("clusters"):
            a, b = r["clusters"].get("a") or [], r["clusters"].get("b") or []
            lines.append(f"      clusters a={_cluster_text(a)} b={_cluster_text(b)}")
    for path in exp["missing_outputs"]:
        lines.append(f"note: {path} does not exist; its records are not shown")
    return "\n".join(lines)


def main_explain(ident: str, output_dir: str, as_json: bool = False) -> int:
    """``cdi profile explain``: print the explanation; exit code per the module doc."""
    try:
        exp = explain(output_dir, ident)
    except ExplainError as e:
        print(f"cdi profile explain: {e}", file=sys.stderr)
        return EXIT_USAGE
    if exp is None:
        store = Path(output_dir) / PROFILES_FILE
        print(f"no profile or identifier matches '{ident}' in {store}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if as_json:
        print(orjson.dumps(exp, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_explanation(exp))
    return EXIT_OK
