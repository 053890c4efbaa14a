"""Memory a worker and its task processes hold when several tasks use one big array.

A ``LocalCluster`` of one worker with ``--slots`` task processes; ``--slots`` tasks at once,
each summing the same ``--mb`` MB numpy array (so every task process reads all of it). The
figure is what the worker and its task processes hold once the tasks are done, over what they
held before: their unique memory (USS, psutil) plus the machine's shared memory (``Shmem`` in
``/proc/meminfo``, where a worker keeps the buffers its task processes map: see
``worker/_shared.py``), counted once. A copy per task process shows as ``slots`` times the
array; one shared copy as about one. It is measured twice: right after the tasks, and once the
worker has been idle ``--idle-s`` (a worker keeps the memory it received the array into, for
the next big message, until its allocator is trimmed: ``pilot/_malloc.py``).

    .venv/bin/python bench/worker_memory.py                    # 100 MB, 4 slots, 3 repeats
    .venv/bin/python bench/worker_memory.py --mb 20 --slots 2 --repeats 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the bench package by its name
    sys.path.insert(0, str(ROOT))

from bench._table import print_table, write_json  # noqa: E402
from pilot._malloc import TRIM_EVERY_S  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "worker_memory.json"


def total_after(arr: Any, pause_s: float) -> float:
    """The task: waits a moment (so the tasks overlap), then reads the whole array."""
    time.sleep(pause_s)
    return float(arr.sum())


def _held(worker: Any) -> int:
    """USS of the worker and its children, plus the machine's shared memory, in bytes."""
    procs = [worker, *worker.children(recursive=True)]
    with open("/proc/meminfo") as f:
        shmem = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))
    return sum(p.memory_full_info().uss for p in procs) + shmem


def measure(mb: int, slots: int, idle_s: float) -> dict[str, Any]:
    import numpy as np
    import psutil

    import pilot

    arr = np.arange(mb * 1_000_000 // 8, dtype=np.float64)
    with pilot.LocalCluster(workers=1, slots=slots, env={"PILOT_LOG_LEVEL": "WARNING"}) as c:
        client = c.client()
        worker = psutil.Process(c.workers[0].pid)
        before = _held(worker)
        jobs = [client.submit(total_after, arr, 0.5) for _ in range(slots)]
        totals = [job.result(300) for job in jobs]
        after = _held(worker)
        time.sleep(idle_s)  # a bench, not a test: the trim comes on a clock
        idle = _held(worker)
    if totals != [float(arr.sum())] * slots:
        raise SystemExit(f"wrong results: {totals}")
    added, added_idle = after - before, idle - before
    return {
        "added_mb": added / 1e6,
        "copies": added / arr.nbytes,
        "added_idle_mb": added_idle / 1e6,
        "copies_idle": added_idle / arr.nbytes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=TRIM_EVERY_S + 2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    runs = [measure(args.mb, args.slots, args.idle_s) for _ in range(args.repeats)]
    row = {
        "array MB": args.mb,
        "tasks at once": args.slots,
        "added MB (median)": statistics.median(r["added_mb"] for r in runs),
        "added MB (worst)": max(r["added_mb"] for r in runs),
        "copies of the array (median)": statistics.median(r["copies"] for r in runs),
        f"added MB idle {args.idle_s:g} s (median)": statistics.median(
            r["added_idle_mb"] for r in runs
        ),
        "copies idle (median)": statistics.median(r["copies_idle"] for r in runs),
    }
    print_table([row], list(row))
    path = write_json(args.out, {"machine": platform.platform(), "summary": row, "runs": runs})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
