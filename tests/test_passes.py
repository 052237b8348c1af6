"""A bounded run in passes (pipelines/passes.py): planning keeps persons and idempotency keys
whole, and the outputs equal one run's: every profile row (all columns, versions included),
every record file's lines, the report's counts."""

from __future__ import annotations

import collections
import contextlib
import sqlite3
from pathlib import Path

import fastavro
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from pipelines.config import load_default_config
from pipelines.generate import write
from pipelines.governed_profiles import _validate, tracking_plans
from pipelines.passes import (
    _node_hashes,
    _UnionFind,
    event_nodes,
    node_hash,
    pack_parts,
    plan_passes,
    read_raw,
)
from tests.hostile import hostile_lines
from transforms.envelope import Envelope
from transforms.io.files import raw_from_archive

RECORD_OUTPUTS = (
    "quarantine",
    "duplicates",
    "late",
    "consent_denied",
    "deleted",
    "merges",
    "identity_review",
    "destinations",
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("passes")
    src = d / "events.ndjson"
    write(str(src), 2000, 120, seed=5)
    # Plus an unlink naming an identifier of another line, and lines that are not events.
    extra = [
        b'{"type": "unlink", "messageId": "ul-1", "userId": "someone", '
        b'"properties": {"identifier": {"type": "anonymous_id", "value": "lonely"}}, '
        b'"timestamp": "2026-11-01T12:00:00.000Z"}',
        b'{"type": "track", "event": "Product Viewed", "messageId": "lonely-1", '
        b'"anonymousId": "lonely", "timestamp": "2026-11-01T12:00:00.000Z"}',
        b"not json",
        b"",
    ]
    with open(src, "ab") as fh:
        fh.write(b"\n" + b"\n".join(extra) + b"\n")
    return d, src


def _rows(db: Path) -> dict:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return {r["profile_id"]: dict(r) for r in conn.execute("SELECT * FROM profiles")}


def _lines(out: Path, name: str) -> collections.Counter:
    return collections.Counter(
        line for f in sorted((out / name).rglob("part-*")) for line in f.read_text().splitlines()
    )


def test_union_find_and_the_nodes_of_an_event():
    uf = _UnionFind()
    a, b, c = (uf.join([node_hash(n)]) for n in "abc")
    assert uf.join([node_hash("a")]) == a
    assert uf.find(c) != uf.find(b)
    d = uf.join([node_hash("d"), node_hash("c"), node_hash("b")])  # one event: one part
    assert uf.find(d) == uf.find(c) == uf.find(b) != uf.find(a)
    assert uf.join([node_hash("a"), node_hash("e")]) == a != uf.find(d)
    config = load_default_config()
    env = Envelope(
        "web",
        "f",
        "",
        {
            "type": "unlink",
            "messageId": "m",
            "userId": "u1",
            "properties": {"identifier": {"type": "anonymous_id", "value": "a9"}},
        },  # fmt: skip
        0,
    )
    assert event_nodes(env, config) == ["k\x1eweb\x1fm", "i\x1euser:u1", "i\x1eanon:a9"]


def test_node_hashes_are_the_same_in_every_process_and_a_raising_judge_is_a_part():
    """Planning's processes hash the names the main process joins: ``hash()`` of a str is
    salted per process, so the hash must not be it."""
    import subprocess
    import sys

    names = ["k\x1eweb\x1fm", "i\x1euser:u1", "i\x1eanon:a9"]
    code = f"from pipelines.passes import node_hash; print([node_hash(n) for n in {names!r}])"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        assert out.strip() == str([node_hash(n) for n in names])

    def raises(raw, now_ms):
        raise RuntimeError("a validation bug")

    assert _node_hashes(raises, ("web", "f", b"{}"), 0) is None


def test_plan_keeps_parts_whole_and_passes_small(generated, tmp_path):
    _, src = generated
    config = load_default_config()
    inputs = {config.sources[0].name: [str(src)]}
    plan = plan_passes(config, inputs, 300, tmp_path / "work")
    raw = list(read_raw(config, inputs))
    assert plan.events == len(raw) and sum(plan.pass_sizes) == len(raw)
    assert len(plan.files) == len(plan.pass_sizes) > 1
    assert all(n <= 300 or n == plan.largest_part for n in plan.pass_sizes)
    # Every raw event is in exactly one pass file, untouched, with its part: a part lies in
    # one pass, and an idempotency key or identifier in one part (stitching relies on it).
    seen = collections.Counter()
    node_part, part_pass = {}, {}
    judge = _validate(config, tracking_plans(config)).judge_locally()
    for k, (path,) in enumerate(plan.files):
        with open(path, "rb") as fh:
            for record in fastavro.reader(fh):
                r = raw_from_archive(record, path)
                source, origin, payload, part = r
                seen[(source, origin, payload)] += 1
                assert part_pass.setdefault(part, k) == k, part
                env, _ = judge(r, plan.now_ms)
                if env is None:
                    continue
                assert env.part == part
                for node in event_nodes(env, config):
                    assert node_part.setdefault(node, part) == part, node
    assert seen == collections.Counter(raw)
    assert len(part_pass) == plan.parts


def _loads(sizes, assign):
    loads = collections.Counter()
    for size, k in zip(sizes, assign, strict=True):
        loads[k] += size
    return [loads[k] for k in range(len(loads))]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 40), max_size=200),
    st.one_of(st.none(), st.integers(1, 120)),
    st.integers(1, 4),
)
def test_packing_keeps_its_promises(sizes, max_events, workers):
    assign = pack_parts(sizes, max_events, workers)
    assert len(assign) == len(sizes)
    loads = _loads(sizes, assign)
    assert sorted(set(assign)) == list(range(len(loads)))  # dense, no empty pass
    if max_events is not None:
        # At most max_events per pass, but a part bigger than that is a pass of its own.
        for k, load in enumerate(loads):
            members = [n for n, a in zip(sizes, assign, strict=True) if a == k]
            assert load <= max_events or len(members) == 1, (k, members)
    if max_events is None or workers > 1:
        # Near-equal: the fullest pass is at most one part above the lightest.
        small = [n for n in sizes if max_events is None or n <= max_events]
        small_loads = [
            sum(n for n, a in zip(sizes, assign, strict=True) if a == k and n in small)
            for k in range(len(loads))
        ]
        nonzero = [x for x in small_loads if x]
        if len(nonzero) > 1:
            assert max(nonzero) - min(nonzero) <= max(small)
    if workers > 1 and max_events is not None:
        # Every process gets work: at least W passes of small parts, when there are W of them.
        small = [n for n in sizes if n <= max_events]
        passes_of_small = {a for n, a in zip(sizes, assign, strict=True) if n <= max_events}
        assert len(passes_of_small) >= min(workers, len(small))


