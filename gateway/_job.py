"""``Job``: a submitted job, seen from the user's thread.

Events arrive on the client's IO thread (``_on_event``) and are queued for the user's thread,
which waits on them, reads results (unpickled lazily, once) and, in a notebook, displays them.
Owned by the ``Client`` that submitted or attached it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway._errors import JobCancelled, JobError, PilotTimeout, TaskError
from gateway._messages import JobSpec, JobUpdate, Output, Status, TaskDone, TaskStatus
from gateway._serialize import loads

if TYPE_CHECKING:
    from gateway._sync import Client

__all__ = ["Job"]


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

    def files(self, dest_dir: str | Path | None = None) -> dict[int, list[str]]:
        """The result files of the tasks that succeeded, by item index: local paths (fetched
        from the gateway into ``dest_dir``, by default ``$PILOT_HOME/results/JOB``) or the
        URLs they were written to with ``results=URL``."""
        from gateway._settings import default_home

        dest = Path(dest_dir) if dest_dir is not None else default_home() / "results" / self.id
        out: dict[int, list[str]] = {}
        for i in sorted(self._done):
            for ref in self._done[i].files:
                where = ref.url or str(self.client.fetch_file(ref, dest))
                item = ref.item if ref.item >= 0 else i
                out.setdefault(item, []).append(where)
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
