"""The one sync facade: ``Client`` and ``Job``, over the async client on one IO thread.

The Python API (``pilot.connect()``) and the notebook magic both use these classes; there is
no second implementation of submit, wait or display. The IO thread owns its own event loop and
the ``AsyncClient``; user threads hand it work with ``call_soon_threadsafe`` (submits are
batched: many ``submit`` calls in a row leave in one message) and block on ``concurrent``
futures or a job's ``threading.Event``. A job's events (outputs, finished tasks, its end) are
queued for the user's thread, which is where display happens in a notebook.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from gateway._client import AsyncClient, JobState
from gateway._errors import JobCancelled, JobError, PilotTimeout, SerializationError, TaskError
from gateway._messages import (
    JobInfo,
    JobSpec,
    JobUpdate,
    Output,
    Payload,
    Resources,
    Status,
    StatusReply,
    TaskDone,
    TaskStatus,
)
from gateway._serialize import digest_of, dumps, dumps_function, loads
from gateway._settings import ConnectionInfo, Timeouts

__all__ = ["Client", "Job"]

AUTO_CHUNK_TASKS = 512  # map(chunk=None) splits items into about this many tasks
_FN_CACHE = 256


class _IOThread:
    """A daemon thread running one event loop; owned by a ``Client``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            if fut.done():
                raise  # the coroutine's own PilotTimeout, with its own message
            fut.cancel()
            raise PilotTimeout("The operation did not finish in time.") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class Job:
    """A submitted job, seen from the user's thread. Never blocks unless asked to.

    ``results`` are in item order; a failed task raises ``TaskError`` (with the remote
    traceback and the item) when results are asked for; ``outcomes()`` gives what did succeed.
    """

    def __init__(
        self,
        client: Client,
        job_id: str,
        *,
        items: Sequence[Any] | None = None,
        chunk: int = 1,
        n_tasks: int = 1,
        kind: str = "call",
    ) -> None:
        self.client = client
        self.id = job_id
        self.kind = kind
        self.items = items
        self.chunk = chunk
        self.n_tasks = n_tasks
        self._done: dict[int, TaskDone] = {}
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._finished = threading.Event()
        self.state = Status.QUEUED
        self.error = ""
        self._values: dict[int, Any] = {}
        self.started_at = time.monotonic()
        self.finished_at: float | None = None

    def __repr__(self) -> str:
        done, total = self.progress
        return f"<Job {self.id} {self.state.name.lower()} {done}/{total}>"

    # called on the IO thread
    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, TaskDone):
            self._done[ev.index] = ev
        elif isinstance(ev, JobUpdate):
            if ev.spec is not None:  # the head of an attach replay; its end follows
                self._adopt_spec(ev.spec)
                return
            self.state, self.error = Status(ev.state), ev.error
            if self.state.finished:
                self.finished_at = time.monotonic()
                self._events.put(ev)
                self._finished.set()
                return
        self._events.put(ev)

    def _adopt_spec(self, spec: JobSpec) -> None:
        self.n_tasks = spec.n_tasks
        self.kind = spec.meta.get("mode", "call")
        self.chunk = spec.meta.get("chunk", 1)

    # -- the user's side ------------------------------------------------------------------

    @property
    def progress(self) -> tuple[int, int]:
        """(tasks finished, tasks) — finished includes failed ones."""
        return len(self._done), self.n_tasks

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Job:
        """Block until the job ends. Raises ``PilotTimeout`` past ``timeout``, then
        ``TaskError``/``JobCancelled``/``JobError`` if it did not succeed."""
        if not self._finished.wait(timeout):
            done, total = self.progress
            raise PilotTimeout(f"Job {self.id} not finished after {timeout}s ({done}/{total}).")
        self._raise_for_state()
        return self

    def _raise_for_state(self) -> None:
        if self.state == Status.DONE:
            return
        if self.state == Status.CANCELLED:
            raise JobCancelled(f"Job {self.id} was cancelled.")
        failed = self.failures()
        if failed:
            raise failed[0]
        raise JobError(self.error or f"Job {self.id} failed.")

    def failures(self) -> list[TaskError]:
        """A ``TaskError`` per failed task, in item order."""
        errors = []
        for index in sorted(self._done):
            d = self._done[index]
            if d.status not in (TaskStatus.OK, TaskStatus.CANCELLED):
                errors.append(self._task_error(d))
        return errors

    def _task_error(self, d: TaskDone) -> TaskError:
        item, label = self._item_of(d)
        headline = d.error.strip().splitlines()[-1] if d.error.strip() else "failed"
        return TaskError(
            f"Task {label} of job {self.id} failed on {d.worker or 'a worker'} after "
            f"{d.attempts} attempt(s): {headline}",
            job_id=self.id,
            index=d.index,
            item=item,
            remote_traceback=d.error,
            worker=d.worker,
        )

    def _item_of(self, d: TaskDone) -> tuple[Any, str]:
        if self.kind == "map" and self.items is not None:
            if 0 <= d.item < len(self.items):
                return self.items[d.item], f"for item {self.items[d.item]!r}"
            chunk = self.items[d.index * self.chunk : (d.index + 1) * self.chunk]
            return list(chunk), f"{d.index} (items {d.index * self.chunk}..)"
        return None, str(d.index)

    def value(self, index: int) -> Any:
        """The unpickled value of task ``index`` (cached)."""
        if index not in self._values:
            d = self._done[index]
            if d.status != TaskStatus.OK:
                raise self._task_error(d)
            self._values[index] = loads(d.value) if d.value is not None else None
        return self._values[index]

    @property
    def results(self) -> list[Any]:
        """Every item's result in item order (waits for the job)."""
        self.wait()
        return self._flat(range(self.n_tasks))

    def result(self, timeout: float | None = None) -> Any:
        """The single result of a ``submit`` job (waits)."""
        self.wait(timeout)
        return self.value(0)

    def _flat(self, indices: Iterable[int]) -> list[Any]:
        if self.kind != "map":
            return [self.value(i) for i in indices]
        out: list[Any] = []
        for i in indices:
            out.extend(self.value(i))
        return out

    def outcomes(self) -> dict[int, Any]:
        """Task index -> value for the tasks that succeeded so far (map: item index)."""
        out = {}
        for i in sorted(self._done):
            if self._done[i].status == TaskStatus.OK:
                if self.kind == "map":
                    for k, v in enumerate(self.value(i)):
                        out[i * self.chunk + k] = v
                else:
                    out[i] = self.value(i)
        return out

    def cancel(self) -> None:
        """Drop queued tasks, interrupt running ones. Returns at once."""
        self.client._io.run(self.client._async.cancel(self.id), self.client.timeouts.request_s)

    def events(self, timeout: float | None = None) -> Iterator[Any]:
        """Yield ``Output``, ``TaskDone`` and finally the ``JobUpdate`` that ends the job.
        With ``timeout``, stop yielding after that long without an event."""
        while True:
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                return
            yield ev
            if isinstance(ev, JobUpdate) and Status(ev.state).finished:
                return

    def next_event(self, timeout: float | None = None) -> Any | None:
        """The next event (as ``events`` yields them), or None after ``timeout`` without one."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def stream(self) -> Iterator[Output]:
        """Only the outputs, live, until the job ends."""
        for ev in self.events():
            if isinstance(ev, Output):
                yield ev

    @classmethod
    def attach(cls, job_id: str, client: Client | None = None) -> Job:
        """Follow a job submitted elsewhere (another process, before a kernel restart)."""
        if client is None:
            from gateway._settings import find_connection

            client = Client(find_connection())
        return client.attach(job_id)


class Client:
    """A connection to a gateway for synchronous code. Thread-safe; close it when done."""

    def __init__(
        self,
        connection: ConnectionInfo,
        *,
        name: str = "",
        timeouts: Timeouts | None = None,
    ) -> None:
        self.connection = connection
        self.timeouts = timeouts or Timeouts()
        self._io = _IOThread("pilot-client-io")
        self._async = AsyncClient(
            connection, name=name or f"client-{os.getpid()}", timeouts=self.timeouts
        )
        try:
            self._io.run(self._async.start(), self.timeouts.request_s + 5)
        except BaseException:
            self._io.stop()
            raise
        self._prefix = f"{os.urandom(4).hex()}-"
        self._counter = itertools.count(1)
        self._fns: dict[int, tuple[Callable[..., Any], str, Payload]] = {}
        self._pending: list[tuple[JobSpec, tuple[Payload, ...], Job]] = []
        self._pending_lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._io.run(self._async.close(), 10)
        self._io.stop()

    # -- submitting -------------------------------------------------------------------------

    def _function(self, fn: Callable[..., Any]) -> tuple[str, Payload]:
        cached = self._fns.get(id(fn))
        if cached is not None and cached[0] is fn:
            return cached[1], cached[2]
        payload = dumps_function(fn)
        key = digest_of(payload)
        if len(self._fns) >= _FN_CACHE:
            self._fns.pop(next(iter(self._fns)))
        self._fns[id(fn)] = (fn, key, payload)  # holding fn keeps its id from being reused
        return key, payload

    def new_job_id(self) -> str:
        return f"{self._prefix}{next(self._counter)}"

    def submit_job(
        self,
        fn: Callable[..., Any],
        args: Sequence[Payload],
        *,
        mode: str = "call",
        name: str = "",
        resources: Resources | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        meta: dict[str, Any] | None = None,
        items: Sequence[Any] | None = None,
        chunk: int = 1,
    ) -> Job:
        """The one way jobs are submitted (``map``, ``submit`` and the magic use it)."""
        key, payload = self._function(fn)
        job_id = self.new_job_id()
        spec = JobSpec(
            job_id,
            name or getattr(fn, "__name__", "job"),
            key,
            payload,
            len(args),
            resources or Resources(),
            float(timeout or 0.0),
            -1 if retries is None else retries,
            {**(meta or {}), "mode": mode, "chunk": chunk},
        )
        job = Job(self, job_id, items=items, chunk=chunk, n_tasks=len(args), kind=mode)
        with self._pending_lock:
            first = not self._pending
            self._pending.append((spec, tuple(args), job))
        if first:
            self._io.loop.call_soon_threadsafe(self._hand_over)
        return job

    def _hand_over(self) -> None:
        """On the IO thread: everything submitted since the last turn, in one message."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        for spec, args, job in batch:
            state = self._async.submit_nowait(spec, args)
            state.listener = job._on_event

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:
        """Run ``fn(*args, **kwargs)`` on a worker. Returns at once; ``job.result()`` waits.
        Raises ``SerializationError`` naming an argument that cannot be pickled."""
        payload = _dumps_args(args, kwargs)
        return self.submit_job(fn, [payload])

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        chunk: int | None = None,
        cpus: int = 1,
        gpus: int = 0,
        tags: Sequence[str] = (),
        timeout: float | None = None,
        retries: int | None = None,
        name: str = "",
        meta: dict[str, Any] | None = None,
    ) -> Job:
        """``fn(item)`` for every item, ``chunk`` items per task. Returns at once."""
        items = list(items)
        if chunk is None:
            chunk = max(1, math.ceil(len(items) / AUTO_CHUNK_TASKS))
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 (got {chunk}).")
        args = []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            args.append(dumps((part, start), what=f"items {start}..{start + len(part) - 1}"))
        return self.submit_job(
            fn,
            args,
            mode="map",
            name=name,
            resources=Resources(cpus, gpus, tuple(tags)),
            timeout=timeout,
            retries=retries,
            meta=meta,
            items=items,
            chunk=chunk,
        )

    # -- the rest ---------------------------------------------------------------------------

    def attach(self, job_id: str) -> Job:
        job = Job(self, job_id)

        async def go() -> JobState:
            return await self._async.attach(job_id, listener=job._on_event)

        state = self._io.run(go(), self.timeouts.request_s + 5)
        if state.spec is not None:
            job._adopt_spec(state.spec)
        return job

    def status(self, wait_workers: int = 0, timeout: float = 0.0) -> StatusReply:
        reply: StatusReply = self._io.run(
            self._async.status(wait_workers, timeout), timeout + self.timeouts.request_s + 5
        )
        return reply

    def wait_for_workers(self, n: int, timeout: float = 30.0) -> StatusReply:
        """Block until ``n`` workers are connected. Raises ``PilotTimeout``."""
        reply = self.status(wait_workers=n, timeout=timeout)
        if len(reply.workers) < n:
            raise PilotTimeout(
                f"Only {len(reply.workers)} of {n} workers connected after {timeout}s."
            )
        return reply

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        return list(self._io.run(self._async.list_jobs(limit)).jobs)

    def logs(self, job_id: str, index: int = -1) -> list[Output]:
        return list(self._io.run(self._async.logs(job_id, index)).outputs)

    def cancel(self, job_id: str) -> None:
        self._io.run(self._async.cancel(job_id), self.timeouts.request_s)

    def send_input(self, job_id: str, index: int, kind: str, data: Any = None) -> None:
        """Send something to a running task; returns at once (see ``AsyncClient``)."""
        self._io.loop.call_soon_threadsafe(self._async.send_input, job_id, index, kind, data)


def _dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Payload:
    try:
        return dumps((args, kwargs))
    except SerializationError as whole:
        # Name the culprit: pickle each argument alone, which raises for the first bad one.
        for i, a in enumerate(args):
            dumps(a, what=f"argument {i}")
        for k, v in kwargs.items():
            dumps(v, what=f"argument {k!r}")
        raise whole
