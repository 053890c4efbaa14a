"""Carrying out the scheduler's instructions: assign, cancel, record outcomes.

A mixin of ``Gateway``: the scheduler decides, this turns decisions into messages (batched per
peer for the end of the turn) and rows (committed at the end of the turn)."""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway import _scheduler as sch
from gateway._messages import (
    Assignment,
    JobUpdate,
    Payload,
    Status,
    TaskAttempt,
    TaskDone,
    TaskResult,
    TaskStatus,
)

__all__ = ["Instructions"]

log = logging.getLogger("pilot.gateway")


class Instructions:
    """Applies ``Scheduler`` instructions; mixed into ``Gateway``."""

    def _apply(self, instructions: list[sch.Instruction], result: TaskResult | None = None) -> None:
        for ins in instructions:
            match ins:
                case sch.AssignTask(worker=worker, job_id=job_id, index=index, attempt=attempt):
                    self._assign_task(worker, job_id, index, attempt)
                case sch.CancelAttempt(worker=worker, job_id=job_id, index=index, attempt=a):
                    self._cancel[worker].append(TaskAttempt(job_id, index, a))
                case sch.TaskSettled():
                    self._task_settled(ins, result)
                case sch.JobSettled(job_id=job_id, state=state):
                    self._job_settled(job_id, state)
                case sch.WorkerGone(name=name):
                    if self._workers.pop(name, None) is not None:
                        log.warning("worker %s is gone; its tasks went back to the queue", name)
                case sch.Unschedulable(job_id=job_id, resources=res):
                    self._unschedulable[job_id] = self._why_unschedulable(res)
                    self._apply(self.scheduler.handle(sch.JobCancel(job_id, time.monotonic())))

    def _assign_task(self, worker: str, job_id: str, index: int, attempt: int) -> None:
        job = self._jobs[job_id]
        w = self._workers[worker]
        spec = job.spec
        args = job.args.get(index)
        if args is None:
            args = job.args[index] = self.store.task_args(job_id, index)
        fn = None
        if spec.fn_key not in w.fns:
            fn = self._function(spec.fn_key)
            w.fns.add(spec.fn_key)
        res = spec.resources
        self._assign[worker].append(
            Assignment(
                job_id,
                index,
                attempt,
                spec.fn_key,
                fn,
                args,
                spec.timeout_s,
                spec.meta,
                max(1, res.cpus),
                res.gpus,
            )
        )
        self.store.attempt_assigned(job_id, index, attempt, worker)

    def _function(self, key: str) -> Payload:
        fn = self._fns.get(key)
        if fn is None:
            fn = self.store.function(key)
            if fn is None:
                raise KeyError(f"function {key} is not stored")
            self._fns[key] = fn
        return fn

    def _task_settled(self, ins: sch.TaskSettled, result: TaskResult | None) -> None:
        job = self._jobs.get(ins.job_id)
        if job is None:
            return
        value = error = None
        if result is not None and (result.job_id, result.index) == (ins.job_id, ins.index):
            value = result.value if ins.status == TaskStatus.OK else None
            error = result.error
        if not error and ins.status != TaskStatus.OK:
            error = _default_error(ins.status, ins.worker)
        done = TaskDone(
            ins.job_id,
            ins.index,
            int(ins.status),
            value,
            error or "",
            ins.worker,
            ins.attempts,
            result.duration_s if result is not None else 0.0,
            result.item if result is not None and value is None else -1,
            result.files if result is not None and value is not None else (),
        )
        if ins.status == TaskStatus.OK:
            job.done += 1
        elif ins.status != TaskStatus.CANCELLED:
            job.failed += 1
        job.args.pop(ins.index, None)
        self.store.task_settled(done)
        if ins.worker in self._workers and ins.status == TaskStatus.OK:
            self._workers[ins.worker].done += 1
        for ident in job.subscribers:
            self._client_done[ident].append(done)

    def _job_settled(self, job_id: str, state: Status) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        error = self._unschedulable.pop(job_id, "")
        if error:
            state = Status.FAILED
        job.state, job.error = state, error
        self.store.job_settled(job_id, state, error, job.done, job.failed)
        for ident in job.subscribers:
            self._to_clients[ident].append(JobUpdate(job_id, int(state), error))

    def _why_unschedulable(self, res: Any) -> str:
        have = "; ".join(
            f"{w.hello.name}: {w.hello.slots} slots, {len(w.hello.gpus)} GPUs, "
            f"tags [{', '.join(w.hello.tags)}]"
            for w in self._workers.values()
        )
        return (
            f"No connected worker can run this job: it asks for {max(1, res.cpus)} slots, "
            f"{res.gpus} GPUs, tags [{', '.join(res.tags)}]; the workers have: {have}. "
            "Ask for less, or start a worker that has it (`pilot worker --slots N --tags T`)."
        )


def _default_error(status: TaskStatus, worker: str) -> str:
    match status:
        case TaskStatus.LOST:
            return f"Worker {worker} was lost while running this task, on every try."
        case TaskStatus.TIMEOUT:
            return "The task ran past its timeout (--timeout) on every try."
        case TaskStatus.CRASHED:
            return f"The process running this task on {worker} died."
        case TaskStatus.CANCELLED:
            return "Cancelled."
    return f"Task ended with status {status.name}."
