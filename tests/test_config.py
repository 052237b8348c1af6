import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.config import (
    ConfigError,
    Duration,
    load_config,
    load_default_config,
    parse_instant,
)
from tests.conftest import PLAN, REPO, config_from

CONFIGS = REPO / "schemas" / "configs"


@pytest.mark.parametrize(
    "name, plan",
    [
        ("default.yaml", None),
        ("example.yaml", "example"),
        ("minimal.yaml", "default"),
        ("reference.yaml", "default"),
    ],
)
def test_shipped_configs_parse(name, plan):
    cfg = load_config(CONFIGS / name)
    assert cfg.sources[0].name == "web"
    assert cfg.dedup.ttl == 7 * 86400
    assert cfg.sources[0].tracking_plan == plan
    if plan is not None:
        assert cfg.resolve(cfg.tracking_plans[plan].path).is_file()
    else:
        assert cfg.tracking_plans == {}  # the embedded default is plan-less


def test_reference_config_documents_every_key():
    """Every dataclass field appears as a key in the reference config (the docs stay complete)."""
    import dataclasses

    from pipelines import config as c

    text = (CONFIGS / "reference.yaml").read_text()
    classes = [
        c.PipelineConfig, c.SourceConfig, c.TrackingPlanRef, c.ValidationConfig, c.EventTimeConfig,
        c.DedupConfig, c.WindowsConfig, c.IdentityConfig, c.IdentifierType, c.DestinationConfig,
        c.ConsentConfig, c.AudienceConfig, c.SinksConfig, c.ProfileSinkConfig, c.ProfileStoreConfig,
        c.DeliveryConfig, c.KafkaDeliveryConfig, c.WebhookConfig, c.PubSubDeliveryConfig,
        c.TriggerConfig, c.PaneTriggerConfig, c.ArchiveConfig,
        c.KafkaSourceConfig,
    ]  # fmt: skip
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("internal"):
                assert f"{f.name}:" in text or f"{f.name}: " in text or "{name: " in text, f.name
                assert f.name in text, f"{cls.__name__}.{f.name} is not documented"


def test_default_config_is_package_data():
    cfg = load_default_config()
    assert Path(cfg.resolve(cfg.sources[0].paths[0])).is_file()
    assert str(REPO) in str(cfg.resolve(cfg.sources[0].paths[0])) or "site-packages" in str(
        cfg.base_dir
    )


@pytest.mark.parametrize(
    "text",
    [
        "sources: [{name: web}]\ntracking_plans: {default: {path: ../tracking_plans/example.yaml}}\ndedupe: {ttl: 1d}",
    ],
)
def test_unknown_top_level_key_suggests_nearest(text):
    with pytest.raises(ConfigError) as e:
        config_from(text)
    assert e.value.problems == ["test.yaml: dedupe: unknown key; did you mean 'dedup'?"]


