"""Gang placement for the scheduler: where the ranks of a training job go, all at once.

Pure functions over the scheduler's worker records; the ``Scheduler`` calls them and owns every
decision they inform. A rank takes ``max(1, cpus)`` slots, ``gpus`` GPUs and needs the job's
tags, like any task; a gang is placed only when every one of its ranks fits now, on free slots
(never prefetched), packed onto as few workers as possible (ranks on one host talk through
shared memory and loopback).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.protocol import Resources
from gateway.server._sched_state import _Worker

__all__ = ["capacity", "describe_pool", "free_capacity", "plan"]


def capacity(w: _Worker, res: Resources) -> int:
    """How many ranks ``w`` could ever hold at once."""
    if not w.can_ever_run(res):
        return 0
    n = w.slots // max(1, res.cpus)
    if res.gpus:
        n = min(n, w.gpus // res.gpus)
    return n


def free_capacity(w: _Worker, res: Resources) -> int:
    """How many ranks ``w`` can take now (0 while it drains)."""
    if w.draining or not w.can_ever_run(res):
        return 0
    n = (w.slots - w.used_slots) // max(1, res.cpus)
    if res.gpus:
        n = min(n, (w.gpus - w.used_gpus) // res.gpus)
    return max(0, n)


def plan(ranks: int, res: Resources, workers: Iterable[_Worker]) -> list[tuple[_Worker, int]]:
    """How many of ``ranks`` ranks each worker takes, fullest-first (packed); [] when they do
    not all fit now."""
    free = sorted(
        ((free_capacity(w, res), w.name, w) for w in workers), key=lambda x: (-x[0], x[1])
    )
    out: list[tuple[_Worker, int]] = []
    left = ranks
    for n, _, w in free:
        if left == 0 or n == 0:
            break
        take = min(n, left)
        out.append((w, take))
        left -= take
    return out if left == 0 else []


def describe_pool(res: Resources, workers: Iterable[_Worker]) -> str:
    """What each worker could hold, for error messages ("w1: 2 ranks of 1 slot, 0 GPUs")."""
    parts = [
        f"{w.name}: {capacity(w, res)} (of {w.slots} slots, {w.gpus} GPUs"
        f"{', tags ' + ','.join(sorted(w.tags)) if w.tags else ''})"
        for w in workers
    ]
    return "; ".join(parts) or "no workers"
