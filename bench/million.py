"""A million queued tasks (issue 12): memory, the submit call, the rate, answers meanwhile, and
a gateway killed and restarted halfway.

On a ``LocalCluster`` (a gateway and ``--workers`` workers of one slot, as ``pilot up``):

1. the reference rate: a job of ``--ref`` no-op tasks (``map(noop, range(ref), chunk=1)``);
2. the big job: ``map(noop, range(n), chunk=1)``, timing the call until it returns (the tasks
   are submitted and acknowledged: they are the gateway's), then until every result is back.
   Meanwhile a thread samples the resident memory (RSS) of the gateway and of this process
   (the client) every 0.25 s, and another client, in a process of its own as the commands
   are, asks the gateway ``status()`` and ``jobs()`` every 0.5 s, timing each answer (what
   ``pilot status`` and ``pilot jobs`` ask; the commands add their own Python start-up, about
   0.15 s here). A third thread reads the job's
   events and counts the results of each task.
3. with ``--restart`` (the default), the same job once more, and when half its tasks are done
   the gateway is killed (SIGKILL) and started again on the same state: the job must finish
   with every result, each task's result reported once. Its answers are given apart: those
   made while a gateway was up, and those that overlapped the restart (from the kill until
   the new gateway is up with its jobs resumed: ``restart_s``), which wait for it by nature.

Targets: gateway and client each under 500 MB, the call returning within 10 s, the big job's
rate at least 0.8x the reference rate, every answer while a gateway is up under 100 ms, and
after the restart no result lost or repeated. The table shows each figure and the target;
everything goes to a JSON file.

    .venv/bin/python bench/million.py                    # 1,000,000 tasks, 2 workers
    .venv/bin/python bench/million.py --n 200000 --no-restart
"""

from __future__ import annotations

import argparse
import platform
import select
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the bench package by its name
    sys.path.insert(0, str(ROOT))

from bench._baselines import noop  # noqa: E402
from bench._table import print_table, write_json  # noqa: E402

MB = 1 << 20
TARGETS = {"gateway_peak_mb": 500, "client_peak_mb": 500, "submit_s": 10.0, "rate_ratio": 0.8}
ANSWER_TARGET_MS = 100.0
ASKER = "--asker"  # run as the asking process (Sampler)


