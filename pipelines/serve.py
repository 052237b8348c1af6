"""`cdi serve`: the profile lookup API over a profile store (Starlette on uvicorn).

    GET /v1/profiles/{identifier}   200 the profile (JSON; ``version``, ``updated_at``; ETag
                                    ``"<version>"``, 304 on If-None-Match), 404 when absent
    GET /healthz                    200 when the store answers, else 503
    GET /metrics                    Prometheus text: requests by route and status, latency

The identifier is read as `cdi profile get` reads it (pipelines/lookup.py: normalized, then the
profile store's PII policy). Profiles are served as stored, i.e. already under that policy; a
deleted or merged-away person is a tombstone in the store and is never served. Reads go through
the store's pooled async reader. No access log per request (identifiers are PII).
"""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager

import orjson

from pipelines.config import PipelineConfig
from pipelines.lookup import KeyMaker, get_profile_async
from transforms.profile_store import StoreSpec, open_reader


def create_app(spec: StoreSpec, config: PipelineConfig, pool_size: int = 8):
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    registry = CollectorRegistry()
    requests = Counter(
        "cdi_lookup_requests", "Requests by route and status", ["route", "status"],
        registry=registry,
    )  # fmt: skip
    latency = Histogram(
        "cdi_lookup_seconds",
        "Profile lookup latency in the server",
        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        registry=registry,
    )
    key_of = KeyMaker(config)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["reader"] = open_reader(spec, pool_size)
        try:
            yield
        finally:
            await state["reader"].aclose()

    def json(body, status: int, headers: dict | None = None) -> Response:
        return Response(orjson.dumps(body), status, headers, media_type="application/json")

    async def profile(request):
        started = time.perf_counter()
        found = await get_profile_async(state["reader"], key_of(request.path_params["identifier"]))
        latency.observe(time.perf_counter() - started)
        if found is None:
            requests.labels("profile", "404").inc()
            return json({"error": "not_found"}, 404)
        etag = f'"{found["version"]}"'
        if request.headers.get("if-none-match") == etag:
            requests.labels("profile", "304").inc()
            return Response(status_code=304, headers={"ETag": etag})
        requests.labels("profile", "200").inc()
        return json(found, 200, {"ETag": etag, "Cache-Control": "no-cache"})

    async def health(request):
        try:
            ok = await state["reader"].ping()
        except Exception as e:  # the store is down: say so, do not crash the server
            requests.labels("health", "503").inc()
            return json(
                {"status": "unavailable", "store": spec.type, "error": type(e).__name__}, 503
            )
        requests.labels("health", "200").inc()
        return json({"status": "ok" if ok else "unavailable", "store": spec.type}, 200)

    async def metrics(request):
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/v1/profiles/{identifier:path}", profile),
            Route("/healthz", health),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )


_ENV = "CDI_SERVE"


def app_from_env():
    """The app of one worker process (``--workers N``): uvicorn imports this factory in each
    worker, which reads what to serve from the environment the parent set."""
    from pipelines.config import load_config, load_default_config

    settings = orjson.loads(os.environ[_ENV])
    config = load_config(settings["config"]) if settings["config"] else load_default_config()
    return create_app(StoreSpec(**settings["spec"]), config, settings["pool"])


def serve(
    spec: StoreSpec,
    config: PipelineConfig,
    host: str,
    port: int,
    pool_size: int,
    workers: int = 1,
    config_path: str | None = None,
) -> None:
    """One process, or ``workers`` processes on one socket (uvicorn's supervisor); each worker
    has its own connection pool of ``pool_size``."""
    import dataclasses

    import uvicorn

    print(
        f"cdi serve: {spec.type} store {spec.describe()} on http://{host}:{port}"
        f" ({workers} worker{'s' if workers > 1 else ''})",
        flush=True,
    )
    common = {"host": host, "port": port, "access_log": False, "log_level": "warning"}
    if workers <= 1:
        uvicorn.run(create_app(spec, config, pool_size), **common)
        return
    os.environ[_ENV] = orjson.dumps(
        {"spec": dataclasses.asdict(spec), "config": config_path, "pool": pool_size}
    ).decode()
    uvicorn.run("pipelines.serve:app_from_env", factory=True, workers=workers, **common)
