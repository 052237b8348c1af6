"""Shared fixtures. Pipelines in tests run on the offline in-process runner (never Prism)."""

from __future__ import annotations

from pathlib import Path

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines.config import IdentityConfig, load_config_text
from runners.local import runner_flag

REPO = Path(__file__).resolve().parent.parent
PLAN = REPO / "schemas" / "tracking_plans" / "example.yaml"


# Keyword arguments of transforms.validate.judge for tests: defaults, generous size limit.
JUDGE_SETTINGS = dict(
    max_event_bytes=100_000,
    max_depth=16,
    max_future_skew_ms=3600_000,
    floor_ms=0,
    identity=IdentityConfig(),
)


def make_pipeline(streaming: bool = False) -> TestPipeline:
    runner = runner_flag("local-streaming" if streaming else "local")
    args = ["--streaming"] if streaming else []
    return TestPipeline(runner=runner, options=None, argv=args, blocking=True)


@pytest.fixture
def pipeline():
    return make_pipeline


def config_from(text: str, base_dir: Path | None = None):
    return load_config_text(text, "test.yaml", base_dir or REPO / "schemas" / "configs")


@pytest.fixture
def default_config():
    return config_from(
        """
sources: [{name: web, paths: [], tracking_plan: default}]
tracking_plans: {default: {path: ../tracking_plans/example.yaml}}
"""
    )


def event(**kw):
    """A valid track event, overridable field by field (None removes a field)."""
    base = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": "m-1",
        "anonymousId": "anon-1",
        "properties": {"product_id": "p-1", "price": 9.5, "currency": "EUR"},
        "originalTimestamp": "2026-11-01T10:00:00.000Z",
        "sentAt": "2026-11-01T10:00:05.000Z",
        "receivedAt": "2026-11-01T10:00:35.000Z",
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


# --- the whole job on a file, for robustness and fuzz tests ------------------------------------


def run_job(tmp_path: Path, lines: list[bytes], config, bounded: bool = True, options=None) -> dict:
    """Run ``build`` + ``write_outputs`` over ``lines`` (raw bytes, one event each) on the local
    runner (or with ``options``, a list of Beam flags: another runner); ``bounded=False`` runs
    the streaming stages over the finite input, ``bounded="planned"`` one pass of a planned run
    (pipelines/passes.py: each connected part settled in one call). Returns the run report
    (counters, accounting) and every output's records and profile rows."""
    import orjson

    from pipelines import governed_profiles as job
    from pipelines.report import build_report, counters

    planned = bounded == "planned"
    out = tmp_path / ("planned" if planned else "bounded" if bounded else "streaming")
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "input.ndjson"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    if options is None:
        p = make_pipeline()
    else:
        from apache_beam.options.pipeline_options import PipelineOptions

        p = TestPipeline(options=PipelineOptions(options), blocking=True)
    inputs = {config.sources[0].name: [str(src)]}
    if planned:
        from pipelines.passes import plan_passes

        plan = plan_passes(config, inputs, None, tmp_path / "plan", balanced=1)
        (files,) = plan.files
        built = job.build(
            p, config, {}, True, archive_globs=files, now_ms=plan.now_ms, by_part=True
        )
    else:
        built = job.build(p, config, inputs, bounded)
    job.write_outputs(built, config, out)
    result = p.run()
    result.wait_until_finish()
    paths = job.output_paths(config, out)
    report = build_report(counters(result), paths, 0.0)

    def records(directory: Path) -> list[dict]:
        return [
            orjson.loads(line)
            for f in sorted(directory.glob("**/part-*"))
            for line in f.read_bytes().splitlines()
        ]

    written = [name for name in job.OUTPUTS if name not in (job.PROFILES, job.VALID)]
    outputs = {name: records(paths[name]) for name in written}
    outputs["destinations"] = {
        d: records(paths[job.DESTINATIONS] / d) for d in config.consent.destinations
    }
    rows = {}
    if paths[job.PROFILES].exists():
        import sqlite3

        with sqlite3.connect(paths[job.PROFILES]) as conn:
            conn.row_factory = sqlite3.Row
            rows = {r["profile_id"]: dict(r) for r in conn.execute("SELECT * FROM profiles")}
    return {"report": report, "outputs": outputs, "rows": rows}


# --- local services (infra/local/services.sh) --------------------------------------------------

SERVICE_DEFAULTS = {
    "CDI_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
    "CDI_POSTGRES_URL": "postgresql://cdi@127.0.0.1:55432/cdi",
    "CDI_REDIS_URL": "redis://127.0.0.1:56379/0",
}


def service_address(variable: str) -> str:
    import os

    return os.environ.get(variable) or SERVICE_DEFAULTS[variable]


def service_unavailable(reason: str, fix: str = "start it with `make services`") -> None:
    """Skip with a one-line reason; with CDI_REQUIRE_SERVICES=1 (CI) fail instead: CI must never
    pass by skipping an integration test."""
    import os

    message = f"{reason} ({fix})"
    if os.environ.get("CDI_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service unavailable: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def postgres_url():
    """A PostgreSQL URL whose search_path is a fresh schema (dropped after the test)."""
    import uuid
    from urllib.parse import quote

    psycopg = pytest.importorskip("psycopg")
    url = service_address("CDI_POSTGRES_URL")
    try:
        admin = psycopg.connect(url, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError:
        service_unavailable(f"no PostgreSQL at {url}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


@pytest.fixture
def redis_url():
    """A Redis URL on a database emptied before the test (db 1: the tests' own)."""
    redis = pytest.importorskip("redis")
    base = service_address("CDI_REDIS_URL")
    url = base.rsplit("/", 1)[0] + "/1" if base.count("/") >= 3 else base + "/1"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    except redis.ConnectionError:
        service_unavailable(f"no Redis at {base}")
    yield url
    client.close()


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def store_spec(request, tmp_path):
    """Each profile store the project writes, on its real server."""
    from transforms.profile_store import StoreSpec

    if request.param == "sqlite":
        return StoreSpec("sqlite", path=str(tmp_path / "profiles.sqlite"))
    url = request.getfixturevalue(f"{request.param}_url")
    return StoreSpec(request.param, url=url)
