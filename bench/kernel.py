"""Benchmark of remote mode in the Parallel Pilot kernel (issue 4).

A trivial cell's round trip (execute -> idle) in remote mode (``%pilot remote``: the cell runs
on a worker), against the same cell in a stock local ``python3`` kernel, medians of N, in one
run (target: remote at most 15 ms over the stock kernel).

Run: ``.venv/bin/python bench/kernel.py [--repeat 100] [--out bench/results/kernel.json]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from _kernels import Kernel, ms, repo_root

ROOT = repo_root()

import pilot  # noqa: E402
from bench._table import print_table, write_json  # noqa: E402
from pilot_kernel import install  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernel.json"))
    args = p.parse_args()
    prefix = tempfile.mkdtemp()
    install(prefix=prefix)
    os.environ["JUPYTER_PATH"] = f"{prefix}/share/jupyter"
    cell = "x = 1\nx"
    with pilot.LocalCluster(workers=1) as cluster:
        env = {"PILOT_HOME": str(cluster.home), "IPYTHONDIR": tempfile.mkdtemp()}
        stock = Kernel("python3", env)
        ours = Kernel("parallel-pilot", env)
        try:
            local = stock.timed(cell, args.repeat)
            ours_local = ours.timed(cell, args.repeat)
            ours.run("%pilot remote")
            pid = int(ours.run("import os; print(os.getpid())")["stdout"])
            if pid == ours.km.provisioner.process.pid:
                raise RuntimeError("the 'remote' cells ran in the kernel itself")
            remote = ours.timed(cell, args.repeat)
        finally:
            stock.close()
            ours.close()
    over = statistics.median(remote) - statistics.median(local)
    rows = [
        {"kernel": "stock python3, local", **ms(local)},
        {"kernel": "parallel-pilot, local", **ms(ours_local)},
        {"kernel": "parallel-pilot, %pilot remote", **ms(remote)},
        {"kernel": "remote over stock (median diff)", "median_ms": over * 1e3},
    ]
    print_table(rows, ["kernel", "median_ms", "p90_ms", "n"])
    result = {
        "stock_local": ms(local),
        "pilot_local": ms(ours_local),
        "pilot_remote": ms(remote),
        "remote_over_stock_ms": over * 1e3,
        "target_ms_max": 15,
    }
    print(f"\nwrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
