"""Every message of the wire protocol, as frozen dataclasses.

(Longer than 400 lines because it is the whole wire vocabulary in one module, STYLE.md habit 4:
a reader and a codec see every type side by side.)

This module is the whole vocabulary of the system; ``docs/protocol.md`` describes it for
people. The codec (``gateway._wire``) turns these into frames and back, and nothing
stringly-typed travels past it: receivers dispatch with ``match`` over these types.

Records nested in messages (``JobSpec``, ``TaskResult``...) are dataclasses too. Opaque pickled
data travels as ``Payload``: the gateway never unpickles it; it forwards the frames.

Field order is the wire order. A new field may be added at the end with a default (a minor
version change); anything else is a major version change. Fields typed with an ``IntEnum``
travel as ints and are decoded back into the enum; a message is copied with
``dataclasses.replace``, never rebuilt by position, so no field is dropped in transit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol._dataref import DataRef
from gateway.protocol._errors import ErrorCode
from gateway.protocol._policy import SchedulingPolicy

__all__ = [
    "Assign",
    "Assignment",
    "AttachJob",
    "Blob",
    "BlobReply",
    "CancelJob",
    "CancelTasks",
    "CellDone",
    "ClientHello",
    "ErrorReply",
    "FileRef",
    "FrameDone",
    "GetBlob",
    "Goodbye",
    "GpuInfo",
    "Heartbeat",
    "InputReply",
    "InputRequest",
    "InterruptTask",
    "JobData",
    "JobInfo",
    "JobKind",
    "JobSpec",
    "JobUpdate",
    "JobsQuery",
    "JobsReply",
    "LogsQuery",
    "LogsReply",
    "Output",
    "OutputKind",
    "Outputs",
    "Payload",
    "PutBlob",
    "RankInfo",
    "Refused",
    "RenderSpec",
    "Rendezvous",
    "RendezvousReady",
    "Resources",
    "RunCell",
    "SessionReady",
    "SharedBlob",
    "ShippedFile",
    "Status",
    "StatusQuery",
    "StatusReply",
    "Submit",
    "Submitted",
    "TaskAttempt",
    "TaskDone",
    "TaskEvents",
    "TaskResult",
    "TaskResults",
    "TaskStatus",
    "TasksStarted",
    "TrainSpec",
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

    @property
    def machine_side(self) -> bool:
        """What the machine did wrong (retried by default), as opposed to what the code did
        wrong (``ERROR``, ``UNPICKLABLE``: failed at once unless the job retries errors)."""
        return self in (TaskStatus.CRASHED, TaskStatus.TIMEOUT, TaskStatus.LOST)


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


class JobKind(enum.IntEnum):
    """What a job's tasks run. Travels as an int."""

    CALL = 0  # fn(*args, **kwargs): one task per call
    MAP = 1  # fn(item) for each item of a chunk; the value is the chunk's list of results
    SESSION = 2  # a remote session: one leased process that runs cells until released
    DDP = 3  # training ranks: a gang, each rank a fresh process with torch.distributed set up
    RENDER = 4  # Blender renders the frames of each chunk; frames come back as files


class OutputKind(enum.IntEnum):
    """What an ``Output`` carries. Travels as an int."""

    STDOUT = 0  # data: bytes
    STDERR = 1  # data: bytes
    DISPLAY = 2  # data: a MIME bundle; extra: metadata, transient, update
    CLEAR_OUTPUT = 3  # extra: wait
    EXECUTE_RESULT = 4  # a session cell's result: data a MIME bundle; extra: execution_count
    SESSION = 5  # data: a session record (SessionReady, InputRequest, CellDone)
    METRICS = 6  # data: a dict of metrics a training rank reported (pilot.train.report)
    FRAME = 7  # data: a FrameDone record (a rendered frame, stored); item: the frame number
    CHECKPOINT = 8  # data: a FileRef to a training checkpoint the gateway keeps; item: its number


@dataclass(frozen=True, slots=True, eq=False)
class Payload:
    """Opaque pickled bytes plus out-of-band buffers (pickle protocol 5). ``digests``: each
    frame's BLAKE3 digest once the codec has computed or verified it (a payload only forwarded
    is never hashed twice). ``refs``: (position, blob key) of buffers that travel as blobs
    (``split_big_buffers``), put back in place by ``with_buffers`` before loading."""

    data: bytes | memoryview
    buffers: tuple[Any, ...] = ()
    digests: tuple[bytes, ...] | None = None
    refs: tuple[tuple[int, str], ...] = ()

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
class ShippedFile:
    """A local file uploaded once to the gateway's blob store; the task finds it at ``path``
    (relative) in its working directory."""

    path: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class JobData:
    """What a job reads and writes besides its arguments (built by ``build_job_data``):
    datasets listed on the client (item ``i`` sees its shard of each when ``shard_over`` > 0),
    files shipped by content hash, and where result files go (``""``: the gateway)."""

    refs: tuple[DataRef, ...] = ()
    shard_over: int = 0
    ship: tuple[ShippedFile, ...] = ()
    results_url: str = ""


