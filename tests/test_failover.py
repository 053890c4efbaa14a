"""Failover: a worker process that dies has its tasks back in the queue at once (ZeroMQ's
disconnect notification), long before the heartbeat deadline; a silent host (a frozen process,
no disconnect seen) is still caught by that deadline.

The gateway runs in this process with chosen deadlines (so the test tells the two paths apart
without timing anything); the workers are real ``pilot worker`` processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import Client, Job
from gateway.protocol import ConnectionInfo, GatewaySettings, TaskDone, Timeouts
from tests_support import ThreadGateway

pytestmark = pytest.mark.system


def slow(x: int) -> int:
    import time

    time.sleep(0.2)  # the task's work
    return x


class Pool:
    """A gateway in this process and two worker processes; stops them all."""

    def __init__(self, tmp: Path, timeouts: Timeouts) -> None:
        conn = tmp / "connection.json"
        settings = GatewaySettings(
            state_dir=tmp / "state", http_port=None, connection_file=conn, timeouts=timeouts
        )
        self.gateway = ThreadGateway(settings).__enter__()
        self.workers = [
            subprocess.Popen(
                [sys.executable, "-m", "pilot", "worker", "--connect", str(conn), "--name", n]
            )
            for n in ("w0", "w1")
        ]
        self.client = Client(ConnectionInfo.load(conn))
        self.client.wait_for_workers(2, timeout=60)

    def close(self) -> None:
        self.client.close()
        for w in self.workers:
            if w.poll() is None:
                os.kill(w.pid, signal.SIGCONT)
                w.kill()
            w.wait(30)
        self.gateway.__exit__(None, None, None)

    def counters(self) -> dict[str, int]:
        return dict(self.client.status().counters)


def _first_done_on(job: Job, worker: str) -> None:
    for ev in job.events():
        if isinstance(ev, TaskDone) and ev.worker == worker:
            return
    raise AssertionError(f"no task finished on {worker}")


@pytest.fixture
def fast_drop(tmp_path: Path) -> Iterator[Pool]:
    # A heartbeat deadline far past the test's own: only the disconnect path can requeue.
    pool = Pool(tmp_path, Timeouts(heartbeat_interval_s=0.25, heartbeat_timeout_s=600.0))
    yield pool
    pool.close()


@pytest.fixture
def frozen(tmp_path: Path) -> Iterator[Pool]:
    pool = Pool(tmp_path, Timeouts(heartbeat_interval_s=0.25, heartbeat_timeout_s=2.0))
    yield pool
    pool.close()


def test_a_killed_worker_s_tasks_go_back_at_once_not_at_the_heartbeat_deadline(
    fast_drop: Pool,
) -> None:
    job = fast_drop.client.map(slow, range(30), chunk=1)
    _first_done_on(job, "w0")
    fast_drop.workers[0].kill()  # SIGKILL: the kernel closes its connection
    assert job.wait(120).results == list(range(30)), "finished on w1, every result once"
    assert len(job.tasks) == 30
    assert fast_drop.counters().get("workers_disconnected") == 1
    assert [w.name for w in fast_drop.client.status().workers] == ["w1"]


def test_a_frozen_worker_is_caught_by_the_heartbeat_deadline(frozen: Pool) -> None:
    job = frozen.client.map(slow, range(30), chunk=1)
    _first_done_on(job, "w0")
    os.kill(frozen.workers[0].pid, signal.SIGSTOP)  # alive, connected, silent
    assert job.wait(120).results == list(range(30))
    assert frozen.counters().get("workers_disconnected", 0) == 0, "no disconnect was seen"
    assert [w.name for w in frozen.client.status().workers] == ["w1"]
