"""Throughput and latency of Parallel Pilot next to raw pyzmq, ipyparallel and Dask.

Raw pyzmq twice: ``raw_zmq``, one broker hop (client -> broker -> worker), the limit the ratios
are taken to; and ``raw_zmq_chain``, the same through Parallel Pilot's own hops (client ->
broker -> worker -> the worker's task process over IPC, and back), nothing done on the way: what
the topology alone costs, so that Parallel Pilot's own work shows beside it.

One run measures every backend on the same machine, one after the other, each with
``--workers`` workers of one slot (default 2), and prints a table of medians, the ratio of each
figure to raw pyzmq measured in the same run, and Parallel Pilot's figures against its targets.
Everything goes to a JSON file as well (``bench/results/throughput.json``; ``--out`` to change).

Workloads (see ``bench/_baselines.py``): 10,000 no-op ``submit``s then gather; ``map`` of
``x + 1`` over 100,000 items with chunk=1000; one task's round trip (median of 200); a 100 MB
numpy argument (new content each time) to a task that returns its size, then the same array
again in 10 tasks (``reuse/new``: their median time over a new array's); and the start-up
time, from nothing to every worker ready (``pilot up`` / ``LocalCluster.__enter__`` for
Parallel Pilot; ``start()`` of each baseline backend).

    .venv/bin/python bench/throughput.py                 # full sizes, every installed backend
    .venv/bin/python bench/throughput.py --quick         # small sizes (a smoke run)
    .venv/bin/python bench/throughput.py --backends pilot,raw_zmq --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the bench package by its name
    sys.path.insert(0, str(ROOT))

from bench._baselines import (  # noqa: E402
    DEFAULT_SIZES,
    Backend,
    WrongResult,
    available_backends,
)
from bench._pilot_backend import Pilot  # noqa: E402
from bench._table import print_table, write_json  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "throughput.json"

QUICK_SIZES: dict[str, dict[str, int]] = {
    "noop_submits": {"n": 1000},
    "map_items": {"n": 20_000, "chunk": 1000},
    "round_trip": {"n": 50},
    "big_arg": {"mb": 10, "repeats": 2},
}

# (table column, workload, figure, higher is better)
FIGURES: list[tuple[str, str, str, bool]] = [
    ("noop tasks/s", "noop_submits", "tasks_per_s", True),
    ("map items/s", "map_items", "items_per_s", True),
    ("rt median ms", "round_trip", "median_ms", False),
    ("rt p90 ms", "round_trip", "p90_ms", False),
    ("big arg GB/s", "big_arg", "median_gb_s", True),
    ("reuse/new", "big_arg", "reuse_ratio", False),
    ("startup s", "startup", "median_s", False),
]

# Parallel Pilot's targets (issue 2): (table column, bound, higher is better)
TARGETS: list[tuple[str, float, bool]] = [
    ("noop tasks/s", 5_000, True),
    ("map items/s", 300_000, True),
    ("rt median ms", 1.0, False),
    ("big arg GB/s", 1.0, True),
    ("reuse/new", 0.1, False),  # issue 12: the same array again costs under a tenth
    ("startup s", 2.0, False),
]

ORDER = ["raw_zmq", "raw_zmq_chain", "pilot", "ipyparallel", "dask"]


def backends() -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {**available_backends(), Pilot.name: Pilot}
    return {name: found[name] for name in ORDER if name in found}


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict with the median of every numeric figure over ``runs`` (and the runs)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = runs
    return out


def _start(cls: type[Backend], workers: int) -> tuple[Backend, float]:
    backend = cls(workers, start_timeout=120, task_timeout=600)
    t0 = time.perf_counter()
    try:
        backend.start()
    except BaseException:
        backend.stop()
        raise
    took = time.perf_counter() - t0
    return backend, getattr(backend, "startup_s", None) or took


def measure(
    cls: type[Backend],
    sizes: dict[str, dict[str, int]],
    *,
    workers: int,
    repeats: int,
    startup_repeats: int,
) -> dict[str, Any]:
    """Start ``cls`` ``startup_repeats`` times (timing each), then run every workload
    ``repeats`` times on the last start. Returns ``{"backend": name, workload: figures}`` or,
    if it failed, with ``"error"``."""
    out: dict[str, Any] = {"backend": cls.name}
    starts: list[dict[str, Any]] = []
    try:
        for _ in range(startup_repeats - 1):
            backend, took = _start(cls, workers)
            backend.stop()
            starts.append({"seconds": took})
        backend, took = _start(cls, workers)
        starts.append({"seconds": took})
        median = statistics.median(s["seconds"] for s in starts)
        out["startup"] = {"median_s": median, "runs": starts}
        try:
            backend._warmup()
            for name in DEFAULT_SIZES:
                kw = sizes[name]
                runs = []
                for _ in range(repeats):
                    runs.append(getattr(backend, name)(**kw))
                    print(f"  {cls.name} {name}: {_brief(runs[-1])}", flush=True)
                out[name] = _median_of(runs)
        finally:
            backend.stop()
    except WrongResult as exc:
        out["error"] = f"WrongResult: {exc}"
    except Exception as exc:
        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _brief(figures: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:,.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )


def _figure(result: dict[str, Any], workload: str, key: str) -> float | None:
    value = result.get(workload, {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def summary_rows(results: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(figures table, ratio-to-raw-zmq table)."""
    raw = next((r for r in results if r["backend"] == "raw_zmq" and "error" not in r), None)
    rows, ratios = [], []
    for r in results:
        row: dict[str, Any] = {"backend": r["backend"]}
        ratio: dict[str, Any] = {"backend": r["backend"]}
        for column, workload, key, _ in FIGURES:
            value = row[column] = _figure(r, workload, key)
            base = _figure(raw, workload, key) if raw is not None else None
            ratio[column] = value / base if value is not None and base else None
        row["error"] = r.get("error", "")
        rows.append(row)
        ratios.append(ratio)
    return rows, ratios


