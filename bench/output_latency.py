"""Live output: how long a line printed in a task takes to reach the client (issue 12: under
20 ms at the median), next to raw pyzmq's one hop.

Each repeat runs one task that prints ``--lines`` lines, ``--gap-ms`` apart, each carrying
``time.time()`` when it was printed; the client notes ``time.time()`` when the line arrives
(one clock: everything runs on this machine). Two workloads, because output comes both ways:

- ``now-and-then``: a line every ``--gap-ms`` (20 ms: progress lines, a training log);
- ``burst``: lines printed back to back in a tight loop (``--lines`` of them), where output
  travels in batches (one message per ``FLUSH_S`` at most, ``worker._capture``).

Parallel Pilot runs a ``LocalCluster`` (a gateway and two workers) and reads the lines from
``job.stream()``: task process, worker, gateway, client. Raw pyzmq is the floor: a process
that sends the same lines over one PUSH socket to a PULL socket here, a line a message.

The table shows, per backend and workload, the median of the repeats' medians, the worst
repeat's median, the p90 over every line and the worst line; everything goes to a JSON file.

    .venv/bin/python bench/output_latency.py               # 5 repeats of 100 lines
    .venv/bin/python bench/output_latency.py --repeats 9 --lines 200 --gap-ms 10
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the bench package by its name
    sys.path.insert(0, str(ROOT))

from bench._table import print_table, write_json  # noqa: E402

TARGET_MS = 20.0
WORKLOADS = ("now-and-then", "burst")
_SENDER = """
import sys, time, zmq
addr, n, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = zmq.Context().socket(zmq.PUSH)
sock.connect(addr)
for i in range(n):
    sock.send(f"t={time.time():.6f}\\n".encode())
    if gap:
        time.sleep(gap)
sock.send(b"end")
sock.close(linger=5000)
"""


def prints_stamps(n: int, gap_s: float) -> int:
    """The task: ``n`` lines, each with the time it was printed, ``gap_s`` apart."""
    import time

    for _ in range(n):
        print(f"t={time.time():.6f}", flush=True)
        if gap_s:
            time.sleep(gap_s)
    return n


def _latencies(text: str, arrived: float) -> list[float]:
    return [
        (arrived - float(line[2:])) * 1000 for line in text.splitlines() if line.startswith("t=")
    ]


def pilot_run(client: Any, lines: int, gap_s: float) -> list[float]:
    from gateway.protocol import OutputKind

    job = client.submit(prints_stamps, lines, gap_s)
    got: list[float] = []
    for out in job.stream():
        if out.kind == OutputKind.STDOUT:
            got += _latencies(out.data.decode(), time.time())
    job.result(60)
    return got


def raw_zmq_run(lines: int, gap_s: float) -> list[float]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sender = subprocess.Popen(
        [sys.executable, "-c", _SENDER, f"tcp://127.0.0.1:{port}", str(lines), str(gap_s)]
    )
    got: list[float] = []
    try:
        sock.setsockopt(zmq.RCVTIMEO, 60_000)
        while (msg := sock.recv()) != b"end":
            got += _latencies(msg.decode(), time.time())
    finally:
        sender.wait(60)
        sock.close(linger=0)
        ctx.term()
    return got


def summarize(runs: list[list[float]]) -> dict[str, float]:
    medians = [statistics.median(r) for r in runs]
    every = sorted(x for r in runs for x in r)
    return {
        "median_ms": statistics.median(medians),
        "worst_repeat_median_ms": max(medians),
        "p90_ms": every[int(0.9 * (len(every) - 1))],
        "worst_line_ms": every[-1],
        "lines": len(every),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 20 lines")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "output_latency.json"))
    args = parser.parse_args(argv)
    repeats, lines = (2, 20) if args.quick else (args.repeats, args.lines)
    gaps = {"now-and-then": args.gap_ms / 1000, "burst": 0.0}

    import pilot

    runs: dict[tuple[str, str], list[list[float]]] = {}
    with pilot.LocalCluster(workers=2, env={"PILOT_LOG_LEVEL": "WARNING"}) as cluster:
        client = cluster.client()
        pilot_run(client, 2, 0.0)  # the task process has loaded the function: not timed
        for _ in range(repeats):  # alternating, so a drift of the machine hits both alike
            for workload in WORKLOADS:
                for name in ("raw_zmq", "pilot"):
                    gap = gaps[workload]
                    if name == "raw_zmq":
                        got = raw_zmq_run(lines, gap)
                    else:
                        got = pilot_run(client, lines, gap)
                    if len(got) != lines:
                        raise SystemExit(f"{name} {workload}: {len(got)} of {lines} lines came")
                    runs.setdefault((name, workload), []).append(got)

    rows = [{"backend": n, "workload": w, **summarize(r)} for (n, w), r in sorted(runs.items())]
    print(f"\nLive output: {lines} lines per task, {repeats} repeats (gap {args.gap_ms} ms)")
    columns = ["backend", "workload", "median_ms", "worst_repeat_median_ms", "p90_ms"]
    print_table(rows, [*columns, "worst_line_ms"])
    pilot_med = next(r for r in rows if r["backend"] == "pilot" and r["workload"] == WORKLOADS[0])
    verdict = "met" if pilot_med["median_ms"] < TARGET_MS else "NOT met"
    print(
        f"\ntarget: a line now and then reaches the client in under {TARGET_MS:.0f} ms at the "
        f"median: {pilot_med['median_ms']:.2f} ms, {verdict}"
    )
    path = write_json(
        args.out,
        {
            "rows": rows,
            "runs_ms": {f"{n}/{w}": r for (n, w), r in runs.items()},
            "repeats": repeats,
            "lines": lines,
            "gap_ms": args.gap_ms,
            "target_ms": TARGET_MS,
            "python": sys.version.split()[0],
            "machine": platform.platform(),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
