"""Parallel Pilot's worker: connects out to a gateway and runs tasks in child processes.

Front door: ``Worker`` (an async context manager) and ``parse_size`` for ``--cache-size``.
"""

from worker._cache import parse_size
from worker._worker import Worker

__all__ = ["Worker", "parse_size"]
