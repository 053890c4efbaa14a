"""Baseline backends for ``bench/throughput.py``.

Every backend is a context manager with the same four workloads, each returning a
dict of figures (and raising :class:`WrongResult` if the answers are wrong):

- ``noop_submits(n)``: submit ``n`` no-op tasks, then gather all results -> ``tasks_per_s``
- ``map_items(n, chunk)``: map ``x + 1`` over ``n`` items, one task per ``chunk`` -> ``items_per_s``
- ``round_trip(n)``: submit one no-op, wait for it, ``n`` times -> ``median_ms``, ``p90_ms``
- ``big_arg(mb, repeats)``: one task whose argument is an ``mb`` MB numpy array, with content
  never sent before in the process (returns only its size) -> ``median_gb_s`` (1 GB = 1e9
  bytes); then the last array again in ``REUSES`` tasks, one after the other ->
  ``reuse_ratio``, the median time of those over the median time of a new one

Backends:

- :class:`RawZmq`: the limit. DEALER client -> ROUTER/ROUTER broker (subprocess or
  thread) -> DEALER worker processes; pickle protocol 5 with numpy buffers as separate
  zero-copy frames; no signing, no bookkeeping beyond task ids.
- :class:`RawZmqChain`: the same through Parallel Pilot's hops, worker to task process included.
- :class:`IpyParallel`: ``ipyparallel.Cluster``, load-balanced view (``bench/_peers.py``).
- :class:`Dask`: ``distributed.LocalCluster`` with one single-threaded worker process each
  (``bench/_peers.py``).

A new backend subclasses :class:`Backend` and implements ``start``, ``stop``,
``_run_noops``, ``_run_map`` and ``_run_one``; the timing and result checks are shared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"

#: Full-size parameters for each workload, keyed by method name.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "noop_submits": {"n": 10_000},
    "map_items": {"n": 100_000, "chunk": 1000},
    "round_trip": {"n": 200},
    "big_arg": {"mb": 100, "repeats": 5},
}

REUSES = 10  # tasks given the same big array again
_NEW_CONTENT = itertools.count(1)  # a big array's first value: new in every run, not only in one

#: Small parameters for smoke tests.
TINY_SIZES: dict[str, dict[str, int]] = {
    "noop_submits": {"n": 50},
    "map_items": {"n": 500, "chunk": 50},
    "round_trip": {"n": 50},
    "big_arg": {"mb": 1, "repeats": 2},
}


# --------------------------------------------------------------------------------------
# Task functions: module level, so every backend ships them by reference (the workers
# import this module; see _python_path()).
# --------------------------------------------------------------------------------------


def noop(x: Any = None) -> Any:
    """The no-op task: returns its argument, so results can be checked."""
    return x


def inc(x: int) -> int:
    return x + 1


def inc_chunk(chunk: list[int]) -> list[int]:
    """One map task: ``inc`` over a chunk of items."""
    return [x + 1 for x in chunk]


def nbytes_and_last(arr: np.ndarray) -> tuple[int, float]:
    """The big-argument task: returns something small that proves the data arrived."""
    return int(arr.nbytes), float(arr[-1])


# --------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------


class BackendError(RuntimeError):
    """A backend failed (task error, timeout, dead process)."""


class BackendStartError(BackendError):
    """A backend could not be started within its deadline."""


class WrongResult(AssertionError):
    """A workload returned wrong results."""


def _search_path() -> list[str]:
    # ROOT for ``bench._baselines``; BENCH_DIR for ``_baselines`` when a script in bench/
    # imported this module by its bare name.
    return [str(ROOT), str(BENCH_DIR)]


@contextlib.contextmanager
def _python_path() -> Iterator[None]:
    """Temporarily put this module's directories on PYTHONPATH for spawned processes."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(_search_path() + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _call_with_deadline(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn()`` in a daemon thread; raise BackendStartError if it takes too long."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name=f"start-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise BackendStartError(f"{what} did not start within {timeout:g}s")
    if "error" in box:
        raise BackendStartError(f"{what} failed to start: {box['error']!r}") from box["error"]
    return box.get("value")


