"""The gateway's records of the jobs it runs and the workers it knows, besides their state.

The scheduler alone owns job, task and worker *state* (queued, running, done, failed; slots in
use). The registry holds what the server needs besides: a job's spec, the arguments of its
unsettled tasks, who follows it and who owns it, the outputs kept per task, the workers that
; a worker's hello, socket identity and counters. One record per job
and per worker; owned by the ``Gateway`` and shared with its handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.protocol import (
    FileRef,
    Heartbeat,
    JobSpec,
    Output,
    OutputKind,
    Payload,
    WorkerHello,
)

__all__ = ["ARGS_BATCH", "ARGS_KEPT", "JobRecord", "Registry", "WorkerRecord"]

# A job keeps the arguments of its first ARGS_KEPT tasks in memory (once they are on disk); the
# others are read from the store ARGS_BATCH at a time as their tasks are assigned: a million
# queued tasks cost the gateway their scheduling records, not their payloads.
ARGS_KEPT = 4096
ARGS_BATCH = 1024


@dataclass(slots=True, eq=False)
class JobRecord:
    spec: JobSpec
    args: dict[int, Payload]  # unsettled tasks' arguments in memory (see ARGS_KEPT)
    subscribers: set[bytes]
    created: float
    owner: bytes | None = None  # the submitting client (its socket identity)
    user: str = ""  # the user who submitted it (``Principal.name``): who may see it
    kept_bytes: dict[int, int] = field(default_factory=dict)  # outputs kept per task
    stored_items: dict[int, set[int]] = field(default_factory=dict)  # task -> frames stored
    checkpoint: FileRef | None = None  # a training job's latest checkpoint in the blob store

    def keep(self, out: Output) -> bool:
        """Note what an output says about stored results (frames, checkpoints); True when the
        output is such a result (always kept, whatever the per-task output budget)."""
        if out.kind == OutputKind.FRAME:  # a retried chunk skips the frames stored
            self.stored_items.setdefault(out.index, set()).add(out.item)
            return True
        if out.kind == OutputKind.CHECKPOINT:
            if self.checkpoint is None or out.item >= self.checkpoint.item:
                self.checkpoint = out.data
            return True
        return False


@dataclass(slots=True, eq=False)
class WorkerRecord:
    ident: bytes
    hello: WorkerHello
    since: float
    done: int = 0  # tasks it finished OK
    load: Heartbeat | None = None  # its last heartbeat: CPU, memory, round trip


@dataclass(slots=True, eq=False)
class Registry:
    """Live jobs by id and connected workers by name. Not thread-safe: the gateway loop's."""

    jobs: dict[str, JobRecord] = field(default_factory=dict)
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)  # job id -> wall time, live jobs
    leased: set[str] = field(default_factory=set)  # live jobs with a lease (remote sessions)
    unstored: list[str] = field(default_factory=list)  # jobs whose arguments await a commit

    def trim_stored(self) -> None:
        """After a commit: jobs submitted before it keep only ARGS_KEPT arguments in memory
        (the rest are on disk now)."""
        for job_id in self.unstored:
            job = self.jobs.get(job_id)
            if job is not None and len(job.args) > ARGS_KEPT:
                job.args = {i: a for i, a in job.args.items() if i < ARGS_KEPT}
        self.unstored.clear()

    def add(self, job: JobRecord) -> None:
        self.jobs[job.spec.job_id] = job
        self.created[job.spec.job_id] = job.created
        if len(job.args) > ARGS_KEPT:
            self.unstored.append(job.spec.job_id)
        if job.spec.lease:
            self.leased.add(job.spec.job_id)

    def remove(self, job_id: str) -> JobRecord | None:
        self.created.pop(job_id, None)
        self.leased.discard(job_id)
        return self.jobs.pop(job_id, None)
