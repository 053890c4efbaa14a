"""``Outcomes``, the client's record of a job's finished tasks: what goes in comes out the same,
in index order, with no socket; and a job of many tasks holds little per task."""

from __future__ import annotations

import itertools
import pickle
import threading
import tracemalloc

from gateway.client._outcomes import Outcomes
from gateway.protocol import FileRef, Payload, TaskDone, TaskStatus


def done(index: int, **kw) -> TaskDone:
    kw.setdefault("value", Payload(pickle.dumps(index * 10)))
    kw.setdefault("worker", "w-1")
    return TaskDone("job-1", index, kw.pop("status", TaskStatus.OK), **kw)


def same(a: TaskDone, b: TaskDone) -> bool:
    """Equal, payloads compared by their bytes (a ``Payload`` compares by identity)."""

    def plain(d: TaskDone) -> tuple:
        v = d.value
        value = None if v is None else (bytes(v.data), tuple(bytes(x) for x in v.buffers))
        return (*(getattr(d, f) for f in TaskDone.__dataclass_fields__ if f != "value"), value)

    return plain(a) == plain(b)


def test_each_outcome_comes_back_as_it_went_in() -> None:
    sent = [
        done(0, attempts=2, duration_s=1.25),
        done(1, value=None),
        done(2, status=TaskStatus.ERROR, value=None, error="Traceback...\nZeroDivisionError"),
        done(3, files=(FileRef("out.txt", 3, "ab" * 32),)),
        done(4, status=TaskStatus.ERROR, value=None, error="boom", item=41),
        done(5, value=Payload(b"head", (b"buffer",))),
        done(6, status=TaskStatus.CANCELLED, value=None, worker=""),
    ]
    got = Outcomes("job-1", n=len(sent))
    for d in reversed(sent):
        got.add(d)
    assert len(got) == len(sent)
    assert list(got) == list(range(len(sent))), "iterated in index order"
    for d in sent:
        assert same(got[d.index], d), (got[d.index], d)
        assert got.status(d.index) == d.status
    assert pickle.loads(got[0].value.data) == 0
    assert got[5].value.buffers == (b"buffer",), "a payload with buffers is kept as it is"
    assert [i for i, _ in got.whole()] == [2, 3, 4], "errors, files and items are kept whole"


def test_missing_tasks_are_not_there() -> None:
    got = Outcomes("job-1", n=3)
    got.add(done(1))
    assert 0 not in got and 1 in got and 3 not in got and -1 not in got and "1" not in got
    for missing in (0, 2, 3, -1):
        try:
            got[missing]
        except KeyError:
            continue
        raise AssertionError(f"{missing} is not finished")
    assert list(got) == [1] and same(dict(got)[1], done(1))


def test_an_attached_job_grows_as_its_outcomes_come() -> None:
    got = Outcomes("job-1")  # the spec (and the number of tasks) is not known yet
    for i in (7, 0, 130, 3):
        got.add(done(i))
    assert list(got) == [0, 3, 7, 130]
    assert got[130].value.data == pickle.dumps(1300)


def test_the_same_task_twice_counts_once() -> None:
    got = Outcomes("job-1", n=2)
    got.add(done(0, attempts=1))
    got.add(done(0, attempts=2))
    assert len(got) == 1 and got[0].attempts == 2


def test_a_reader_never_sees_half_an_outcome() -> None:
    """The IO thread adds while the user's thread reads: every task seen is whole."""
    n = 20_000
    got = Outcomes("job-1")  # growing while read: the hardest case
    stop = threading.Event()
    bad: list[str] = []

    def read() -> None:
        while not stop.is_set():
            for i in list(got):
                d = got[i]
                if d.worker != "w-1" or pickle.loads(d.value.data) != i * 10:
                    bad.append(repr(d))
                    return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(n):
            got.add(done(i))
    finally:
        stop.set()
        reader.join(30)
    assert not bad, bad[:1]
    assert len(got) == n


def test_a_million_tasks_cost_little_each() -> None:
    """The point of the columns: a TaskDone object per task was about 500 bytes."""
    n = 200_000
    value = Payload(pickle.dumps(None))
    tracemalloc.start()
    try:
        got = Outcomes("job-1", n)
        for i in range(n):  # each as the IO thread decodes it: a fresh TaskDone
            got.add(TaskDone("job-1", i, TaskStatus.OK, value, worker="w-1", duration_s=0.5))
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept / n < 40, f"{kept / n:.0f} bytes a task"
    assert got[n - 1].worker == "w-1"


def test_a_jobs_unread_events_keep_little_and_read_whole() -> None:
    """Events nobody reads (a user who only asks ``job.results``) hold an index per task, and
    ``events()`` gives each back as the ``TaskDone`` that came."""
    from gateway.client._job import Job

    n = 100_000
    job = Job(None, None, job_id="job-1")  # type: ignore[arg-type]  # no client needed here
    value = Payload(pickle.dumps(None))
    tracemalloc.start()
    try:
        for i in range(n):
            job.on_event(TaskDone("job-1", i, TaskStatus.OK, value, worker="w-1", duration_s=0.5))
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept / n < 80, f"{kept / n:.0f} bytes a task"
    first = job.next_event(timeout=0)
    assert same(first, TaskDone("job-1", 0, TaskStatus.OK, value, worker="w-1", duration_s=0.5))
    assert [ev.index for ev in itertools.islice(job.events(timeout=0), 3)] == [1, 2, 3]
