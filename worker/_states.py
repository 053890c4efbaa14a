"""A worker's lifecycle states."""

from __future__ import annotations

import enum

__all__ = ["WorkerState"]


class WorkerState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
