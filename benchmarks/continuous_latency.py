"""The continuous job (`cdi run --streaming`, Prism) fed from the broker: sustained events/s,
end-to-end latency from produce to the profile row visible in the store, and activation latency
from produce to the `Audience Entered` record delivered to a Kafka destination.

    python -m benchmarks.continuous_latency                    # 5, 10, 20 events/s, 30 s each
    python -m benchmarks.continuous_latency --rates 10 --seconds 60

Needs the local Kafka broker (`make services`) and Prism (`make prism`). For each offered rate a
fresh topic (3 partitions) and a fresh job: the job is started and warmed up (one event through),
then a producer sends identify events of new persons, each stamped with the time it is sent, at
the offered rate (open loop: on a schedule, never waiting for the job). A watcher polls the
job's SQLite profile store every 10 ms and notes when each person's row appears: latency = row
visible - scheduled send time. When the producer stops, the job gets 60 s to catch up, then is
drained (SIGTERM). Each person enters the audience `pro_users` (trait `plan` = `pro`, consent
for `marketing` granted in the same event) delivered to the destination `crm` of type `kafka`: a
consumer on that topic notes when each person's `Audience Entered` record arrives (activation
latency = arrival - scheduled send). Reports per rate: events/s the job kept up with (rows seen
/ time from the first send to the last row), p50/p90/p99/max of both latencies, events whose row
or activation never appeared, and the peak RSS of the job and the runner. Results go to
``benchmarks/results/continuous_latency.json``.

Config: `watermark_delay: 0s`, `idle_after: 1s` (consent holds an event until the watermark
passes its time: the watermark follows the newest record, and a partition idle for a second
moves to now), `sinks.profiles` SQLite in the output directory.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from benchmarks.run_benchmark import RESULTS

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = "127.0.0.1:19092"

CONFIG = """
sources:
  - name: web
    type: kafka
    kafka:
      bootstrap_servers: "{bootstrap}"
      topics: [{topic}]
      group_id: bench-{topic}
      start: earliest
      watermark_delay: 0s
      idle_after: 1s
consent:
  purposes: [marketing]
  destinations:
    crm:
      purposes: [marketing]
      delivery: {{type: kafka, kafka: {{bootstrap_servers: "{bootstrap}", topic: {topic}-crm}}}}
audiences:
  - {{name: pro_users, when: {{trait: plan, eq: pro}}, destinations: [crm]}}
