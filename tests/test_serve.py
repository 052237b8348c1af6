"""The lookup API (`cdi serve`) and `cdi profile get` over each store: profiles by any identifier,
ETag from the version, 404 for absent and deleted persons, health and metrics."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import orjson
import pytest

from tests.conftest import config_from
from tests.test_profile_stores import row, tomb, write

CONFIG = config_from(
    """
sources: [{name: web, format: ndjson}]
pii: {salt: serve-salt}
sinks: {profiles: {pii: {email: hash}}}
"""
)


def hashed(email: str) -> str:
    from pipelines.lookup import lookup_key

    return lookup_key(f"email:{email}", CONFIG).split(":", 1)[1]


@pytest.fixture
def client(store_spec):
    from starlette.testclient import TestClient

    from pipelines.serve import create_app

    write(
        store_spec,
        [
            row(
                "user:u1", 7, "user_id:u1", "anonymous_id:a1", f"email:{hashed('jane@example.com')}"
            ),
            row("user:u2", 3, "user_id:u2"),
        ],
    )
    with TestClient(create_app(store_spec, CONFIG, pool_size=2)) as c:
        c.spec = store_spec
        yield c


def test_a_profile_by_any_of_its_identifiers(client):
    for ident in ("user:u1", "anon:a1", "anonymous_id:a1", "email:Jane@Example.com", "user_id:u1"):
        r = client.get(f"/v1/profiles/{ident}")
        assert r.status_code == 200, ident
        body = r.json()
        assert body["profile_id"] == "user:u1" and body["version"] == 7
        assert body["updated_at"] == "2026-11-01T00:00:00.000Z"
        assert r.headers["etag"] == '"7"'
    assert "jane@example.com" not in r.text  # stored, and so served, hashed


def test_etag_answers_304_until_the_profile_changes(client):
    r = client.get("/v1/profiles/user:u2", headers={"If-None-Match": '"3"'})
    assert r.status_code == 304 and r.content == b""
    write(client.spec, [row("user:u2", 4, "user_id:u2")])
    r = client.get("/v1/profiles/user:u2", headers={"If-None-Match": '"3"'})
    assert r.status_code == 200 and r.headers["etag"] == '"4"'


def test_absent_and_deleted_persons_are_404(client):
    assert client.get("/v1/profiles/email:nobody@example.com").status_code == 404
    write(client.spec, [tomb("user:u1", 9)])
    for ident in ("user:u1", "anon:a1", "email:jane@example.com"):
        r = client.get(f"/v1/profiles/{ident}")
        assert r.status_code == 404 and r.json() == {"error": "not_found"}


def test_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok", "store": client.spec.type}
    client.get("/v1/profiles/user:u1")
    client.get("/v1/profiles/user:nobody")
    text = client.get("/metrics").text
    assert 'cdi_lookup_requests_total{route="profile",status="200"} 1.0' in text
    assert 'cdi_lookup_requests_total{route="profile",status="404"} 1.0' in text
    assert "cdi_lookup_seconds_count 2.0" in text


def test_health_says_503_when_the_store_is_gone(tmp_path):
    from starlette.testclient import TestClient

    from pipelines.serve import create_app
    from transforms.profile_store import StoreSpec

    spec = StoreSpec("postgres", url="postgresql://cdi@127.0.0.1:1/none?connect_timeout=1")
    with TestClient(create_app(spec, CONFIG)) as c:
        r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"


# --- the real commands --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_cdi_serve_and_profile_get_as_processes(tmp_path, workers):
    from transforms.profile_store import StoreSpec

    db = tmp_path / "profiles.sqlite"
    write(StoreSpec("sqlite", path=str(db)), [row("user:u1", 7, "user_id:u1", "anonymous_id:a1")])

    got = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "profile", "get", "anon:a1", "--sink", str(db)],
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0 and orjson.loads(got.stdout)["profile_id"] == "user:u1"
    missing = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "profile", "get", "anon:zz", "--sink", str(db)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and missing.stdout == ""

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "serve",
            "--sink",
            str(db),
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):  # readiness, not timing: wait until it answers or exits
            try:
                urllib.request.urlopen(f"{base}/healthz")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                time.sleep(0.1)
        if workers > 1:  # the supervisor runs its workers as child processes
            children = subprocess.run(
                ["pgrep", "-P", str(server.pid)], capture_output=True, text=True
            ).stdout.split()
            assert len(children) >= workers
        with urllib.request.urlopen(f"{base}/v1/profiles/user%3Au1") as r:
            assert orjson.loads(r.read())["version"] == 7 and r.headers["ETag"] == '"7"'
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/v1/profiles/user:nobody")
        assert e.value.code == 404
    finally:
        server.terminate()
        server.wait(30)