def _chunks(items: list, chunk: int) -> list[list]:
    return [items[i : i + chunk] for i in range(0, len(items), chunk)]


class Backend:
    """Base class: a context manager exposing the four workloads.

    Subclasses implement:

    - ``start()`` / ``stop()``: bring the workers up / tear everything down (``stop`` must
      be safe to call after a partial start and more than once);
    - ``_run_noops(n)``: submit ``noop(i)`` for ``i in range(n)``, all before gathering,
      and return the results in order;
    - ``_run_map(items, chunk)``: map ``inc`` over ``items`` with one task per ``chunk``
      items and return the flat list of results;
    - ``_run_one(fn, arg)``: run ``fn(arg)`` as one task and wait for its result.
    """

    name = "base"

    def __init__(
        self, n_workers: int = 2, *, start_timeout: float = 120.0, task_timeout: float = 600.0
    ):
        self.n_workers = n_workers
        self.start_timeout = start_timeout
        self.task_timeout = task_timeout

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Backend:
        try:
            self.start()
            self._warmup()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _warmup(self) -> None:
        """Pay first-use costs (imports, connections, caches) outside the timings."""
        self._run_noops(4 * self.n_workers)
        self._run_map(list(range(100)), 10)
        self._run_one(nbytes_and_last, np.ones(1000))

    # -- hooks -------------------------------------------------------------------------

    def _run_noops(self, n: int) -> list:
        raise NotImplementedError

    def _run_map(self, items: list[int], chunk: int) -> list[int]:
        raise NotImplementedError

    def _run_one(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        raise NotImplementedError

    # -- workloads ---------------------------------------------------------------------

    def noop_submits(self, n: int = 10_000) -> dict:
        t0 = time.perf_counter()
        results = self._run_noops(n)
        dt = time.perf_counter() - t0
        if list(results) != list(range(n)):
            raise WrongResult(f"{self.name}: noop results wrong")
        return {"n": n, "seconds": dt, "tasks_per_s": n / dt}

    def map_items(self, n: int = 100_000, chunk: int = 1000) -> dict:
        items = list(range(n))
        expected = [x + 1 for x in items]
        t0 = time.perf_counter()
        results = self._run_map(items, chunk)
        dt = time.perf_counter() - t0
        if list(results) != expected:
            raise WrongResult(f"{self.name}: map results wrong")
        return {
            "n": n,
            "chunk": chunk,
            "tasks": -(-n // chunk),
            "seconds": dt,
            "items_per_s": n / dt,
        }

    def round_trip(self, n: int = 200) -> dict:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            result = self._run_one(noop, i)
            times.append(time.perf_counter() - t0)
            if result != i:
                raise WrongResult(f"{self.name}: round trip returned {result!r}, not {i}")
        ms = np.array(times) * 1e3
        return {
            "n": n,
            "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()),
        }

    def big_arg(self, mb: int = 100, repeats: int = 5) -> dict:
        arr = np.arange(mb * 1_000_000 // 8, dtype=np.float64)
        expected = (int(arr.nbytes), float(arr[-1]))
        times = []
        for _ in range(repeats):
            # new content each time, across runs too: nothing content-addressed may skip it
            arr[0] = -float(next(_NEW_CONTENT))
            t0 = time.perf_counter()
            result = self._run_one(nbytes_and_last, arr)
            times.append(time.perf_counter() - t0)
            if not isinstance(result, tuple | list) or tuple(result) != expected:
                raise WrongResult(f"{self.name}: big arg returned {result!r}, not {expected}")
        med = statistics.median(times)
        reused = []  # the last array again, 10 tasks one after the other: sent again or not?
        for _ in range(REUSES):
            t0 = time.perf_counter()
            result = self._run_one(nbytes_and_last, arr)
            reused.append(time.perf_counter() - t0)
            if tuple(result) != expected:
                raise WrongResult(f"{self.name}: big arg again returned {result!r}")
        return {
            "mb": mb,
            "repeats": repeats,
            "bytes": int(arr.nbytes),
            "median_s": med,
            "median_gb_s": arr.nbytes / med / 1e9,
            "best_gb_s": arr.nbytes / min(times) / 1e9,
            "worst_gb_s": arr.nbytes / max(times) / 1e9,
            "reuse_median_s": statistics.median(reused),
            "reuse_worst_s": max(reused),
            "reuse_ratio": statistics.median(reused) / med,  # target: under 0.1
        }

    def run_all(self, sizes: dict[str, dict[str, int]] | None = None) -> dict[str, dict]:
        """Run the four workloads (``sizes`` overrides DEFAULT_SIZES per workload)."""
        sizes = {k: {**v, **(sizes or {}).get(k, {})} for k, v in DEFAULT_SIZES.items()}
        return {name: getattr(self, name)(**kw) for name, kw in sizes.items()}


def run_backend(
    cls: type[Backend], sizes: dict[str, dict[str, int]] | None = None, **kwargs: Any
) -> dict:
    """Start ``cls``, run all workloads, stop it.

    Returns ``{"backend": name, <workload>: figures, ...}``, or ``{"backend": name,
    "error": "..."}`` if it could not start or failed; wrong results still raise.
    """
    out: dict[str, Any] = {"backend": cls.name}
    try:
        with cls(**kwargs) as backend:
            out.update(backend.run_all(sizes))
    except WrongResult:
        raise
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def summary_row(result: dict) -> dict:
    """Flatten a :func:`run_backend` result into one table row."""
    get = lambda w, k: result.get(w, {}).get(k)  # noqa: E731
    return {
        "backend": result.get("backend"),
        "noop tasks/s": get("noop_submits", "tasks_per_s"),
        "map items/s": get("map_items", "items_per_s"),
        "rt median ms": get("round_trip", "median_ms"),
        "rt p90 ms": get("round_trip", "p90_ms"),
        "big arg GB/s": get("big_arg", "median_gb_s"),
        "error": result.get("error", ""),
    }


SUMMARY_COLUMNS = [
    "backend",
    "noop tasks/s",
    "map items/s",
    "rt median ms",
    "rt p90 ms",
    "big arg GB/s",
    "error",
]


# --------------------------------------------------------------------------------------

from bench._peers import Dask, IpyParallel  # noqa: E402  (they build on Backend, above)
from bench._raw_zmq import RawZmq, RawZmqChain  # noqa: E402

BACKENDS: dict[str, type[Backend]] = {
    RawZmq.name: RawZmq,
    RawZmqChain.name: RawZmqChain,
    IpyParallel.name: IpyParallel,
    Dask.name: Dask,
}

_REQUIRES = {"ipyparallel": "ipyparallel", "dask": "distributed"}  # raw pyzmq's two: zmq


def available_backends() -> dict[str, type[Backend]]:
    """The baseline backends whose packages are importable, by name (raw_zmq always)."""
    return {
        name: cls
        for name, cls in BACKENDS.items()
        if importlib.util.find_spec(_REQUIRES.get(name, "zmq")) is not None
    }


def main(argv: list[str] | None = None) -> None:
    """Throwaway runner: ``python bench/_baselines.py [--tiny] [--json PATH] [names...]``."""
    import argparse

    from bench._table import print_table, write_json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("backends", nargs="*", help="default: all available")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--broker", choices=["process", "thread"], default="process")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    available = available_backends()
    names = args.backends or list(available)
    sizes = TINY_SIZES if args.tiny else DEFAULT_SIZES
    results = []
    for name in names:
        if name not in available:
            results.append({"backend": name, "error": "not installed"})
            continue
        kwargs = {"broker": args.broker} if name == "raw_zmq" else {}
        t0 = time.perf_counter()
        result = run_backend(available[name], sizes, **kwargs)
        result["wall_s"] = time.perf_counter() - t0
        print(f"{name}: {result}", flush=True)
        results.append(result)
    print()
    print_table([summary_row(r) for r in results], SUMMARY_COLUMNS)
    if args.json:
        write_json(args.json, {"sizes": sizes, "results": results})


if __name__ == "__main__":
    # Re-import under the package name so task functions pickle as bench._baselines.*
    sys.path[:0] = [str(ROOT)]
    from bench._baselines import main as _main

    _main()
