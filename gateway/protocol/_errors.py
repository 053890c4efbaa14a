"""The one exception tree of Parallel Pilot.

Every error a user can meet is a ``PilotError``; its message says what happened and how to fix
it. Nothing is swallowed: code that catches one of these either re-raises, converts it into a
more specific one, or logs it with its traceback.

::

    PilotError
     ├── ConfigError            settings, connection file or options that make no sense
     ├── NoGateway              no gateway answered (also a ConnectionError)
     ├── ProtocolError          a message that cannot be accepted
     │    ├── AuthenticationError   bad or missing signature, replayed message id
     │    ├── VersionMismatch       a peer speaking another major version
     │    └── MessageTooLarge       over ``max_message_bytes``
     ├── SerializationError     a value that cannot be pickled (names the value)
     ├── DataError              a dataset or shipped file that cannot be read
     ├── RenderError            Blender cannot be used, or a chunk failed (``kind`` says how)
     ├── VideoError             ffmpeg could not make or read a video
     ├── JobError               a job that did not produce all of its results
     │    ├── TaskError             a task failed; carries the remote traceback and the item
     │    ├── JobCancelled          the job was cancelled
     │    └── Unschedulable         no connected worker can ever run the job
     ├── JobNotFound            no job with that id in the gateway's state
     ├── NotYourJob             the job belongs to another user of the gateway
     ├── NotRunning             the task asked for is not running
     ├── StoreUnavailable       the gateway cannot write its state: it takes no new work
     └── PilotTimeout           a wait ran past its deadline (also a TimeoutError)

An ``ErrorReply`` carries an ``ErrorCode``; ``error_for`` turns it into the exception of this
tree that the ``ERRORS`` table names, so a code and its class are written in one place.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "ERRORS",
    "AuthenticationError",
    "ConfigError",
    "DataError",
    "ErrorCode",
    "JobCancelled",
    "JobError",
    "JobNotFound",
    "MessageTooLarge",
    "NoGateway",
    "NotRunning",
    "NotYourJob",
    "PilotError",
    "PilotTimeout",
    "ProtocolError",
    "RenderError",
    "SerializationError",
    "StoreUnavailable",
    "TaskError",
    "Unschedulable",
    "VersionMismatch",
    "VideoError",
    "error_for",
]


class PilotError(Exception):
    """Base of every error raised by Parallel Pilot."""


class ConfigError(PilotError):
    """Settings, a connection file or options that make no sense."""


class NoGateway(PilotError, ConnectionError):
    """No gateway answered at the address we were given or found."""


class ProtocolError(PilotError):
    """A message that cannot be accepted: malformed, truncated or of an unknown type."""


class AuthenticationError(ProtocolError):
    """A message whose signature does not verify, or whose id was seen before (a replay)."""


class VersionMismatch(ProtocolError):
    """A peer that speaks another major version of the protocol."""


class MessageTooLarge(ProtocolError):
    """A message larger than the configured ``max_message_bytes``."""


class SerializationError(PilotError):
    """A value that cannot be pickled; the message names the value."""


class DataError(PilotError):
    """A dataset, shipped file or result file that cannot be listed, read or written."""


class RenderError(PilotError):
    """Blender could not be used or a chunk failed; ``kind`` names the failure (the worker's
    classification, e.g. ``SCRIPT_ERROR``), the message how to fix it."""

    def __init__(self, kind: Any, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class VideoError(PilotError):
    """ffmpeg could not make or read a video; the message quotes its stderr."""


class JobError(PilotError):
    """A job that did not produce all of its results."""


class TaskError(JobError):
    """A task failed on a worker after its retries.

    ``remote_traceback`` is the traceback text as the worker formatted it, ``item`` the item
    (or partition) that failed, ``index`` its position among the job's items, ``worker`` the
    worker it last ran on.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: str = "",
        index: int = -1,
        item: Any = None,
        remote_traceback: str = "",
        worker: str = "",
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.index = index
        self.item = item
        self.remote_traceback = remote_traceback
        self.worker = worker

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            return f"{text}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return text


class JobCancelled(JobError):
    """The job was cancelled before all of its tasks finished."""


class Unschedulable(JobError):
    """No connected worker can ever run this job (resources or tags it asks for)."""


class JobNotFound(PilotError, KeyError):
    """No job with that id is known to the gateway."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NotYourJob(PilotError):
    """The job belongs to another user of a secure gateway: a user sees, attaches to, reads
    the logs of and cancels only their own jobs (the admin sees all)."""


class PilotTimeout(PilotError, TimeoutError):
    """A wait ran past its deadline."""


class NotRunning(PilotError):
    """The task a message was meant for is not running (it ended, or never started)."""


class StoreUnavailable(PilotError):
    """The gateway could not write its state (a full disk, say); it takes no new work until it
    can. Retry later, or free space where the gateway keeps its state."""


class ErrorCode(enum.IntEnum):
    """What an ``ErrorReply`` says went wrong. Travels as an int."""

    INTERNAL = 0
    JOB_NOT_FOUND = 1
    NOT_RUNNING = 2
    STORE_UNAVAILABLE = 3
    BAD_REQUEST = 4
    NOT_YOURS = 5
    UNKNOWN_USER = 6


#: The one table from codes to the error tree.
ERRORS: dict[ErrorCode, type[PilotError]] = {
    ErrorCode.INTERNAL: PilotError,
    ErrorCode.JOB_NOT_FOUND: JobNotFound,
    ErrorCode.NOT_RUNNING: NotRunning,
    ErrorCode.STORE_UNAVAILABLE: StoreUnavailable,
    ErrorCode.BAD_REQUEST: ConfigError,
    ErrorCode.NOT_YOURS: NotYourJob,
    ErrorCode.UNKNOWN_USER: AuthenticationError,
}


def error_for(code: int, message: str) -> PilotError:
    """The exception an ``ErrorReply`` with ``code`` stands for (``PilotError`` for a code this
    version does not know)."""
    try:
        cls = ERRORS[ErrorCode(code)]
    except ValueError:
        cls = PilotError
    return cls(message)
