"""`cdi profile explain` over a hand-built run output directory."""

from __future__ import annotations

import orjson
import pytest

from pipelines.cli import main
from pipelines.explain import MERGES_DIR, PROFILES_FILE, REVIEW_DIR, merge_history
from transforms.io.sqlite import open_profile_db, upsert_profiles
from transforms.profile_store import PROFILE_COLUMNS

T0 = "2026-11-01T10:00:00.000Z"


def row(profile_id: str, *ids: tuple[str, str]) -> dict:
    identities = [{"type": t, "value": v, "first_seen": T0, "last_seen": T0} for t, v in ids]
    out = {c: "{}" for c in PROFILE_COLUMNS}
    out.update(
        profile_id=profile_id,
        identities=orjson.dumps(identities, option=orjson.OPT_SORT_KEYS).decode(),
        first_seen=T0,
        last_seen=T0,
        version=1,
        updated_at=T0,
    )
    return out


def link(a: str, b: str, time: str, mid: str, etype: str) -> dict:
    return {"a": a, "b": b, "event_time": time, "messageId": mid, "event_type": etype}


def merged(frm: str, into: str, lnk: dict | None) -> dict:
    rule = f"linked_by.{lnk['event_type']}" if lnk else "anchor_changed"
    return {"kind": "profile_merged", "from": frm, "into": into, "rule": rule, "link": lnk}


def refused(rule: str, lnk: dict, clusters=None, identifier=None) -> dict:
    r = {"kind": "link_refused", "rule": rule, "link": lnk, "clusters": clusters}
    if identifier:
        r["identifier"] = identifier
    return r