def target_rows(results: list[dict[str, Any]]) -> list[dict]:
    pilot = next((r for r in results if r["backend"] == Pilot.name), {})
    rows = []
    for column, bound, higher in TARGETS:
        workload, key = next((w, k) for c, w, k, _ in FIGURES if c == column)
        value = _figure(pilot, workload, key)
        met = None if value is None else (value >= bound if higher else value <= bound)
        rows.append(
            {
                "figure": column,
                "target": f"{'>=' if higher else '<='} {bound:,g}",
                "pilot": value,
                "met": {None: "-", True: "yes", False: "NO"}[met],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--backends", help=f"comma-separated subset of {', '.join(ORDER)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="runs of each workload (default 3; quick 1)")
    parser.add_argument("--startup-repeats", type=int, help="starts timed (default 3; quick 1)")
    args = parser.parse_args(argv)

    available = backends()
    names = args.backends.split(",") if args.backends else list(available)
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    repeats = args.repeats or (1 if args.quick else 3)
    startup_repeats = args.startup_repeats or (1 if args.quick else 3)

    results = []
    for name in names:
        if name not in available:
            results.append({"backend": name, "error": "not installed"})
            continue
        print(f"{name}...", flush=True)
        t0 = time.perf_counter()
        result = measure(
            available[name],
            sizes,
            workers=args.workers,
            repeats=repeats,
            startup_repeats=startup_repeats,
        )
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)

    rows, ratios = summary_rows(results)
    columns = ["backend", *(c for c, *_ in FIGURES)]
    print(
        f"\nmedians: {args.workers} workers x 1 slot, {os.cpu_count()} cores, "
        f"{repeats} run(s) per workload"
    )
    print_table(rows, [*columns, "error"])
    print("\nratio to raw pyzmq (same run; throughput: higher is better, times: lower)")
    print_table(ratios, columns)
    targets = target_rows(results)
    print("\nParallel Pilot against its targets")
    print_table(targets, ["figure", "target", "pilot", "met"])

    path = write_json(
        args.out,
        {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
            },
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workers": args.workers,
            "repeats": repeats,
            "startup_repeats": startup_repeats,
            "sizes": sizes,
            "summary": rows,
            "ratio_to_raw_zmq": ratios,
            "targets": targets,
            "results": results,
        },
    )
    print(f"\nwritten to {path}")
    return 1 if any("WrongResult" in r.get("error", "") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
