"""A real local cluster: a gateway and two worker processes, driven through the Python API."""

from __future__ import annotations

import os
import threading

import pytest

import pilot
from gateway.protocol import Output, OutputKind, Status, TaskDone

pytestmark = pytest.mark.system


def square(x: int) -> int:
    print(f"item {x} start")
    print(f"item {x} end")
    return x * x


def test_map_of_1000_items_over_two_workers(client: pilot.Client) -> None:
    job = client.map(square, range(1000), chunk=10)
    job.wait(120)
    assert job.results == [x * x for x in range(1000)]
    workers = {job.tasks[i].worker for i in range(job.n_tasks)}
    assert workers == {"local-0", "local-1"}


def test_outputs_stream_in_order_and_labelled(client: pilot.Client) -> None:
    job = client.map(square, range(40), chunk=4)
    text: dict[int, str] = {}
    for out in job.stream():
        assert out.kind == OutputKind.STDOUT
        text[out.item] = text.get(out.item, "") + out.data.decode()
    assert job.results == [x * x for x in range(40)]
    assert sorted(text) == list(range(40))
    for x in range(40):
        assert text[x] == f"item {x} start\nitem {x} end\n"


def test_submit_returns_value_and_kwargs(client: pilot.Client) -> None:
    job = client.submit(divmod, 17, 5)
    assert job.result(30) == (3, 2)
    job = client.submit(lambda a, b=1: a * b, 3, b=4)
    assert job.result(30) == 12


def write_fd_level(x: int) -> int:
    os.write(1, f"fd-level {x}\n".encode())
    os.system(f"echo subprocess {x}")
    return x


def test_fd_level_output_is_captured(client: pilot.Client) -> None:
    job = client.submit(write_fd_level, 5)
    outs = b"".join(o.data for o in job.stream() if o.kind == OutputKind.STDOUT)
    assert b"fd-level 5\n" in outs and b"subprocess 5\n" in outs
    assert job.result() == 5


def shows_html(x: int) -> int:
    from IPython.display import HTML, display

    display(HTML(f"<b>{x}</b>"))
    return x


def test_display_sends_mime_bundle(client: pilot.Client) -> None:
    job = client.map(shows_html, [7], chunk=1)
    displays = [o for o in job.stream() if o.kind == OutputKind.DISPLAY]
    assert displays[0].data["text/html"] == "<b>7</b>"
    assert displays[0].item == 0


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def test_raising_task_gives_task_error_with_remote_traceback(client: pilot.Client) -> None:
    job = client.map(fails_on_three, range(6), chunk=2, retries=0)
    with pytest.raises(pilot.TaskError) as info:
        job.wait(60)
    err = info.value
    assert err.item == 3
    assert "ValueError: bad item 3" in err.remote_traceback
    assert "fails_on_three" in err.remote_traceback
    assert "worker/_child.py" not in err.remote_traceback
    assert job.state == Status.FAILED
    assert job.outcomes() == {0: 0, 1: 1, 4: 4, 5: 5}, "other items stay reachable"


def crash_hard(how: str) -> int:
    if how == "kill":
        os.kill(os.getpid(), 9)
    import ctypes

    ctypes.string_at(0)  # segfault
    return 0


@pytest.mark.parametrize("how", ["kill", "segv"])
def test_crashing_process_fails_only_that_task(client: pilot.Client, how: str) -> None:
    bad = client.submit_job(crash_hard, [pilot.Client.__module__ and _args(how)], retries=0)
    good = client.submit(square, 4)
    with pytest.raises(pilot.TaskError, match="died"):
        bad.wait(60)
    assert good.result(60) == 16
    assert client.submit(square, 5).result(60) == 25, "the process was replaced"


def _args(*args: object) -> pilot.Client:
    from gateway.protocol import dumps

    return dumps((args, {}))  # type: ignore[return-value]


