"""Every message of the wire protocol, as frozen dataclasses.

This module is the whole vocabulary of the system; ``docs/protocol.md`` describes it for
people. The codec (``gateway._wire``) turns these into frames and back, and nothing
stringly-typed travels past it: receivers dispatch with ``match`` over these types.

Records nested in messages (``JobSpec``, ``TaskResult``...) are dataclasses too. Opaque pickled
data travels as ``Payload``: the gateway never unpickles it; it forwards the frames.

Field order is the wire order. A new field may be added at the end with a default (a minor
version change); anything else is a major version change.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FROM_CLIENT",
    "FROM_WORKER",
    "MESSAGE_TYPES",
    "RECORD_TYPES",
    "Assign",
    "Assignment",
    "AttachJob",
    "BlobReply",
    "CancelJob",
    "CancelTasks",
    "ClientHello",
    "ErrorReply",
    "FileRef",
    "GetBlob",
    "Goodbye",
    "GpuInfo",
    "Heartbeat",
    "JobInfo",
    "JobSpec",
    "JobUpdate",
    "JobsQuery",
    "JobsReply",
    "LogsQuery",
    "LogsReply",
    "Output",
    "Outputs",
    "Payload",
    "PutBlob",
    "Refused",
    "Resources",
    "Status",
    "StatusQuery",
    "StatusReply",
    "Submit",
    "Submitted",
    "TaskAttempt",
    "TaskDone",
    "TaskEvents",
    "TaskInput",
    "TaskResult",
    "TaskResults",
    "TaskStatus",
    "TasksStarted",
    "Welcome",
    "WorkerHello",
    "WorkerInfo",
]


class TaskStatus(enum.IntEnum):
    """How an attempt ended. Travels as an int."""

    OK = 0
    ERROR = 1  # the task's code raised
    CRASHED = 2  # the process running it died
    CANCELLED = 3
    TIMEOUT = 4
    LOST = 5  # the worker running it went away
    UNPICKLABLE = 6  # its arguments could not be loaded or its result not pickled
    MISSING_FUNCTION = 7  # the worker no longer had the job's function: send it again


class Status(enum.IntEnum):
    """A job's state. Travels as an int."""

    QUEUED = 0
    RUNNING = 1
    DONE = 2
    FAILED = 3
    CANCELLED = 4

    @property
    def finished(self) -> bool:
        return self >= Status.DONE


@dataclass(frozen=True, slots=True, eq=False)
class Payload:
    """Opaque pickled bytes plus out-of-band buffers (pickle protocol 5).

    ``digests`` caches each buffer's SHA-256 once the codec has computed or verified it, so a
    payload that is only forwarded (gateway to worker) is never hashed twice.
    """

    data: bytes | memoryview
    buffers: tuple[Any, ...] = ()
    digests: tuple[bytes, ...] | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(memoryview(b).nbytes for b in self.buffers)


# -- records (nested inside messages) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resources:
    """What one task needs on a worker. ``cpus`` counts slots."""

    cpus: int = 1
    gpus: int = 0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int = 0


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job as the client describes it. ``fn`` is sent once per connection per ``fn_key``;
    later jobs with the same key carry ``fn=None``."""

    job_id: str
    name: str
    fn_key: str
    fn: Payload | None
    n_tasks: int
    resources: Resources = field(default_factory=Resources)
    timeout_s: float = 0.0  # 0: no per-task timeout
    retries: int = -1  # -1: the gateway's default
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskAttempt:
    """One attempt of one task: what a worker reports it still runs after a reconnect."""

    job_id: str
    index: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Assignment:
    """A task handed to a worker. ``fn`` is None when the worker already has ``fn_key``."""

    job_id: str
    index: int
    attempt: int
    fn_key: str
    fn: Payload | None
    args: Payload
    timeout_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    cpus: int = 1
    gpus: int = 0


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file a task wrote: in the gateway's blob store (``digest``) or at ``url``."""

    name: str
    size: int
    digest: str = ""
    url: str = ""
    item: int = -1


