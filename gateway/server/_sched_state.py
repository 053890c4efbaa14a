"""The scheduler's state: its records of jobs, tasks and workers.

Mutable, owned by one ``Scheduler``; nothing else holds them.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from gateway.protocol import Resources, Status

# -- state ------------------------------------------------------------------------------------


class _T(enum.Enum):
    QUEUED = "queued"
    OUT = "out"  # assigned to a worker (queued there or running)
    ORPHAN = "orphan"  # out on a worker when the gateway restarted
    HELD = "held"  # a rank that finished OK: settled when its whole gang has
    FINAL = "final"


@dataclass(slots=True, eq=False)
class _Task:
    index: int
    state: _T = _T.QUEUED
    attempt: int = 0
    worker: str = ""
    started_at: float | None = None
    failures: int = 0
    failed_on: tuple[str, ...] = ()  # workers it failed on (a tuple: no set per queued task)
    orphan_deadline: float = 0.0


class _Tasks(Sequence[_Task]):
    """A job's tasks by index, each record made when it is first looked at. A task nothing
    looked at yet is queued, with nothing else to say; so a job of a million tasks does not
    build a million records in the turn that adds it (a second, with every client and worker
    waiting)."""

    __slots__ = ("_made",)

    def __init__(self, n: int) -> None:
        self._made: list[_Task | None] = [None] * n

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, index: int) -> _Task:  # type: ignore[override]
        t = self._made[index]
        if t is None:
            t = self._made[index] = _Task(index % len(self._made))
        return t

    def __iter__(self) -> Iterator[_Task]:
        return (self[i] for i in range(len(self._made)))

    def queued(self) -> Iterator[int]:
        """The indices of the queued tasks, in order, without making a record."""
        made, queued = self._made, _T.QUEUED
        return (i for i, t in enumerate(made) if t is None or t.state is queued)


@dataclass(slots=True, eq=False)
class _Job:
    job_id: str
    resources: Resources
    timeout_s: float
    retries: int
    tasks: _Tasks
    queue: deque[int] = field(default_factory=deque)
    unsettled: int = 0
    done: int = 0  # tasks that succeeded
    failed: int = 0  # tasks that failed for good
    state: Status = Status.QUEUED
    retry_errors: bool = False
    long_tasks: bool = False  # never prefetched
    # a gang (training ranks): placed all at once; any rank's failure restarts the whole group
    gang: bool = False
    world: int = 0  # ranks in the current group (it may shrink on a restart, to min_tasks)
    min_tasks: int = 0
    restarts: int = 0  # group restarts allowed
    restart_count: int = 0
    waiting_said: bool = False
    # ranks a restart stopped, until each is known to have ended: index -> (worker, attempt)
    stopping: dict[int, tuple[str, int]] = field(default_factory=dict)
    stopping_since: float | None = None  # the first tick that saw them stopping
    duration_sum_s: float = 0.0
    duration_n: int = 0
    bad_workers: dict[str, int] = field(default_factory=dict)
    family: str = ""
    data_keys: tuple[str, ...] = ()

    @property
    def cost(self) -> int:
        return max(1, self.resources.cpus)


@dataclass(slots=True, eq=False)
class _Worker:
    name: str
    slots: int
    gpus: int
    tags: frozenset[str]
    last_seen: float
    used_slots: int = 0
    used_gpus: int = 0
    draining: bool = False
    out: dict[tuple[str, int], _Task] = field(default_factory=dict)

    def can_ever_run(self, res: Resources) -> bool:
        return (
            max(1, res.cpus) <= self.slots and res.gpus <= self.gpus and set(res.tags) <= self.tags
        )
