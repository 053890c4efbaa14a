"""Parallel Pilot's worker: connects out to a gateway and runs tasks in child processes.

Front door: ``Worker`` (an async context manager), ``parse_size`` for ``--cache-size``, and
``kill_with_this_thread`` (a ``preexec_fn`` so a child process ends with the one that started
it: ``pilot up`` uses it for its gateway and workers).
"""

from worker._cache import parse_size
from worker._orphan import kill_with_this_thread
from worker._worker import Worker

__all__ = ["Worker", "kill_with_this_thread", "parse_size"]