@dataclass(frozen=True, slots=True)
class TaskResult:
    """How an attempt ended, from the worker. ``value`` is set when ``status`` is OK."""

    job_id: str
    index: int
    attempt: int
    status: int
    value: Payload | None = None
    error: str = ""
    duration_s: float = 0.0
    item: int = -1  # in a map chunk: the global index of the item that failed
    files: tuple[FileRef, ...] = ()  # result files the task wrote


@dataclass(frozen=True, slots=True)
class TaskDone:
    """A task's final outcome, to the client. Sent once per task."""

    job_id: str
    index: int
    status: int
    value: Payload | None = None
    error: str = ""
    worker: str = ""
    attempts: int = 1
    duration_s: float = 0.0
    item: int = -1  # in a map chunk: the global index of the item that failed
    files: tuple[FileRef, ...] = ()  # result files the task wrote


@dataclass(frozen=True, slots=True)
class Output:
    """Something a running task produced besides its result.

    ``kind`` is ``stdout``/``stderr`` (``data`` is bytes), ``display`` (``data`` is a MIME
    bundle; ``extra`` holds ``metadata``, ``transient``, ``update``) or ``progress``.
    ``item`` is the global item index inside a map chunk, or -1.
    """

    job_id: str
    index: int
    item: int
    kind: str
    data: Any
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    name: str
    slots: int
    cpus: int
    memory_bytes: int
    gpus: tuple[GpuInfo, ...]
    tags: tuple[str, ...]
    running: int
    connected_s: float
    tasks_done: int = 0


@dataclass(frozen=True, slots=True)
class JobInfo:
    job_id: str
    name: str
    state: int
    n_tasks: int
    done: int
    failed: int
    created: float
    finished: float = 0.0
    error: str = ""


# -- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHello:
    name: str
    pid: int = 0


@dataclass(frozen=True, slots=True)
class WorkerHello:
    name: str
    slots: int
    cpus: int
    memory_bytes: int
    gpus: tuple[GpuInfo, ...] = ()
    tags: tuple[str, ...] = ()
    running: tuple[TaskAttempt, ...] = ()
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    gateway_id: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float


@dataclass(frozen=True, slots=True)
class Refused:
    """The peer will not be served; ``reason`` says why and how to fix it. With ``retry``,
    the peer should say hello again (the gateway restarted or had declared it lost)."""

    reason: str
    retry: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat:
    free_slots: int = 0


@dataclass(frozen=True, slots=True)
class Goodbye:
    """A peer leaving on purpose. A worker hands back the attempts it will not finish; with
    ``final`` False it is draining (finishing what runs, taking nothing new)."""

    handed_back: tuple[TaskAttempt, ...] = ()
    final: bool = True


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A request that could not be served. ``request_id`` is the request's ``msg_id``."""

    request_id: str
    error: str
    kind: str = "PilotError"


@dataclass(frozen=True, slots=True)
class Submit:
    """New jobs with their tasks. ``tasks[i]`` holds the argument payloads of ``jobs[i]``.
    ``fresh``: none of these jobs was sent before (so the gateway need not look them up in its
    store in case this is a re-sent submit)."""

    jobs: tuple[JobSpec, ...]
    tasks: tuple[tuple[Payload, ...], ...]
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class Submitted:
    """The jobs of a ``Submit`` are stored and queued."""

    job_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CancelJob:
    job_id: str


@dataclass(frozen=True, slots=True)
class AttachJob:
    """Subscribe to a job's events; the reply replays its finished tasks and kept outputs."""

    job_id: str
    replay_outputs: bool = True


@dataclass(frozen=True, slots=True)
class JobUpdate:
    job_id: str
    state: int
    error: str = ""
    spec: JobSpec | None = None  # set in answer to AttachJob


@dataclass(frozen=True, slots=True)
class TaskEvents:
    """Finished tasks, then the jobs that ended with them (``ended``: ``JobUpdate``s without a
    spec), in that order: one message for a turn's worth of outcomes."""

    done: tuple[TaskDone, ...]
    ended: tuple[JobUpdate, ...] = ()