def test_packing_in_order_and_for_two_processes():
    assert pack_parts([3, 3, 3, 3], 6) == [0, 0, 1, 1]  # one process: in order
    assert pack_parts([10, 1, 1], 5) == [0, 1, 1]  # a big part alone
    # Two processes, one pass size's worth of events: still two passes, one per process.
    assert sorted(_loads([1] * 10, pack_parts([1] * 10, 100, 2))) == [5, 5]
    # 3 passes' worth on 2 processes: 4 passes, two waves.
    assert _loads([1] * 30, pack_parts([1] * 30, 10, 2)) == [8, 8, 7, 7]
    assert pack_parts([], 10, 2) == [] and pack_parts([], None, 3) == []
    # A large part that appears last does not multiply the passes: 20,990 events in passes of
    # 1,000 are 22 passes (placing in order of appearance once made 1,820, in 7.7 s).
    sizes = [1] * 20_000 + [990]
    loads = _loads(sizes, pack_parts(sizes, 1000, 2))
    assert len(loads) == 22 and max(loads) <= 1000
    # Parts that fit nowhere: the passes are made again in whole waves (6, not 5).
    assert len(_loads([2] * 9, pack_parts([2] * 9, 5, 2))) == 6


def test_balanced_plan_splits_into_near_equal_whole_parts(generated, tmp_path):
    _, src = generated
    config = load_default_config()
    inputs = {config.sources[0].name: [str(src)]}
    plan = plan_passes(config, inputs, None, tmp_path / "work", balanced=3)
    assert len(plan.files) == 3 and sum(plan.pass_sizes) == plan.events
    # Each part goes to the lightest pass: no two passes differ by more than the largest part.
    assert max(plan.pass_sizes) - min(plan.pass_sizes) <= plan.largest_part
    key_pass = {}
    judge = _validate(config, tracking_plans(config)).judge_locally()
    for k, files in enumerate(plan.files):
        for path in files:
            with open(path, "rb") as fh:
                for record in fastavro.reader(fh):
                    env, _ = judge(raw_from_archive(record, path), plan.now_ms)
                    for node in event_nodes(env, config) if env is not None else ():
                        assert key_pass.setdefault(node, k) == k, node
    # More passes asked for than there are parts: no empty pass.
    one_event = tmp_path / "one.ndjson"
    one_event.write_bytes(src.read_bytes().splitlines()[0] + b"\n")
    tiny = plan_passes(
        config, {config.sources[0].name: [str(one_event)]}, None, tmp_path / "w2", balanced=4
    )
    assert tiny.pass_sizes == [1] and len(tiny.files) == 1


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    """Generated events (duplicates, invalid lines) plus unlinks, each naming the anonymous id
    of an event far from it and a user of another, so that parts join across the events each
    planning process judges; an unlink with no identifier; a blank line; an event that is not
    JSON."""
    d = tmp_path_factory.mktemp("linked")
    src = d / "events.ndjson"
    write(str(src), 3000, 150, seed=11)
    lines = src.read_bytes().splitlines()
    events = []
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError):  # a generated invalid line
            events.append(orjson.loads(line))
    events = [e for e in events if isinstance(e, dict)]
    users = [e["userId"] for e in events if isinstance(e.get("userId"), str)]
    anons = [e["anonymousId"] for e in events if isinstance(e.get("anonymousId"), str)]
    for n in range(40):
        unlink = {
            "type": "unlink",
            "messageId": f"ul-{n}",
            "userId": users[(7 * n) % len(users)],
            "properties": {"identifier": {"type": "anonymous_id", "value": anons[-1 - 13 * n]}},
            "timestamp": "2026-11-01T12:00:00.000Z",
        }
        lines.insert(37 * n + n % 3, orjson.dumps(unlink))
    lines[100:100] = [b'{"type": "unlink", "messageId": "ul-x", "userId": "u"}', b"", b"{"]
    src.write_bytes(b"\n".join(lines) + b"\n")
    return src


