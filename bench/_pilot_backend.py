"""The Parallel Pilot backend for ``bench/throughput.py``, through the public API only.

``Pilot`` runs a ``pilot.LocalCluster`` (a gateway and ``n_workers`` workers of one slot each,
as ``pilot up`` does) and drives it with ``pilot.Client``: ``submit`` for the no-op burst, the
round trips and the big argument, ``map(..., chunk=)`` for the map. ``start()`` records how
long the cluster took to be ready (``startup_s``): the time of ``LocalCluster.__enter__``, which
returns once every worker is registered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench._baselines import Backend, inc, noop

__all__ = ["Pilot", "time_startup"]

QUIET = {"PILOT_LOG_LEVEL": "WARNING"}  # the cluster's processes log only what goes wrong


def time_startup(n_workers: int = 2) -> float:
    """Seconds from nothing to ``n_workers`` registered workers (one ``LocalCluster`` start;
    the dashboard included, as ``pilot up`` starts it)."""
    import pilot

    cluster = pilot.LocalCluster(workers=n_workers, env=QUIET)
    t0 = time.perf_counter()
    with cluster:
        took = time.perf_counter() - t0
    return took


class Pilot(Backend):
    """Parallel Pilot: ``LocalCluster(workers=n)`` plus one ``Client``."""

    name = "pilot"

    def __init__(self, n_workers: int = 2, **kwargs: Any):
        super().__init__(n_workers, **kwargs)
        self._cluster: Any = None
        self._client: Any = None
        self.startup_s: float | None = None

    def start(self) -> None:
        import pilot

        cluster = pilot.LocalCluster(workers=self.n_workers, env=QUIET)
        t0 = time.perf_counter()
        cluster.__enter__()
        self.startup_s = time.perf_counter() - t0
        self._cluster = cluster
        self._client = cluster.client()

    def stop(self) -> None:
        if self._cluster is not None:
            self._cluster.__exit__(None, None, None)  # closes the client too
            self._cluster = None
            self._client = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the gateway and the workers (not their task processes)."""
        if self._cluster is None:
            return []
        procs = [self._cluster.gateway, *self._cluster.workers]
        return [p.pid for p in procs if p is not None]

    def _run_noops(self, n: int) -> list:
        jobs = [self._client.submit(noop, i) for i in range(n)]
        return [job.result(self.task_timeout) for job in jobs]

    def _run_map(self, items: list[int], chunk: int) -> list[int]:
        job = self._client.map(inc, items, chunk=chunk)
        job.wait(self.task_timeout)
        return job.results

    def _run_one(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self._client.submit(fn, arg).result(self.task_timeout)
