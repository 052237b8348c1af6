"""Coverage-guided fuzzing (atheris / libFuzzer) of the pure per-event path: `make fuzz`.

One input is one raw NDJSON line (bytes). It is judged by validation, with and without the
example tracking plan (and with every violation mode), and every event that passes goes on
through the pure functions the job then applies to it: the profile key, the shuffle encoding,
the dedup key and fingerprint, stitching messages, consent, PII policies, the profile fold and
the profile row. Any exception is a finding: the job would have dead-lettered the event (or, in
a stage without a dead letter, failed), so it is a bug to fix and a line for tests/corpus/.

Seeds: tests/corpus/*.ndjson (one seed per line). Run: ``make fuzz`` (FUZZ_SECONDS, default 60),
or ``python tests/atheris_validate.py -max_total_time=600 DIR``. Not collected by pytest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import atheris

from pipelines.config import load_config
from transforms.consent import consent_observation
from transforms.dedup import dedup_key, fingerprint
from transforms.envelope import pack, unpack
from transforms.identity import extract_identifiers, primary_profile_key
from transforms.pii import DEFAULT_RULES, apply_policies
from transforms.profile import TraitRules, empty_profile, fold_event, profile_row
from transforms.stitching import blocked_links, stitch_messages
from transforms.tracking_plan import compile_plan, load_plan
from transforms.validate import judge

REPO = Path(__file__).resolve().parent.parent
CONFIG = load_config(REPO / "schemas" / "configs" / "example.yaml")
PLAN = compile_plan(load_plan(REPO / "schemas" / "tracking_plans" / "example.yaml"))
SETTINGS = dict(
    max_event_bytes=CONFIG.validation.max_event_bytes,
    max_depth=CONFIG.validation.max_depth,
    max_future_skew_ms=3600_000,
    floor_ms=1420070400000,
    identity=CONFIG.identity,
)
MODES = (None, {"default": "omit"}, {"default": "allow"})
POLICIES = {"hashed": ({"email": "hash", "phone": "hash", "ip": "drop"}, "keep")}
RULES = TraitRules(frozenset({"first_plan"}), frozenset({"logins"}))


def one_input(data: bytes) -> None:
    if not data:
        return
    # The first byte picks the settings, the rest is the line (the seeds are laid out so).
    choice, line = data[0] & 7, data[1:].replace(b"\n", b" ")
    plan = PLAN if choice & 1 else None
    modes = MODES[(choice >> 1) % 3] if plan is not None else None
    env, _ = judge(
        ("web", "fuzz", line),
        plan,
        rule_modes=modes,
        clamp_event_time=bool(choice & 4),
        now_ms=int(time.time() * 1000),
        **SETTINGS,
    )
    if env is None:
        return
    identity = CONFIG.identity
    key = primary_profile_key(env.event, identity)
    assert key is not None, "a valid event without a profile key"
    assert unpack(pack(env)) == env
    dedup_key(env.source, env.event, CONFIG.dedup.key)
    fingerprint(env.event)
    stitch_messages(env.event, env.event_time_ms, identity)
    blocked_links(env.event, env.event_time_ms, identity)
    consent_observation(env.event)
    redacted = apply_policies(env.event, DEFAULT_RULES, POLICIES, "salt")["hashed"]
    profile = empty_profile()
    ids = extract_identifiers(redacted, identity)
    fold_event(profile, redacted, env.event_time_ms, ids, RULES)
    profile_row(key, profile)


def seed_corpus(directory: Path) -> None:
    """One seed file per line of the regression corpus (libFuzzer reads a directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in sorted((REPO / "tests" / "corpus").glob("*.ndjson")):
        for i, line in enumerate(f.read_bytes().split(b"\n")):
            if line.strip():
                (directory / f"{f.stem}-{i}").write_bytes(b"\x00" + line)


if __name__ == "__main__":
    args = sys.argv[1:]
    dirs = [a for a in args if not a.startswith("-")]
    if dirs:
        seed_corpus(Path(dirs[0]))
    # After the imports, not around them: the package is installed editable, through a custom
    # import loader that instrument_imports() does not see into.
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *args], one_input)
    atheris.Fuzz()
