"""Runner selection: which Beam runner a `cdi run` uses, and the local-run fixes it needs.

Local runs are pinned to runners that work offline. Beam's ``DirectRunner`` first tries Prism,
whose binary is downloaded from GitHub at run time; that download is impossible on a closed network
and is not a dependency we want in CI, so we never ask for it:

- ``local`` (default): the in-process ``FnApiRunner``, the portable Fn API engine Dataflow's and
  Flink's SDK harness also run, with Beam's state, timers and combiners.
- ``local-streaming``: the ``BundleBasedDirectRunner``, which supports ``TestStream``, processing-time
  triggers and unbounded sources.
- Anything else (``DataflowRunner``, ``FlinkRunner``, ``PortableRunner``...) is passed to Beam as is;
  see docs in the README for what production needs (job server jar, expansion service).

The in-process FnApiRunner keeps a 100 MB state cache that measures object sizes with ``objsize``
(~1 ms per state write, 30x the work itself). Production SDK harnesses run with that cache off
(``--max_cache_memory_usage_mb=0``), so the local runner turns it off too: same semantics as
production, and the stateful stages stop being dominated by cache bookkeeping.
"""

from __future__ import annotations

LOCAL = "local"
LOCAL_STREAMING = "local-streaming"

_ALIASES = {
    LOCAL: "FnApiRunner",
    "fnapirunner": "FnApiRunner",
    LOCAL_STREAMING: "BundleBasedDirectRunner",
    "direct": "BundleBasedDirectRunner",
    "bundlebaseddirectrunner": "BundleBasedDirectRunner",
}


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
