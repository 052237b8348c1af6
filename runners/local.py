"""Runner selection: which Beam runner a `cdi run` uses, and the local-run fixes it needs.

Local runs are pinned to runners that work offline. Beam's ``DirectRunner`` first tries Prism,
whose binary is downloaded from GitHub at run time; that download is impossible on a closed network
and is not a dependency we want in CI, so we never ask for it:

- ``local`` (default): the in-process ``FnApiRunner``, the portable Fn API engine Dataflow's and
  Flink's SDK harness also run, with Beam's state, timers and combiners.
- ``local-streaming``: the ``BundleBasedDirectRunner``, which supports ``TestStream``, processing-time
  triggers and unbounded sources.
- ``prism``: Beam's portable local runner (a Go program), built from the Go module proxy by
  ``make prism`` into ``.venv/bin/prism`` (or found at ``$CDI_PRISM`` / on PATH) and passed as
  ``--prism_location``: Beam's own download of it from GitHub cannot work here. It runs the
  streaming stages over bounded and unbounded inputs with real watermarks.
- Anything else (``DataflowRunner``, ``FlinkRunner``, ``PortableRunner``...) is passed to Beam as is;
  see docs in the README for what production needs (job server jar, expansion service).

The in-process FnApiRunner keeps a 100 MB state cache that measures object sizes with ``objsize``
(~1 ms per state write, 30x the work itself). Production SDK harnesses run with that cache off
(``--max_cache_memory_usage_mb=0``), so the local runner turns it off too: same semantics as
production, and the stateful stages stop being dominated by cache bookkeeping. It also raises
CPython's garbage collector thresholds (:func:`tune_gc`).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

LOCAL = "local"
LOCAL_STREAMING = "local-streaming"
PRISM = "prism"

_ALIASES = {
    LOCAL: "FnApiRunner",
    "fnapirunner": "FnApiRunner",
    LOCAL_STREAMING: "BundleBasedDirectRunner",
    "direct": "BundleBasedDirectRunner",
    "bundlebaseddirectrunner": "BundleBasedDirectRunner",
    PRISM: "PrismRunner",
    "prismrunner": "PrismRunner",
}


def prism_binary() -> str | None:
    """The Prism binary: ``$CDI_PRISM``, else next to this Python (``make prism`` puts it in the
    venv), else on PATH; None when there is none."""
    candidates = [os.environ.get("CDI_PRISM"), str(Path(sys.executable).parent / "prism")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return shutil.which("prism")


def runner_args(name: str | None, streaming: bool = False) -> list[str]:
    """``--runner=...`` plus what that runner needs to run offline (Prism: its binary, a job
    stream deadline fit for long runs). Put user flags after these: the last one wins."""
    resolved = runner_flag(name, streaming)
    args = [f"--runner={resolved}"]
    if resolved == "PrismRunner":
        harden_loopback_harness(serial=False)  # the caller may ask for serial bundles too
        binary = prism_binary()
        if binary is None:
            raise FileNotFoundError(
                "no Prism binary: run `make prism` (needs Go), or set CDI_PRISM to one"
            )
        args.append(f"--prism_location={binary}")
        # Beam applies --job_server_timeout (default 300 s) as the deadline of the job's state
        # and message streams too: a Prism run longer than 5 minutes failed with
        # DEADLINE_EXCEEDED. A month instead (a flag given after these wins).
        args.append(f"--job_server_timeout={30 * 86400}")
    return args


def disable_local_state_cache() -> None:
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.STATE_CACHE_SIZE_MB = 0


# The in-process runner keeps a bounded run's shuffles as millions of small live objects, which
# CPython's cyclic collector at its default thresholds (700, 10, 10) walks over and over without
# freeing anything (the job makes no reference cycles worth collecting early). Here:
# - the young generation every 10,000 allocations: each collection walks the objects allocated
#   since the last one, and 10,000 are still in the CPU's cache (700: too many collections;
#   200,000: tens of MB out of cache; the oracle at 500k 34.4 s with 200,000, 32.1 s with
#   10,000, 31.1 s with no collection at all);
# - the middle generation every 20,000 young collections (200M allocations): each walks
#   everything the process came to hold since the last one, which in a bounded run only grows
#   (the oracle at 1M, collecting it every 50: two such collections, 6 s of 80 s, freeing 10
#   objects in all).
# The pipeline measured the same with each setting (1M in passes; 250k in one process and in
# passes), the same peak; the README has the history. A pass process collects a finished pass's
# garbage (its pipeline graph) before the next pass (pipelines/cli.py, _run_pass).
GC_THRESHOLDS = (10_000, 20_000, 1000)


def tune_gc() -> None:
    """Fewer cyclic collections in this process (a bounded in-process run, the oracle)."""
    gc.set_threshold(*GC_THRESHOLDS)


def runner_flag(name: str | None, streaming: bool = False) -> str:
    """The ``--runner`` value for a user-facing runner name (None = the local default)."""
    if not name:
        # A streaming run's default is Prism: the BundleBasedDirectRunner cannot run the job's
        # streaming graph (its event-time timers never reach the sinks there).
        name = PRISM if streaming else LOCAL
    resolved = _ALIASES.get(name.lower(), name)
    if resolved == "DirectRunner":
        # DirectRunner would try to download Prism first; pin the offline engines instead.
        resolved = "BundleBasedDirectRunner" if streaming else "FnApiRunner"
    if resolved == "FnApiRunner":
        disable_local_state_cache()
        tune_gc()
    return resolved


def die_with_parent() -> None:
    """In the child before exec: Linux delivers SIGKILL to it when the process that started it
    dies, however it dies (a SIGKILL or an OOM kill of `cdi run` leaves no runner behind)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the job shell's exit path stops it instead
        pass