def _plan_contents(plan) -> list[collections.Counter]:
    """Per pass: its records (source, origin, payload, part) as a multiset, over its files; a
    part lies in one file (a pass's job settles a part from one file's reading)."""
    passes, part_file = [], {}
    for files in plan.files:
        records = collections.Counter()
        for path in files:
            with open(path, "rb") as fh:
                for r in fastavro.reader(fh):
                    assert part_file.setdefault(r["part"], path) == path, r["part"]
                    records[(r["source"], r["origin"], r["payload"], r["avro"], r["part"])] += 1
        passes.append(records)
    assert len(part_file) == plan.parts or plan.events == 0
    return passes


@pytest.mark.parametrize(
    "balanced, processes, max_events",
    [(1, 2, 500), (2, 2, None), (2, 2, 500), (3, 3, 400), (2, 3, None)],
)
def test_planning_in_processes_makes_the_plan_of_one(
    linked, tmp_path, balanced, processes, max_events
):
    """Judged in W processes (each every W-th event) and written by W (each the parts p with p
    % W == its number, to files of its own), the plan is the one process's: the same parts,
    numbered alike, the same passes with the same events."""
    config = load_default_config()
    inputs = {config.sources[0].name: [str(linked)]}
    one = plan_passes(config, inputs, max_events, tmp_path / "one", balanced=balanced, processes=1)
    many = plan_passes(
        config, inputs, max_events, tmp_path / "many", balanced=balanced, processes=processes
    )
    assert all(len(files) == 1 for files in one.files)
    for field in ("events", "parts", "largest_part", "pass_sizes"):
        assert getattr(many, field) == getattr(one, field), field
    assert _plan_contents(many) == _plan_contents(one)
    assert one.parts < one.events - 100  # the unlinks and duplicates joined events into parts
    for files in many.files:
        for path in files:
            j = int(Path(path).stem.rsplit("-w", 1)[1])
            with open(path, "rb") as fh:
                assert {r["part"] % processes for r in fastavro.reader(fh)} == {j}, path


