"""Benchmark of %%distribute through a real kernel (issue 3).

1. An empty ``%%distribute --partitions 2`` cell: its round trip, median of 50, against the same
   cell body run locally in the same kernel; the difference is the magic's overhead
   (target: at most 30 ms).
2. ``--over x=range(10000) --chunk 100`` with a trivial body: items/s, next to ``client.map`` of
   the same work from the same kernel on the same cluster (target: the magic at least 80% of
   the API's rate).

Run: ``.venv/bin/python bench/magic.py [--repeat 50] [--out bench/results/magic.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _kernels import Kernel, ms, repo_root

ROOT = repo_root()

import pilot  # noqa: E402
from bench._table import print_table, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the items/s comparison")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "magic.json"))
    args = p.parse_args()

    with pilot.LocalCluster(workers=2) as cluster:
        env = {"PILOT_HOME": str(cluster.home), "IPYTHONDIR": tempfile.mkdtemp()}
        k = Kernel("python3", env)
        try:
            k.run("%load_ext pilot_magics\nimport pilot, time\nclient = pilot.connect()")
            magic = k.timed("%%distribute --partitions 2 --quiet\npartition", args.repeat)
            local = k.timed("partition = 0\npartition", args.repeat)
            overhead = statistics.median(magic) - statistics.median(local)

            magic_rates, api_rates = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                k.run("%%distribute --over x=range(10000) --chunk 100 --quiet --gather r\nx")
                magic_rates.append(10_000 / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                k.run("r = client.map(lambda x: x, range(10000), chunk=100).results")
                api_rates.append(10_000 / (time.perf_counter() - t0))
        finally:
            k.close()

    m_rate, a_rate = statistics.median(magic_rates), statistics.median(api_rates)
    rows = [
        {"measure": "empty --partitions 2 cell", **ms(magic)},
        {"measure": "same cell, local", **ms(local)},
        {"measure": "overhead (median diff)", "median_ms": overhead * 1e3},
    ]
    print_table(rows, ["measure", "median_ms", "p90_ms", "n"])
    rates = [
        {"path": "%%distribute --over (10k, chunk 100)", "items_per_s": m_rate},
        {"path": "client.map (same work)", "items_per_s": a_rate},
        {"path": "magic / API", "items_per_s": m_rate / a_rate},
    ]
    print()
    print_table(rates, ["path", "items_per_s"])
    result = {
        "cell_overhead_ms": overhead * 1e3,
        "distribute_cell": ms(magic),
        "local_cell": ms(local),
        "magic_items_per_s": m_rate,
        "api_items_per_s": a_rate,
        "magic_over_api": m_rate / a_rate,
        "targets": {"cell_overhead_ms_max": 30, "magic_over_api_min": 0.8},
    }
    print(f"\nwrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