@dataclass(frozen=True, slots=True)
class TrainSpec:
    """How a DDP job's ranks run and recover (``JobSpec.train``)."""

    restarts: int = 0  # group restarts after a rank fails
    min_ranks: int = 0  # a restart may shrink the world down to this many ranks (0: no shrink)
    backend: str = "auto"  # gloo, nccl, or auto (nccl when every rank has a GPU)
    checkpoint_url: str = ""  # fsspec URL for pilot.train.checkpoint ("": the gateway's store)
    init_timeout_s: float = 60.0  # a rank that has not joined by then fails the group


@dataclass(frozen=True, slots=True)
class RankInfo:
    """One rank's place in its group (``Assignment.rank``): what torchrun's environment says."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    group_rank: int  # the index of this rank's worker among the group's workers
    restart: int  # TORCHELASTIC_RESTART_COUNT
    run_id: str
    hosts_rendezvous: bool  # this worker runs rank 0 and opens the rendezvous socket


@dataclass(frozen=True, slots=True)
class RenderSpec:
    """What a RENDER job renders (``JobSpec.render``); zero values keep the scene's settings."""

    scene: str  # the .blend, relative to the task's working directory (shipped by hash)
    engine: str = ""
    samples: int = 0
    resolution: tuple[int, ...] = ()  # (width, height) or ()
    file_format: str = "PNG"  # PNG, JPEG or OPEN_EXR
    body: str = ""  # Python run in Blender before rendering (bpy and scene bound)


@dataclass(frozen=True, slots=True)
class Blob:
    """Bytes under their SHA-256 (hex): a function, travelling once by content hash."""

    digest: str
    data: Payload


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job as the client describes it. ``fn_digest`` names the function's blob, which
    travels once (``Submit.blobs``) and is fetched by a worker that lacks it. ``data_keys``
    holds one locality key per task (empty: no data)."""

    job_id: str
    name: str
    kind: JobKind
    fn_digest: str
    n_tasks: int
    resources: Resources = field(default_factory=Resources)
    timeout_s: float = 0.0  # 0: no per-task timeout
    retries: int = -1  # -1: the scheduling policy's default
    retry_errors: bool = False  # retry a task whose code raised, too
    chunk: int = 1  # MAP: items per task
    data: JobData | None = None
    data_keys: tuple[str, ...] = ()
    lease: bool = False  # ends when its client goes silent (a remote session)
    meta: dict[str, Any] = field(default_factory=dict)  # extensions only
    train: TrainSpec | None = None  # DDP
    render: RenderSpec | None = None  # RENDER


@dataclass(frozen=True, slots=True)
class TaskAttempt:
    """One attempt of one task: what a worker reports it still runs after a reconnect."""

    job_id: str
    index: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Assignment:
    """A task handed to a worker: its job's kind, function (by digest) and data, its own
    arguments and resources."""

    job_id: str
    index: int
    attempt: int
    kind: JobKind
    fn_digest: str
    args: Payload
    timeout_s: float = 0.0
    cpus: int = 1
    gpus: int = 0
    data: JobData | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the job's extensions
    train: TrainSpec | None = None  # DDP: the job's training settings
    rank: RankInfo | None = None  # DDP: this rank's place in its group
    render: RenderSpec | None = None  # RENDER
    skip: tuple[int, ...] = ()  # items (frames) already stored by an earlier attempt
    checkpoint: FileRef | None = None  # DDP: the job's latest checkpoint kept by the gateway


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
    status: TaskStatus
    value: Payload | None = None
    error: str = ""
    duration_s: float = 0.0
    item: int = -1  # in a map chunk: the global index of the item that failed
    files: tuple[FileRef, ...] = ()  # result files the task wrote
    progressed: bool = False  # it reported progress first (a rank that trained a step)


@dataclass(frozen=True, slots=True)
class TaskDone:
    """A task's final outcome, to the client. Sent once per task."""

    job_id: str
    index: int
    status: TaskStatus
    value: Payload | None = None
    error: str = ""
    worker: str = ""
    attempts: int = 1
    duration_s: float = 0.0
    item: int = -1  # in a map chunk: the global index of the item that failed
    files: tuple[FileRef, ...] = ()  # result files the task wrote


@dataclass(frozen=True, slots=True)
class Output:
    """Something a running task produced besides its result (see ``OutputKind``).
    ``item`` is the global item index inside a map chunk, or -1."""

    job_id: str
    index: int
    item: int
    kind: OutputKind
    data: Any
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FrameDone:
    """A rendered frame, stored (``Output`` of kind FRAME; ``Output.item`` is the frame)."""

    frame: int
    file: FileRef
    thumbnail: bytes = b""  # a small PNG for the live preview
    blender: str = ""  # the version that rendered it


@dataclass(frozen=True, slots=True)
class SessionReady:
    """A remote session's process is up (``Output`` of kind ``SESSION``)."""

    host: str
    pid: int
    python: str
    cwd: str


@dataclass(frozen=True, slots=True)
class InputRequest:
    """A remote cell called ``input()`` or ``getpass()``; answered with ``InputReply``."""

    prompt: str
    password: bool = False