def test_planning_in_processes_an_empty_input(tmp_path):
    config = load_default_config()
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(b"\n")
    inputs = {config.sources[0].name: [str(empty)]}
    for processes in (1, 2):
        plan = plan_passes(
            config, inputs, None, tmp_path / f"w{processes}", balanced=2, processes=processes
        )
        assert (plan.events, plan.parts, plan.pass_sizes, len(plan.files)) == (0, 0, [0], 1)
        assert _plan_contents(plan) == [collections.Counter()]


def test_a_planning_process_that_dies_fails_the_plan(generated, tmp_path):
    """A planning process killed (an OOM kill) fails planning at once, with that said: no
    hang, no partial plan."""
    import os
    import signal
    import threading
    import time

    _, src = generated
    big = tmp_path / "big.ndjson"
    big.write_bytes(src.read_bytes() * 50)  # long enough to be killed mid-read
    config = load_default_config()
    inputs = {config.sources[0].name: [str(big)]}
    failed = []

    def plan():
        try:
            plan_passes(config, inputs, None, tmp_path / "work", balanced=2)
        except Exception as e:  # noqa: BLE001 (the test looks at it)
            failed.append(e)

    planning = threading.Thread(target=plan)
    planning.start()
    deadline = time.monotonic() + 120
    workers = []
    while len(workers) < 2 and time.monotonic() < deadline and planning.is_alive():
        workers = _spawned_children(os.getpid())
        time.sleep(0.05)
    assert len(workers) == 2, "no planning processes started"
    time.sleep(0.5)  # into their work
    os.kill(workers[0], signal.SIGKILL)
    planning.join(60)
    assert not planning.is_alive(), "planning hangs on a dead process"
    assert failed and "worker process died" in str(failed[0]), failed
    assert isinstance(failed[0], RuntimeError)


