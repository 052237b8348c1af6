"""PII classification and per-destination policy: keep, hash, drop; nothing raw leaks."""

from __future__ import annotations

import copy
import re

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from transforms.pii import (
    DEFAULT_RULES,
    EMAIL_PATTERN,
    PiiRule,
    apply_policies,
    apply_policy,
    find_pii,
    hash_value,
    needs_salt,
    require_salt,
    resolve_salt,
)

SALT = "test-salt"


def identify(**extra):
    event = {
        "type": "identify",
        "messageId": "m-1",
        "userId": "u-1",
        "traits": {"email": "Ada@Example.com", "phone": "+49 151 2345678", "plan": "pro"},
        "context": {"ip": "203.0.113.7", "traits": {"email": "ada@example.com"}},
        "properties": {"comment": "call me maybe", "price": 3},
    }
    event.update(extra)
    return event


def at(obj, path):
    """The value at a concrete path such as ``properties.items[0].email``."""
    for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        obj = obj[int(index)] if index else obj[key]
    return obj


def is_hash(value):
    return isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) is not None


# --- hashing and salt ---------------------------------------------------------------------------


def test_hash_is_deterministic_salted_and_strips():
    h = hash_value("a@b.com", SALT)
    assert is_hash(h)
    assert h == hash_value("a@b.com", SALT) == hash_value("  a@b.com\n", SALT)
    assert h != hash_value("a@b.com", "other-salt")
    assert h != hash_value("A@b.com", SALT)  # no lowercasing here: the caller normalises
    assert hash_value(4915123, SALT) == hash_value("4915123", SALT)
    assert is_hash(hash_value(10**30, SALT))
    assert hash_value({"b": 1, "a": 2}, SALT) == hash_value({"a": 2, "b": 1}, SALT)
    # Hashing a hash changes nothing: an already hashed trait keeps its value (joinable).
    assert hash_value(h, SALT) == h == hash_value(h, "other-salt")
    assert hash_value(h.upper(), SALT) != h.upper()  # only our exact form counts as hashed


def test_hash_needs_a_salt():
    with pytest.raises(ValueError, match="salt"):
        hash_value("a@b.com", "")


def test_resolve_salt_prefers_environment_and_never_shows_it():
    assert resolve_salt("from-config", environ={"CDI_PII_SALT": "from-env"}) == "from-env"
    assert resolve_salt("from-config", environ={}) == "from-config"
    assert resolve_salt(None, "MY_SALT", environ={"MY_SALT": "x"}) == "x"
    assert resolve_salt(None, environ={}, required=False) == ""
    with pytest.raises(ValueError, match="CDI_PII_SALT") as e:
        resolve_salt(None, environ={"CDI_PII_SALT": ""})
    assert "from-" not in str(e.value)


def test_require_salt_only_when_a_policy_hashes(monkeypatch):
    monkeypatch.delenv("CDI_PII_SALT", raising=False)
    assert require_salt(None, [{"email": "drop"}, {"ip": "keep"}]) == ""
    with pytest.raises(ValueError):
        require_salt(None, [{"email": "drop"}, {"ip": "hash"}])
    monkeypatch.setenv("CDI_PII_SALT", "s3cret")
    assert require_salt(None, [{"ip": "hash"}]) == "s3cret"
    assert needs_salt({}, default_action="hash")


# --- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pii_class": ""},
        {"pii_class": "x"},  # neither paths nor pattern
        {"pii_class": "x", "paths": ("a..b",)},
        {"pii_class": "x", "paths": "traits.email"},
        {"pii_class": "x", "pattern": "("},
        {"pii_class": "x", "paths": ("a",), "key_pattern": "phone"},
    ],
)
def test_bad_rules_are_refused(kwargs):
    with pytest.raises(ValueError):
        PiiRule(**kwargs)


def test_bad_policy_is_refused_and_empty_salt_fails_up_front():
    with pytest.raises(ValueError, match="unknown action"):
        apply_policy(identify(), DEFAULT_RULES, {"email": "mask"}, SALT)
    # Even an event without PII: a misconfiguration must not wait for the first email to show.
    with pytest.raises(ValueError, match="salt"):
        apply_policy({"type": "track"}, DEFAULT_RULES, {"email": "hash"}, "")


def test_default_rules_classify_the_usual_fields():
    found = dict(find_pii(identify(), DEFAULT_RULES))
    assert found == {
        "traits.email": "email",
        "traits.phone": "phone",
        "context.ip": "ip",
        "context.traits.email": "email",
        "properties.comment": "free_text",
    }


# --- keep / hash / drop -----------------------------------------------------------------------


