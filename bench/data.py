"""Reading a dataset from S3 on the workers: throughput, the cache, locality (issue 5).

One run starts a real S3 server on loopback (``tests/s3server.py``: ``rclone serve s3``, or
moto), uploads a dataset of ``--files`` files making ``--mb`` MB in all (default 250 files of
2 MB; ``--quick``: 50 MB), and measures:

a. the limit on this machine: one s3fs client reading every file, one after the other
   (``cat_file`` in a loop), then all at once (``fs.cat(paths)``: s3fs's concurrent reads) and
   through a pool of 8 threads;
b. cold runs: a fresh 2-worker ``LocalCluster`` (new temporary ``PILOT_HOME``, so an empty
   cache) runs ``client.map(read, range(P), chunk=1, data={"ds": URL})`` with ``--partitions``
   partitions; each task reads its local files fully and returns the byte count (the total is
   checked); aggregate MB/s from submission to the last result (listing included);
c. cached reruns of the same job on the same cluster: time, MB/s, and the object GETs the S3
   server logged during them (must be 0);
d. locality: the share of a rerun's tasks that ran on the worker that ran them in the cold run
   (``TaskDone.worker``; target at least 90%).

Figures are medians over ``--repeats`` runs (each cold run on its own fresh cluster). No
assertion is about time: the byte totals are checked (an error if wrong), and the script exits
with status 1 after printing everything if a rerun made an object GET or a rerun's hit rate was
under 90%. Results go to ``bench/results/data.json`` (``--out`` to change).

    .venv/bin/python bench/data.py                    # 500 MB in 250 files
    .venv/bin/python bench/data.py --quick            # 50 MB in 25 files
    .venv/bin/python bench/data.py --mb 200 --files 100 --partitions 8 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):  # run as a script: the repo's packages and tests/s3server
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import s3fs  # noqa: E402
from s3server import S3Server, s3_server  # noqa: E402

import pilot  # noqa: E402
from bench._table import print_table, write_json  # noqa: E402

BUCKET = "bench"
PREFIX = "ds"
UPLOAD_BATCH = 32  # files per fs.pipe call while creating the dataset
POOL_THREADS = 8


def read_shard(partition: int, ds: list[str]) -> int:
    """The task: read every local path of this partition's shard fully; return the bytes."""
    total = 0
    for path in ds:
        with open(path, "rb", buffering=0) as fh:
            while block := fh.read(1 << 20):
                total += len(block)
    return total


def make_dataset(fs: s3fs.S3FileSystem, n_files: int, total_mb: float) -> tuple[list[str], int]:
    """Upload ``n_files`` random files making ``total_mb`` MB; return (paths, total bytes)."""
    size = max(1, int(total_mb * 1e6 / n_files))
    fs.mkdir(BUCKET)
    paths = [f"{BUCKET}/{PREFIX}/part-{i:05d}.bin" for i in range(n_files)]
    for start in range(0, n_files, UPLOAD_BATCH):
        fs.pipe({p: os.urandom(size) for p in paths[start : start + UPLOAD_BATCH]})
    return paths, size * n_files


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def client_limit(server: S3Server, paths: list[str], total: int, repeats: int) -> list[dict]:
    """(a) One s3fs client reading every file: sequentially, concurrently, with threads."""
    # A fresh instance: no listing cache, its own connection pool.
    fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)

    def sequential() -> int:
        return sum(len(fs.cat_file(p)) for p in paths)

    def concurrent() -> int:
        return sum(len(b) for b in fs.cat(paths).values())

    def threads() -> int:
        with ThreadPoolExecutor(POOL_THREADS) as pool:
            return sum(pool.map(lambda p: len(fs.cat_file(p)), paths))

    rows = []
    for name, fn in (
        ("one client, sequential (cat_file loop)", sequential),
        ("one client, concurrent (fs.cat(paths))", concurrent),
        (f"one client, {POOL_THREADS} threads (cat_file)", threads),
    ):
        times = []
        for _ in range(repeats):
            seconds, got = timed(fn)
            if got != total:
                raise AssertionError(f"{name}: read {got} bytes, expected {total}")
            times.append(seconds)
        rows.append(_row(name, times, total))
    return rows


def run_job(client: pilot.Client, url: str, partitions: int, total: int) -> pilot.Job:
    """One run of the job; checks that the tasks read every byte."""
    job = client.map(read_shard, range(partitions), chunk=1, data={"ds": url})
    got = sum(job.results)
    if got != total:
        raise AssertionError(f"the tasks read {got} bytes, expected {total}")
    return job