def write_ndjson(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(orjson.dumps(r).decode() + "\n" for r in records)
    (directory / "part-00000-of-00001.ndjson").write_text(lines)


U1_IDS = (
    ("user_id", "u1"),
    ("anonymous_id", "a1"),
    ("anonymous_id", "a2"),
    ("anonymous_id", "a3"),
    ("email", "x@y.io"),
    ("device_id", "d1"),
)
# anon:a3 merged into anon:a2, which later merged into user:u1: a chain.
CHAIN_OLD = merged(
    "anon:a3", "anon:a2", link("anon:a2", "anon:a3", "2026-11-01T09:00:00.000Z", "m0", "alias")
)
LOGIN = merged(
    "anon:a1", "user:u1", link("anon:a1", "user:u1", "2026-11-01T10:00:00.000Z", "m1", "identify")
)
CHAIN_NEW = merged(
    "anon:a2", "user:u1", link("anon:a2", "user:u1", "2026-11-02T10:00:00.000Z", "m2", "identify")
)
OTHER_MERGE = merged("anon:z1", "user:u2", link("anon:z1", "user:u2", T0, "m3", "identify"))
SPLIT = {
    "kind": "profile_split",
    "from": "user:u1",
    "into": ["anon:a7", "user:u1"],
    "members": {"anon:a7": ["anon:a7"], "user:u1": ["user:u1"]},
}
JUNK = refused(
    "blocklist",
    link("device_id:0000", "user:u1", "2026-11-01T11:00:00.000Z", "m4", "screen"),
    identifier="device_id:0000",
)
LIMIT = refused(
    "limit.user_id",
    link("email:x@y.io", "user:u2", "2026-11-01T12:00:00.000Z", "m5", "identify"),
    clusters={"a": ["anon:a1", "email:x@y.io", "user:u1"], "b": ["user:u2"]},
)
SHARED = refused(
    "breaker.shared_identifier",
    link("device_id:d1", "device_id:kiosk", "2026-11-01T13:00:00.000Z", "m6", "track"),
    identifier="device_id:kiosk",
)
UNRELATED = refused(
    "blocklist", link("anon:null", "user:u2", T0, "m7", "track"), identifier="anon:null"
)


@pytest.fixture
def out(tmp_path):
    conn = open_profile_db(tmp_path / PROFILES_FILE)
    upsert_profiles(
        conn,
        [
            row("user:u1", *U1_IDS),
            row("user:u2", ("user_id", "u2"), ("anonymous_id", "z1")),
            row("anon:a9", ("anonymous_id", "a9")),
        ],
    )
    conn.close()
    write_ndjson(tmp_path / MERGES_DIR, [OTHER_MERGE, CHAIN_NEW, LOGIN, CHAIN_OLD, SPLIT])
    write_ndjson(tmp_path / REVIEW_DIR, [UNRELATED, SHARED, LIMIT, JUNK])
    return tmp_path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["profile", "explain", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_lists_identifiers_merges_and_refused_links(out, capsys):
    code, text, err = run(capsys, "user:u1", "--output", out)
    assert code == 0 and err == ""
    assert text.startswith("profile user:u1  (matched by profile_id)\n")
    assert "identifiers (6):" in text
    for t, v in U1_IDS:
        assert f"  {t:<14} {v}  (seen {T0} .. {T0})" in text
    # The chain a3 -> a2 -> u1 is followed, oldest link first; other persons' merges are not shown.
    assert "merged into it (3), oldest link first:" in text
    order = [text.index(f"{r['from']} -> {r['into']}") for r in (CHAIN_OLD, LOGIN, CHAIN_NEW)]
    assert order == sorted(order)
    assert (
        "      link anon:a1 -- user:u1, identify event at 2026-11-01T10:00:00.000Z, messageId m1"
        in text
    )
    assert "[linked_by.alias]" in text and "anon:z1" not in text
    # No merge record cites a link touching the email or the device.
    assert "joined through links no merge record cites: device_id:d1, email:x@y.io" in text
    assert "splits (1):\n  user:u1 -> anon:a7, user:u1" in text
    assert "refused links naming its identifiers (3):" in text
    assert "  [blocklist] device_id:0000 -- user:u1, screen event" in text
    assert "      identifier device_id:0000" in text
    assert "  [limit.user_id] email:x@y.io -- user:u2" in text
    assert "      clusters a=[anon:a1, email:x@y.io, user:u1] b=[user:u2]" in text
    assert "  [breaker.shared_identifier] device_id:d1 -- device_id:kiosk" in text
    assert "anon:null" not in text
    assert text.index("[blocklist]") < text.index("[limit.user_id]") < text.index("[breaker")


@pytest.mark.parametrize(
    ("ident", "matched"),
    [
        ("anon:a1", "identifier anon:a1"),
        ("anonymous_id:a1", "identifier anon:a1"),
        ("user_id:u1", "profile_id"),
        ("email:x@y.io", "identifier email:x@y.io"),
        ("email: X@Y.io", "identifier email:x@y.io"),  # as typed: trimmed and lowercased
        ("device_id:d1", "identifier device_id:d1"),
        ("d1", "identifier device_id:d1"),  # a bare value matches any type
    ],
)
def test_any_identifier_form_finds_the_person(out, capsys, ident, matched):
    code, text, _ = run(capsys, ident, "--output", out)
    assert code == 0
    assert text.splitlines()[0] == f"profile user:u1  (matched by {matched})"


def test_json_is_one_object_with_everything(out, capsys):
    code, text, _ = run(capsys, "email:x@y.io", "--output", out, "--json")
    assert code == 0
    exp = orjson.loads(text)
    assert exp["query"] == "email:x@y.io" and exp["profile_id"] == "user:u1"
    assert exp["matched_by"] == "identifier email:x@y.io" and exp["also_in"] == []
    assert [i["key"] for i in exp["identities"]] == [
        "user:u1",
        "anon:a1",
        "anon:a2",
        "anon:a3",
        "email:x@y.io",
        "device_id:d1",
    ]
    assert exp["merges"] == [CHAIN_OLD, LOGIN, CHAIN_NEW]
    assert exp["splits"] == [SPLIT]
    assert exp["refused"] == [JUNK, LIMIT, SHARED]
    assert exp["not_in_merge_links"] == ["device_id:d1", "email:x@y.io"]
    assert exp["missing_outputs"] == []


def test_a_profile_without_history(out, capsys):
    code, text, _ = run(capsys, "anon:a9", "--output", out)
    assert code == 0
    assert "merged into it (0)" in text and "refused links naming its identifiers (0):" in text
    assert "splits" not in text and "joined through" not in text


def test_not_found_exits_1(out, capsys):
    code, text, err = run(capsys, "anon:nobody", "--output", out)
    assert code == 1 and text == ""
    assert err.strip() == f"no profile or identifier matches 'anon:nobody' in {out / PROFILES_FILE}"


def test_no_profile_store_exits_2_and_creates_nothing(tmp_path, capsys):
    code, text, err = run(capsys, "user:u1", "--output", tmp_path / "nope")
    assert code == 2 and text == ""
    assert "profiles.sqlite" in err
    assert not (tmp_path / "nope").exists()


def test_missing_record_dirs_are_noted(out, capsys):
    for d in (MERGES_DIR, REVIEW_DIR):
        for f in (out / d).iterdir():
            f.unlink()
        (out / d).rmdir()
    code, text, _ = run(capsys, "user:u1", "--output", out)
    assert code == 0
    assert f"note: {out / MERGES_DIR} does not exist" in text
    assert f"note: {out / REVIEW_DIR} does not exist" in text


def test_an_identifier_in_two_profiles_is_flagged(out, capsys):
    conn = open_profile_db(out / PROFILES_FILE)
    # a newer row of anon:a9 (a store keeps the higher version)
    upsert_profiles(
        conn, [{**row("anon:a9", ("anonymous_id", "a9"), ("device_id", "d1")), "version": 2}]
    )
    conn.close()
    code, text, _ = run(capsys, "device_id:d1", "--output", out)
    assert code == 0
    assert text.splitlines()[:2] == [
        "profile anon:a9  (matched by identifier device_id:d1)",
        "  WARNING: the identifier is also in user:u1",
    ]


def test_malformed_record_exits_2(out, capsys):
    (out / MERGES_DIR / "part-00001-of-00002.ndjson").write_text('{"kind": \n')
    code, _, err = run(capsys, "user:u1", "--output", out)
    assert code == 2 and "part-00001-of-00002.ndjson:1: not valid JSON" in err


def test_usage_errors_exit_2(out, capsys):
    assert run(capsys, "user:u1")[0] == 2  # --output is required
    assert main(["profile"]) == 2


def test_file_names_match_the_output_contract(default_config, tmp_path):
    from pipelines.governed_profiles import MERGES, PROFILES, REVIEW, output_paths

    paths = output_paths(default_config, tmp_path)
    assert paths[PROFILES] == tmp_path / PROFILES_FILE
    assert paths[MERGES] == tmp_path / MERGES_DIR
    assert paths[REVIEW] == tmp_path / REVIEW_DIR


def test_merge_history_survives_a_cycle():
    a_into_b = merged("anon:a", "anon:b", None)
    b_into_a = merged("anon:b", "anon:a", None)
    merges, splits = merge_history([a_into_b, b_into_a], "anon:a")
    assert merges == [b_into_a, a_into_b] and splits == []
