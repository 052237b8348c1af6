"""`cdi`: run the job, generate sample events, check a config, inspect quarantine and profiles.

Exit codes: 0 success, 2 usage or configuration error (nothing started), 1 pipeline failure
(`profile explain`/`profile get`: nothing matches, or the store cannot be read).
Errors go to stderr, one line each, ``file: path: reason``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 too; keep the message format ours
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cdi", description="Customer data infrastructure on Apache Beam.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the governed profile job")
    run.add_argument("--config", help="pipeline config YAML (default: the embedded default config)")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        help="input glob (repeatable); replaces the first source's paths",
    )
    run.add_argument("--output", help="output directory (default: sinks.output_dir)")
    run.add_argument(
        "--runner",
        help="local (default), local-streaming, prism (`make prism`), or a Beam runner name "
        "(DataflowRunner, FlinkRunner...)",
    )
    run.add_argument(
        "--status-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --streaming: seconds between status lines (default 10)",
    )
    run.add_argument(
        "--max-events-per-pass",
        type=int,
        metavar="N",
        help="bounded runs over files: run in passes of at most N events (whole persons and "
        "idempotency keys per pass), the results of one run with the memory of N events",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="W",
        help="bounded runs over files: run passes W at a time, each in a process of its own "
        "(both cores of a 2-core machine with W=2); without --max-events-per-pass, the input "
        "is split into W passes of near-equal size. Memory: W passes at once",
    )
    run.add_argument(
        "--detach",
        action="store_true",
        help="submit the job and return without waiting for it (Dataflow, Flink; the Flex "
        "Template launcher): no run report",
    )

    rep = sub.add_parser(
        "replay",
        help="re-read a time range of a Kafka source through the same job, as a bounded run; "
        "activation outputs (destinations) are suppressed unless --activate",
    )
    rep.add_argument("--config", required=True, help="pipeline config YAML")
    rep.add_argument("--source", help="the name of a kafka source in the config")
    rep.add_argument(
        "--from-archive",
        dest="archive",
        help="read the raw-input archive at this path (sinks.archive) instead of a topic: every "
        "source's whole hours overlapping [--from, --to)",
    )
    rep.add_argument(
        "--from", dest="start", required=True, help="ISO instant: first record time read"
    )
    rep.add_argument(
        "--to", dest="stop", required=True, help="ISO instant: records from here on are not read"
    )
    rep.add_argument("--output", required=True, help="output directory of the replay")
    rep.add_argument(
        "--activate", action="store_true", help="also write the destinations (activation)"
    )
    rep.add_argument("--runner", help="as for `cdi run`")

    gen = sub.add_parser(
        "generate", help="write synthetic Segment-spec events and their ground truth"
    )
    gen.add_argument("--events", type=int, required=True)
    gen.add_argument("--persons", type=int, required=True)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument(
        "--out", required=True, help="NDJSON file to write; ground truth goes to FILE.truth.json"
    )

    val = sub.add_parser("validate-config", help="check a pipeline config and its tracking plans")
    val.add_argument("file")

    q = sub.add_parser("quarantine", help="inspect and replay quarantined events")
    qsub = q.add_subparsers(dest="action", required=True, parser_class=_Parser)
    qs = qsub.add_parser("summarize", help="counts by reason and source")
    qs.add_argument("dir", help="a run's output dir or its quarantine/ dir")
    qr = qsub.add_parser(
        "replay",
        help="write the (repaired) payloads as NDJSON to re-submit with `cdi run --input`; "
        "messageId and source are kept, so an event already accepted is caught as a duplicate",
    )
    qr.add_argument("dir", help="a run's output dir or its quarantine/ dir")
    qr.add_argument("--out", required=True, help="NDJSON file to write")

    prof = sub.add_parser("profile", help="inspect unified profiles of a run")
    psub = prof.add_subparsers(dest="action", required=True, parser_class=_Parser)
    pe = psub.add_parser(
        "explain",
        help="show a profile's identifiers, the merges that built it and the refused links "
        "naming its identifiers",
    )
    pe.add_argument(
        "id", help="profile id or identifier: user:u1, anon:a1, email:x@y.io, anonymous_id:a1"
    )
    pe.add_argument("--output", required=True, help="the run's output directory")
    pe.add_argument("--json", action="store_true", help="print one JSON object")
    pg = psub.add_parser(
        "get", help="print the profile an identifier names, as JSON (exit 1: no such profile)"
    )
    pg.add_argument(
        "id", help="identifier or profile id: email:jane@example.com, anon:a1, user:u1, ..."
    )
    _store_arguments(pg)

    srv = sub.add_parser(
        "serve", help="serve GET /v1/profiles/{identifier}, /healthz and /metrics over a store"
    )
    _store_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--pool", type=int, default=8, help="store connections per worker (default 8)")
    srv.add_argument(
        "--workers", type=int, default=1, help="server processes on the port (default 1)"
    )
    return p


def _store_arguments(parser) -> None:
    parser.add_argument(
        "--sink",
        help="the store: postgresql://..., redis://..., or a SQLite file (default: the "
        "config's profile store)",
    )
    parser.add_argument(
        "--config",
        help="the config the store was written with: its identity types and profile PII "
        "policy apply to the identifier (default: the embedded default config)",
    )
    parser.add_argument("--output", help="output directory of a SQLite store (with no --sink)")


def _store_spec(args, cfg):
    from transforms.profile_store import spec_from_url

    if args.sink:
        return spec_from_url(args.sink)
    from pipelines.governed_profiles import profile_stores

    return profile_stores(cfg, args.output or cfg.sinks.output_dir)[0]


def cmd_profile_get(args) -> int:
    import orjson

    from pipelines.lookup import get_profile

    cfg = _load(args.config)
    spec = _store_spec(args, cfg)
    if spec.type == "sqlite" and not Path(spec.path).exists():
        raise UsageError(f"cdi profile get: no profile store at {spec.path}")
    try:
        found = get_profile(args.id, spec, cfg)
    except Exception as e:  # unreachable store, bad URL, not a store: one line, no traceback
        print(f"cdi profile get: {spec.type} {spec.describe()}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if found is None:
        print(f"cdi profile get: no profile for {args.id}", file=sys.stderr)
        return EXIT_FAILURE
    print(orjson.dumps(found, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    return EXIT_OK


def cmd_serve(args) -> int:
    from pipelines.serve import serve

    cfg = _load(args.config)
    spec = _store_spec(args, cfg)
    if spec.type == "bigquery":
        raise UsageError("cdi serve: BigQuery is not a lookup store; serve PostgreSQL or Redis")
    if spec.type == "sqlite" and not Path(spec.path).exists():
        raise UsageError(f"cdi serve: no profile store at {spec.path}")
    if args.workers < 1 or args.pool < 1:
        raise UsageError("cdi serve: --workers and --pool must be at least 1")
    serve(spec, cfg, args.host, args.port, args.pool, args.workers, args.config)
    return EXIT_OK


def _load(config_path: str | None):
    from pipelines.config import ConfigError, load_config, load_default_config
    from pipelines.governed_profiles import pii_salt
    from transforms.tracking_plan import PlanError, load_plan

    cfg = load_config(config_path) if config_path else load_default_config()
    for name, ref in cfg.tracking_plans.items():
        try:
            load_plan(cfg.resolve(ref.path))
        except PlanError as e:
            raise ConfigError([f"{cfg.filename}: tracking_plans.{name}: {e}"]) from None
    try:
        pii_salt(cfg)  # a policy that hashes needs a salt: refused here, before anything runs
    except ValueError as e:
        raise ConfigError([f"{cfg.filename}: pii.salt: {e}"]) from None
    return cfg


def _check_inputs(inputs: dict[str, list[str]], cfg) -> None:
    from apache_beam.io.filesystems import FileSystems

    from pipelines.config import ConfigError

    problems = []
    index = {s.name: i for i, s in enumerate(cfg.sources)}
    for source, globs in inputs.items():
        if not globs:
            problems.append(
                f"{cfg.filename}: sources[{index[source]}].paths: no input given (set paths or "
                "pass --input)"
            )
        for g in globs:
            try:
                found = FileSystems.match([g])[0].metadata_list
            except Exception as e:  # Beam raises BeamIOError for unreadable schemes/paths
                found, problems = [], problems + [f"--input {g}: {e}"]
                continue
            if not found:
                problems.append(f"--input {g}: no file matches")
    if problems:
        raise ConfigError(problems)


def _clear_outputs(paths: dict[str, Path]) -> None:
    """A batch run owns its output artifacts: remove ours (only ours) from a previous run."""
    for key, path in paths.items():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        if key == "profiles":
            for suffix in ("-wal", "-shm"):
                try:
                    Path(str(path) + suffix).unlink(missing_ok=True)
                except NotADirectoryError:  # nothing of ours there; the run will say why
                    pass


def cmd_run(args, beam_args: list[str]) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from pipelines import governed_profiles as job
    from pipelines.config import ConfigError
    from pipelines.report import build_report, counters, format_summary, write_report
    from runners.local import PrismJobServer, harden_loopback_harness, runner_args

    cfg = getattr(args, "replay_config", None) or _load(args.config)
    globs = getattr(args, "archive_globs", None)
    inputs = {} if globs is not None else job.source_inputs(cfg, getattr(args, "input", None))
    _check_inputs(inputs, cfg)
    output_dir = Path(args.output or cfg.sinks.output_dir)
    paths = job.output_paths(cfg, output_dir)
    activate = getattr(args, "activate", True)

    options = PipelineOptions(beam_args)
    streaming = options.view_as(StandardOptions).streaming
    # A run owns its outputs and replaces them, except a continuous run that resumes where its
    # sources say (committed offsets, a time, unacked messages): it keeps the profile store
    # (versions keep it from going back) and adds record files next to the earlier ones (each
    # file's name is its own). A continuous run from `earliest` re-derives everything, so it
    # replaces them: a row an earlier run wrote for a person this run merges away before ever
    # seeing it alone would otherwise stay. They go only once the job is built (or planned):
    # a usage or configuration error (exit 2) leaves the previous run's outputs as they were.
    replaces = not (streaming and any(s.resumes for s in cfg.sources))
    try:
        runner = runner_args(args.runner, streaming=streaming)
    except FileNotFoundError as e:
        raise UsageError(f"cdi run: --runner {args.runner or 'prism'}: {e}") from None
    detach = getattr(args, "detach", False)
    per_pass = getattr(args, "max_events_per_pass", None)
    workers = getattr(args, "workers", None)
    for flag, value in (("--max-events-per-pass", per_pass), ("--workers", workers)):
        if value is None:
            continue
        if streaming or globs is not None or detach:
            raise ConfigError(
                [f"{flag}: for bounded runs over files (not with --streaming, replay or --detach)"]
            )
        if value < 1:
            raise ConfigError([f"{flag}: must be at least 1"])
    if per_pass is not None or (workers or 1) > 1:
        return _run_in_passes(
            cfg, inputs, output_dir, paths, runner + beam_args, per_pass, workers, args.runner
        )
    # The continuous shell (status line, drain by a drain file the workers can see) is for the
    # local runner; Dataflow and Flink jobs are drained with their own tools.
    continuous = streaming and not detach and "--runner=PrismRunner" in runner
    drain_file = output_dir / ".cdi-drain"
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if continuous:
            # Prism in a session of its own: a Ctrl-C to the terminal drains the job instead
            # of killing the runner under it.
            server = stack.enter_context(PrismJobServer())
            runner = [a for a in runner if not a.startswith("--prism_location")] + server.args()
            harden_loopback_harness(serial=_serial_bundles(cfg))
        options = PipelineOptions(runner + beam_args)
        try:
            p = beam.Pipeline(options=options)
            outputs = job.build(
                p, cfg, inputs, archive_globs=globs, drain_file=str(drain_file.resolve())
            )
            job.write_outputs(outputs, cfg, output_dir, activate=activate)
            if replaces:
                _clear_outputs(paths)
            if continuous:
                from pipelines.continuous import run_continuously

                result = run_continuously(p, drain_file, getattr(args, "status_every", 10.0))
            else:
                result = p.run()
                if detach:
                    job_id = getattr(result, "job_id", lambda: None)()
                    where = f" job {job_id}" if job_id else ""
                    print(f"cdi run: submitted{where} (detached: no report)")
                    return EXIT_OK
                result.wait_until_finish()
        except ConfigError:
            raise
        except KeyboardInterrupt:
            print("cdi run: cancelled: no report", file=sys.stderr)
            return EXIT_FAILURE
        except Exception as e:  # the pipeline itself failed: exit 1 with the cause
            print(f"cdi run: pipeline failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_FAILURE
        metrics = counters(result)
    report = build_report(metrics, paths, time.perf_counter() - started)
    if not activate:
        report["activation"] = "suppressed (replay without --activate): destinations not written"
        del report["outputs"]["destinations"]
    write_report(report, paths["report"])
    print(format_summary(report))
    if not activate:
        print("activation        suppressed: no destination records written (use --activate)")
    return EXIT_OK if report["accounted"] else EXIT_FAILURE


def _run_in_passes(
    cfg, inputs, output_dir, paths, beam_args, per_pass, workers, runner_name=None
) -> int:
    """``cdi run --max-events-per-pass N`` and ``--workers W`` (pipelines/passes.py): plan,
    run the passes (W at a time, in a pool of W processes that plan first, when W > 1) into the
    same outputs, one report with the counters of all passes."""
    from pipelines.passes import plan_passes, worker_pool
    from pipelines.report import build_report, format_summary, write_report

    started = time.perf_counter()
    workers = workers or 1
    workdir = output_dir / ".cdi-passes"
    shutil.rmtree(workdir, ignore_errors=True)
    # One pool plans and runs the passes: each process starts Python and Beam once.
    pooled = worker_pool(workers, _pass_worker, (runner_name,)) if workers > 1 else None
    with pooled or contextlib.nullcontext() as pool:
        plan = plan_passes(cfg, inputs, per_pass, workdir, balanced=workers, pool=pool)
        _clear_outputs(paths)  # planned: the input is readable and every source is a file source
        at_once = f", {workers} at a time" if workers > 1 else ""
        print(
            f"cdi run: {plan.events:,} events in {len(plan.files)} passes of at most "
            f"{max(plan.pass_sizes):,}{at_once} ({plan.parts:,} parts, the largest "
            f"{plan.largest_part:,} events; planned in {plan.seconds:.1f} s)",
            flush=True,
        )
        total: dict[str, int] = {}
        jobs = [
            (cfg, files, plan.now_ms, str(output_dir), k, beam_args)
            for k, files in enumerate(plan.files)
        ]
        try:
            for k, outcome in _each_pass(jobs, pool):
                if isinstance(outcome, str):
                    print(
                        f"cdi run: pass {k + 1} of {len(plan.files)} failed: {outcome}",
                        file=sys.stderr,
                    )
                    return EXIT_FAILURE
                for name, value in outcome.items():
                    total[name] = total.get(name, 0) + value
                print(f"cdi run: pass {k + 1} of {len(plan.files)} done", flush=True)
        except KeyboardInterrupt:
            print("cdi run: cancelled: no report", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        report = build_report(total, paths, time.perf_counter() - started)
        report["passes"] = {
            "max_events_per_pass": per_pass,
            "workers": workers,
            "passes": len(plan.files),
            "events_per_pass": plan.pass_sizes,
            "parts": plan.parts,
            "largest_part": plan.largest_part,
            "planning_seconds": round(plan.seconds, 1),
        }
        write_report(report, paths["report"])
        print(format_summary(report))
        return EXIT_OK if report["accounted"] else EXIT_FAILURE


def _pass_worker(runner_name: str | None) -> None:
    """A pass process's start: it dies with ``cdi run`` (a SIGKILL, an OOM kill or a SIGTERM
    of the parent leaves no pass running on, writing into the outputs), and the runner is set
    up as in ``cdi run`` itself (the settings runner_args makes live in the process)."""
    from runners.local import die_with_parent, runner_args

    die_with_parent()
    runner_args(runner_name)


def _each_pass(jobs: list[tuple], pool=None):
    """``(k, counters or the failure's text)`` of each pass as it ends: in this process without
    a ``pool``, else in its W processes at once (spawned: no forked runner threads; each runs
    one pass after another, which hold little once done: a pass's parts are read and settled
    one by one). The first failure stops the passes not yet started."""
    if pool is None:
        for job in jobs:
            yield job[4], _run_pass(*job)
        return
    import concurrent.futures

    pending = {pool.submit(_run_pass, *job): job[4] for job in jobs}
    try:
        for done in concurrent.futures.as_completed(pending):
            try:
                outcome = done.result()
            except Exception as e:  # the worker process itself died (killed, out of memory)
                outcome = f"worker process: {type(e).__name__}: {e}"
            yield pending[done], outcome
            if isinstance(outcome, str):
                return
    finally:
        for future in pending:
            future.cancel()


def _run_pass(cfg, files, now_ms, output_dir, k, beam_args) -> dict[str, int] | str:
    """One pass: the ordinary bounded job over its archive files; its counters, or the
    failure's text (a runner's exception may not survive the trip between processes)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import governed_profiles as job
    from pipelines.report import counters

    # A previous pass's graph and runner in this process are cyclic garbage, which the raised
    # collector thresholds (runners/local.py, tune_gc) would otherwise keep to the process's end.
    gc.collect()
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    outputs = job.build(
        p,
        cfg,
        {},
        bounded=True,
        archive_globs=files,
        now_ms=now_ms,
        archive_input=True,  # sinks.archive gets each pass's raw input, as one run's
        by_part=True,  # planning put each part whole in one of the files
    )
    job.write_outputs(outputs, cfg, Path(output_dir), file_suffix=f"-pass{k:04d}")
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return counters(result)


