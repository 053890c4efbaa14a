"""``SchedulingPolicy``: every knob of how work is split, placed, batched and retried.

One frozen record, built once at the edge (``GatewaySettings.policy``), owned by the scheduler
and sent to each worker in its ``Welcome`` (the worker needs the batching knobs). Nothing else
in the code base holds a scheduling constant.

Who uses which knob:

- the client: ``auto_chunk_tasks`` (``map(chunk=None)`` and ``%%distribute --over`` without
  ``--chunk`` split the items into about that many tasks);
- the scheduler: prefetch (``prefetch``, ``prefetch_max``, ``prefetch_window_s``,
  ``prefetch_max_task_s``), retries (``default_retries``, ``bad_worker_failures``), locality
  (``locality_scan``), durations (``families_kept``), jobs nobody can run
  (``fail_unschedulable``);
- the server: ``lease_timeout_s`` (a remote session whose client went silent that long ends);
- the worker: ``short_task_s``, ``batch_budget_s``, ``max_batch`` (batches to a task
  process) and ``started_delay_s`` (how long a start waits to travel with results).

Retries by cause: what the machine did wrong (worker lost, task process crashed, timeout) is
retried up to ``retries`` times (``default_retries`` when the job says nothing), on another
worker where one fits; what the code did wrong (a Python exception) fails its item at once,
unless the job asks for ``retry_errors``. Unpicklable arguments or results are never retried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_POLICY", "SchedulingPolicy"]


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    """See the module docstring. Travels as a record in ``Welcome``."""

    auto_chunk_tasks: int = 512
    prefetch: int = 4  # tasks assigned to a worker beyond its free slots, for short tasks
    prefetch_max: int = 64  # the deepest prefetch, for very short tasks
    prefetch_window_s: float = 0.01  # very short tasks: about this much queued work per worker
    prefetch_max_task_s: float = 0.5  # no prefetch for jobs whose tasks run longer than this
    default_retries: int = 2  # machine-side failures retried per task
    bad_worker_failures: int = 3  # failures in a job that keep a worker off it
    locality_scan: int = 256  # queued tasks looked at to find one whose data a worker cached
    families_kept: int = 1024  # functions whose mean task duration is remembered
    lease_timeout_s: float = 0.0  # a remote session ends when its client is silent this long
    # (0: the heartbeat deadline, ``Timeouts.heartbeat_timeout_s``)
    fail_unschedulable: bool = True  # a job no connected worker can ever run fails at once
    short_task_s: float = 0.001  # worker: only tasks shorter than this (mean) are batched
    batch_budget_s: float = 0.005  # worker: a batch is sized to run for about this long
    max_batch: int = 64  # worker: tasks handed to a task process at once
    started_delay_s: float = 0.005  # worker: starts travel with results, or after this long

    def auto_chunk(self, n_items: int) -> int:
        """Items per task when the user gave no chunk: about ``auto_chunk_tasks`` tasks."""
        return max(1, math.ceil(n_items / self.auto_chunk_tasks))

    def retries_for(self, retries: int) -> int:
        """A job's retries: its own, or the default when it said -1."""
        return retries if retries >= 0 else self.default_retries


DEFAULT_POLICY = SchedulingPolicy()