def cluster_runs(
    server: S3Server, url: str, total: int, partitions: int, repeats: int, reruns: int
) -> dict[str, Any]:
    """(b)-(d): per repeat, a fresh cluster: one cold run, then ``reruns`` cached reruns."""
    cold_times: list[float] = []
    warm_times: list[float] = []
    warm_gets: list[int] = []
    hit_rates: list[float] = []
    cold_gets: list[int] = []
    per_worker: list[dict[str, int]] = []
    starts: list[float] = []
    placements: list[list[list[str]]] = []  # per cluster: the cold run's, then each rerun's
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="pilot-bench-data-") as home:
            t0 = time.perf_counter()
            env = {**server.env(), "PILOT_LOG_LEVEL": "WARNING"}
            with pilot.LocalCluster(workers=2, home=home, env=env) as cluster:
                starts.append(time.perf_counter() - t0)
                run = functools.partial(run_job, cluster.client(), url, partitions, total)

                before = server.get_count(BUCKET)
                seconds, cold = timed(run)
                cold_times.append(seconds)
                cold_gets.append(server.get_count(BUCKET) - before)
                placed = {i: d.worker for i, d in cold._done.items()}
                per_worker.append(dict(Counter(placed.values())))
                placements.append([[placed[i] for i in range(partitions)]])
                for _ in range(reruns):
                    before = server.get_count(BUCKET)
                    seconds, warm = timed(run)
                    warm_times.append(seconds)
                    warm_gets.append(server.get_count(BUCKET) - before)
                    same = sum(1 for i, d in warm._done.items() if placed.get(i) == d.worker)
                    hit_rates.append(same / partitions)
                    placements[-1].append([warm._done[i].worker for i in range(partitions)])
    return {
        "cold": cold_times,
        "cold_gets": cold_gets,
        "warm": warm_times,
        "warm_gets": warm_gets,
        "hit_rates": hit_rates,
        "tasks_per_worker_cold": per_worker,
        "cluster_start_s": starts,
        "placements": placements,
    }


def _row(name: str, times: list[float], total: int) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "measure": name,
        "median_s": median,
        "MB_per_s": total / 1e6 / median,
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=None, help="dataset size in MB (default 500)")
    p.add_argument("--files", type=int, default=None, help="number of files (default 250)")
    p.add_argument("--quick", action="store_true", help="50 MB in 25 files, unless given")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="cold runs, each on a fresh cluster")
    p.add_argument("--reruns", type=int, default=3, help="cached reruns per cold run")
    p.add_argument("--backend", default=None, help="S3 server: rclone (default) or moto")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    args = p.parse_args()
    mb = args.mb if args.mb is not None else (50.0 if args.quick else 500.0)
    n_files = args.files if args.files is not None else (25 if args.quick else 250)

    with (
        tempfile.TemporaryDirectory(prefix="pilot-bench-s3-") as workdir,
        s3_server(Path(workdir), backend=args.backend) as server,
    ):
        # The client lists with its own credentials: this process's environment.
        os.environ.update(server.env())
        fs = s3fs.S3FileSystem(**server.storage_options())
        upload_s, (paths, total) = timed(lambda: make_dataset(fs, n_files, mb))
        url = f"s3://{BUCKET}/{PREFIX}/"
        print(
            f"dataset: {n_files} files, {total / 1e6:,.0f} MB at {url} "
            f"({server.backend} on {server.endpoint_url}; uploaded in {upload_s:.1f} s)",
            flush=True,
        )
        limit = client_limit(server, paths, total, args.repeats)
        runs = cluster_runs(server, url, total, args.partitions, args.repeats, args.reruns)

    cold = _row(f"2 workers, {args.partitions} partitions, cold cache", runs["cold"], total)
    warm = _row("same job rerun, cached", runs["warm"], total)
    hit_rate = statistics.median(runs["hit_rates"]) if runs["hit_rates"] else float("nan")
    rows = [
        *limit,
        cold,
        warm,
    ]
    print()
    print_table(rows, ["measure", "median_s", "MB_per_s", "min_s", "max_s", "n"])
    best_client = max(r["MB_per_s"] for r in limit)
    checks = [
        {"check": "object GETs during the reruns (total)", "value": sum(runs["warm_gets"])},
        {"check": "object GETs per cold run", "value": statistics.median(runs["cold_gets"])},
        {"check": "rerun locality hit rate (median)", "value": hit_rate},
        {"check": "rerun locality hit rate (min)", "value": min(runs["hit_rates"])},
        {"check": "cold cluster / best single client", "value": cold["MB_per_s"] / best_client},
        {"check": "cold / cached rerun time", "value": cold["median_s"] / warm["median_s"]},
    ]
    print()
    print_table(checks, ["check", "value"])
    print(f"cold-run tasks per worker: {runs['tasks_per_worker_cold']}")
    print(f"reruns' hit rates: {[round(h, 3) for h in runs['hit_rates']]}")
    print(f"reruns' object GETs: {runs['warm_gets']}")

    result = {
        "dataset": {"files": n_files, "bytes": total, "url": url, "upload_s": upload_s},
        "s3_backend": server.backend,
        "partitions": args.partitions,
        "workers": 2,
        "single_client": limit,
        "cluster_cold": cold | {"times_s": runs["cold"], "gets": runs["cold_gets"]},
        "cluster_rerun": warm | {"times_s": runs["warm"], "gets": runs["warm_gets"]},
        "rerun_gets_total": sum(runs["warm_gets"]),
        "locality_hit_rate": hit_rate,
        "locality_hit_rates": runs["hit_rates"],
        "tasks_per_worker_cold": runs["tasks_per_worker_cold"],
        "cluster_start_s": runs["cluster_start_s"],
        "placements": runs["placements"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "targets": {"rerun_gets": 0, "locality_hit_rate_min": 0.9},
    }
    print(f"\nwrote {write_json(args.out, result)}")
    problems = []
    if sum(runs["warm_gets"]) != 0:
        problems.append(f"the reruns made {sum(runs['warm_gets'])} object GETs (expected 0)")
    if min(runs["hit_rates"]) < 0.9:
        problems.append(f"a rerun's locality hit rate was {min(runs['hit_rates']):.0%} (< 90%)")
    if problems:
        print("TARGETS MISSED: " + "; ".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
