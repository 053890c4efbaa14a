"""The peers ``bench/throughput.py`` compares Parallel Pilot with: ipyparallel and Dask.

Each is a ``bench._baselines.Backend`` (the workloads, their timing and result checks are
shared there), driven the way a user of that library would:

- ``IpyParallel``: ``ipyparallel.Cluster`` on loopback (a controller and engines), a
  load-balanced view;
- ``Dask``: ``distributed.LocalCluster`` of single-threaded worker processes and a ``Client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from bench._baselines import (
    Backend,
    BackendStartError,
    _call_with_deadline,
    _chunks,
    _python_path,
    _search_path,
    inc,
    inc_chunk,
    noop,
)

__all__ = ["Dask", "IpyParallel"]


class IpyParallel(Backend):
    """ipyparallel: a local Cluster (controller + engines on loopback), load-balanced view."""

    name = "ipyparallel"

    def __init__(self, n_workers: int = 2, **kwargs: Any):
        super().__init__(n_workers, **kwargs)
        self._cluster: Any = None
        self._rc: Any = None
        self._view: Any = None
        self._profile_dir: str | None = None

    def start(self) -> None:
        import ipyparallel as ipp

        self._profile_dir = tempfile.mkdtemp(prefix="pilot-bench-ipp-")
        with _python_path():
            self._cluster = ipp.Cluster(
                n=self.n_workers,
                profile_dir=self._profile_dir,
                log_level=logging.WARNING,
                engine_timeout=int(self.start_timeout),
            )

            async def start() -> Any:
                return await asyncio.wait_for(
                    self._cluster.start_and_connect(n=self.n_workers), self.start_timeout
                )

            try:
                self._rc = _call_with_deadline(
                    lambda: asyncio.run(start()), self.start_timeout + 10, "ipyparallel cluster"
                )
            except BackendStartError as exc:
                if isinstance(exc.__cause__, TimeoutError):
                    raise BackendStartError(
                        f"ipyparallel cluster did not start within {self.start_timeout:g}s"
                    ) from None
                raise
        # Engines got PYTHONPATH from the environment; make sure anyway.
        self._rc[:].execute(f"import sys; sys.path[:0] = {_search_path()!r}", block=True)
        self._view = self._rc.load_balanced_view()

    def stop(self) -> None:
        if self._rc is not None:
            with contextlib.suppress(Exception):
                self._rc.close()
            self._rc = None
        self._view = None
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                _call_with_deadline(
                    lambda: asyncio.run(self._cluster.stop_cluster()), 60, "ipyparallel stop"
                )
            self._cluster = None
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None

    def _run_noops(self, n: int) -> list:
        ars = [self._view.apply_async(noop, i) for i in range(n)]
        return [ar.get(timeout=self.task_timeout) for ar in ars]

    def _run_map(self, items: list[int], chunk: int) -> list[int]:
        ar = self._view.map_async(inc, items, chunksize=chunk)
        return list(ar.get(timeout=self.task_timeout))

    def _run_one(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self._view.apply_async(fn, arg).get(timeout=self.task_timeout)


class Dask(Backend):
    """dask.distributed: LocalCluster of single-threaded worker processes + Client."""

    name = "dask"

    def __init__(self, n_workers: int = 2, **kwargs: Any):
        super().__init__(n_workers, **kwargs)
        self._cluster: Any = None
        self._client: Any = None

    def start(self) -> None:
        from distributed import Client, LocalCluster

        def start() -> tuple[Any, Any]:
            cluster = LocalCluster(
                n_workers=self.n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            try:
                client = Client(cluster, timeout=self.start_timeout)
                client.wait_for_workers(self.n_workers, timeout=self.start_timeout)
            except BaseException:
                cluster.close()
                raise
            return cluster, client

        with _python_path():
            self._cluster, self._client = _call_with_deadline(
                start, self.start_timeout, "dask LocalCluster"
            )

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close()
            self._cluster = None

    def _run_noops(self, n: int) -> list:
        futures = [self._client.submit(noop, i, pure=False) for i in range(n)]
        return self._client.gather(futures)

    def _run_map(self, items: list[int], chunk: int) -> list[int]:
        futures = self._client.map(inc_chunk, _chunks(items, chunk), pure=False)
        return [x for part in self._client.gather(futures) for x in part]

    def _run_one(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        with warnings.catch_warnings():
            # "Large object of size 100 MB detected in task graph": expected here, we
            # deliberately pass the array the way a user would.
            warnings.filterwarnings("ignore", message=".*Large object.*")
            future = self._client.submit(fn, arg, pure=False)
        return future.result(timeout=self.task_timeout)
