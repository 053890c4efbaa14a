"""The scheduler's state: its records of jobs, tasks and workers.

Mutable, owned by one ``Scheduler``; nothing else holds them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from gateway._messages import Resources, Status

# -- state ------------------------------------------------------------------------------------


class _T(enum.Enum):
    QUEUED = "queued"
    OUT = "out"  # assigned to a worker (queued there or running)
    ORPHAN = "orphan"  # out on a worker when the gateway restarted
    FINAL = "final"


@dataclass(slots=True, eq=False)
class _Task:
    index: int
    state: _T = _T.QUEUED
    attempt: int = 0
    worker: str = ""
    started_at: float | None = None
    failures: int = 0
    failed_on: set[str] = field(default_factory=set)
    orphan_deadline: float = 0.0


@dataclass(slots=True, eq=False)
class _Job:
    job_id: str
    resources: Resources
    timeout_s: float
    retries: int
    tasks: list[_Task]
    queue: deque[int] = field(default_factory=deque)
    unsettled: int = 0
    failed: int = 0
    state: Status = Status.QUEUED
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
