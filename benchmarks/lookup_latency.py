"""Profile stores: write throughput, and lookups through `cdi serve` measured from another process.

    python -m benchmarks.lookup_latency                      # 100k profiles, Redis + PostgreSQL
    python -m benchmarks.lookup_latency --profiles 20000 --stores redis

Needs the local services (`make services`). For each store: loads N synthetic profiles (3
identifiers each: user id, anonymous id, hashed email) through the store's writer in batches of
500 (profiles/s), starts `cdi serve` on it (one uvicorn process), then a load client in a second
process asks for a random identifier of a random profile:

- closed loop, 1 and 16 concurrent clients (each waits for its answer): requests/s, p50/p99;
- open loop at a fixed offered rate (default 1,000 requests/s): latency from each request's
  *scheduled* send time, so a stall counts against every request it delays (no coordinated
  omission).

The client uses the standard library's ``http.client`` (keep-alive, one connection per client
thread). Both processes share this machine's 2 cores, so the numbers are a floor for a server with
its own. Results go to ``benchmarks/results/lookup_latency.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.run_benchmark import RESULTS

REPO = Path(__file__).resolve().parent.parent
BATCH = 500


def synthetic_rows(n: int, seed: int = 7) -> tuple[list[dict], list[str]]:
    """``n`` profile rows (as the job writes them) and every identifier key they list."""
    import hashlib

    import orjson

    from transforms.profile import as_of_version

    rng = random.Random(seed)
    rows, keys = [], []
    for i in range(n):
        email = hashlib.sha256(f"person{i}@example.com".encode()).hexdigest()
        ids = [("user_id", f"u{i:07d}"), ("anonymous_id", f"a-{i:07d}"), ("email", email)]
        identities = [
            {"type": t, "value": v, "first_seen": "2026-11-01T00:00:00.000Z",
             "last_seen": "2026-11-07T00:00:00.000Z"}
            for t, v in sorted(ids)
        ]  # fmt: skip
        traits = {"plan": rng.choice(["free", "pro", "team"]), "name": f"Person {i}"}
        rows.append(
            {
                "profile_id": f"user:u{i:07d}",
                "identities": orjson.dumps(identities).decode(),
                "traits": orjson.dumps(traits).decode(),
                "computed_traits": orjson.dumps(
                    {
                        "orders_lifetime": {
                            "value": rng.randint(0, 9),
                            "window_start": None,
                            "window_end": None,
                        }
                    }
                ).decode(),  # fmt: skip
                "event_counts": orjson.dumps({"type:track": rng.randint(1, 90)}).decode(),
                "consent": '{"analytics":true,"marketing":false}',
                "first_seen": "2026-11-01T00:00:00.000Z",
                "last_seen": "2026-11-07T00:00:00.000Z",
                "version": as_of_version(1_762_473_600_000, 40),
                "updated_at": "2026-11-07T00:00:00.000Z",
            }
        )
        keys += [f"user:u{i:07d}", f"anon:a-{i:07d}", f"email:{email}"]
    return rows, keys


def load(spec, rows: list[dict]) -> float:
    """Write ``rows`` in batches; profiles/s."""
    from transforms.profile_store import open_store

    store = open_store(spec)
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        store.write(rows[i : i + BATCH])
    elapsed = time.perf_counter() - started
    store.close()
    return len(rows) / elapsed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(sink: str, workers: int = 1) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--sink", sink, "--port", str(port),
         "--pool", "16", "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()) from None
            time.sleep(0.1)
    raise RuntimeError("cdi serve did not answer")


# --- the load client (runs in its own process: `python -m benchmarks.lookup_latency client`) ---


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def closed_loop(port: int, keys: list[str], clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(i: int):
        rng = random.Random(i)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while time.perf_counter() < stop:
            key = rng.choice(keys)
            t0 = time.perf_counter()
            conn.request("GET", f"/v1/profiles/{key}")
            r = conn.getresponse()
            r.read()
            latencies[i].append(time.perf_counter() - t0)
            errors[i] += r.status != 200
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [x for xs in latencies for x in xs]
    return _summary(flat, elapsed, sum(errors), clients=clients)


def open_loop(port: int, keys: list[str], rate: float, seconds: float, threads: int = 16) -> dict:
    """Requests scheduled every 1/rate s, spread over ``threads`` connections; latency from the
    scheduled time."""
    total = int(rate * seconds)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    t_start = time.perf_counter() + 0.2

    def worker(i: int):
        rng = random.Random(100 + i)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for k in range(i, total, threads):
            due = t_start + k / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            conn.request("GET", f"/v1/profiles/{rng.choice(keys)}")
            r = conn.getresponse()
            r.read()
            latencies[i].append(time.perf_counter() - due)
            errors[i] += r.status != 200
        conn.close()

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t_start
    flat = [x for xs in latencies for x in xs]
    return _summary(flat, elapsed, sum(errors), offered=rate)


def _summary(lat: list[float], elapsed: float, errors: int, **extra) -> dict:
    return {
        **extra,
        "requests": len(lat),
        "errors": errors,
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(_percentile(lat, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(lat, 0.99) * 1000, 3),
        "max_ms": round(max(lat) * 1000, 3) if lat else None,
        "mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else None,
    }


def client_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", required=True)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rate", type=float, default=1000)
    a = ap.parse_args(argv)
    keys = Path(a.keys).read_text().split("\n")
    # warm-up: pool connections, caches
    closed_loop(a.port, keys, 4, 1.0)
    out = {
        "closed_1": closed_loop(a.port, keys, 1, a.seconds),
        "closed_16": closed_loop(a.port, keys, 16, a.seconds),
        "open": open_loop(a.port, keys, a.rate, a.seconds),
    }
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        client_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", type=int, default=100_000)
    ap.add_argument("--stores", default="redis,postgres")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--out", default=str(RESULTS / "lookup_latency.json"))
    ap.add_argument("--workers", type=int, default=1, help="cdi serve --workers")
    a = ap.parse_args(argv)

    import tempfile

    import psycopg
    import redis

    from tests.conftest import service_address
    from transforms.profile_store import StoreSpec

    rows, keys = synthetic_rows(a.profiles)
    tmp = Path(tempfile.mkdtemp(prefix="cdi-lookup-"))
    keys_file = tmp / "keys.txt"
    keys_file.write_text("\n".join(keys))
    results = {
        "profiles": a.profiles,
        "identifiers": len(keys),
        "server_workers": a.workers,
        "stores": {},
    }
    for store in a.stores.split(","):
        if store == "redis":
            url = service_address("CDI_REDIS_URL").rsplit("/", 1)[0] + "/2"
            redis.Redis.from_url(url).flushdb()
            spec = StoreSpec("redis", url=url)
        elif store == "postgres":
            url = service_address("CDI_POSTGRES_URL")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
                conn.execute("CREATE SCHEMA bench")
            url += "?options=-csearch_path%3Dbench"
            spec = StoreSpec("postgres", url=url)
        else:
            spec = StoreSpec("sqlite", path=str(tmp / "profiles.sqlite"))
            url = spec.path
        print(f"{store}: writing {a.profiles:,} profiles ...", flush=True)
        written = load(spec, rows)
        rewritten = load(spec, rows)  # the same rows again: every write refused by version
        server, port = start_server(url, a.workers)
        try:
            client = subprocess.run(
                [sys.executable, "-m", "benchmarks.lookup_latency", "client", "--port", str(port),
                 "--keys", str(keys_file), "--seconds", str(a.seconds), "--rate", str(a.rate)],
                capture_output=True, text=True, cwd=REPO, check=True,
            )  # fmt: skip
        finally:
            server.terminate()
            server.wait(30)
        res = json.loads(client.stdout)
        res["write_profiles_per_s"] = round(written)
        res["rewrite_profiles_per_s"] = round(rewritten)
        results["stores"][store] = res
        print(
            f"{store}: write {written:,.0f} profiles/s (same rows again {rewritten:,.0f}/s)\n"
            f"  1 client   {res['closed_1']['rps']:>8,.0f} req/s  p50 {res['closed_1']['p50_ms']:.2f} ms"
            f"  p99 {res['closed_1']['p99_ms']:.2f} ms\n"
            f"  16 clients {res['closed_16']['rps']:>8,.0f} req/s  p50 {res['closed_16']['p50_ms']:.2f} ms"
            f"  p99 {res['closed_16']['p99_ms']:.2f} ms\n"
            f"  offered {a.rate:,.0f}/s: {res['open']['rps']:,.0f} req/s  p50 {res['open']['p50_ms']:.2f} ms"
            f"  p99 {res['open']['p99_ms']:.2f} ms  errors {res['open']['errors']}",
            flush=True,
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