def _base(extra: str) -> str:
    return (
        "sources: [{name: web}]\ntracking_plans: {default: {path: ../tracking_plans/example.yaml}}\n"
        + extra
    )


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("dedup: {tll: 1d}", "test.yaml: dedup.tll: unknown key; did you mean 'ttl'?"),
        (
            "dedup: {ttl: 7 days}",
            "test.yaml: dedup.ttl: malformed duration '7 days' (expected a number and a unit, e.g. 500ms, 30s, 10m, 2h, 7d, 1h30m)",
        ),
        ("dedup: {ttl: 30}", "test.yaml: dedup.ttl: duration needs a unit, e.g. '30s' or '30m'"),
        (
            "validation: {max_event_bytes: big}",
            "test.yaml: validation.max_event_bytes: expected int, got str 'big'",
        ),
        (
            "validation: {max_event_bytes: -1}",
            "test.yaml: validation: max_event_bytes must be positive",
        ),
        (
            "event_time: {on_invalid: clip}",
            "test.yaml: event_time.on_invalid: must be one of 'quarantine', 'clamp', got 'clip'; did you mean 'clamp'?",
        ),
        (
            "event_time: {min_event_time: yesterday}",
            "test.yaml: event_time: min_event_time 'yesterday' is not an ISO 8601 instant",
        ),
        (
            "identity: {blocklist_patterns: ['(']}",
            "test.yaml: identity: blocklist_patterns: '(' is not a valid regex: missing ), unterminated subpattern at position 0",
        ),
        (
            "consent: {destinations: {crm: {purposes: [sales]}}}",
            "test.yaml: consent.destinations.crm.purposes[0]: unknown purpose 'sales'; declared purposes: analytics, marketing, advertising",
        ),
        (
            "sinks: {profiles: {type: mongo}}",
            "test.yaml: sinks.profiles.type: must be one of 'sqlite', 'postgres', 'redis', 'bigquery', got 'mongo'",
        ),
        (
            "sinks: {profiles: {type: postgres}}",
            "test.yaml: sinks.profiles: url: a postgres store needs a url",
        ),
        (
            "sinks: {profiles: {also: [{type: redis, url: 'redis://h', batch_size: 0}]}}",
            "test.yaml: sinks.profiles.also[0]: batch_size: must be at least 1",
        ),
        ("audiences: [{name: a}]", "test.yaml: audiences[0].when: required key is missing"),
        (
            "identity: {max_hops: 5}",
            "test.yaml: identity.max_hops: replaced by `rounds` (default 16): stitching now finds "
            "whole identifier graphs up to chains of ~2 ** (rounds - 4) identifiers, where "
            "max_hops stopped at max_hops links; delete it",
        ),
        ("identity: {rounds: 1}", "test.yaml: identity: rounds: must be between 2 and 30"),
        (
            "profile: {update_every: 0s}",
            "test.yaml: profile: update_every: must be positive (or null: on every change)",
        ),
        (
            "computed_traits: [{name: s, aggregate: count, window: {type: session, gap: 30m}, "
            "trigger: {accumulation: discarding}}]",
            "test.yaml: computed_traits[0]: discarding panes cannot follow session windows "
            "(sessions merge); use accumulating",
        ),
        (
            "consent: {destinations: {crm: {delivery: {type: kafka}}}}",
            "test.yaml: consent.destinations.crm.delivery: kafka: a delivery of type kafka needs its `kafka` section",
        ),
    ],
)
def test_each_config_error_is_one_precise_line(extra, expected):
    with pytest.raises(ConfigError) as e:
        config_from(_base(extra))
    assert e.value.problems == [expected]


def test_the_reference_configs_commented_examples_parse():
    """The examples the reference config shows commented out are valid as written (a computed
    trait's pane trigger was once read as an activation trigger and refused)."""
    text = (CONFIGS / "reference.yaml").read_text()
    block = text.split("computed_traits: []\n", 1)[1].split("\n\n", 1)[0]
    example = "\n".join(line.replace("  # ", "  ", 1) for line in block.splitlines())
    cfg = config_from(_base("computed_traits:\n" + example + "\n"))
    (trait,) = cfg.computed_traits
    assert trait.name == "revenue_30d" and trait.window.type == "sliding"
    assert trait.trigger.early == Duration.parse("1m") and trait.trigger.late
    assert trait.trigger.accumulation == "accumulating"


def test_missing_tracking_plan_file_and_unknown_plan_reference():
    text = "sources: [{name: web, tracking_plan: defualt}]\ntracking_plans: {default: {path: nope.yaml}}"
    with pytest.raises(ConfigError) as e:
        config_from(text)
    assert any("tracking_plans.default.path: file not found" in p for p in e.value.problems)
    assert any(
        "sources[0].tracking_plan: no tracking plan named 'defualt'" in p
        and "did you mean 'default'?" in p
        for p in e.value.problems
    )


def test_wrong_types_and_missing_required():
    with pytest.raises(ConfigError) as e:
        config_from("sources: web\n")
    assert e.value.problems == ["test.yaml: sources: expected a list, got str 'web'"]


def test_duration_parse():
    assert Duration.parse("1h30m") == 5400
    assert Duration.parse("500ms") == 0.5
    assert Duration.parse("7d") == 604800
    for bad in ("", "7", "d", "1 week", "-1s", "1y"):
        with pytest.raises(ValueError):
            Duration.parse(bad)