def test_keep_hash_drop_per_class():
    event = identify()
    policy = {"email": "hash", "phone": "drop", "ip": "drop", "free_text": "keep"}
    out, applied = apply_policy(event, DEFAULT_RULES, policy, SALT)
    assert out["traits"]["email"] == hash_value("Ada@Example.com", SALT)
    assert out["context"]["traits"]["email"] == hash_value("ada@example.com", SALT)
    assert "phone" not in out["traits"] and "ip" not in out["context"]
    assert out["properties"] == {"comment": "call me maybe", "price": 3}
    assert out["traits"]["plan"] == "pro" and out["userId"] == "u-1"  # identifiers untouched
    assert sorted(applied) == sorted(
        [
            ("traits.email", "email", "hash"),
            ("traits.phone", "phone", "drop"),
            ("context.ip", "ip", "drop"),
            ("context.traits.email", "email", "hash"),
            ("properties.comment", "free_text", "keep"),
        ]
    )


def test_absent_class_uses_the_default_action():
    out, applied = apply_policy(identify(), DEFAULT_RULES, {"email": "keep"}, SALT, "drop")
    assert out["traits"] == {"email": "Ada@Example.com", "plan": "pro"}
    assert out["context"] == {"traits": {"email": "ada@example.com"}}
    assert ("context.ip", "ip", "drop") in applied


def test_input_is_never_mutated_and_output_shares_nothing():
    event = identify(properties={"items": [{"email": "x@y.io", "meta": {"k": 1}}]})
    before = copy.deepcopy(event)
    rules = (*DEFAULT_RULES, PiiRule("meta", ("properties.items.meta",)))
    out, _ = apply_policy(event, rules, {"email": "drop", "meta": "keep"}, SALT, "hash")
    assert event == before
    out["properties"]["items"][0]["meta"]["k"] = 2
    out["traits"]["new"] = 1
    assert event == before


# --- paths, wildcards and lists ---------------------------------------------------------------


def test_wildcard_and_list_paths_are_concrete_in_the_report():
    rules = (PiiRule("email", ("properties.*.email",)),)
    event = {
        "properties": {
            "billing": {"email": "b@x.io", "city": "Paris"},
            "items": [{"email": "i0@x.io"}, {"sku": "s"}, {"email": "i2@x.io"}],
            "email": "top-level is not one segment deeper",
        }
    }
    out, applied = apply_policy(event, rules, {"email": "hash"}, SALT)
    assert [p for p, _, _ in applied] == [
        "properties.billing.email",
        "properties.items[0].email",
        "properties.items[2].email",
    ]
    assert is_hash(out["properties"]["items"][2]["email"])
    assert out["properties"]["items"][1] == {"sku": "s"}
    assert out["properties"]["email"] == "top-level is not one segment deeper"


def test_classified_list_is_handled_item_by_item_and_dropped_items_become_none():
    rules = (PiiRule("email", ("traits.emails",)),)
    event = {"traits": {"emails": ["a@x.io", None, "b@x.io"]}}
    out, applied = apply_policy(event, rules, {"email": "drop"}, SALT)
    assert out == {"traits": {"emails": [None, None, None]}}
    assert applied == [("traits.emails[0]", "email", "drop"), ("traits.emails[2]", "email", "drop")]


def test_a_classified_object_is_hashed_or_dropped_whole():
    rules = (PiiRule("address", ("traits.address",)),)
    event = {"traits": {"address": {"street": "1 Main St", "city": "Springfield"}, "k": 1}}
    out, _ = apply_policy(event, rules, {"address": "hash"}, SALT)
    assert out["traits"]["address"] == hash_value(event["traits"]["address"], SALT)
    out, _ = apply_policy(event, rules, {"address": "drop"}, SALT)
    assert out == {"traits": {"k": 1}}


def test_first_path_rule_wins_and_a_pattern_adds_a_class():
    rules = (
        PiiRule("free_text", ("traits.notes",)),
        PiiRule("secret", ("traits.notes",)),
        PiiRule("email", pattern=EMAIL_PATTERN),
    )
    event = {"traits": {"notes": "write to a@b.com", "bio": "no address here"}}
    assert find_pii(event, rules) == [("traits.notes", "free_text"), ("traits.notes", "email")]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"free_text": "keep", "email": "hash"}, ("email", "hash")),
        ({"free_text": "drop", "email": "hash"}, ("free_text", "drop")),
        ({"free_text": "hash", "email": "hash"}, ("free_text", "hash")),  # tie: the path class
        ({"free_text": "keep", "email": "keep"}, ("free_text", "keep")),
    ],
)
def test_the_strictest_action_of_a_values_classes_wins(policy, expected):
    # Keeping free text must not let an email through when emails are hashed.
    event = {"traits": {"notes": "write to a@b.com"}}
    out, applied = apply_policy(event, DEFAULT_RULES, policy, SALT)
    assert applied == [("traits.notes", *expected)]
    if expected[1] == "hash":
        assert out["traits"]["notes"] == hash_value("write to a@b.com", SALT)