def _serial_bundles(cfg) -> bool:
    """Whether a streaming run on Prism runs its bundles one at a time (runners/local.py): yes
    over files, where it keeps the report's counts exact; no when a topic or subscription is
    read continuously, where latency matters and Prism's counts are at risk either way.
    ``CDI_PRISM_SERIAL=1|0`` decides instead."""
    import os

    forced = os.environ.get("CDI_PRISM_SERIAL")
    if forced in ("0", "1"):
        return forced == "1"
    return not any(s.continuous for s in cfg.sources)


def replay_window(start: str, stop: str) -> tuple[int, int]:
    """``--from`` / ``--to`` as epoch ms; ConfigError unless both are instants, in order."""
    from pipelines.config import ConfigError
    from transforms.envelope import parse_iso_ms

    bounds = parse_iso_ms(start), parse_iso_ms(stop)
    for flag, value, ms in (("--from", start, bounds[0]), ("--to", stop, bounds[1])):
        if ms is None:
            raise ConfigError([f"{flag}: not an ISO 8601 instant: {value!r}"])
    if bounds[0] >= bounds[1]:
        raise ConfigError(["--from must be before --to"])
    return bounds


def replay_config(cfg, source: str, start: str, stop: str):
    """The config of a replay: only ``source`` (a kafka source), reading ``[start, stop)`` by
    record time. Raises ConfigError naming what is wrong."""
    import dataclasses

    from pipelines.config import ConfigError

    named = {s.name: s for s in cfg.sources}
    if source not in named:
        raise ConfigError([f"--source: no source named {source!r} ({', '.join(named)})"])
    src = named[source]
    if src.type != "kafka":
        raise ConfigError(
            [f"--source {source}: replay reads kafka sources (a {src.type} source: use cdi run)"]
        )
    replay_window(start, stop)
    kafka = dataclasses.replace(src.kafka, start=start, stop=stop)
    return dataclasses.replace(cfg, sources=(dataclasses.replace(src, kafka=kafka),))