def test_validate_config_cli_exit_codes(tmp_path, capsys):
    assert main(["validate-config", str(CONFIGS / "reference.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        _base("windows: {allowed_latenes: 2d}").replace(
            "../tracking_plans", str(REPO / "schemas/tracking_plans")
        )
    )
    assert main(["validate-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: windows.allowed_latenes: unknown key; did you mean 'allowed_lateness'?" in err
    assert main(["validate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_bad_tracking_plan_is_a_config_error(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nevents:\n  X:\n    properties: {type: objekt}\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources: [{name: web}]\ntracking_plans: {default: {path: plan.yaml}}\n")
    assert main(["validate-config", str(cfg)]) == 2
    assert "invalid JSON Schema" in capsys.readouterr().err


def test_run_with_bad_config_exits_2_without_starting(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources: [{name: web}]\ntracking_plans: {default: {path: nope.yaml}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "--config", str(cfg), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "tracking_plans.default.path: file not found" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_run_with_unmatched_input_exits_2(tmp_path, capsys):
    assert (
        main(["run", "--input", str(tmp_path / "none-*.ndjson"), "--output", str(tmp_path / "o")])
        == 2
    )
    assert "no file matches" in capsys.readouterr().err


def test_unquoted_yaml_instants_are_instants():
    """YAML reads ``2015-01-01`` and ``2024-01-01T00:00:00Z`` as dates and datetimes; the keys
    that take an instant take them as written (naive YAML times are UTC)."""
    cfg = config_from(
        _base(
            "event_time: {min_event_time: 2015-01-01}\n"
            "sources: [{name: web}, {name: k, type: kafka, kafka: {topics: [t], bootstrap_servers: h, "
            "start: 2024-01-01T00:00:00Z, stop: 2024-01-02 00:00:00}}]\n"
        ).replace("sources: [{name: web}]\n", "", 1)
    )
    assert cfg.event_time.min_event_time == "2015-01-01"
    kafka = cfg.sources[1].kafka
    assert parse_instant(kafka.start) == parse_instant("2024-01-01T00:00:00Z")
    assert parse_instant(kafka.stop) == parse_instant("2024-01-02T00:00:00Z")


def test_a_hashing_policy_without_a_salt_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CDI_PII_SALT", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "sources: [{name: web, paths: [events.ndjson]}]\n"
        "consent: {purposes: [marketing], destinations: {crm: {purposes: [marketing], "
        "pii: {email: hash}}}}\n"
    )
    (tmp_path / "events.ndjson").write_text("{}\n")
    expected = f"config error: {cfg}: pii.salt: a PII policy hashes values but no salt is set"
    assert main(["validate-config", str(cfg)]) == 2
    assert expected in capsys.readouterr().err
    out = tmp_path / "out"
    (out / "duplicates").mkdir(parents=True)
    assert main(["run", "--config", str(cfg), "--output", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert (out / "duplicates").is_dir()  # nothing ran, nothing of an earlier run removed
    monkeypatch.setenv("CDI_PII_SALT", "s3cret")
    assert main(["validate-config", str(cfg)]) == 0


def test_a_source_without_input_names_the_file_and_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources: [{name: web}]\n")
    assert main(["run", "--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (
        f"config error: {cfg}: sources[0].paths: no input given (set paths or pass --input)" in err
    )


def test_unknown_subcommand_exits_2(capsys):
    assert main(["frobnicate"]) == 2


def test_validate_config_says_which_sources_have_no_plan(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "sources: [{name: web}, {name: app, tracking_plan: p}]\n"
        f"tracking_plans: {{p: {{path: {PLAN}}}, spare: {{path: {PLAN}}}}}\n"
    )
    assert main(["validate-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "source 'web': no tracking plan" in out
    assert "source 'app': tracking plan 'p'" in out
    assert "tracking plan 'spare': not used by any source" in out


def test_violations_need_a_plan():
    with pytest.raises(ConfigError) as e:
        config_from("sources: [{name: web, violations: {default: allow}}]\n")
    assert e.value.problems == [
        "test.yaml: sources[0].violations: the source has no tracking_plan, "
        "so there are no plan rules to relax"
    ]


@pytest.mark.parametrize("name", ["profiles", "fragments", "consent_denied", "deleted", "failed"])
def test_a_destination_named_like_an_output_of_the_job_is_refused(name):
    """The per-person stage tags each destination's records with its name, beside its own
    outputs: a destination named like one of them would take its records."""
    text = f"sources: [{{name: web}}]\nconsent: {{destinations: {{{name}: {{purposes: [analytics]}}}}}}"
    with pytest.raises(ConfigError) as e:
        config_from(text)
    assert any(f"'{name}' is reserved" in p for p in e.value.problems), e.value.problems