def test_a_kept_object_is_still_looked_into():
    rules = (PiiRule("address", ("traits.address",)), *DEFAULT_RULES)
    event = {"traits": {"address": {"city": "Springfield", "contact": "a@b.com"}}}
    out, applied = apply_policy(event, rules, {"address": "keep", "email": "drop"}, SALT)
    assert out == {"traits": {"address": {"city": "Springfield"}}}
    assert applied == [
        ("traits.address", "address", "keep"),
        ("traits.address.contact", "email", "drop"),
    ]


# --- patterns ---------------------------------------------------------------------------------


def test_pattern_catches_an_email_in_an_unexpected_place_and_treats_the_whole_value():
    event = identify(properties={"note": "mail me at a@b.com", "tags": ["x", "or c.d@e.org"]})
    assert ("properties.note", "email") in find_pii(event, DEFAULT_RULES)
    out, applied = apply_policy(event, DEFAULT_RULES, {"email": "hash"}, SALT)
    assert out["properties"]["note"] == hash_value("mail me at a@b.com", SALT)
    assert out["properties"]["tags"] == ["x", hash_value("or c.d@e.org", SALT)]
    assert ("properties.tags[1]", "email", "hash") in applied
    out, _ = apply_policy(event, DEFAULT_RULES, {"email": "drop"}, SALT)
    assert "note" not in out["properties"] and out["properties"]["tags"] == ["x", None]


def test_phone_pattern_only_under_phone_like_keys():
    event = {
        "properties": {
            "mobileNumber": "+44 (20) 7946-0958",
            "contact_phone": 4915123456789,
            "orderDate": "2026-11-01",  # looks like digits and dashes, is not a phone
            "order_id": "1234567890",
            "phone_verified": True,
            "fax": "12-34",  # too few digits
        }
    }
    assert find_pii(event, DEFAULT_RULES) == [
        ("properties.mobileNumber", "phone"),
        ("properties.contact_phone", "phone"),
    ]


def test_ip_pattern_only_under_ip_like_keys():
    event = {
        "context": {"app": {"version": "1.2.3.4"}},
        "properties": {"client_ip": "10.0.0.1", "remoteIp": "2001:db8::1", "zip": "12345"},
    }
    assert find_pii(event, DEFAULT_RULES) == [
        ("properties.client_ip", "ip"),
        ("properties.remoteIp", "ip"),
    ]


def test_email_pattern_is_linear_on_long_values():
    # Without the lookbehind this takes seconds (quadratic backtracking).
    event = {"properties": {"blob": "a" * 32_000, "dots": "a." * 16_000 + "@x"}}
    assert find_pii(event, DEFAULT_RULES) == []


# --- nothing raw leaks ------------------------------------------------------------------------

_KEYS = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
_EMAILS = st.builds(
    lambda user, domain, tld: f"{user}@{domain}.{tld}",
    st.text("abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=12),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10),
    st.text("abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=5),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),  # what orjson decodes
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


@st.composite
def events_with_emails(draw):
    email = draw(_EMAILS)
    # Some values carry the address, alone or inside text: anywhere in the tree.
    with_email = st.one_of(
        st.just(email),
        st.builds(lambda a, b: f"{a}{email}{b}", st.text(max_size=10), st.text(max_size=10)),
    )
    leaves = st.one_of(_SCALARS, with_email)
    tree = st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=4)
        ),
        max_leaves=20,
    )
    body = draw(st.dictionaries(_KEYS, tree, max_size=5))
    event = {
        "type": "identify",
        "messageId": "m-1",
        "traits": {"email": email, "other": draw(tree)},
        "properties": body,
    }
    return event, email


@settings(max_examples=200, deadline=None)
@given(events_with_emails(), st.sampled_from(["hash", "drop"]))
def test_no_raw_email_survives_a_hash_or_drop_policy(case, action):
    event, email = case
    before = orjson.dumps(event)
    out, _ = apply_policy(event, DEFAULT_RULES, {"email": action}, SALT)
    assert orjson.dumps(event) == before
    assert email.encode() not in orjson.dumps(out)
    for path, cls in find_pii(out, DEFAULT_RULES):
        if cls == "email":
            assert is_hash(at(out, path)), path


