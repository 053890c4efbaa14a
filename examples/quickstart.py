"""The README's demo: `pilot up`, a 1,000-item job through the Python API, live outputs, stop.

Run it with ./scripts/demo (which makes the venv), or `python examples/quickstart.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pilot


def simulate(frame: int) -> dict:
    """Stand-in for real work: a little arithmetic per frame, and a line of output."""
    total = sum(i * i for i in range(2_000 + frame))
    if frame % 100 == 0:
        print(f"frame {frame}: checksum {total % 9973}")
    return {"frame": frame, "checksum": total % 9973, "pid": os.getpid()}


def main() -> int:
    home = os.environ.setdefault("PILOT_HOME", os.path.expanduser("~/.pilot"))
    print(f"$ pilot up --workers 2        (PILOT_HOME={home})")
    t0 = time.perf_counter()
    quiet = {**os.environ, "PILOT_LOG_LEVEL": os.environ.get("PILOT_LOG_LEVEL", "WARNING")}
    up = subprocess.Popen([sys.executable, "-m", "pilot", "up", "--workers", "2"], env=quiet)
    try:
        client = _connect_when_ready(deadline=time.monotonic() + 60)
        client.wait_for_workers(2, timeout=60)
        print(f"gateway and 2 workers ready after {time.perf_counter() - t0:.2f}s\n")

        t1 = time.perf_counter()
        job = client.map(simulate, range(1, 1001), chunk=40)
        print(f"submitted job {job.id}: 1,000 items in {job.n_tasks} tasks of 40; live output:")
        for out in job.stream():
            print(f"  [item {out.item + 1}] {out.data.decode().rstrip()}")
        results = job.results
        took = time.perf_counter() - t1

        expected = [sum(i * i for i in range(2_000 + f)) % 9973 for f in range(1, 1001)]
        assert [r["checksum"] for r in results] == expected, "results are wrong"
        assert [r["frame"] for r in results] == list(range(1, 1001)), "results out of order"
        pids = {r["pid"] for r in results}
        print(f"\n1,000 results correct and in order, in {took:.2f}s, from {len(pids)} processes.")
        status = client.status()
        for w in status.workers:
            print(f"  worker {w.name}: {w.tasks_done} tasks done")
        print(f"state (SQLite + blobs): {home}/state   connection file: {home}/connection.json")
        print(f"look again later: pilot jobs; pilot logs {job.id}")
        client.close()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(30)
    print(f"pilot up stopped cleanly (exit code {code}).")
    return 0 if code == 0 else 1


def _connect_when_ready(deadline: float) -> pilot.Client:
    """`pilot up` writes the connection file once its gateway listens."""
    while True:
        try:
            return pilot.connect()
        except pilot.NoGateway:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
