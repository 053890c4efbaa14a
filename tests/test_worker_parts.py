"""The worker's parts, without sockets: the blob cache, fetches and holds, reports, durations."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from gateway.protocol import (
    DEFAULT_POLICY,
    Assignment,
    BlobReply,
    GetBlob,
    JobData,
    JobKind,
    Output,
    OutputKind,
    Outputs,
    Payload,
    ShippedFile,
    TaskAttempt,
    TaskResult,
    TaskResults,
    TasksStarted,
    TaskStatus,
)
from worker._blobcache import BlobCache
from worker._fetch import BlobFetcher, TaskHolds
from worker._reports import Reports
from worker._runner import Durations
from worker._shipped import blob_path


def on_a_loop(test):  # type: ignore[no-untyped-def]
    """Run an async test on a fresh event loop (the parts' timers need a running one)."""

    @functools.wraps(test)
    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        return asyncio.run(test(*args, **kwargs))

    return run


def _task(index: int = 0, fn: str = "f" * 64, data: JobData | None = None) -> Assignment:
    return Assignment("job", index, 1, JobKind.CALL, fn, Payload(b"args"), data=data)


def test_the_blob_cache_evicts_the_least_recently_used_past_its_bytes() -> None:
    cache = BlobCache(max_bytes=10)
    cache.put("a", Payload(b"1234"))
    cache.put("b", Payload(b"1234"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", Payload(b"1234"))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 8


def test_the_blob_cache_keeps_a_blob_larger_than_its_bound() -> None:
    cache = BlobCache(max_bytes=4)
    cache.put("a", Payload(b"12"))
    cache.put("big", Payload(b"123456789"))
    assert list(cache._blobs) == ["big"] and cache.nbytes == 9


@on_a_loop
async def test_a_blob_is_asked_for_once_however_many_wait() -> None:
    sent: list[object] = []
    got: list[BlobReply] = []
    fetcher = BlobFetcher(sent.append, BlobCache(), Path("/nonexistent"))
    fetcher.function("d1", got.append)
    fetcher.function("d1", got.append)
    assert sent == [GetBlob("d1")]
    fetcher.arrived(BlobReply("r", "d1", True, Payload(b"fn")))
    assert [r.ok for r in got] == [True, True]
    fetcher.function("d1", got.append)  # cached now: answered at once, nothing sent
    assert len(sent) == 1 and len(got) == 3
    fetcher.close()


@on_a_loop
async def test_a_fetch_is_asked_again_after_a_reconnect_and_a_late_reply_is_dropped() -> None:
    sent: list[object] = []
    got: list[BlobReply] = []
    fetcher = BlobFetcher(sent.append, BlobCache(), Path("/nonexistent"))
    fetcher.function("d1", got.append)
    fetcher.resend()
    assert sent == [GetBlob("d1"), GetBlob("d1")]
    fetcher.arrived(BlobReply("r", "d1", True, Payload(b"fn")))
    fetcher.arrived(BlobReply("r", "d1", True, Payload(b"fn")))
    assert len(got) == 1
    fetcher.close()


@on_a_loop
async def test_a_fetch_past_its_deadline_fails_its_waiters(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker._fetch as fetch

    monkeypatch.setattr(fetch, "BLOB_FETCH_BASE_S", 0.01)
    got: list[BlobReply] = []
    fetcher = BlobFetcher(lambda msg: None, BlobCache(), Path("/nonexistent"))
    fetcher.function("d1", got.append)
    await asyncio.sleep(0.05)  # past the (patched) deadline: a timer, not a start-up wait
    assert len(got) == 1 and not got[0].ok and "did not send it" in got[0].error


@on_a_loop
async def test_a_task_is_held_until_its_function_and_files_are_here(tmp_path: Path) -> None:
    sent: list[object] = []
    released: list[Assignment] = []
    cache = BlobCache()
    fetcher = BlobFetcher(sent.append, cache, tmp_path)
    holds = TaskHolds(fetcher, tmp_path, release=released.append, fail=pytest.fail)
    ship = (ShippedFile("data.txt", "e" * 64, 3),)
    task = _task(data=JobData(ship=ship))
    assert not holds.admit(task)
    assert {m.digest for m in sent} == {"f" * 64, "e" * 64}
    fetcher.arrived(BlobReply("", "f" * 64, True, Payload(b"fn")))
    assert released == []
    fetcher.arrived(BlobReply("", "e" * 64, True, Payload(b"abc")))
    assert released == [task]
    assert blob_path(tmp_path, "e" * 64).read_bytes() == b"abc"
    assert holds.admit(_task(index=1, data=JobData(ship=ship))), "both are here now"
    fetcher.close()


@on_a_loop
async def test_a_missing_function_fails_its_task_as_unloadable(tmp_path: Path) -> None:
    failed: list[tuple[Assignment, TaskStatus, str]] = []
    fetcher = BlobFetcher(lambda msg: None, BlobCache(), tmp_path)
    holds = TaskHolds(fetcher, tmp_path, release=pytest.fail, fail=lambda *a: failed.append(a))
    task = _task()
    assert not holds.admit(task)
    fetcher.arrived(BlobReply("", "f" * 64, False, None, "no such blob"))
    [(who, status, text)] = failed
    assert who == task and status == TaskStatus.UNPICKLABLE and "no such blob" in text


@on_a_loop
async def test_a_cancelled_held_task_is_not_released(tmp_path: Path) -> None:
    fetcher = BlobFetcher(lambda msg: None, BlobCache(), tmp_path)
    holds = TaskHolds(fetcher, tmp_path, release=pytest.fail, fail=pytest.fail)
    task = _task()
    holds.admit(task)
    assert holds.drop({("job", 0, 1)}) == [task]
    fetcher.arrived(BlobReply("", "f" * 64, True, Payload(b"fn")))
    assert "f" * 64 in fetcher.cache, "the blob is kept for the next task"


@on_a_loop
async def test_reports_send_outputs_then_starts_with_results() -> None:
    sent: list[object] = []
    reports = Reports(sent.append, wake=lambda: None)
    out = Output("job", 0, -1, OutputKind.STDOUT, b"hi")
    result = TaskResult("job", 0, 1, TaskStatus.OK)
    reports.outputs([out])
    reports.started(TaskAttempt("job", 0, 1))
    reports.result(result)
    reports.flush()
    assert sent == [Outputs((out,)), TaskResults((result,), (TaskAttempt("job", 0, 1),))]
    assert reports.pending == 0


@on_a_loop
async def test_a_start_without_results_waits_then_travels_alone() -> None:
    sent: list[object] = []
    woken = asyncio.Event()
    reports = Reports(sent.append, wake=woken.set)
    reports.started(TaskAttempt("job", 0, 1))
    reports.flush()
    assert sent == [], "a start waits for the results it can travel with"
    await asyncio.wait_for(woken.wait(), 1 + DEFAULT_POLICY.started_delay_s)
    reports.flush()
    assert sent == [TasksStarted((TaskAttempt("job", 0, 1),))]


def test_durations_are_a_moving_mean_of_the_functions_seen_last() -> None:
    d = Durations(kept=2)
    d.add("a", 1.0)
    d.add("a", 0.0)
    assert d.get("a") == pytest.approx(0.8)
    d.add("b", 1.0)
    d.add("c", 1.0)
    assert d.get("a") is None and d.get("b") == 1.0


def slow_times_ten(x: int) -> int:
    import time

    time.sleep(0.02)
    return x * 10


def negated(x: int) -> int:
    return -x


@pytest.mark.system
def test_a_function_evicted_from_the_worker_is_fetched_from_the_gateway() -> None:
    """A worker whose blob cache holds one function: another job's function evicts the first
    while its job still has tasks to come; those tasks wait for a ``GetBlob``, not a retry."""
    import threading

    import pilot
    from gateway.protocol import WorkerSettings
    from tests_support import TEST_TIMEOUTS
    from worker import Worker

    asked: list[str] = []
    started = threading.Event()
    box: dict[str, object] = {}
    with pilot.LocalCluster(workers=0, timeouts=TEST_TIMEOUTS) as cluster:
        assert cluster.connection is not None
        settings = WorkerSettings(
            connection=cluster.connection, name="tiny", slots=1, timeouts=TEST_TIMEOUTS
        )

        async def serve() -> None:
            async with Worker(settings, blob_cache_bytes=1) as w:
                send = w.fetcher._send

                def spy(msg: object) -> None:
                    asked.append(getattr(msg, "digest", ""))
                    send(msg)

                w.fetcher._send = spy
                box["worker"], box["loop"] = w, asyncio.get_running_loop()
                started.set()
                await w.run()

        thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        thread.start()
        assert started.wait(60)
        client = cluster.client()
        client.wait_for_workers(1, 30)
        first = client.map(slow_times_ten, range(30), chunk=1)
        others = [client.submit(negated, k) for k in range(10)]
        assert first.wait(60).results == [x * 10 for x in range(30)]
        assert [o.result(30) for o in others] == [-k for k in range(10)]
        assert all(d.attempts == 1 for d in first.tasks.values()), "fetched, not retried"
        loop = box["loop"]
        assert isinstance(loop, asyncio.AbstractEventLoop)
        loop.call_soon_threadsafe(box["worker"].stop)  # type: ignore[attr-defined]
        thread.join(30)
    assert asked, "the evicted function was asked of the gateway"


def test_retry_errors_is_a_flag_of_distribute() -> None:
    from pilot_magics import parse_options

    assert parse_options("--over x=range(3) --retry-errors").retry_errors
    assert not parse_options("--over x=range(3)").retry_errors


# -- a task process's output capture (in a process of its own: it takes over fds 1 and 2) ------

_CAPTURE_SCRIPT = """
import json, os, sys, threading, time
from gateway.protocol import OutputKind
from worker._capture import Capture

report, sent, arrived = sys.argv[1], [], threading.Event()
expected = len("a\\nthen\\n") + 1000 * len("x\\n") + len("from fd 1\\n")

displays = []

def emit(outputs):
    sent.append([o.data.decode() for o in outputs if isinstance(o.data, bytes)])
    displays.extend(o.data for o in outputs if isinstance(o.data, dict))
    if sum(len(d) for batch in sent for d in batch) >= expected and displays:
        arrived.set()

capture = Capture(emit)
capture.start()
capture.label = ("job", 0, 0)
print("a")
alone = len(sent)  # the first line after a quiet spell went out inside print(), whole
print("then")  # within FLUSH_S of that send: it waits...
capture.add(OutputKind.DISPLAY, {"text/plain": "shown"})  # ...and a display behind it
for _ in range(1000):
    print("x")
os.write(1, b"from fd 1\\n")  # a C extension's write: read by the flusher thread
ok = arrived.wait(30)
with open(report, "w") as f:
    text = "".join(sum(sent, []))
    json.dump({"alone": alone, "sends": len(sent), "arrived": ok, "text": text,
               "displays": displays}, f)
"""


@pytest.mark.timeout(60)
def test_a_lone_line_leaves_at_once_and_a_burst_in_a_few_messages(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-c", _CAPTURE_SCRIPT, str(report)], check=True, timeout=50)
    got = json.loads(report.read_text())
    assert got["alone"] == 1, "a line printed after a quiet spell is sent inside print()"
    assert got["arrived"], f"the flusher never sent the rest: {got}"
    assert got["text"] == "a\nthen\n" + "x\n" * 1000 + "from fd 1\n", "everything, in order"
    assert got["sends"] < 100, f"a burst of 1,000 lines took {got['sends']} messages"
    assert got["displays"] == [{"text/plain": "shown"}]