def cmd_replay(args, beam_args: list[str]) -> int:
    import dataclasses

    from pipelines.config import ConfigError

    cfg = _load(args.config)
    if (args.source is None) == (args.archive is None):
        raise UsageError("cdi replay: give --source (a kafka source) or --from-archive PATH")
    # Replays never archive again: the history is already where it was read from.
    sinks = dataclasses.replace(
        cfg.sinks, archive=dataclasses.replace(cfg.sinks.archive, path=None)
    )
    cfg = dataclasses.replace(cfg, sinks=sinks)
    if args.archive is None:
        args.replay_config = replay_config(cfg, args.source, args.start, args.stop)
        return cmd_run(args, beam_args)
    from apache_beam.io.filesystems import FileSystems

    from transforms.io.files import archive_files

    start, stop = replay_window(args.start, args.stop)
    if not FileSystems.exists(args.archive):
        raise ConfigError([f"--from-archive {args.archive}: no such archive"])
    found = archive_files(args.archive, [s.name for s in cfg.sources], start, stop)
    # An empty range is a run with no input, not an error.
    args.replay_config = cfg
    args.archive_globs = found
    return cmd_run(args, beam_args)


def cmd_generate(args) -> int:
    from pipelines.generate import write

    if args.events <= 0 or args.persons <= 0:
        raise UsageError("cdi generate: --events and --persons must be positive")
    truth = write(args.out, args.events, args.persons, args.seed)
    print(
        f"wrote {truth['events']:,} events for {args.persons:,} persons to {args.out} "
        f"(duplicates {truth['duplicates']:,}, invalid {sum(truth['invalid'].values()):,}, "
        f"late {truth['late']:,}); ground truth in {args.out}.truth.json"
    )
    return EXIT_OK


