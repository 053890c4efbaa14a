"""The scheduler's vocabulary: the events it is fed and the instructions it returns.

Plain frozen dataclasses; every event carries ``now`` (the clock is the caller's).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway._messages import Resources, Status, TaskAttempt, TaskStatus

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
class JobSettled:
    job_id: str
    state: Status


@dataclass(frozen=True, slots=True)
class Unschedulable:
    job_id: str
    resources: Resources


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
Instruction = AssignTask | CancelAttempt | TaskSettled | JobSettled | Unschedulable | WorkerGone
