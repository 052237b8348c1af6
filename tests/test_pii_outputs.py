"""No raw email or phone reaches an output whose PII policy forbids it: profile store and every
activation destination, plus denial and deletion records, which never carry payloads."""

import sqlite3

import orjson
import pytest

from pipelines import governed_profiles as job
from tests.conftest import config_from, event, make_pipeline, run_job

EMAIL, PHONE = "Jane.Doe@Example.com", "+1 (555) 010-9999"
GRANT = {
    "consent": {"categoryPreferences": {"analytics": True, "marketing": True, "advertising": False}}
}

CONFIG = """
sources: [{name: web, paths: [], tracking_plan: default}]
tracking_plans: {default: {path: ../tracking_plans/example.yaml}}
pii: {salt: test-salt}
sinks: {profiles: {pii: {email: hash, phone: drop}}}
consent:
  destinations:
    crm: {purposes: [marketing], pii: {email: keep, phone: keep}}
    analytics_db: {purposes: [analytics], pii: {email: hash, phone: hash}}
    ads: {purposes: [advertising], pii: {email: keep}}
"""


def test_every_output_gets_only_what_its_policy_allows(tmp_path):
    lines = [
        event(messageId="1", type="identify", userId="u1", event=None, properties=None,
              traits={"email": EMAIL, "phone": PHONE, "plan": "pro"}, context=GRANT),
        event(messageId="2", userId="u1", context={**GRANT, "traits": {"email": EMAIL, "phone": PHONE}}),
        event(messageId="3", userId="u2", context={"traits": {"email": "x@y.io"}}),  # no consent
    ]  # fmt: skip
    src = tmp_path / "e.ndjson"
    src.write_text("\n".join(orjson.dumps(e).decode() for e in lines) + "\n")
    cfg = config_from(CONFIG)
    out = tmp_path / "out"
    with make_pipeline() as p:
        outputs = job.build(p, cfg, {"web": [str(src)]})
        job.write_outputs(outputs, cfg, out)

    def text_of(path):
        return "".join(f.read_text() for f in path.glob("part-*"))

    raw_email, raw_phone = EMAIL.lower(), "010-9999"  # (a bare "555" can occur inside a hash)
    with sqlite3.connect(out / "profiles.sqlite") as conn:
        profile_text = " ".join(
            " ".join(map(str, r)) for r in conn.execute("SELECT * FROM profiles")
        ).lower()
    assert raw_email not in profile_text and raw_phone not in profile_text
    assert "sha256:" in profile_text  # hashed, so still joinable

    analytics = text_of(out / "destinations" / "analytics_db").lower()
    assert analytics and raw_email not in analytics and raw_phone not in analytics
    crm = text_of(out / "destinations" / "crm").lower()
    assert raw_email in crm and raw_phone in crm  # keep means keep
    assert text_of(out / "destinations" / "ads") == ""  # advertising not granted: nothing at all
    for side in ("consent_denied", "deleted"):
        assert raw_email not in text_of(out / side).lower()
    denied = [orjson.loads(x) for x in text_of(out / "consent_denied").splitlines()]
    assert {(d["destination"], d["message_id"]) for d in denied} >= {("ads", "1"), ("crm", "3")}


HASHED_IDS = """
sources: [{name: web, paths: []}]
pii: {salt: test-salt}
sinks: {profiles: {pii: {email: hash, phone: hash}}}
identity:
  types:
    - {name: user_id, paths: [userId], normalizer: trim, limit: 1}
    - {name: email, paths: [traits.email, context.traits.email], normalizer: email}
    - {name: phone, paths: [traits.phone], normalizer: phone}
    - {name: anonymous_id, paths: [anonymousId], normalizer: trim}
"""


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "streaming"])
def test_hashed_identifiers_keep_their_first_and_last_seen(tmp_path, bounded):
    """An identifier the profile store hashes is still dated: its first/last seen are recorded
    under the key of the person's (hashed) member, not under a re-normalized hash of the raw
    text (the phone normalizer kept only the hash's digits; an e-mail was hashed unnormalized)."""
    lines = [
        event(messageId="1", type="identify", userId="u1", anonymousId="a1", event=None,
              properties=None, context=GRANT,
              traits={"email": " Bob@Example.COM ", "phone": "+1 (555) 123-4567"}),
        event(messageId="2", userId="u1", anonymousId="a1", context=GRANT,
              originalTimestamp="2026-11-01T11:00:00.000Z"),
    ]  # fmt: skip
    run = run_job(tmp_path, [orjson.dumps(e) for e in lines], config_from(HASHED_IDS), bounded)
    (row,) = run["rows"].values()
    identities = {i["type"]: i for i in orjson.loads(row["identities"])}
    assert set(identities) == {"user_id", "email", "phone", "anonymous_id"}
    assert identities["email"]["value"].startswith("sha256:")
    assert identities["phone"]["value"].startswith("sha256:")
    for kind, ident in identities.items():
        assert ident["first_seen"] and ident["last_seen"], (kind, ident)
    assert identities["user_id"]["last_seen"] > identities["user_id"]["first_seen"]
