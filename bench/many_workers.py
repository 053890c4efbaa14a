"""A thousand workers: a load generator that plays N workers over real sockets, in one process.

Each simulated worker is a real ZeroMQ DEALER with its own identity, speaking the real protocol
with the gateway's key (``WorkerHello``, ``Heartbeat`` every interval, ``Assign`` answered at
once with ``TaskResults`` of a pickled ``None``): the gateway cannot tell them from real
workers, but they run no task processes, so what is measured is the gateway. The gateway is a
real ``pilot gateway`` process (its CPU is read from /proc through psutil).

For each pool size (default 10 and 1000) it measures:

- registration: from the first hello to every worker registered (``pilot status`` counts);
- idle CPU: the gateway's CPU use over ``--idle-s`` seconds with every worker heartbeating
  and no job (a share of one core);
- no-op rate: tasks/s of ``--tasks`` no-op ``submit``s through a real ``Client``.

Targets (issue 12): 1,000 workers registered within 5 s; the gateway's idle CPU under 10 % of
a core for their heartbeats; the no-op rate with 1,000 workers at least 0.8x the rate with 10.

    .venv/bin/python bench/many_workers.py                  # 10 and 1000 workers, 3 repeats
    .venv/bin/python bench/many_workers.py --sizes 10,200 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._table import print_table, write_json  # noqa: E402
from gateway.client import Client  # noqa: E402
from gateway.protocol import (  # noqa: E402
    Assign,
    Codec,
    ConnectionInfo,
    Heartbeat,
    TaskAttempt,
    TaskResult,
    TaskResults,
    TaskStatus,
    WorkerHello,
    dumps,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "many_workers.json"
HEARTBEAT_S = 1.0  # what a real worker does by default


def noop() -> None:
    return None


class FakeWorkers:
    """N fake workers in a thread of their own (one event loop, N DEALER sockets)."""

    def __init__(self, conn: ConnectionInfo, n: int, prefix: str) -> None:
        self.conn = conn
        self.n = n
        self.prefix = prefix
        self.results_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        ctx = zmq.asyncio.Context()
        none = dumps(None)
        tasks = []
        for i in range(self.n):
            name = f"{self.prefix}{i}"
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, name.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.conn.worker_url)
            tasks.append(asyncio.ensure_future(self._one(sock, name, none)))
        while not self._stop.is_set():
            await asyncio.sleep(0.05)  # the generator's own poll of its stop flag
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ctx.destroy(linger=0)

    async def _one(self, sock: Any, name: str, none: Any) -> None:
        codec = Codec(self.conn.key)
        hello = WorkerHello(name, 1, 1, 1 << 30, pid=os.getpid())

        async def send(msg: Any) -> None:
            await sock.send_multipart(codec.encode(msg), copy=False)

        await send(hello)

        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                await send(Heartbeat(0))

        beater = asyncio.ensure_future(beat())
        try:
            while True:
                msg = codec.decode(await sock.recv_multipart(copy=False)).msg
                if isinstance(msg, Assign):
                    results = tuple(
                        TaskResult(a.job_id, a.index, a.attempt, TaskStatus.OK, none)
                        for a in msg.tasks
                    )
                    started = tuple(TaskAttempt(a.job_id, a.index, a.attempt) for a in msg.tasks)
                    await send(TaskResults(results, started))
                    self.results_sent += len(results)
        finally:
            beater.cancel()


def start_gateway(home: Path) -> tuple[subprocess.Popen[bytes], ConnectionInfo]:
    cmd = [
        sys.executable,
        "-m",
        "pilot",
        "gateway",
        "--state",
        str(home / "state"),
        "--connection-file",
        str(home / "connection.json"),
        "--ready-line",
        "--http-port",
        "none",
    ]
    env = {**os.environ, "PILOT_HOME": str(home), "PILOT_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"READY "):
        raise RuntimeError(f"the gateway did not start: {line!r}")
    return proc, ConnectionInfo.load(home / "connection.json")  # the READY line hides keys


def measure(n: int, tasks: int, idle_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pilot-many-") as tmp:
        gw, conn = start_gateway(Path(tmp))
        fakes = FakeWorkers(conn, n, "fake-")
        client = Client(conn)
        try:
            t0 = time.perf_counter()
            fakes.start()
            client.wait_for_workers(n, timeout=120)
            register_s = time.perf_counter() - t0
            proc = psutil.Process(gw.pid)
            client.submit(noop).result(30)  # warm
            c0 = sum(proc.cpu_times()[:2])
            w0 = time.perf_counter()
            time.sleep(idle_s)  # the measured idle period itself
            idle_cpu = (sum(proc.cpu_times()[:2]) - c0) / (time.perf_counter() - w0)
            t = time.perf_counter()
            jobs = [client.submit(noop) for _ in range(tasks)]
            for j in jobs:
                j.wait(300)
            rate = tasks / (time.perf_counter() - t)
        finally:
            client.close()
            fakes.stop()
            gw.terminate()
            gw.wait(30)
    return {"workers": n, "register_s": register_s, "idle_cpu": idle_cpu, "tasks_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,1000", help="pool sizes, comma-separated")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for _ in range(args.repeats):
        for n in sizes:
            r = measure(n, args.tasks, args.idle_s)
            print(json.dumps(r), flush=True)
            runs[n].append(r)
    rows = []
    base = statistics.median(r["tasks_per_s"] for r in runs[sizes[0]])
    for n in sizes:
        rs = runs[n]
        rate = statistics.median(r["tasks_per_s"] for r in rs)
        rows.append(
            {
                "workers": n,
                "register s (median)": statistics.median(r["register_s"] for r in rs),
                "register s (worst)": max(r["register_s"] for r in rs),
                "idle CPU % (median)": 100 * statistics.median(r["idle_cpu"] for r in rs),
                "idle CPU % (worst)": 100 * max(r["idle_cpu"] for r in rs),
                "no-op tasks/s (median)": rate,
                "no-op tasks/s (worst)": min(r["tasks_per_s"] for r in rs),
                f"rate / {sizes[0]} workers": rate / base,
            }
        )
    print_table(rows, list(rows[0]))
    write_json(args.out, {"sizes": sizes, "runs": runs, "summary": rows})
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