"""


def _event(person: str, sent_ms: int) -> bytes:
    from transforms.envelope import format_iso_ms

    return json.dumps(
        {
            "type": "identify",
            "messageId": uuid.uuid4().hex,
            "userId": person,
            "traits": {"plan": "pro"},
            "context": {"consent": {"categoryPreferences": {"marketing": True}}},
            "timestamp": format_iso_ms(sent_ms),
        }
    ).encode()


def _rss_kb(pid: int) -> int:
    total = 0
    for p in [pid] + _descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def run_rate(rate: float, seconds: float, work: Path) -> dict:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for name in (topic, f"{topic}-crm"):
        admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)])[name].result(
            15
        )
    out = work / topic
    out.mkdir(parents=True)
    config = out / "config.yaml"
    config.write_text(CONFIG.format(bootstrap=BOOTSTRAP, topic=topic))
    log = (out / "job.log").open("wb")
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--config", str(config)]
    cmd += ["--output", str(out / "out"), "--streaming", "--status-every", "5"]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    db = out / "out" / "profiles.sqlite"
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 0})
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if db.exists():
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                        for (pid,) in conn.execute("SELECT profile_id FROM profiles"):
                            seen.setdefault(pid, time.time())
                except sqlite3.Error:
                    pass
            time.sleep(0.01)

    activated: dict[str, float] = {}

    def consume():
        from confluent_kafka import Consumer

        consumer = Consumer(
            {"bootstrap.servers": BOOTSTRAP, "group.id": f"bench-{topic}-crm",
             "auto.offset.reset": "earliest"}
        )  # fmt: skip
        consumer.subscribe([f"{topic}-crm"])
        while not stop.is_set():
            msg = consumer.poll(0.05)
            if msg is None or msg.error() is not None:
                continue
            record = json.loads(msg.value())
            if record.get("event") == "Audience Entered":
                activated.setdefault(f"user:{record.get('userId')}", time.time())
        consumer.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    activations = threading.Thread(target=consume, daemon=True)
    activations.start()
    peak = 0
    # Warm-up: the job is up when one person's row is visible.
    warm = f"warmup-{uuid.uuid4().hex[:6]}"
    producer.produce(topic, _event(warm, int(time.time() * 1000)), key=warm.encode())
    producer.flush(10)
    deadline = time.time() + 180
    while f"user:{warm}" not in seen and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    if f"user:{warm}" not in seen:
        job.kill()
        raise RuntimeError(f"the job did not come up; see {out / 'job.log'}")

    scheduled: dict[str, float] = {}
    start = time.time()
    n = int(rate * seconds)
    for i in range(n):
        at = start + i / rate
        while (now := time.time()) < at:
            time.sleep(min(at - now, 0.005))
        person = f"p{i}-{topic}"
        scheduled[f"user:{person}"] = at
        producer.produce(topic, _event(person, int(at * 1000)), key=person.encode())
        producer.poll(0)
        if i % max(1, int(rate)) == 0:
            peak = max(peak, _rss_kb(job.pid))
    producer.flush(10)
    catch_up = time.time() + 60
    while time.time() < catch_up and not all(k in seen and k in activated for k in scheduled):
        peak = max(peak, _rss_kb(job.pid))
        time.sleep(0.2)
    stop.set()
    watcher.join()
    activations.join()
    job.send_signal(signal.SIGTERM)
    try:
        job.wait(300)
    except subprocess.TimeoutExpired:
        job.kill()
    latencies = [seen[k] - at for k, at in scheduled.items() if k in seen]
    activation = [activated[k] - at for k, at in scheduled.items() if k in activated]
    last = max((seen[k] for k in scheduled if k in seen), default=start)
    return {
        "offered_events_per_s": rate,
        "events": n,
        "rows_seen": len(latencies),
        "missing": n - len(latencies),
        "kept_up_events_per_s": round(len(latencies) / max(last - start, 1e-9), 1),
        "latency_s": {
            "p50": round(_percentile(latencies, 0.50), 3),
            "p90": round(_percentile(latencies, 0.90), 3),
            "p99": round(_percentile(latencies, 0.99), 3),
            "max": round(max(latencies, default=float("nan")), 3),
        },
        "activations_seen": len(activation),
        "activation_latency_s": {
            "p50": round(_percentile(activation, 0.50), 3),
            "p99": round(_percentile(activation, 0.99), 3),
            "max": round(max(activation, default=float("nan")), 3),
        },
        "peak_rss_mib": round(peak / 1024),
        "job_exit": job.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[5, 10, 20])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--work", default="/tmp/cdi-continuous-bench")
    args = ap.parse_args(argv)
    work = Path(args.work)
    results = []
    print(
        f"{'offered/s':>9} {'kept up/s':>9} {'row p50':>7} {'p90':>6} {'p99':>6} {'max':>6} "
        f"{'missing':>7} {'act p50':>7} {'p99':>6} {'missing':>7} {'peak RSS':>9}"
    )
    for rate in args.rates:
        r = run_rate(rate, args.seconds, work)
        results.append(r)
        lat, act = r["latency_s"], r["activation_latency_s"]
        print(
            f"{rate:>9.0f} {r['kept_up_events_per_s']:>9.1f} {lat['p50']:>7.2f} {lat['p90']:>6.2f}"
            f" {lat['p99']:>6.2f} {lat['max']:>6.2f} {r['missing']:>7} {act['p50']:>7.2f}"
            f" {act['p99']:>6.2f} {r['events'] - r['activations_seen']:>7}"
            f" {r['peak_rss_mib']:>6} MiB",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "continuous_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
