"""The wire protocol's tables: every record and message type, and which each side may send.

The types are in ``_messages`` and ``_monitoring``; the codec (``_wire``) reads these tables. A
record's code on the wire is its place in ``RECORD_TYPES``, so a new record goes at the end
(a message travels by name). The receiving side's codec refuses a message type its peer may not
send (``FROM_CLIENT``, ``FROM_WORKER``).
"""

from __future__ import annotations

from gateway.protocol import _monitoring
from gateway.protocol._dataref import DataRef
from gateway.protocol._messages import (
    Assign,
    Assignment,
    AttachJob,
    Blob,
    BlobReply,
    CancelJob,
    CancelTasks,
    CellDone,
    ClientHello,
    ErrorReply,
    FileRef,
    FrameDone,
    GetBlob,
    Goodbye,
    GpuInfo,
    Heartbeat,
    InputReply,
    InputRequest,
    InterruptTask,
    JobData,
    JobInfo,
    JobSpec,
    JobsQuery,
    JobsReply,
    JobUpdate,
    LogsQuery,
    LogsReply,
    Output,
    Outputs,
    PutBlob,
    RankInfo,
    Refused,
    RenderSpec,
    Rendezvous,
    RendezvousReady,
    Resources,
    RunCell,
    SessionReady,
    SharedBlob,
    ShippedFile,
    StatusQuery,
    StatusReply,
    Submit,
    Submitted,
    TaskAttempt,
    TaskDone,
    TaskEvents,
    TaskResult,
    TaskResults,
    TasksStarted,
    TrainSpec,
    Welcome,
    WorkerHello,
    WorkerInfo,
)
from gateway.protocol._policy import SchedulingPolicy

__all__ = ["FROM_CLIENT", "FROM_WORKER", "MESSAGE_TYPES", "RECORD_TYPES"]


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
    DataRef,
    ShippedFile,
    JobData,
    Blob,
    SessionReady,
    InputRequest,
    CellDone,
    SchedulingPolicy,
    TrainSpec,
    RankInfo,
    RenderSpec,
    FrameDone,
    *_monitoring.RECORDS,
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
    RunCell,
    InputReply,
    InterruptTask,
    PutBlob,
    GetBlob,
    BlobReply,
    SharedBlob,
    RendezvousReady,
    Rendezvous,
    *_monitoring.MESSAGES,
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
    RunCell,
    InputReply,
    InterruptTask,
    PutBlob,
    GetBlob,
    *_monitoring.FROM_CLIENT,
)
FROM_WORKER: tuple[type, ...] = (WorkerHello, Heartbeat, Goodbye, TaskResults, TasksStarted)
FROM_WORKER += (Outputs, PutBlob, GetBlob, RendezvousReady)
