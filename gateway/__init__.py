"""Parallel Pilot's gateway package: the wire protocol, the scheduler, the state, the server,
and the clients everyone else uses. It imports none of the other packages.

The front door: ``Gateway`` (the server), ``AsyncClient`` and ``Client``/``Job`` (async and
sync clients), the settings, the error tree, and the protocol's building blocks (``Codec``,
``Payload``, ``dumps``/``loads``) for the worker.
"""

from gateway._errors import (
    AuthenticationError,
    ConfigError,
    DataError,
    JobCancelled,
    JobError,
    JobNotFound,
    MessageTooLarge,
    NoGateway,
    PilotError,
    PilotTimeout,
    ProtocolError,
    SerializationError,
    TaskError,
    Unschedulable,
    VersionMismatch,
)
from gateway._job import Job
from gateway._messages import JobUpdate, Output, Payload, Resources, Status, TaskDone, TaskStatus
from gateway._serialize import dumps, dumps_function, loads
from gateway._settings import (
    ConnectionInfo,
    GatewaySettings,
    Timeouts,
    WorkerSettings,
    default_home,
    find_connection,
)
from gateway._sync import Client
from gateway._wire import VERSION, Codec

__all__ = [
    "VERSION",
    "AuthenticationError",
    "Client",
    "Codec",
    "ConfigError",
    "ConnectionInfo",
    "DataError",
    "GatewaySettings",
    "Job",
    "JobCancelled",
    "JobError",
    "JobNotFound",
    "JobUpdate",
    "MessageTooLarge",
    "NoGateway",
    "Output",
    "Payload",
    "PilotError",
    "PilotTimeout",
    "ProtocolError",
    "Resources",
    "SerializationError",
    "Status",
    "TaskDone",
    "TaskError",
    "TaskStatus",
    "Timeouts",
    "Unschedulable",
    "VersionMismatch",
    "WorkerSettings",
    "default_home",
    "dumps",
    "dumps_function",
    "find_connection",
    "loads",
]
