"""Carrying out the scheduler's instructions: assign, cancel, record outcomes and job ends.

``Executor`` is one part of the ``Gateway``, built from what it uses: the scheduler decides,
the executor turns each decision into messages (in the ``Outbox``, sent at the end of the turn)
and rows (in the ``StateStore``, committed at the end of the turn, before anything is sent).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from gateway.protocol import (
    Assignment,
    Blob,
    JobUpdate,
    Output,
    OutputKind,
    RankInfo,
    Resources,
    TaskAttempt,
    TaskDone,
    TaskResult,
    TaskStatus,
)
from gateway.server import _scheduler as sch
from gateway.server._monitor import Monitor
from gateway.server._outbox import Outbox
from gateway.server._registry import ARGS_BATCH, Registry
from gateway.server._state import StateStore

__all__ = ["Executor"]

log = logging.getLogger("pilot.gateway")

FUNCTIONS_KEPT = 256  # function blobs kept in memory (the blob store has them all)
REMEMBERED_BLOB_BYTES = 1 << 20  # bigger blobs are not kept in memory


class Executor:
    """Applies ``Scheduler`` instructions (see the module docstring). ``counters`` is the
    gateway's counter dict; ``monitor`` measures settled tasks and sees the gateway's notes."""

    def __init__(
        self,
        scheduler: sch.Scheduler,
        registry: Registry,
        store: StateStore,
        outbox: Outbox,
        counters: dict[str, int],
        monitor: Monitor | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.monitor = monitor or Monitor()
        # when each task out on a worker was assigned (monotonic): its latency, once settled
        self._assigned_at: dict[tuple[str, int], float] = {}
        self._registry = registry
        self._store = store
        self._outbox = outbox
        self._counters = counters
        self._unschedulable: dict[str, str] = {}  # job id -> why, until its end is recorded
        # OK results of ranks whose gang has not finished yet: (job, index) -> the result
        self._held: dict[tuple[str, int], TaskResult] = {}
        self._functions: OrderedDict[str, Blob] = OrderedDict()  # recent ones, not re-read

    def remember(self, blob: Blob) -> None:
        """A blob just stored: keep it at hand for the workers that will ask, if it is small
        (a function; an argument's big buffer is read from the store when asked)."""
        if blob.data.nbytes > REMEMBERED_BLOB_BYTES:
            return
        self._functions[blob.digest] = blob
        self._functions.move_to_end(blob.digest)
        if len(self._functions) > FUNCTIONS_KEPT:
            self._functions.popitem(last=False)

    def handle(self, event: Any, result: TaskResult | None = None) -> None:
        """Feed ``event`` to the scheduler and carry out what it says. ``result`` is the
        worker's report behind a ``TaskFinished`` (its value, error and files)."""
        self.apply(self.scheduler.handle(event), result)

    def apply(self, instructions: Iterable[Any], result: TaskResult | None = None) -> None:
        instructions = list(instructions)
        if result is not None and result.status == TaskStatus.OK:
            settled = any(
                isinstance(i, sch.TaskSettled)
                and (i.job_id, i.index) == (result.job_id, result.index)
                for i in instructions
            )
            if not settled:  # a rank whose gang is still running: its value waits here
                self._held[(result.job_id, result.index)] = result
        for ins in instructions:
            match ins:
                case sch.AssignTask(worker=worker, job_id=job_id, index=index, attempt=attempt):
                    self._assign_task(worker, job_id, index, attempt)
                case sch.AssignGang():
                    self._assign_gang(ins)
                case sch.GangWaiting(job_id=job_id, need=need, free=free):
                    self._note(
                        job_id,
                        f"[pilot] waiting for {need} free rank slots to start all ranks at once "
                        f"({free} free now; busy workers finish first)\n",
                    )
                case sch.GangRestarted(job_id=job_id, restart=restart, rank=rank, status=st):
                    for key in [k for k in self._held if k[0] == job_id]:
                        del self._held[key]
                    self._note(
                        job_id,
                        f"[pilot] rank {rank} ended ({st.name.lower()}): the group stopped and "
                        f"restarts from its latest checkpoint (restart {restart})\n",
                    )
                case sch.CancelAttempt(worker=worker, job_id=job_id, index=index, attempt=a):
                    self._outbox.cancel(worker, TaskAttempt(job_id, index, a))
                case sch.TaskSettled():
                    self._task_settled(ins, result)
                case sch.JobStarted(job_id=job_id):
                    self._store.job_running(job_id)
                case sch.JobSettled():
                    self._job_settled(ins)
                case sch.WorkerGone(name=name):
                    if self._registry.workers.pop(name, None) is not None:
                        log.warning("worker %s is gone; its tasks went back to the queue", name)
                        self.monitor.worker_gone(name, "lost")
                case sch.Unschedulable(job_id=job_id, resources=res, ranks=ranks):
                    self._unschedulable[job_id] = self._why_unschedulable(res, ranks)

    def _note(self, job_id: str, text: str) -> None:
        """A line from the gateway in the job's stderr, live and kept for ``pilot logs``."""
        job = self._registry.jobs.get(job_id)
        if job is None:
            return
        out = Output(job_id, -1, -1, OutputKind.STDERR, text.encode())
        for ident in job.subscribers:
            self._outbox.output(ident, out)
        self._store.add_output(out)
        if self.monitor.observers:
            self.monitor.outputs((out,))

    def _assign_gang(self, ins: sch.AssignGang) -> None:
        hosts: list[str] = []  # the group's workers, in the order of their first rank
        for worker, _, _ in ins.ranks:
            if worker not in hosts:
                hosts.append(worker)
        seen: dict[str, int] = {}
        for r, (worker, index, attempt) in enumerate(ins.ranks):
            local = seen[worker] = seen.get(worker, -1) + 1
            info = RankInfo(
                rank=r,
                world_size=ins.world,
                local_rank=local,
                local_world_size=sum(1 for w, _, _ in ins.ranks if w == worker),
                group_rank=hosts.index(worker),
                restart=ins.restart,
                run_id=ins.job_id,
                hosts_rendezvous=worker == ins.ranks[0][0],
            )
            self._assign_task(worker, ins.job_id, index, attempt, info)

    def _assign_task(
        self, worker: str, job_id: str, index: int, attempt: int, rank: RankInfo | None = None
    ) -> None:
        job = self._registry.jobs[job_id]
        spec = job.spec
        args = job.args.get(index)
        if args is None:  # past the arguments kept in memory: read a batch from the store
            job.args.update(self._store.task_args_from(job_id, index, ARGS_BATCH))
            args = job.args.get(index)
            if args is None:
                args = job.args[index] = self._store.task_args(job_id, index)
        res = spec.resources
        task = Assignment(
            job_id,
            index,
            attempt,
            spec.kind,
            spec.fn_digest,
            args,
            spec.timeout_s,
            max(1, res.cpus),
            res.gpus,
            spec.data,
            spec.meta,
            spec.train,
            rank,
            spec.render,
            tuple(sorted(job.stored_items.get(index, ()))),
            job.checkpoint if rank is not None else None,
        )
        self._outbox.assign(worker, task)
        self._store.attempt_assigned(job_id, index, attempt, worker)
        self._assigned_at[(job_id, index)] = time.monotonic()

    def known_blob(self, digest: str) -> Blob | None:
        """A function blob kept in memory (a worker that lacks it asks: ``GetBlob``)."""
        return self._functions.get(digest)

    def _task_settled(self, ins: sch.TaskSettled, result: TaskResult | None) -> None:
        job = self._registry.jobs.get(ins.job_id)
        if job is None:
            return
        value = None
        error = ""
        if result is None or (result.job_id, result.index) != (ins.job_id, ins.index):
            held = self._held.pop((ins.job_id, ins.index), None)
            if held is not None and held.attempt == ins.attempt:
                result = held
        if result is not None and (result.job_id, result.index) == (ins.job_id, ins.index):
            value = result.value if ins.status == TaskStatus.OK else None
            error = result.error
        if not error and ins.status != TaskStatus.OK:
            error = _default_error(ins.status, ins.worker)
        ok = value is not None
        done = TaskDone(
            ins.job_id,
            ins.index,
            ins.status,
            value,
            error,
            ins.worker,
            ins.attempts,
            result.duration_s if result is not None else 0.0,
            result.item if result is not None and not ok else -1,
            result.files if result is not None and ok else (),
        )
        job.args.pop(ins.index, None)
        self._store.task_settled(done)
        assigned = self._assigned_at.pop((ins.job_id, ins.index), None)
        self.monitor.task_settled(
            ins.status == TaskStatus.OK,
            done.duration_s,
            -1.0 if assigned is None else time.monotonic() - assigned,
        )
        w = self._registry.workers.get(ins.worker)
        if w is not None and ins.status == TaskStatus.OK:
            w.done += 1
        for ident in job.subscribers:
            self._outbox.task_done(ident, done)

    def _job_settled(self, ins: sch.JobSettled) -> None:
        job = self._registry.remove(ins.job_id)
        for key in [k for k in self._held if k[0] == ins.job_id]:
            del self._held[key]
        error = self._unschedulable.pop(ins.job_id, "")
        self._store.job_settled(ins.job_id, ins.state, error, ins.done, ins.failed)
        if job is None:
            return
        if self.monitor.observers:  # the dashboard's feed: what makes the job's final row
            self.monitor.job_ended(job, ins.state, ins.done, ins.failed, error)
        for ident in job.subscribers:
            self._outbox.client(ident, JobUpdate(ins.job_id, ins.state, error))

    def _why_unschedulable(self, res: Resources, ranks: int = 0) -> str:
        have = "; ".join(
            f"{w.hello.name}: {w.hello.slots} slots, {len(w.hello.gpus)} GPUs, "
            f"tags [{', '.join(w.hello.tags)}]"
            for w in self._registry.workers.values()
        )
        if ranks:
            return (
                f"The connected workers can never hold this job's {ranks} ranks at once (each "
                f"rank needs {max(1, res.cpus)} slots and {res.gpus} GPUs); the workers have: "
                f"{have}. Ask for fewer ranks (--ddp N, --min-ranks), or add workers "
                "(`pilot worker --slots N`)."
            )
        if "blender" in res.tags:
            return (
                "No connected worker has Blender, and a render job needs one: install Blender "
                "on a worker machine (Debian: `apt-get install blender`), or start the worker "
                f"with `pilot worker --blender /path/to/blender`. The workers have: {have}."
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
