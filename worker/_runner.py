"""Running a worker's tasks: ``TaskRunner`` owns the task processes, the queue and the slots.

The worker hands it every assignment (``assign``). The runner:

- holds a task until its function's blob and its shipped files are on this worker
  (``worker._fetch.TaskHolds``), then queues it;
- runs queued tasks on an idle task process when the slots they need are free; a remote
  session (``JobKind.SESSION``) is started through ``start_session`` instead, in a process of
  its own, taking its slots until it ends (``session_ended``); so is a training rank
  (``JobKind.DDP``, through ``start_rank``, until ``rank_ended``);
- hands an idle task process several queued tasks at once when they are known to be short
  (their function's mean duration here is under ``policy.short_task_s``, with no timeout, one
  slot, no GPU), as many as run in about ``policy.batch_budget_s``, keeping some back for the
  next process to free up: each hop then carries many tasks per message;
- answers a task process's ``GetBlob`` (a function it has not loaded, an argument's big
  buffer) from the worker's blob cache, which the gateway refills if it was evicted; a big
  buffer asked with ``shared`` through shared memory (``worker._shared``);
- turns what the processes say into ``Reports``: outputs, a start per task handed out, each
  result; a result file (``PutBlob``) goes to the gateway at once through ``forward``, ahead
  of its task's result;
- when a process dies, fails only the task that was running (CRASHED, or CANCELLED if it was
  being interrupted), requeues the rest of its batch and starts another process;
- on cancel, drops queued and held tasks, and interrupts a running one (SIGINT, then SIGKILL
  after the grace period) or has its process skip one still waiting in its batch (see
  ``worker._control``).

Owned by the worker's event loop. ``held()`` lists every attempt it holds (a hello after a
reconnect re-announces them); ``hand_back()`` (drain) stops it taking work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import zmq

from gateway.protocol import (
    DEFAULT_POLICY,
    Assign,
    Assignment,
    GetBlob,
    Heartbeat,
    JobKind,
    Outputs,
    PutBlob,
    TaskAttempt,
    TaskResult,
    TaskResults,
    TaskStatus,
    WorkerSettings,
)
from worker._fetch import BlobFetcher, TaskHolds
from worker._pool import Child, TaskPool
from worker._reports import Reports
from worker._shared import SharedBuffers

__all__ = ["Durations", "TaskRunner"]

log = logging.getLogger("pilot.worker")

Key = tuple[str, int, int]  # (job_id, index, attempt)


class Durations:
    """The mean duration of a function's tasks on this worker (an EWMA), by function digest,
    for the ``kept`` functions seen last."""

    def __init__(self, kept: int = 128) -> None:
        self._kept = kept
        self._mean: OrderedDict[str, float] = OrderedDict()

    def get(self, digest: str) -> float | None:
        return self._mean.get(digest)

    def add(self, digest: str, seconds: float) -> None:
        mean = self._mean.pop(digest, None)
        self._mean[digest] = seconds if mean is None else 0.8 * mean + 0.2 * seconds
        if len(self._mean) > self._kept:
            self._mean.popitem(last=False)


class TaskRunner:
    """See the module docstring. Callbacks: ``forward(msg)`` sends to the gateway;
    ``start_session(task)`` starts a remote session, ``start_rank(task)`` a training rank;
    ``spawn(coro)`` runs a coroutine in the
    worker's task group; ``wake()`` ends a turn (dispatch, report) outside the socket turns."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        settings: WorkerSettings,
        *,
        env: dict[str, str],
        files_dir: Path,
        reports: Reports,
        fetcher: BlobFetcher,
        forward: Callable[[Any], None],
        start_session: Callable[[Assignment], None],
        start_rank: Callable[[Assignment], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        wake: Callable[[], None],
    ) -> None:
        self.policy = DEFAULT_POLICY  # replaced by the gateway's, from its Welcome
        self.slots = settings.slots
        self._grace_s = settings.timeouts.cancel_grace_s
        self.pool = TaskPool(
            ctx,
            settings.slots,
            on_exit=self._exited,
            env=env,
            max_message_bytes=settings.max_message_bytes,
        )
        self._reports = reports
        self._fetcher = fetcher
        self._shared = SharedBuffers(fetcher.cache)
        self._forward = forward
        self._start_session = start_session
        self._start_rank = start_rank
        self._spawn = spawn
        self._wake = wake
        self._holds = TaskHolds(fetcher, files_dir, release=self._released, fail=self.fail)
        self._queue: deque[Assignment] = deque()
        self._holding: dict[tuple[str, int], Assignment] = {}
        self.durations = Durations()
        self.used_slots = 0
        self._idle = asyncio.Event()
        self.ready = asyncio.Event()  # every task process said it is ready
        self.draining = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the task processes; ``ready`` is set once they all said so."""
        await asyncio.gather(*(self.pool.spawn() for _ in range(self.slots)))

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no slot is used; False if some still are after ``timeout_s``."""
        if not self.used_slots:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.draining = True
        try:
            await self.pool.close()
        finally:
            self._shared.close()

    # -- what the worker holds ------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.slots - self.used_slots

    def held(self) -> tuple[TaskAttempt, ...]:
        """Every attempt this worker holds: queued, held for blobs, running."""
        return tuple(TaskAttempt(a.job_id, a.index, a.attempt) for a in self._holding.values())

    def assign(self, task: Assignment) -> None:
        """A task from the gateway: queued once its blobs are here."""
        self._holding[(task.job_id, task.index)] = task
        if self._holds.admit(task):
            self._queue.append(task)

    def hand_back(self) -> tuple[TaskAttempt, ...]:
        """Stop taking work (drain); return the attempts that have not started, now dropped."""
        self.draining = True
        tasks = [*self._queue, *self._holds.drop()]
        self._queue.clear()
        for a in tasks:
            self._holding.pop((a.job_id, a.index), None)
        return tuple(TaskAttempt(a.job_id, a.index, a.attempt) for a in tasks)

    def fail(self, task: Assignment, status: TaskStatus, text: str) -> None:
        """Report ``task`` as failed before it ran."""
        self._holding.pop((task.job_id, task.index), None)
        self._reports.result(TaskResult(task.job_id, task.index, task.attempt, status, None, text))
        self._wake()

    def _released(self, task: Assignment) -> None:
        self._queue.append(task)
        self._wake()

    def cancel(self, wanted: set[Key]) -> None:
        """Drop the queued and held attempts of ``wanted``; interrupt the running ones. A
        dropped training rank is reported CANCELLED: its group's restart waits for that."""
        dropped = self._holds.drop(wanted)
        kept: deque[Assignment] = deque()
        for a in self._queue:
            (dropped if (a.job_id, a.index, a.attempt) in wanted else kept).append(a)
        self._queue = kept
        for a in dropped:
            self._holding.pop((a.job_id, a.index), None)
            if a.kind == JobKind.DDP:
                status = TaskStatus.CANCELLED
                self._reports.result(TaskResult(a.job_id, a.index, a.attempt, status, None))
        for child in list(self.pool.children.values()):
            seqs = [
                seq
                for seq, t in child.tasks.items()
                if (t.job_id, t.index, t.attempt) in wanted and seq not in child.interrupting
            ]
            self.pool.interrupt(child, seqs, self._grace_s)

    def rank_ended(self, task: Assignment, result: TaskResult) -> None:
        """A training rank's process ended (``worker._ranks``): free its slots. The same task
        may hold a newer attempt here already (its group restarted): that one stays held."""
        self._release_slots(task.cpus)
        held = self._holding.get((task.job_id, task.index))
        if held is not None and held.attempt == task.attempt:
            del self._holding[(task.job_id, task.index)]
        self._reports.result(result)
        self._wake()

    def session_ended(self, task: Assignment, result: TaskResult) -> None:
        """A remote session's process reported its end (or died): free its slots."""
        self._release_slots(task.cpus)
        self._holding.pop((task.job_id, task.index), None)
        self._reports.result(result)
        self._wake()

    # -- task processes -------------------------------------------------------------------

    def on_message(self, ident: bytes, msg: Any) -> None:
        """A message from the task process ``ident``."""
        child = self.pool.children.get(ident)
        if child is None:
            return
        match msg:
            case Heartbeat():
                child.ready = True
                if self.pool.all_ready:
                    self.ready.set()
            case Outputs(outputs=outputs):
                self._reports.outputs(outputs)
            case TaskResults(results=results):
                for r in results:
                    self._finish(child, r)
            case PutBlob():  # a result file: to the gateway now, ahead of the task's result
                self._forward(msg)
            case GetBlob(digest=digest, shared=False):  # a function this process lacks
                self._fetcher.function(digest, lambda reply: self.pool.send(ident, reply))
            case GetBlob(digest=digest):  # an argument's buffer: through shared memory
                send = functools.partial(self.pool.send, ident)
                self._shared.ask(digest, send, self._fetcher.function)

    def _finish(self, child: Child, result: TaskResult) -> None:
        """A result from ``child``: results come in the order its tasks were sent."""
        key = (result.job_id, result.index, result.attempt)
        seq = next(iter(child.tasks), None)
        task = child.tasks.get(seq) if seq is not None else None
        if task is None or (task.job_id, task.index, task.attempt) != key:
            seq = child.seq_of(*key)
            if seq is None:
                log.warning("task process %s sent an unexpected result", child.ident.decode())
                return
            task = child.tasks[seq]
        del child.tasks[seq]
        child.interrupting.discard(seq)
        if result.status == TaskStatus.OK and task.fn_digest:
            self.durations.add(task.fn_digest, result.duration_s)
        self._holding.pop((task.job_id, task.index), None)
        self._reports.result(result)
        if not child.tasks:
            self._release_slots(child.slots)
            child.slots = 0

    def _release_slots(self, n: int) -> None:
        self.used_slots -= n
        if not self.used_slots:
            self._idle.set()

    def _exited(self, child: Child, code: int) -> None:
        """Fail the task that was running (if one was), requeue the rest of its batch."""
        running = child.control.running
        requeue = []
        for seq, task in list(child.tasks.items()):
            if seq == running:
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                if seq in child.interrupting:
                    status, text = TaskStatus.CANCELLED, "Interrupted, then killed."
                else:
                    status = TaskStatus.CRASHED
                    text = (
                        f"The process running this task died ({how}). A segfault, os._exit or "
                        "running out of memory does this."
                    )
                self._finish(
                    child, TaskResult(task.job_id, task.index, task.attempt, status, None, text)
                )
            elif seq in child.interrupting:  # cancelled before it ran: nothing to report
                self._holding.pop((task.job_id, task.index), None)
            else:  # not started, or its result was still held: it runs again
                requeue.append(task)
        child.tasks.clear()
        if child.slots:
            self._release_slots(child.slots)
            child.slots = 0
        self._queue.extendleft(reversed(requeue))
        log.info("task process %s exited (%s); starting another", child.ident.decode(), code)
        if not self.draining:
            self._spawn(self._respawn())

    async def _respawn(self) -> None:
        await self.pool.spawn()
        self._wake()

    # -- dispatch -------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued tasks to idle task processes while slots allow."""
        if self.draining:
            return
        while self._queue:
            a = self._queue[0]
            if a.kind in (JobKind.SESSION, JobKind.DDP):  # a process of its own, not the pool's
                self._queue.popleft()
                self.used_slots += a.cpus
                self._reports.started(TaskAttempt(a.job_id, a.index, a.attempt))
                (self._start_session if a.kind == JobKind.SESSION else self._start_rank)(a)
                continue
            if self.used_slots and self.used_slots + a.cpus > self.slots:
                return
            child = self.pool.idle()
            if child is None:
                return
            batch = [self._queue.popleft()]
            limit = self._batch_limit(a)
            while len(batch) < limit and self._queue and self._batchable(self._queue[0]):
                batch.append(self._queue.popleft())
            self._hand(child, batch)

    def _batchable(self, a: Assignment) -> bool:
        # A timeout is watched per task from its start, and SIGINT must reach a task with a
        # deadline at once: those run alone. So do tasks needing more than one slot or a GPU,
        # and render chunks (one Blender process each, never short).
        if a.timeout_s > 0 or a.cpus != 1 or a.gpus or a.kind in (JobKind.SESSION, JobKind.RENDER):
            return False
        if a.kind == JobKind.DDP:  # a training rank: a process of its own
            return False
        mean = self.durations.get(a.fn_digest)
        return mean is not None and mean < self.policy.short_task_s

    def _batch_limit(self, a: Assignment) -> int:
        """How many tasks from the head of the queue go to the next idle process: enough to
        fill ``batch_budget_s``, and no more than an even share of what is queued between the
        processes idle now and the next to free up (so work is left for it)."""
        if not self._batchable(a):
            return 1
        mean = max(self.durations.get(a.fn_digest) or 0.0, 1e-6)
        share = math.ceil(len(self._queue) / (self.pool.idle_count() + 1))
        policy = self.policy
        return max(1, min(policy.max_batch, int(policy.batch_budget_s / mean), share))

    def _hand(self, child: Child, batch: list[Assignment]) -> None:
        for a in batch:
            self._reports.started(TaskAttempt(a.job_id, a.index, a.attempt))
        child.take(batch)
        self.used_slots += child.slots
        self.pool.send(child.ident, Assign(tuple(batch)))