def sleeps(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_task_past_its_timeout_fails(client: pilot.Client) -> None:
    job = client.map(sleeps, [30], chunk=1, timeout=0.5, retries=0)
    with pytest.raises(pilot.TaskError, match="timeout"):
        job.wait(30)
    assert client.submit(square, 3).result(30) == 9, "the worker is usable afterwards"


def announces_then_sleeps(seconds: float) -> float:
    import time

    print("started", flush=True)
    time.sleep(seconds)
    return seconds


def test_cancel_interrupts_running_and_drops_queued(client: pilot.Client) -> None:
    job = client.map(announces_then_sleeps, [60] * 6, chunk=1)
    first = next(ev for ev in job.events() if isinstance(ev, Output))
    assert first.data == b"started\n"
    job.cancel()
    with pytest.raises(pilot.JobCancelled):
        job.wait(5)  # a deadline for the cancel to land, not a timing assertion
    assert client.submit(square, 6).result(30) == 36, "workers are free again"


def test_jobs_lists_a_running_jobs_progress(client: pilot.Client) -> None:
    """``client.jobs()`` (``pilot jobs``) reads the stored rows, whose counts are written at
    a job's end: a running job's row carries its live progress."""
    job = client.map(announces_then_sleeps, [0] * 2 + [60] * 2, chunk=1)
    next(ev for ev in job.events() if isinstance(ev, TaskDone))
    (row,) = [j for j in client.jobs() if j.job_id == job.id]
    assert row.state == Status.RUNNING and row.done >= 1 and row.n_tasks == 4, row
    job.cancel()
    with pytest.raises(pilot.JobCancelled):
        job.wait(30)  # a deadline for the cancel to land, not a timing assertion
    (row,) = [j for j in client.jobs() if j.job_id == job.id]
    assert row.state == Status.CANCELLED and row.done >= 2, row


def ignores_sigint() -> None:
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(60)


def test_cancel_kills_a_task_that_ignores_sigint(client: pilot.Client) -> None:
    job = client.submit(ignores_sigint)
    job.cancel()
    with pytest.raises(pilot.JobCancelled):
        job.wait(10)
    assert client.submit(square, 2).result(30) == 4


def test_unpicklable_argument_fails_before_submit_naming_it(client: pilot.Client) -> None:
    lock = threading.Lock()
    with pytest.raises(pilot.SerializationError, match="argument 'guard'"):
        client.submit(square, 1, guard=lock)
    with pytest.raises(pilot.SerializationError, match="argument 1"):
        client.submit(square, 1, lock)


def returns_unpicklable() -> object:
    import threading

    return threading.Lock()


def test_unpicklable_result_is_a_clear_task_error(client: pilot.Client) -> None:
    job = client.submit(returns_unpicklable)
    with pytest.raises(pilot.TaskError, match="cannot be pickled"):
        job.wait(30)


def test_attach_from_another_client_replays_results_and_outputs(
    cluster: pilot.LocalCluster, client: pilot.Client
) -> None:
    job = client.map(square, range(8), chunk=2)
    job.wait(60)
    other = cluster.client()
    again = pilot.Job.attach(job.id, client=other)
    again.wait(30)
    assert again.results == [x * x for x in range(8)]
    replayed = b"".join(o.data for o in again.stream())
    assert b"item 6 start" in replayed, "kept outputs are replayed to a re-attached client"
    logs = other.logs(job.id)
    assert b"item 7 end" in b"".join(o.data for o in logs if o.kind == OutputKind.STDOUT)


def test_attach_unknown_job(client: pilot.Client) -> None:
    with pytest.raises(pilot.JobNotFound):
        client.attach("no-such-job")


def test_status_lists_workers(client: pilot.Client) -> None:
    reply = client.status()
    assert sorted(w.name for w in reply.workers) == ["local-0", "local-1"]
    assert all(w.slots == 1 and w.cpus >= 1 for w in reply.workers)


def test_local_workers_split_the_machines_cores_between_them(client: pilot.Client) -> None:
    """Each local worker counts its share of the cores as a machine of its own would (it
    registers them; its training ranks' OMP_NUM_THREADS comes from them): two workers never
    count the machine twice. Nothing is pinned."""
    cores = len(os.sched_getaffinity(0))
    registered = sorted(w.cpus for w in client.status().workers)
    if cores < 2:  # fewer cores than workers: each counts them all
        assert registered == [cores, cores]
    else:
        assert registered == sorted([cores // 2, cores - cores // 2])
    (affinity,) = set(client.map(cores_here, range(4), chunk=1).wait(60).results)
    assert affinity == cores, "a task may still run on any core"


def cores_here(_: object) -> int:
    return len(os.sched_getaffinity(0))


def test_unschedulable_request_fails_at_once_listing_workers(client: pilot.Client) -> None:
    job = client.map(square, [1], gpus=1)
    with pytest.raises(pilot.JobError, match="No connected worker can run this job"):
        job.wait(30)
    assert "local-0: 1 slots, 0 GPUs" in job.error


def test_many_distinct_functions_then_an_early_one_again(client: pilot.Client) -> None:
    """More functions than a task process keeps loaded: an evicted one is fetched again by its
    hash (task process -> worker -> gateway), neither failed nor retried."""
    fns = [eval(f"lambda x: x + {k}") for k in range(200)]
    for k, fn in enumerate(fns):
        assert client.submit(fn, 1).result(30) == 1 + k
    again = client.submit(fns[0], 1)
    assert again.result(30) == 1
    assert again.tasks[0].attempts == 1, "found by its hash, not retried"
    assert client.map(fns[3], [1, 2], chunk=1).results == [4, 5]
