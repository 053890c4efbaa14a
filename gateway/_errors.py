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
     ├── JobError               a job that did not produce all of its results
     │    ├── TaskError             a task failed; carries the remote traceback and the item
     │    ├── JobCancelled          the job was cancelled
     │    └── Unschedulable         no connected worker can ever run the job
     ├── JobNotFound            no job with that id in the gateway's state
     └── PilotTimeout           a wait ran past its deadline (also a TimeoutError)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "DataError",
    "JobCancelled",
    "JobError",
    "JobNotFound",
    "MessageTooLarge",
    "NoGateway",
    "PilotError",
    "PilotTimeout",
    "ProtocolError",
    "SerializationError",
    "TaskError",
    "Unschedulable",
    "VersionMismatch",
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


class PilotTimeout(PilotError, TimeoutError):
    """A wait ran past its deadline."""
