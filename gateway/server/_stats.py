"""A job's timings, from the gateway's store: what ``pilot stats JOB`` and ``job.stats()`` show.

``job_stats(store, job_id, now)`` reads the job's row and its attempts (one query each) and
returns a ``JobStats`` record: every attempt with its worker and wall-clock times (assigned,
started, finished), per worker the attempts, those that ended OK and the busy time, and for the
job its wall time (submission to end, or to ``now`` while it runs), its task time (the summed
run time of its attempts) and the speed-up (task time over wall time: how many workers' worth
of work ran at once).

A worker reports an attempt's start with its next results (one message for a short task), so
the stored start of a short attempt can be as late as its end; where the worker measured the
run time (the task's final attempt) the start is taken as the end less that time.
"""

from __future__ import annotations

from gateway.protocol import JobKind, JobStats, Status, TaskStats, WorkerStats
from gateway.server._state import StateStore

__all__ = ["job_stats"]


def job_stats(store: StateStore, job_id: str, now: float) -> JobStats | None:
    """``job_id``'s timings (see the module docstring); None when the store has no such job.
    The caller checks who may see it."""
    info = store.job_info(job_id)
    found = store.job_spec(job_id)
    if info is None or found is None:
        return None
    kind = found[0].kind
    rows = store.attempts(job_id)
    last = {}
    for idx, attempt, *_ in rows:
        last[idx] = max(last.get(idx, attempt), attempt)
    attempts: list[TaskStats] = []
    per_worker: dict[str, list[float]] = {}  # attempts, ok, busy, first start, last end
    task_s = 0.0
    for idx, attempt, worker, status, assigned, started, finished, duration in rows:
        started = started or 0.0
        finished = finished or 0.0
        if finished and duration is not None and attempt == last[idx]:
            started = finished - duration
        elif finished and not started:
            started = assigned or finished
        busy = max(0.0, finished - started) if finished else 0.0
        task_s += busy
        attempts.append(
            TaskStats(
                idx,
                attempt,
                worker or "",
                -1 if status is None else int(status),
                assigned or 0.0,
                started,
                finished,
            )
        )
        w = per_worker.setdefault(worker or "", [0, 0, 0.0, 0.0, 0.0])
        w[0] += 1
        w[1] += int(status == 0)
        w[2] += busy
        if started and (not w[3] or started < w[3]):
            w[3] = started
        w[4] = max(w[4], finished)
    end = info.finished if info.state.finished and info.finished else now
    wall = max(0.0, end - info.created)
    workers = tuple(
        WorkerStats(name, int(a), int(ok), busy, first, lastf)
        for name, (a, ok, busy, first, lastf) in sorted(per_worker.items())
    )
    return JobStats(
        job_id,
        info.name,
        JobKind(kind),
        Status(info.state),
        info.owner,
        info.n_tasks,
        info.created,
        info.finished if info.state.finished else 0.0,
        wall,
        task_s,
        task_s / wall if wall > 0 else 0.0,
        tuple(attempts),
        workers,
    )
