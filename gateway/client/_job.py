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

from gateway.client._outcomes import Outcomes
from gateway.client._queries import job_stats
from gateway.client._render import RenderOutput, submit_render
from gateway.protocol import (
    JobCancelled,
    JobError,
    JobKind,
    JobSpec,
    JobStats,
    JobUpdate,
    Output,
    OutputKind,
    PilotTimeout,
    Status,
    TaskDone,
    TaskError,
    TaskStatus,
    default_home,
    find_connection,
    loads,
)

if TYPE_CHECKING:
    from gateway.client._sync import Client

__all__ = ["Job"]


class Job:
    """A submitted job, seen from the user's thread. Never blocks unless asked to.

    ``results`` are in item order; a failed task raises ``TaskError`` (with the remote
    traceback and the item) when results are asked for; ``outcomes()`` gives what did succeed.
    """

    def __init__(
        self,
        client: Client,
        spec: JobSpec | None,
        *,
        items: Sequence[Any] | None = None,
        job_id: str = "",
    ) -> None:
        """A job the ``client`` submitted (``spec``), or one it attaches to (``job_id``; the
        spec arrives with the attach)."""
        self.client = client
        self.spec = spec
        self.id = spec.job_id if spec is not None else job_id
        self.items = items
        #: Finished tasks by index (the one client-side record of them, in columns: a
        #: ``Mapping[int, TaskDone]``); filled on the client's IO thread, read on the user's.
        self.tasks = Outcomes(self.id, spec.n_tasks if spec is not None else 0)
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._finished = threading.Event()
        self.state = Status.QUEUED
        self.error = ""
        self._values: dict[int, Any] = {}
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        #: A training job's reported metrics (``pilot.train.report``), in arrival order.
        self.metrics: list[dict[str, Any]] = []
        #: A render job's frames as they arrive (set by ``Client.render``, or on attach).
        self.render: RenderOutput | None = None

    def __repr__(self) -> str:
        done, total = self.progress
        return f"<Job {self.id} {self.state.name.lower()} {done}/{total}>"

    @property
    def kind(self) -> JobKind:
        return self.spec.kind if self.spec is not None else JobKind.CALL

    @property
    def chunk(self) -> int:
        return self.spec.chunk if self.spec is not None else 1

    @property
    def n_tasks(self) -> int:
        return self.spec.n_tasks if self.spec is not None else 0

    def on_event(self, ev: Any) -> None:
        """Called by the client on its IO thread: a finished task, an output, or a state."""
        if isinstance(ev, TaskDone):
            self.tasks.add(ev)
            # Queued as its index, made whole again when read: a job of a million tasks whose
            # events nobody reads keeps a small int for each, not a TaskDone.
            self._events.put(ev.index)
            return
        if isinstance(ev, Output):
            if ev.kind == OutputKind.METRICS:
                self.metrics.append(dict(ev.data))
            elif ev.kind == OutputKind.FRAME:
                if self.render is None:  # attached: the frames asked are not known here
                    self.render = RenderOutput(())
                self.render.done[ev.item] = ev.data
        elif isinstance(ev, JobUpdate):
            if ev.spec is not None:  # the head of an attach replay; its end follows
                self.spec, self.state, self.error = ev.spec, ev.state, ev.error
                return
            self.state, self.error = ev.state, ev.error
            if self.state.finished:
                self.finished_at = time.monotonic()
                self._events.put(ev)
                self._finished.set()
                return
        self._events.put(ev)

    # -- the user's side ------------------------------------------------------------------

    @property
    def progress(self) -> tuple[int, int]:
        """(tasks finished, tasks) — finished includes failed ones."""
        return len(self.tasks), self.n_tasks

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
        fine = (TaskStatus.OK, TaskStatus.CANCELLED)
        return [
            self._task_error(self.tasks[i]) for i in self.tasks if self.tasks.status(i) not in fine
        ]

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
        if self.kind == JobKind.MAP and self.items is not None:
            if 0 <= d.item < len(self.items):
                return self.items[d.item], f"for item {self.items[d.item]!r}"
            chunk = self.items[d.index * self.chunk : (d.index + 1) * self.chunk]
            return list(chunk), f"{d.index} (items {d.index * self.chunk}..)"
        return None, str(d.index)

    def value(self, index: int) -> Any:
        """The unpickled value of task ``index`` (cached)."""
        if index not in self._values:
            d = self.tasks[index]
            if d.status != TaskStatus.OK:
                raise self._task_error(d)
            self._values[index] = loads(d.value) if d.value is not None else None
        return self._values[index]

    @property
    def results(self) -> list[Any]:
        """Every item's result in item order (waits for the job). A training job: each rank's
        value in rank order (the ranks of the last group, which a restart may have shrunk). A
        render job: ``frames``."""
        self.wait()
        if self.kind == JobKind.RENDER:
            return self.frames
        if self.kind == JobKind.DDP:
            return [self.value(i) for i in self.tasks if self._ok(i)]
        return self._flat(range(self.n_tasks))

    def _ok(self, index: int) -> bool:
        return self.tasks.status(index) == TaskStatus.OK

    # -- render jobs ----------------------------------------------------------------------

    @property
    def frames(self) -> list[str]:
        """A render job's frames as local files, in frame order (fetched once)."""
        return self._render().frames(self)

    @property
    def video(self) -> Path:
        """A render job's frames as an MP4 (made once the job is done; see ``Client.render``)."""
        self.wait()
        return self._render().video(self)

    def missing_frames(self) -> list[int]:
        """Frames of a render job that are not stored, or whose file is gone."""
        return self._render().missing(self)

    def rerun(self, *, missing: bool = True) -> Job:
        """Render again: only the missing or failed frames (``missing=True``), or all."""
        r = self._render()
        if not r.again:
            raise JobError(f"Job {self.id} was not submitted here: rerun it from its client.")
        frames = self.missing_frames() if missing else list(r.frames_asked)
        if not frames:
            raise JobError(f"Job {self.id} has no missing frames: nothing to render again.")
        return submit_render(self.client, frames=frames, **r.again)

    def _render(self) -> RenderOutput:
        if self.render is None:
            raise JobError(f"Job {self.id} is not a render job.")
        return self.render

    def result(self, timeout: float | None = None) -> Any:
        """The single result of a ``submit`` job (waits)."""
        self.wait(timeout)
        return self.value(0)

    def _flat(self, indices: Iterable[int]) -> list[Any]:
        if self.kind != JobKind.MAP:
            return [self.value(i) for i in indices]
        out: list[Any] = []
        for i in indices:
            out.extend(self.value(i))
        return out

    def files(self, dest_dir: str | Path | None = None) -> dict[int, list[str]]:
        """The result files of the tasks that succeeded, by item index: local paths (fetched
        from the gateway into ``dest_dir``, by default ``$PILOT_HOME/results/JOB``) or the
        URLs they were written to with ``results=URL``."""
        dest = Path(dest_dir) if dest_dir is not None else default_home() / "results" / self.id
        out: dict[int, list[str]] = {}
        for i, d in self.tasks.whole():  # only outcomes kept whole have files
            for ref in d.files:
                where = ref.url or str(self.client.fetch_file(ref, dest))
                item = ref.item if ref.item >= 0 else i
                out.setdefault(item, []).append(where)
        return out

    def outcomes(self) -> dict[int, Any]:
        """Task index -> value for the tasks that succeeded so far (map: item index)."""
        out = {}
        for i in self.tasks:
            if self.tasks.status(i) == TaskStatus.OK:
                if self.kind == JobKind.MAP:
                    for k, v in enumerate(self.value(i)):
                        out[i * self.chunk + k] = v
                else:
                    out[i] = self.value(i)
        return out

    def cancel(self) -> None:
        """Drop queued tasks, interrupt running ones. Returns once the gateway has it."""
        self.client.cancel(self.id)

    def stats(self) -> JobStats:
        """This job's timings from the gateway's store (``JobStats``): every attempt (worker,
        queued, started, finished), per worker the attempts and busy time, and the job's wall
        time, task time and speed-up."""
        return job_stats(self.client, self.id)

    def events(self, timeout: float | None = None) -> Iterator[Any]:
        """Yield ``Output``, ``TaskDone`` and finally the ``JobUpdate`` that ends the job.
        With ``timeout``, stop yielding after that long without an event."""
        while True:
            try:
                ev = self._event(self._events.get(timeout=timeout))
            except queue.Empty:
                return
            yield ev
            if isinstance(ev, JobUpdate) and Status(ev.state).finished:
                return

    def next_event(self, timeout: float | None = None) -> Any | None:
        """The next event (as ``events`` yields them), or None after ``timeout`` without one."""
        try:
            return self._event(self._events.get(timeout=timeout))
        except queue.Empty:
            return None

    def _event(self, ev: Any) -> Any:
        return self.tasks[ev] if type(ev) is int else ev  # a finished task, by its index

    def stream(self) -> Iterator[Output]:
        """Only the outputs, live, until the job ends."""
        for ev in self.events():
            if isinstance(ev, Output):
                yield ev

    @classmethod
    def attach(cls, job_id: str, client: Client | None = None) -> Job:
        """Follow a job submitted elsewhere (another process, before a kernel restart)."""
        if client is None:
            from gateway.client._sync import Client

            client = Client(find_connection())
        return client.attach(job_id)