def _spawned_children(parent: int) -> list[int]:
    """The processes ``parent`` spawned with multiprocessing (its pools' workers)."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmd:
            found.append(int(pid))
    return found


def _assert_same_outputs(one: Path, passes: Path) -> None:
    """Every profile row (all columns, versions included), every record line and every count
    of the report (but its wall time and paths) equal."""
    assert _rows(passes / "profiles.sqlite") == _rows(one / "profiles.sqlite")
    for name in RECORD_OUTPUTS:
        assert _lines(passes, name) == _lines(one, name), name
    a = orjson.loads((one / "run_report.json").read_bytes())
    b = orjson.loads((passes / "run_report.json").read_bytes())
    for key in a:
        if key not in ("wall_seconds", "outputs"):
            assert a[key] == b[key], key


def _one_run_and_passes(cfg: Path, tmp_path: Path, per_pass: int) -> dict[str, Path]:
    """``cfg`` run once and in passes of ``per_pass`` by two processes; the outputs checked
    equal (:func:`_assert_same_outputs`); the two output directories."""
    outs = {"one": tmp_path / "one", "passes": tmp_path / "passes"}
    passes = ["--workers", "2", "--max-events-per-pass", str(per_pass)]
    for name, extra in (("one", []), ("passes", passes)):
        assert main(["run", "--config", str(cfg), "--output", str(outs[name]), *extra]) == 0
    _assert_same_outputs(outs["one"], outs["passes"])
    return outs


@pytest.fixture(scope="module")
def one_run(generated, tmp_path_factory):
    _, src = generated
    one = tmp_path_factory.mktemp("one-run")
    assert main(["run", "--input", str(src), "--output", str(one)]) == 0
    return one


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-events-per-pass", "250"],
        ["--workers", "2"],  # two balanced passes, two processes at once
        ["--workers", "2", "--max-events-per-pass", "600"],  # 4+ passes, two at a time
    ],
)
def test_a_run_in_passes_equals_one_run(generated, one_run, tmp_path, extra):
    _, src = generated
    passes = tmp_path / "passes"
    assert main(["run", "--input", str(src), "--output", str(passes), *extra]) == 0
    _assert_same_outputs(one_run, passes)
    b = orjson.loads((passes / "run_report.json").read_bytes())
    assert b["passes"]["passes"] > 1
    if "--workers" in extra:
        assert b["passes"]["workers"] == 2
    else:
        assert b["passes"]["max_events_per_pass"] == 250
    assert not (passes / ".cdi-passes").exists()


def test_passes_equal_one_run_with_plan_audiences_triggers_and_a_deletion(generated, tmp_path):
    """The example config (tracking plan, computed traits, audiences, an event trigger) plus a
    configured deletion: a planned run's passes settle each part in one call
    (transforms/planned_parts.py), and every output still equals one run's."""
    _, src = generated
    first = orjson.loads(next(line for line in src.read_bytes().splitlines() if line.strip()))
    example = Path(__file__).parent.parent / "schemas" / "configs" / "example.yaml"
    cfg = tmp_path / "example.yaml"
    # Destinations named like other outputs of a part's call (merges, triggered) keep their own.
    cfg.write_text(
        example.read_text().replace("paths: [../samples/events.ndjson]", f"paths: [{src}]")
        .replace("path: ../tracking_plans/", f"path: {example.parent.parent}/tracking_plans/")
        .replace("ad_network", "merges").replace("warehouse", "triggered")
        + f"privacy: {{deleted_identifiers: ['anonymous_id:{first['anonymousId']}']}}\n"
    )  # fmt: skip
    outs = _one_run_and_passes(cfg, tmp_path, 600)
    # Something of each kind was there to compare.
    lines = {n: sum(_lines(outs["one"], n).values()) for n in RECORD_OUTPUTS}
    assert lines["deleted"] and lines["merges"] and lines["consent_denied"], lines
    merges = [orjson.loads(line) for line in _lines(outs["passes"], "merges")]
    assert merges and all(r.get("kind", "").startswith("profile_") for r in merges)
    activations = _lines(outs["one"], "destinations")
    assert any("Audience Entered" in line for line in activations)
    assert any("big_order" in line for line in activations)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--max-events-per-pass", "0"], "--max-events-per-pass"),
        (["--max-events-per-pass", "10", "--streaming"], "--max-events-per-pass"),
        (["--workers", "0"], "--workers"),
        (["--workers", "2", "--streaming"], "--workers"),
    ],
)
def test_passes_refuse_what_they_cannot_do(generated, tmp_path, extra, flag, capsys):
    _, src = generated
    rc = main(["run", "--input", str(src), "--output", str(tmp_path / "o"), *extra])
    assert rc == 2
    assert flag in capsys.readouterr().err


