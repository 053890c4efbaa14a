"""The worker's side of its task processes: what they say, and what they are handed.

A mixin of ``Worker`` (it uses the worker's queue, pool, sessions and report lists): results
and outputs coming back from task processes, a crashed process's task, and dispatch, which hands
an idle process one task or, for short tasks of a known function, a batch sized to run for
about ``BATCH_BUDGET_S``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import zmq

from gateway._drain import send_frames
from gateway._messages import (
    Assign,
    Assignment,
    Heartbeat,
    Outputs,
    PutBlob,
    TaskAttempt,
    TaskResult,
    TaskResults,
    TaskStatus,
)
from worker._pool import Child
from worker._states import WorkerState

__all__ = ["TaskProcesses"]

log = logging.getLogger("pilot.worker")

MAX_BATCH = 64  # tasks handed to a task process at once
BATCH_BUDGET_S = 0.005  # a batch is sized to run for about this long
SHORT_TASK_S = 0.001  # only functions whose tasks take less than this (mean) are batched


class TaskProcesses:
    """Task-process handling; mixed into ``Worker``."""

    def _from_child(self, frames: list[zmq.Frame]) -> None:
        ident, *rest = frames
        if self.sessions.owns(ident.bytes):
            self.sessions.on_message(ident.bytes, self._local.decode(rest).msg)
            return
        child = self.pool.children.get(ident.bytes)
        if child is not None:
            self._on_child(child, self._local.decode(rest).msg)

    def _on_child(self, child: Child, msg: Any) -> None:
        match msg:
            case Heartbeat():
                child.ready = True
                if self.pool.all_ready:
                    self._children_ready.set()
            case Outputs(outputs=outputs):
                self._outputs.extend(outputs)
            case TaskResults(results=results):
                for r in results:
                    self._finish(child, r)
            case PutBlob():  # a result file: to the gateway now, ahead of the task's result
                self._send_gateway(msg)

    def _blobs_arrived(self, ready: list[Assignment], failed: list[tuple[Assignment, str]]) -> None:
        """Shipped files fetched: their tasks join the queue (or fail, if a blob is gone)."""
        self._queue.extend(ready)
        for a, why in failed:
            self._holding.pop((a.job_id, a.index), None)
            self._results.append(
                TaskResult(a.job_id, a.index, a.attempt, int(TaskStatus.ERROR), None, why)
            )
        self._end_turn()

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
        if result.status == TaskStatus.OK:
            mean = self._durations.get(task.fn_key)
            d = result.duration_s
            self._durations[task.fn_key] = d if mean is None else 0.8 * mean + 0.2 * d
        if result.status == TaskStatus.MISSING_FUNCTION:
            child.fns.discard(task.fn_key)
        self._holding.pop((task.job_id, task.index), None)
        self._results.append(result)
        if not child.tasks:
            self._release(child)

    def _release(self, child: Child) -> None:
        self._used_slots -= child.slots
        child.slots = 0
        if not self._used_slots:
            self._idle.set()

    def _session_finished(self, task: Assignment, result: TaskResult) -> None:
        self._used_slots -= task.cpus
        if not self._used_slots:
            self._idle.set()
        self._holding.pop((task.job_id, task.index), None)
        self._results.append(result)
        self._end_turn()

    def _start_session(self, a: Assignment) -> None:
        self._used_slots += a.cpus
        self._started.append(TaskAttempt(a.job_id, a.index, a.attempt))
        assert self._group is not None
        self._group.create_task(self.sessions.start(a))

    def _child_exited(self, child: Child, code: int) -> None:
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
            self._release(child)
        self._queue.extendleft(reversed(requeue))
        log.info("task process %s exited (%s); starting another", child.ident.decode(), code)
        if not self._stop.is_set() and self._group is not None:
            self._group.create_task(self._respawn())

    async def _respawn(self) -> None:
        await self.pool.spawn()
        self._end_turn()

    def _dispatch(self) -> None:
        if self.state is WorkerState.DRAINING:
            return
        while self._queue:
            a = self._queue[0]
            if a.meta.get("mode") == "session":  # a process of its own, not the pool's
                self._queue.popleft()
                self._start_session(a)
                continue
            if self._used_slots and self._used_slots + a.cpus > self.settings.slots:
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
        # deadline at once: those run alone. So do tasks needing more than one slot or a GPU.
        if a.timeout_s > 0 or a.cpus != 1 or a.gpus or a.meta.get("mode") == "session":
            return False
        mean = self._durations.get(a.fn_key)
        return mean is not None and mean < SHORT_TASK_S

    def _batch_limit(self, a: Assignment) -> int:
        """How many tasks from the head of the queue go to the next idle process: enough to
        fill ``BATCH_BUDGET_S``, and no more than an even share of what is queued between the
        processes idle now and the next to free up (so work is left for it)."""
        if not self._batchable(a):
            return 1
        mean = max(self._durations[a.fn_key], 1e-6)
        share = math.ceil(len(self._queue) / (self.pool.idle_count() + 1))
        return max(1, min(MAX_BATCH, int(BATCH_BUDGET_S / mean), share))

    def _hand(self, child: Child, batch: list[Assignment]) -> None:
        tasks = []
        for a in batch:
            fn = None
            if a.fn_key not in child.fns:
                fn = self._fns.get(a.fn_key)  # None if evicted: the process says so, and
                if fn is not None:  # the gateway sends it again with the next attempt
                    child.fns.add(a.fn_key)
            if fn is not a.fn:
                a = Assignment(
                    a.job_id,
                    a.index,
                    a.attempt,
                    a.fn_key,
                    fn,
                    a.args,
                    a.timeout_s,
                    a.meta,
                    a.cpus,
                    a.gpus,
                )
            tasks.append(a)
            self._started.append(TaskAttempt(a.job_id, a.index, a.attempt))
        child.take(tasks)
        self._used_slots += child.slots
        self._send_child(child.ident, Assign(tuple(tasks)))

    def _send_child(self, ident: bytes, msg: Any) -> None:
        send_frames(self.pool.sock, [ident, *self._local.encode(msg)])
        if self._children_drain is not None:  # see _send_gateway: sessions send outside turns
            self._children_drain.kick()
