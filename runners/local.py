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
production, and the stateful stages stop being dominated by cache bookkeeping.
"""

from __future__ import annotations

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


def runner_flag(name: str | None, streaming: bool = False) -> str:
    """The ``--runner`` value for a user-facing runner name (None = the local default)."""
    if not name:
        name = LOCAL_STREAMING if streaming else LOCAL
    resolved = _ALIASES.get(name.lower(), name)
    if resolved == "DirectRunner":
        # DirectRunner would try to download Prism first; pin the offline engines instead.
        resolved = "BundleBasedDirectRunner" if streaming else "FnApiRunner"
    if resolved == "FnApiRunner":
        disable_local_state_cache()
    return resolved
