"""The gateway's in-memory records of the jobs it runs and the workers it knows.

The scheduler holds the scheduling state; these hold what the server needs besides: a job's
spec, the arguments of its unsettled tasks, who follows it; a worker's hello and which
functions it already has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway._messages import JobSpec, Payload, Status, WorkerHello

__all__ = ["_Job", "_Worker"]


@dataclass(slots=True, eq=False)
class _Job:
    spec: JobSpec
    args: dict[int, Payload]  # unsettled tasks' arguments, loaded lazily after a restart
    subscribers: set[bytes]
    created: float
    done: int = 0
    failed: int = 0
    state: Status = Status.QUEUED
    error: str = ""
    kept_bytes: dict[int, int] = field(default_factory=dict)  # outputs kept per task
    owner: bytes | None = None  # the submitting client


@dataclass(slots=True, eq=False)
class _Worker:
    ident: bytes
    hello: WorkerHello
    since: float
    fns: set[str] = field(default_factory=set)
    done: int = 0