class PrismJobServer:
    """A Prism job server this process starts and stops itself, in a session of its own: a
    continuous run drains on Ctrl-C / SIGTERM, and a signal sent to the whole process group (a
    terminal's Ctrl-C, ``timeout``, a supervisor) must reach the job's shell only, never the
    runner under it. Use as a context manager; ``args()`` are the pipeline flags that point a
    PrismRunner at it (``--job_endpoint``)."""

    def __init__(self, binary: str | None = None, log_level: str | None = None):
        self._binary = binary or prism_binary()
        if self._binary is None:
            raise FileNotFoundError(
                "no Prism binary: run `make prism` (needs Go), or set CDI_PRISM to one"
            )
        # $CDI_PRISM_LOG_LEVEL (debug, info, warn, error): Prism's own log, on stderr.
        self._log_level = log_level or os.environ.get("CDI_PRISM_LOG_LEVEL", "error")
        self._process = None
        self.endpoint = ""

    def __enter__(self) -> PrismJobServer:
        import socket
        import subprocess
        import time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._process = subprocess.Popen(
            [self._binary, f"--job_port={port}", "--serve_http=false"]
            + [f"--log_level={self._log_level}", "--idle_shutdown_timeout=-1s"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prism exited with status {self._process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                self.endpoint = f"localhost:{port}"
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("prism did not start listening within 60 s")

    def args(self) -> list[str]:
        return [f"--job_endpoint={self.endpoint}"]

    def __exit__(self, *exc) -> None:
        import subprocess

        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def harden_loopback_harness(serial: bool = True) -> None:
    """Make this process's SDK harness (Prism's LOOPBACK worker) refuse runner-initiated bundle
    splits and, with ``serial``, run one bundle at a time.

    Measured here (Beam 2.77, Prism 2.77), 1,000 demo events through the streaming stages:
    with Prism splitting bundles (its log: "Unexpected split on a bundle with timers", Beam
    issue 35771) whole persons' held events were lost (profile event counts 943 of 952;
    deliveries 2,858 and 2,878 of 2,894); with splits refused every row and record output equals
    the in-process runner's, byte for byte. Concurrent bundles then still lose *counter* counts
    (Prism's metrics store, see the README: deliveries 2,748 of 2,894 on those events):
    ``serial`` keeps the counts right in runs of few, large bundles (a streaming run over
    files), at about 3x the time. Idempotent; once serial, serial for the process."""
    from concurrent.futures import ThreadPoolExecutor

    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.worker import bundle_processor, sdk_worker

    if not getattr(bundle_processor.BundleProcessor, "cdi_unsplittable", False):

        def refuse_split(self, request):
            return beam_fn_api_pb2.ProcessBundleSplitResponse()

        bundle_processor.BundleProcessor.try_split = refuse_split
        bundle_processor.BundleProcessor.cdi_unsplittable = True
    if not serial or getattr(sdk_worker.SdkHarness, "cdi_serial", False):
        return

    class _SerialPool(ThreadPoolExecutor):
        @property
        def _workers(self):  # the harness logs the size of its pool by this name
            return self._threads

    class SerialSdkHarness(sdk_worker.SdkHarness):
        cdi_serial = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._worker_thread_pool = _SerialPool(max_workers=1, thread_name_prefix="bundle")

    sdk_worker.SdkHarness = SerialSdkHarness
