"""Short tasks travel in batches (worker to task process and back); faults stay per task.

One worker of one slot, so that a job's tasks line up in one task process's batch: ``work`` is
taught to the worker as a short function first (it only batches functions it has seen run
quickly), then each test puts a task that crashes, blocks or is cancelled among quick ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pilot
from gateway.protocol import Status, TaskDone, TaskStatus
from tests_support import TEST_TIMEOUTS

pytestmark = pytest.mark.system


def work(x: object) -> object:
    """Quick, unless ``x`` says otherwise: ``("crash",)`` kills the process, ``("mark", dir,
    i)`` leaves a file ``ran-i``, ``("sleep", dir, i, s)`` marks then sleeps, ``("wait",
    path)`` waits until ``path`` exists."""
    if isinstance(x, tuple):
        match x:
            case ("crash",):
                os.kill(os.getpid(), 9)
            case ("mark", where, i):
                Path(where, f"ran-{i}").touch()
            case ("sleep", where, i, seconds):
                Path(where, f"ran-{i}").touch()
                time.sleep(seconds)
            case ("wait", path):
                while not os.path.exists(path):
                    time.sleep(0.01)  # polling a file the test creates, not waiting for start-up
    return x


@pytest.fixture(scope="module")
def cluster() -> Iterator[pilot.LocalCluster]:
    with pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS) as c:
        yield c


@pytest.fixture
def client(cluster: pilot.LocalCluster) -> pilot.Client:
    """A client whose worker has just seen ``work`` run quickly many times (a slow call in an
    earlier test would otherwise keep it from batching ``work`` for a while)."""
    c = cluster.client()
    assert c.map(work, range(200), chunk=1).wait(60).results == list(range(200))
    return c


def test_a_crash_in_a_batch_fails_only_the_running_task(client: pilot.Client) -> None:
    items: list[object] = list(range(100))
    items[50] = ("crash",)
    job = client.map(work, items, chunk=1, retries=0)
    with pytest.raises(pilot.TaskError, match="died"):
        job.wait(60)
    assert [e.index for e in job.failures()] == [50]
    outcomes = job.outcomes()
    assert sorted(outcomes) == [i for i in range(100) if i != 50], "the batch-mates ran"
    assert all(outcomes[i] == i for i in outcomes)
    assert client.submit(work, 7).result(30) == 7, "the process was replaced"


def test_cancel_skips_tasks_waiting_in_the_batch(client: pilot.Client, tmp_path: Path) -> None:
    where = str(tmp_path)
    items = [("sleep", where, 0, 60.0)] + [("mark", where, i) for i in range(1, 30)]
    job = client.map(work, items, chunk=1)
    while not (tmp_path / "ran-0").exists():
        time.sleep(0.01)  # the first task has started (polling under the job's own deadline)
        assert not job.done()
    job.cancel()
    with pytest.raises(pilot.JobCancelled):
        job.wait(5)  # a deadline for the cancel to land, not a timing assertion
    assert client.submit(work, 8).result(30) == 8, "the worker is free again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ran-0"], "nothing queued ran"


def test_cancel_interrupts_only_the_cancelled_task(client: pilot.Client, tmp_path: Path) -> None:
    # A's task sleeps at the head of a batch in which B's tasks wait. Cancelling B sends the
    # task process SIGINT; the task it runs (A's) is not B's and must not be interrupted.
    where = str(tmp_path)
    a = client.map(work, [("sleep", where, 0, 1.0)], chunk=1)
    b = client.map(work, [("mark", where, i) for i in range(1, 20)], chunk=1)
    while not (tmp_path / "ran-0").exists():
        time.sleep(0.01)
    b.cancel()
    with pytest.raises(pilot.JobCancelled):
        b.wait(5)
    assert a.wait(30).results == [("sleep", where, 0, 1.0)]
    assert a.state == Status.DONE


def test_results_before_a_long_task_of_the_batch_are_not_held_back(
    client: pilot.Client, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    items: list[object] = [*range(10), ("wait", str(gate)), *range(11, 40)]
    job = client.map(work, items, chunk=1)
    seen: set[int] = set()
    for ev in job.events(timeout=30):  # no event for 30 s: the results were held back
        if isinstance(ev, TaskDone):
            assert ev.status == TaskStatus.OK
            seen.add(ev.index)
            if seen >= set(range(10)):
                break
    assert seen >= set(range(10)), "the quick tasks' results came while the 11th waits"
    assert not job.done()
    gate.touch()
    assert job.wait(30).results == items
