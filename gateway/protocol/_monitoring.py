"""Job stats and dashboard logins: the part of the wire vocabulary that serves monitoring.

It belongs with ``_messages`` (the same rules: frozen dataclasses, field order is wire order, a
new field only at the end with a default) and lives apart only for that module's size. Its
types join ``_vocabulary``'s ``RECORD_TYPES``, ``MESSAGE_TYPES`` and ``FROM_CLIENT`` at their
ends (``RECORDS``, ``MESSAGES``, ``FROM_CLIENT`` here), so their codes and names are the
protocol's like any other.

- ``StatsQuery`` / ``StatsReply``: a job's timings (``JobStats``: per attempt ``TaskStats``,
  per worker ``WorkerStats``), from the gateway's store (``pilot stats``, ``Job.stats()``);
- ``DashboardLogin`` / ``DashboardLink``: a one-time login link to the gateway's dashboard for
  whoever asks (``pilot dashboard``), and the admin's scrape token for Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.protocol._messages import JobKind, Status

__all__ = [
    "FROM_CLIENT",
    "MESSAGES",
    "RECORDS",
    "DashboardLink",
    "DashboardLogin",
    "JobStats",
    "StatsQuery",
    "StatsReply",
    "TaskStats",
    "WorkerStats",
]


@dataclass(frozen=True, slots=True)
class TaskStats:
    """One attempt of one task, in a job's stats (``JobStats.attempts``): wall-clock times
    (UNIX seconds; 0.0: not yet). ``status`` is a ``TaskStatus`` value, -1 while it runs."""

    index: int
    attempt: int
    worker: str
    status: int
    assigned: float
    started: float
    finished: float


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """What one worker did for a job: attempts, those that ended OK, and their busy time."""

    worker: str
    attempts: int
    ok: int
    busy_s: float
    first_started: float
    last_finished: float


@dataclass(frozen=True, slots=True)
class JobStats:
    """A job's timings from the gateway's store (``StatsReply``): ``wall_s`` from submission to
    the end (or now), ``task_s`` the attempts' summed run time, ``speedup`` their ratio."""

    job_id: str
    name: str
    kind: JobKind
    state: Status
    owner: str
    n_tasks: int
    created: float
    finished: float
    wall_s: float
    task_s: float
    speedup: float
    attempts: tuple[TaskStats, ...] = ()
    workers: tuple[WorkerStats, ...] = ()


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """Ask for a job's timings. Answered by ``StatsReply``; an unknown job or another user's
    by ``ErrorReply``."""

    job_id: str


@dataclass(frozen=True, slots=True)
class StatsReply:
    stats: JobStats
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class DashboardLogin:
    """Ask for a link that logs the sender into the dashboard once (``pilot dashboard``). With
    ``scrape``, the admin also gets the read-only token for Prometheus scrapers."""

    scrape: bool = False


@dataclass(frozen=True, slots=True)
class DashboardLink:
    """The dashboard's URL with a one-time login token (``url`` holds it), for whoever asked;
    ``scrape_token`` when asked for by the admin; ``url`` is "" when the gateway has no
    dashboard."""

    url: str
    request_id: str = ""
    scrape_token: str = field(default="", repr=False)


RECORDS: tuple[type, ...] = (TaskStats, WorkerStats, JobStats)
MESSAGES: tuple[type, ...] = (StatsQuery, StatsReply, DashboardLogin, DashboardLink)
FROM_CLIENT: tuple[type, ...] = (StatsQuery, DashboardLogin)