class Sampler:
    """Peak RSS of the gateway (whichever process it is now) and of this process, and the
    answer times of ``status()`` and ``jobs()`` asked by a client in a process of its own (as
    ``pilot status`` is: this process decodes a million results meanwhile, and an answer read
    here would wait for its GIL), until ``__exit__``."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.peak = {"gateway": 0, "client": 0}
        # per call: (start, end) on the system's monotonic clock, which both processes read,
        # so the restart's window can be told apart
        self.answers: dict[str, list[tuple[float, float]]] = {"status": [], "jobs": []}
        self._stop = threading.Event()
        self._answered = threading.Event()  # the asker's first answer: it is measuring
        self._asker = subprocess.Popen(
            [sys.executable, __file__, ASKER, str(cluster.connection_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._threads = [
            threading.Thread(target=self._memory, daemon=True),
            threading.Thread(target=self._read_answers, daemon=True),
        ]

    def __enter__(self) -> Sampler:
        for t in self._threads:
            t.start()
        # answers are measured throughout the job: wait until the asker (a new process that
        # imports pilot and connects, seconds on a loaded machine) has answered once, or a
        # short job ends before it asks and the run has no answers at all
        self._answered.wait(60)
        if not any(self.answers.values()):
            self.__exit__()
            raise RuntimeError(f"the asker gave no answer (exit code {self._asker.poll()})")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._asker.stdin is not None
        self._asker.stdin.close()  # the asker's signal to stop
        try:
            self._asker.wait(60)
        except subprocess.TimeoutExpired:  # hung: stop it, and let what went wrong show
            self._asker.kill()
            self._asker.wait(10)
        for t in self._threads:
            t.join(30)

    def _read_answers(self) -> None:
        assert self._asker.stdout is not None
        for line in self._asker.stdout:
            what, start, end = line.split()
            self.answers[what].append((float(start), float(end)))
            self._answered.set()
        self._answered.set()  # the asker ended: __enter__ stops waiting

    def _memory(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.25):
            gw = self.cluster.gateway
            try:
                rss = psutil.Process(gw.pid).memory_info().rss if gw is not None else 0
            except psutil.Error:
                rss = 0  # between a kill and a restart
            self.peak["gateway"] = max(self.peak["gateway"], rss)
            self.peak["client"] = max(self.peak["client"], me.memory_info().rss)


def asker_main(connection_file: str) -> None:
    """The asking process: ``status()`` and ``jobs()`` at once and then every 0.5 s, a line
    ``WHAT START END`` (monotonic seconds) per answer, until its stdin closes."""
    import pilot

    def stopped(wait_s: float) -> bool:  # stdin readable: closed by the bench
        return bool(select.select([sys.stdin], [], [], wait_s)[0])

    while True:
        try:
            with pilot.connect(connection_file, name="bench-asker") as c:
                while True:
                    for what, call in (("status", c.status), ("jobs", c.jobs)):
                        t0 = time.monotonic()
                        call()
                        print(what, t0, time.monotonic(), flush=True)
                    if stopped(0.5):
                        return
        except pilot.PilotError:
            if stopped(0.5):  # the gateway is being restarted: ask again once it is back
                return


def count_results(job: Any, n: int, counts: bytearray) -> None:
    """Read the job's events until it ends, counting each task's results."""
    from gateway.protocol import TaskDone

    for ev in job.events():
        if isinstance(ev, TaskDone):
            counts[ev.index] = min(255, counts[ev.index] + 1)


def big_job(cluster: Any, client: Any, n: int, restart: bool) -> dict[str, Any]:
    counts = bytearray(n)
    with Sampler(cluster) as sampler:
        t0 = time.perf_counter()
        job = client.map(noop, range(n), chunk=1)
        submit_s = time.perf_counter() - t0
        reader = threading.Thread(target=count_results, args=(job, n, counts), daemon=True)
        reader.start()
        restarted_at = None
        down = (0.0, 0.0)  # from the kill until the new gateway is up (its jobs resumed)
        if restart:
            while job.progress[0] < n // 2:
                time.sleep(0.05)  # polling the job's own counter; the bench is not a test
            restarted_at = job.progress[0]
            killed = time.monotonic()
            cluster.kill_gateway()
            cluster.start_gateway()
            down = (killed, time.monotonic())
        job.wait(3600)
        took = time.perf_counter() - t0
        reader.join(60)
    lost = sum(1 for c in counts if c == 0)
    repeated = sum(1 for c in counts if c > 1)
    out = {
        "n": n,
        "submit_s": submit_s,
        "run_s": took,
        "rate": n / took,
        "gateway_peak_mb": sampler.peak["gateway"] / MB,
        "client_peak_mb": sampler.peak["client"] / MB,
        "answers_ms": {k: _answer_figures(v, down) for k, v in sampler.answers.items()},
        "results_lost": lost,
        "results_repeated": repeated,
        "results_ok": len(job.results) == n and lost == 0,
    }
    if restarted_at is not None:
        out["restarted_at_done"] = restarted_at
    return out


def _answer_figures(spans: list[tuple[float, float]], down: tuple[float, float]) -> dict:
    """Median and worst answer times; with a restart, also apart: the answers that waited for
    the killed gateway to come back (their call overlaps ``down``) and the others."""
    out = _figures([(end - start) * 1000 for start, end in spans])
    if down != (0.0, 0.0):
        waited = [s for s in spans if s[0] < down[1] and s[1] > down[0]]
        up = [s for s in spans if not (s[0] < down[1] and s[1] > down[0])]
        out["gateway_up"] = _figures([(e - s) * 1000 for s, e in up])
        out["across_restart"] = _figures([(e - s) * 1000 for s, e in waited])
        out["restart_s"] = down[1] - down[0]
    return out


def _figures(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "median_ms": statistics.median(ms), "worst_ms": max(ms)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--ref", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-restart", dest="restart", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "million.json"))
    parser.add_argument(ASKER, metavar="CONNECTION_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.asker:
        asker_main(args.asker)
        return 0

    import pilot

    with pilot.LocalCluster(workers=args.workers, env={"PILOT_LOG_LEVEL": "WARNING"}) as cluster:
        client = cluster.client()
        client.map(noop, range(100), chunk=1).wait(60)  # warm: the task processes load noop
        t0 = time.perf_counter()
        client.map(noop, range(args.ref), chunk=1).wait(600)
        ref_rate = args.ref / (time.perf_counter() - t0)
        clean = big_job(cluster, client, args.n, restart=False)
        restarted = big_job(cluster, client, args.n, restart=True) if args.restart else None

    clean["rate_ratio"] = clean["rate"] / ref_rate
    rows = [
        _row("gateway peak RSS, MB", clean["gateway_peak_mb"], "< 500"),
        _row("client peak RSS, MB", clean["client_peak_mb"], "< 500"),
        _row("map() returns, s", clean["submit_s"], "< 10"),
        _row(f"rate, tasks/s ({args.ref:,}-task job)", ref_rate, ""),
        _row(f"rate, tasks/s ({args.n:,}-task job)", clean["rate"], ""),
        _row("rate ratio", clean["rate_ratio"], ">= 0.8"),
    ]
    for what, fig in clean["answers_ms"].items():
        rows.append(_row(f"{what}() answer, worst ms", fig.get("worst_ms"), "< 100"))
        rows.append(_row(f"{what}() answer, median ms", fig.get("median_ms"), ""))
    if restarted is not None:
        rows.append(_row("restart: results lost", restarted["results_lost"], "0"))
        rows.append(_row("restart: results repeated", restarted["results_repeated"], "0"))
        rows.append(_row("restart: gateway peak RSS, MB", restarted["gateway_peak_mb"], "< 500"))
        rows.append(_row("restart: client peak RSS, MB", restarted["client_peak_mb"], "< 500"))
        for what, fig in restarted["answers_ms"].items():
            up, waited = fig["gateway_up"], fig["across_restart"]
            rows.append(
                _row(f"restart: {what}() worst ms, gateway up", up.get("worst_ms"), "< 100")
            )
            rows.append(
                _row(f"restart: {what}() worst ms, across the restart", waited.get("worst_ms"), "")
            )
        rows.append(_row("restart: gateway down, s", fig["restart_s"], ""))
    print(f"\nA job of {args.n:,} no-op tasks on {args.workers} workers")
    print_table(rows, ["figure", "value", "target"])
    path = write_json(
        args.out,
        {
            "n": args.n,
            "ref": args.ref,
            "workers": args.workers,
            "ref_rate": ref_rate,
            "clean": clean,
            "restarted": restarted,
            "targets": {**TARGETS, "answer_ms": ANSWER_TARGET_MS},
            "python": sys.version.split()[0],
            "machine": platform.platform(),
        },
    )
    print(f"wrote {path}")
    return 0


def _row(figure: str, value: Any, target: str) -> dict[str, Any]:
    return {"figure": figure, "value": value, "target": target}


if __name__ == "__main__":
    sys.exit(main())