def test_passes_archive_the_raw_input_as_one_run_does(generated, tmp_path):
    """With ``sinks.archive`` set, the passes together archive exactly the raw events one run
    archives (each pass its own files): `cdi replay --from-archive` sees the same history."""
    _, src = generated
    archives = {}
    for name, extra in (("one", []), ("passes", ["--max-events-per-pass", "400"])):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(
            f"sources: [{{name: web, paths: [{src}]}}]\n"
            f"sinks: {{archive: {{path: {tmp_path / name / 'archive'}}}}}\n"
        )
        assert main(["run", "--config", str(cfg), "--output", str(tmp_path / name), *extra]) == 0
        got = collections.Counter()
        for f in (tmp_path / name / "archive").glob("*.avro"):
            with open(f, "rb") as fh:
                got.update(raw_from_archive(r, str(f)) for r in fastavro.reader(fh))
        assert all(len(r) == 3 for r in got)  # a pass's parts stay out of the archive
        archives[name] = got
    assert sum(archives["one"].values()) > 2000
    assert archives["passes"] == archives["one"]


@pytest.mark.parametrize("stage", ["planning", "passes"])
def test_pass_processes_die_with_cdi_run(generated, tmp_path, stage):
    """A SIGKILL of `cdi run --workers 2` (an OOM kill, a supervisor) leaves no process of its
    own running on (a planning process, or a pass's writing into the outputs): each dies with
    its parent (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, src = generated
    big = tmp_path / "big.ndjson"
    big.write_bytes(src.read_bytes() * 5)  # long enough to be killed mid-pass
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", "--input", str(big), "--output",
         str(tmp_path / "o"), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if stage == "passes":
        # The plan is printed once planning's processes are gone: any spawned after, a pass's.
        for line in proc.stdout:
            if b" passes of at most " in line:
                break
    deadline = time.monotonic() + 120
    workers = []
    while not workers and time.monotonic() < deadline and proc.poll() is None:
        workers = _spawned_children(proc.pid)
        time.sleep(0.2)
    assert workers, f"no {stage} process started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    deadline = time.monotonic() + 60
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [w for w in workers if os.path.exists(f"/proc/{w}") and "Z" not in _state(w)]
        time.sleep(0.2)
    assert not alive, f"{stage} processes outlived cdi run: {alive}"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_pass_file_is_read_part_by_part_and_a_file_without_parts_is_refused(tmp_path):
    """``parts_of`` (ReadPlannedParts): each part's raw events, in file order, parts in order;
    a record without its part is not a planned pass's file and fails the read (a job error,
    not an element's)."""
    from transforms.io.files import ARCHIVE_SCHEMA, archive_record, parts_of

    schema = fastavro.parse_schema(ARCHIVE_SCHEMA)
    raws = [("web", "a.ndjson", b'{"n": %d}' % i) for i in range(4)]
    path = tmp_path / "pass-0000.avro"
    with open(path, "wb") as fh:
        records = [
            {**archive_record(r), "part": p} for r, p in zip(raws, (7, 2, 7, 2), strict=True)
        ]
        fastavro.writer(fh, schema, records)
    assert parts_of(str(path)) == [(2, [raws[1], raws[3]]), (7, [raws[0], raws[2]])]
    plain = tmp_path / "archive.avro"
    with open(plain, "wb") as fh:
        fastavro.writer(fh, schema, [archive_record(r) for r in raws])
    with pytest.raises(ValueError, match="without its part"):
        parts_of(str(plain))


READ_AT = 1_800_000_000_000  # 2027-01-15: after every generated and hostile event time

# A plan that strips what it does not know, under a business key its plan does not know either:
# the coupon is omitted, so the pass keys such an event by its messageId.
OMITTING = """
sources: [{name: web, paths: [], tracking_plan: default, violations: {default: omit}}]
tracking_plans: {default: {path: ../tracking_plans/example.yaml}}
dedup: {key: [source, properties.coupon]}
"""


