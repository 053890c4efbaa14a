"""The scheduler's vocabulary: the events it is fed and the instructions it returns.

Plain frozen dataclasses; every event carries ``now`` (the clock is the caller's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.protocol import (
    GatewaySettings,
    JobKind,
    JobSpec,
    Resources,
    Status,
    TaskAttempt,
    TaskStatus,
)

# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobAdded:
    job_id: str
    n_tasks: int
    resources: Resources
    now: float
    timeout_s: float = 0.0
    retries: int = 2
    data_keys: tuple[str, ...] = ()  # per task: what it reads (locality), "" for nothing
    settled: tuple[int, ...] = ()  # recovery: tasks already finished
    orphans: tuple[TaskAttempt, ...] = ()  # recovery: attempts out on workers at the crash
    orphan_workers: tuple[str, ...] = ()  # recovery: orphans[i] ran on orphan_workers[i]
    family: str = ""  # jobs of one family (the same function) have alike task durations
    retry_errors: bool = False  # retry attempts whose code raised, too
    long_tasks: bool = False  # never prefetched (renders: a queued chunk idles a worker)
    gang: bool = False  # training ranks: all placed at once, restarted together
    min_tasks: int = 0  # a gang may restart on fewer ranks, down to this many (0: all)
    restarts: int = 0  # a gang's group restarts


@dataclass(frozen=True, slots=True)
class JobCancel:
    job_id: str
    now: float


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    name: str
    slots: int
    gpus: int
    tags: frozenset[str]
    now: float
    holding: tuple[TaskAttempt, ...] = ()  # attempts it still runs or queues (reconnect)
    same_process: bool = False  # a re-hello from the process we knew: its tasks are in flight


@dataclass(frozen=True, slots=True)
class WorkerLeft:
    name: str
    now: float
    status: TaskStatus = TaskStatus.LOST


@dataclass(frozen=True, slots=True)
class WorkerDraining:
    """A worker that stops taking tasks; ``handed_back`` go back to the queue, no fault."""

    name: str
    now: float
    handed_back: tuple[TaskAttempt, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerHeard:
    name: str
    now: float


@dataclass(frozen=True, slots=True)
class TaskStarted:
    worker: str
    job_id: str
    index: int
    attempt: int
    now: float


@dataclass(frozen=True, slots=True)
class TaskFinished:
    worker: str
    job_id: str
    index: int
    attempt: int
    status: TaskStatus
    now: float
    duration_s: float = 0.0
    progressed: bool = False  # the task reported progress (a rank that trained a step)


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


# -- instructions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssignTask:
    worker: str
    job_id: str
    index: int
    attempt: int


@dataclass(frozen=True, slots=True)
class AssignGang:
    """Every rank of a gang at once: ``ranks[r]`` is (worker, task index, attempt) of rank r."""

    job_id: str
    world: int
    restart: int  # how many times this group restarted (TORCHELASTIC_RESTART_COUNT)
    ranks: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class GangWaiting:
    """A gang that the pool could hold waits for ``need`` free rank slots (``free`` now)."""

    job_id: str
    need: int
    free: int


@dataclass(frozen=True, slots=True)
class GangRestarted:
    """Rank ``rank`` failed (``status``): the group stopped and is queued again."""

    job_id: str
    restart: int
    rank: int
    status: TaskStatus


@dataclass(frozen=True, slots=True)
class CancelAttempt:
    worker: str
    job_id: str
    index: int
    attempt: int


@dataclass(frozen=True, slots=True)
class TaskSettled:
    """A task reached its final state. For OK, the server keeps the reporting attempt's value.
    ``attempt`` is the attempt whose outcome this is (the one to take the value or error of)."""

    job_id: str
    index: int
    status: TaskStatus
    attempt: int
    worker: str
    attempts: int


@dataclass(frozen=True, slots=True)
class WorkerGone:
    """The scheduler no longer counts on this worker (lost, or left)."""

    name: str


@dataclass(frozen=True, slots=True)
class JobStarted:
    """The first attempt of a job started: it is RUNNING (said once)."""

    job_id: str


@dataclass(frozen=True, slots=True)
class JobSettled:
    """A job ended (DONE, FAILED or CANCELLED) with ``done`` tasks OK and ``failed`` not."""

    job_id: str
    state: Status
    done: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """No connected worker can ever run this job; with the policy's ``fail_unschedulable`` a
    ``JobSettled(FAILED)`` follows (the server words the error: it knows what workers have)."""

    job_id: str
    resources: Resources
    ranks: int = 0  # a gang: the ranks it needs at least


Event = (
    JobAdded
    | JobCancel
    | WorkerJoined
    | WorkerLeft
    | WorkerDraining
    | WorkerHeard
    | TaskStarted
    | TaskFinished
    | Tick
)
Instruction = (
    AssignTask
    | AssignGang
    | GangWaiting
    | GangRestarted
    | CancelAttempt
    | TaskSettled
    | JobStarted
    | JobSettled
    | Unschedulable
    | WorkerGone
)


def job_added(spec: JobSpec, now: float, settings: GatewaySettings, **recovery: Any) -> JobAdded:
    """The scheduler's ``JobAdded`` for ``spec`` (``recovery``: settled tasks and orphans of a
    job resumed after a restart)."""
    train = spec.train
    return JobAdded(
        spec.job_id,
        spec.n_tasks,
        spec.resources,
        now,
        spec.timeout_s,
        settings.policy.retries_for(spec.retries),
        data_keys=spec.data_keys,
        family=spec.fn_digest,
        retry_errors=spec.retry_errors,
        long_tasks=spec.kind == JobKind.RENDER,
        gang=spec.kind == JobKind.DDP,
        min_tasks=train.min_ranks if train is not None else 0,
        restarts=train.restarts if train is not None else 0,
        **recovery,
    )