@settings(max_examples=200, deadline=None)
@given(
    events_with_emails(),
    st.sampled_from(["keep", "hash", "drop"]),
    st.sampled_from(["keep", "hash", "drop"]),
)
def test_several_policies_at_once_equal_one_policy_at_a_time(case, email_action, default):
    event, _ = case
    event["context"] = {
        "ip": "10.1.2.3",
        "traits": {"phone": "+1 555 0100", "email": event["traits"]["email"]},
    }
    policies = {
        "a": ({"email": email_action}, default),
        "b": ({"email": "keep", "ip": "drop"}, "hash"),
        "c": ({}, "keep"),
    }
    before = orjson.dumps(event)
    out = apply_policies(event, DEFAULT_RULES, policies, SALT)
    assert orjson.dumps(event) == before
    for name, (policy, dflt) in policies.items():
        assert out[name] == apply_policy(event, DEFAULT_RULES, policy, SALT, dflt)[0], name


@pytest.mark.parametrize("address_action", ["keep", "hash", "drop"])
def test_several_policies_treat_classified_objects_and_lists_like_one_policy(address_action):
    rules = (PiiRule("address", ("traits.address",)), *DEFAULT_RULES)
    event = {
        "traits": {
            "address": {"city": "Springfield", "contact": "a@b.com", "tags": ["x", "c@d.io"]},
            "emails": ["e@f.org", 3, None],
        }
    }
    policies = {"p": ({"address": address_action, "email": "drop"}, "keep")}
    out = apply_policies(event, rules, policies, SALT)["p"]
    assert out == apply_policy(event, rules, *policies["p"][:1], SALT, "keep")[0]


# --- the compiled redaction equals one policy at a time, for any event ---------------------------

_leaf = st.one_of(
    st.sampled_from(["a@b.com", "call +1 (555) 010-9999", "10.0.0.1", "plain", "", "1.2.3.4"]),
    st.integers(-5, 10**9),
    st.booleans(),
    st.none(),
)
_key = st.sampled_from(["email", "phone", "ip", "notes", "name", "items", "x", "clientIp"])
_tree = st.recursive(
    _leaf,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(_key, kids, max_size=4)),
    max_leaves=12,
)
_section = st.sampled_from(["traits", "properties", "context", "other"])
_action = st.sampled_from(["keep", "hash", "drop"])


@settings(max_examples=300, deadline=None)
@given(
    event=st.dictionaries(_section, st.dictionaries(_key, _tree, max_size=4), max_size=4),
    policies=st.dictionaries(
        st.sampled_from(["d1", "d2", "d3"]),
        st.tuples(
            st.dictionaries(st.sampled_from(["email", "phone", "ip", "free_text"]), _action),
            _action,
        ),
        min_size=1,
    ),
)
def test_redaction_equals_each_policy_alone_and_never_mutates(event, policies):
    from transforms.pii import Redaction

    before = orjson.dumps(event)
    redaction = Redaction(DEFAULT_RULES, policies, SALT)
    out = redaction.apply(event)
    again = redaction.apply(event, names=sorted(policies))  # memos warm: the same answer
    assert orjson.dumps(event) == before
    for name, (policy, default) in policies.items():
        expected = apply_policy(event, DEFAULT_RULES, policy, SALT, default)[0]
        assert out[name] == expected, name
        assert again[name] == expected, name


_OBJECT_RULES = (
    *DEFAULT_RULES,
    PiiRule("address", paths=("context.address",)),  # an ancestor object with a class
    PiiRule("device", paths=("context.*.id",)),
)


@settings(max_examples=300, deadline=None)
@example("context.address.email", "Ada@Example.com", _OBJECT_RULES, {"address": "hash"}, "keep")
@example("context.address.id", "d-1", _OBJECT_RULES, {"address": "drop"}, "keep")
@example("context.device.id", "d-1", _OBJECT_RULES, {"device": "hash"}, "keep")
@given(
    path=st.lists(
        st.sampled_from(["traits", "context", "address", "email", "id", "ip"]),
        min_size=1,
        max_size=4,
    ).map(".".join),  # fmt: skip
    value=st.one_of(
        st.sampled_from(["Ada@Example.com", "+49 151 2345678", "203.0.113.7", "u-1", ""]),
        st.text(max_size=12),
    ),
    rules=st.sampled_from([DEFAULT_RULES, _OBJECT_RULES]),
    policy=st.dictionaries(
        st.sampled_from(["email", "phone", "ip", "address", "device", "free_text"]), _action
    ),
    default=_action,
)
def test_one_value_at_a_path_is_redacted_as_a_whole_event_would_be(
    path, value, rules, policy, default
):
    """The identifier redactor's shortcut (no event built, no walk) equals apply_policy on an
    event holding only that value, ancestors with a class of their own included."""
    from transforms.pii import PathRedactor

    event: dict = {}
    node = event
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    out = apply_policy(event, rules, policy, SALT, default)[0]
    for part in path.split("."):
        out = out.get(part) if isinstance(out, dict) else None
    redactor = PathRedactor(rules, policy, default, SALT)
    assert redactor(path, value) == out
    assert redactor(path, value) == out  # the path's plan memoized: the same answer