def _planned_nodes_cover_the_verdicts(config, lines: list[bytes]) -> int:
    """Planning's node names of each line hold those of the job's whole verdict on it, and a
    line planning gives no node is one the job refuses; how many lines were valid."""
    from pipelines.passes import _node_reader

    nodes_of = _node_reader(config)
    verdict = _validate(config, tracking_plans(config)).judge_locally()
    valid = 0
    for line in lines:
        raw = ("web", "f", line)
        env, _ = verdict(raw, READ_AT)
        planned = nodes_of(raw, READ_AT)
        if env is None:
            continue
        valid += 1
        assert planned is not None, line
        assert set(event_nodes(env, config)) <= set(planned), line
    return valid


def test_planning_reads_every_node_the_verdict_has(generated):
    """Planning reads nodes without the whole verdict (no event-time or plan checks): for every
    line the job accepts, they hold the verdict's own; with rule modes, also the key the job
    falls back to when ``omit`` removed the key's field (it fails without that)."""
    _, src = generated
    lines = [line for line in src.read_bytes().splitlines() if line.strip()]
    assert _planned_nodes_cover_the_verdicts(load_default_config(), lines) > 1900
    from tests.conftest import config_from, event

    order = {"order_id": "o1", "revenue": 5, "currency": "EUR"}
    omitting = [
        orjson.dumps(event(event="Order Completed", messageId=f"m{i}", properties={**order, **p}))
        for i, p in enumerate([{"coupon": "SAVE"}, {}, {"coupon": "SAVE", "colour": "red"}])
    ]
    assert _planned_nodes_cover_the_verdicts(config_from(OMITTING), omitting) == 3


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile_lines, min_size=1, max_size=4))
def test_planning_reads_every_node_the_verdict_has_on_hostile_lines(lines):
    from tests.conftest import config_from

    _planned_nodes_cover_the_verdicts(load_default_config(), lines)
    _planned_nodes_cover_the_verdicts(config_from(OMITTING), lines)


def test_planning_takes_the_whole_verdict_where_a_node_is_read_from_what_it_writes():
    """An identifier read from ``context.cdi...`` (what validation writes) is known only to the
    whole verdict: planning takes it there, and an event the job refuses gets no node."""
    from tests.conftest import config_from

    config = config_from(
        """
sources: [{name: web, paths: []}]
identity:
  types:
    - {name: user_id, paths: [userId]}
    - {name: anonymous_id, paths: [anonymousId]}
    - {name: clamp, paths: [context.cdi_clamped_event_time]}
"""
    )
    from pipelines.passes import _node_reader

    late = b'{"type": "identify", "messageId": "m", "userId": "u", "timestamp": "1999-01-01T00:00:00Z"}'
    assert _node_reader(config)(("web", "f", late), READ_AT) is None  # too early: refused
    assert _planned_nodes_cover_the_verdicts(config, [late.replace(b"1999", b"2026")]) == 1


def test_passes_equal_one_run_over_an_avro_source(generated, tmp_path):
    """Avro records of the canonical envelope (a source of ``format: avro``): planning reads
    their nodes, a pass reads each part whole from its files, and every output equals one
    run's."""
    from transforms.envelope import envelope_avro_schema, event_to_avro_record

    _, src = generated
    events = []
    for line in src.read_bytes().splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line that is not JSON has no Avro record
        if isinstance(event, dict):
            events.append(event)
    path = tmp_path / "events.avro"
    with open(path, "wb") as fh:
        schema = fastavro.parse_schema(envelope_avro_schema())
        fastavro.writer(fh, schema, [event_to_avro_record(e) for e in events])
    cfg = tmp_path / "avro.yaml"
    cfg.write_text(f"sources: [{{name: app, format: avro, paths: ['{path}']}}]\n")
    outs = _one_run_and_passes(cfg, tmp_path, 500)
    report = orjson.loads((outs["passes"] / "run_report.json").read_bytes())
    assert report["passes"]["passes"] >= 4 and report["valid"] > 1800, report["passes"]