def cmd_validate_config(args) -> int:
    cfg = _load(args.file)
    print(
        f"{args.file}: ok ({len(cfg.sources)} source(s), {len(cfg.tracking_plans)} tracking plan(s), "
        f"{len(cfg.consent.destinations)} destination(s), {len(cfg.audiences)} audience(s), "
        f"{len(cfg.triggers)} trigger(s))"
    )
    for src in cfg.sources:
        if src.tracking_plan is None:
            print(
                f"  source {src.name!r}: no tracking plan: envelope rules only (type, messageId, "
                "identifier, event time, size, depth); every well-formed event is accepted"
            )
        else:
            print(f"  source {src.name!r}: tracking plan {src.tracking_plan!r}")
    used = {s.tracking_plan for s in cfg.sources}
    for name in cfg.tracking_plans:
        if name not in used:
            print(f"  tracking plan {name!r}: not used by any source")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = _parser().parse_known_args(argv)
        if rest and args.command not in ("run", "replay"):
            raise UsageError(f"cdi {args.command}: unrecognized arguments: {' '.join(rest)}")
        if args.command == "run":
            return cmd_run(args, rest)
        if args.command == "replay":
            return cmd_replay(args, rest)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "quarantine":
            from pipelines import quarantine_tools

            if args.action == "summarize":
                return quarantine_tools.main_summarize(args.dir)
            return quarantine_tools.main_replay(args.dir, args.out)
        if args.command == "profile":
            if args.action == "get":
                return cmd_profile_get(args)
            from pipelines.explain import main_explain

            return main_explain(args.id, args.output, as_json=args.json)
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_validate_config(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
