"""Parallel Pilot's worker: connects out to a gateway and runs tasks in child processes.

Front door: ``Worker`` (an async context manager), ``parse_size`` for ``--cache-size``, and
``kill_with_this_thread`` (a ``preexec_fn`` so a child process ends with the one that started
it: ``pilot up`` uses it for its gateway and workers).

``Worker`` is imported on first use: ``import pilot`` (every client, and the gateway's own
process) needs only ``kill_with_this_thread``, and the worker's modules (the task runner, the
Blender and training parts, fsspec) would add a tenth of a second to every start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker._cache import parse_size
from worker._orphan import kill_with_this_thread

if TYPE_CHECKING:
    from worker._worker import Worker

__all__ = ["Worker", "kill_with_this_thread", "parse_size"]


def __getattr__(name: str) -> Any:
    if name == "Worker":
        from worker._worker import Worker

        return Worker
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