@dataclass(frozen=True, slots=True)
class CellDone:
    """A remote cell finished; after every output it produced."""

    cell_id: str
    ok: bool
    execution_count: int
    ename: str = ""
    evalue: str = ""
    traceback: tuple[str, ...] = ()


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
    slurm_job_id: str = ""  # the Slurm job it runs in ("": none)


@dataclass(frozen=True, slots=True)
class JobInfo:
    job_id: str
    name: str
    state: Status
    n_tasks: int
    done: int
    failed: int
    created: float
    finished: float = 0.0
    error: str = ""
    queued: int = 0  # tasks waiting in the gateway's queue (live jobs; for adaptive scaling)
    resources: Resources = Resources()  # what each task needs
    owner: str = ""  # the user who submitted it (a secure gateway's; "admin" otherwise)


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
    blender: str = ""  # the Blender version it renders with ("": none)
    host: str = ""  # the host's name, for the status page
    slurm_job_id: str = ""  # the Slurm job it runs in ("": none), from $PILOT_SLURM_JOB_ID


@dataclass(frozen=True, slots=True)
class Welcome:
    """The gateway's answer to a hello (and to a client's heartbeat). ``policy`` is set for
    workers: they batch and report by its knobs."""

    gateway_id: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    policy: SchedulingPolicy | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The peer will not be served; ``reason`` says why and how to fix it. With ``retry``,
    the peer should say hello again (the gateway restarted or had declared it lost)."""

    reason: str
    retry: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Alive; a worker's says its machine's CPU % (-1: unknown), memory used, last round trip."""

    free_slots: int = 0
    cpu_percent: float = -1.0
    memory_used_bytes: int = 0
    rtt_s: float = -1.0


@dataclass(frozen=True, slots=True)
class Goodbye:
    """A peer leaving on purpose. A worker hands back the attempts it will not finish; with
    ``final`` False it is draining (finishing what runs, taking nothing new)."""

    handed_back: tuple[TaskAttempt, ...] = ()
    final: bool = True


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A request that could not be served. ``request_id`` is the request's ``msg_id``;
    ``code`` maps to the error tree (``error_for``)."""

    request_id: str
    error: str
    code: ErrorCode = ErrorCode.INTERNAL


@dataclass(frozen=True, slots=True)
class Submit:
    """New jobs with their tasks. ``tasks[i]`` holds the argument payloads of ``jobs[i]``;
    ``blobs`` the functions the gateway has not had from this client yet (stored before any
    job is accepted). ``fresh``: none of these jobs was sent before (so the gateway need not
    look them up in its store in case this is a re-sent submit)."""

    jobs: tuple[JobSpec, ...]
    tasks: tuple[tuple[Payload, ...], ...]
    fresh: bool = False
    blobs: tuple[Blob, ...] = ()


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
    # One byte per task index, nonzero where the client has that task's outcome already: the
    # replay leaves those out (a client re-attaching after a gateway restart has most of them).
    known: bytes = b""


@dataclass(frozen=True, slots=True)
class JobUpdate:
    job_id: str
    state: Status
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
    """Tasks for a worker. Functions travel by digest (``Assignment.fn_digest``): a worker
    that has not got one asks for it once (``GetBlob``) and keeps it by content."""

    tasks: tuple[Assignment, ...]


@dataclass(frozen=True, slots=True)
class CancelTasks:
    attempts: tuple[TaskAttempt, ...]


@dataclass(frozen=True, slots=True)
class TasksStarted:
    attempts: tuple[TaskAttempt, ...]


@dataclass(frozen=True, slots=True)
class RunCell:
    """A cell for a remote session (task ``job_id[index]``), from its client; relayed by the
    gateway and the worker. Answered by outputs, then a ``CellDone``."""

    job_id: str
    index: int
    cell_id: str
    code: str


@dataclass(frozen=True, slots=True)
class InputReply:
    """The text a remote cell's ``input()`` asked for (``InputRequest``)."""

    job_id: str
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class InterruptTask:
    """Interrupt what a running task does (the worker sends it SIGINT); the task lives on."""

    job_id: str
    index: int


@dataclass(frozen=True, slots=True)
class RendezvousReady:
    """The worker that runs rank 0 of a group opened its rendezvous socket at host:port."""

    job_id: str
    restart: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """Where the ranks of a group meet (relayed from ``RendezvousReady``)."""

    job_id: str
    restart: int
    host: str
    port: int


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
    """Ask for a stored blob. Answered with ``BlobReply``. ``shared``: the asker is a task
    process on its worker's host, which may answer an argument's big buffer with a
    ``SharedBlob`` instead (the gateway ignores it)."""

    digest: str
    shared: bool = False


@dataclass(frozen=True, slots=True)
class BlobReply:
    request_id: str
    digest: str
    ok: bool
    data: Payload | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class SharedBlob:
    """A worker's answer to its task process's ``GetBlob(shared=True)`` for an argument's big
    buffer: its ``nbytes`` bytes are in a sealed memfd, descriptor ``fd`` of process ``pid``,
    which the task process maps read-only instead of receiving a copy (``worker._shared``)."""

    digest: str
    pid: int
    fd: int
    nbytes: int