@dataclass(frozen=True, slots=True)
class Outputs:
    outputs: tuple[Output, ...]


@dataclass(frozen=True, slots=True)
class StatusQuery:
    """Ask for workers and jobs. With ``wait_workers``, the answer waits (up to
    ``timeout_s``) until that many workers are connected."""

    wait_workers: int = 0
    timeout_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StatusReply:
    gateway_id: str
    workers: tuple[WorkerInfo, ...]
    jobs: tuple[JobInfo, ...]
    counters: dict[str, int] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class JobsQuery:
    limit: int = 50


@dataclass(frozen=True, slots=True)
class JobsReply:
    jobs: tuple[JobInfo, ...]
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class LogsQuery:
    job_id: str
    index: int = -1  # -1: every task


@dataclass(frozen=True, slots=True)
class LogsReply:
    outputs: tuple[Output, ...]
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Assign:
    tasks: tuple[Assignment, ...]


@dataclass(frozen=True, slots=True)
class CancelTasks:
    attempts: tuple[TaskAttempt, ...]


@dataclass(frozen=True, slots=True)
class TasksStarted:
    attempts: tuple[TaskAttempt, ...]


@dataclass(frozen=True, slots=True)
class TaskInput:
    """Something for a running task, from its client (relayed by the gateway and the worker):
    ``kind`` is ``cell`` (``data``: code and cell id), ``input_reply`` (``data``: the text) or
    ``interrupt`` (the worker sends SIGINT; nothing is forwarded)."""

    job_id: str
    index: int
    kind: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class TaskResults:
    """Attempts that ended; ``started`` are attempts that started since the last report (a
    worker reports starts with the next results, so a short task costs one message)."""

    results: tuple[TaskResult, ...]
    started: tuple[TaskAttempt, ...] = ()


@dataclass(frozen=True, slots=True)
class PutBlob:
    """Store bytes in the gateway's blob store under their SHA-256 (a shipped file from a
    client, a result file from a worker). Answered with ``BlobReply``."""

    digest: str
    data: Payload


@dataclass(frozen=True, slots=True)
class GetBlob:
    """Ask for a stored blob. Answered with ``BlobReply``."""

    digest: str


@dataclass(frozen=True, slots=True)
class BlobReply:
    request_id: str
    digest: str
    ok: bool
    data: Payload | None = None
    error: str = ""


RECORD_TYPES: tuple[type, ...] = (
    Resources,
    GpuInfo,
    JobSpec,
    TaskAttempt,
    Assignment,
    TaskResult,
    TaskDone,
    Output,
    WorkerInfo,
    JobInfo,
    JobUpdate,  # also a message; nested in TaskEvents.ended
    FileRef,
)

MESSAGE_TYPES: tuple[type, ...] = (
    ClientHello,
    WorkerHello,
    Welcome,
    Refused,
    Heartbeat,
    Goodbye,
    ErrorReply,
    Submit,
    Submitted,
    CancelJob,
    AttachJob,
    JobUpdate,
    TaskEvents,
    Outputs,
    StatusQuery,
    StatusReply,
    JobsQuery,
    JobsReply,
    LogsQuery,
    LogsReply,
    Assign,
    CancelTasks,
    TasksStarted,
    TaskResults,
    TaskInput,
    PutBlob,
    GetBlob,
    BlobReply,
)

# Which messages each side may send; the codec of the receiving side refuses the rest.
FROM_CLIENT: tuple[type, ...] = (
    ClientHello,
    Heartbeat,
    Goodbye,
    Submit,
    CancelJob,
    AttachJob,
    StatusQuery,
    JobsQuery,
    LogsQuery,
    TaskInput,
    PutBlob,
    GetBlob,
)
FROM_WORKER: tuple[type, ...] = (
    WorkerHello,
    Heartbeat,
    Goodbye,
    TaskResults,
    TasksStarted,
    Outputs,
    PutBlob,
    GetBlob,
)
