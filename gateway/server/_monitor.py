"""The gateway's monitor: cheap measurements that are always on, and the observers of live events.

Owned by the ``Gateway`` and handed to the parts that feed it; every call is made on the
gateway's loop:

- ``task_settled(ok, duration_s, latency_s)``: once per settled task (the executor). Two bucket
  histograms (the task's run time on its worker, and its latency from assignment to result at
  the gateway) and two counts: a ``bisect`` and three additions, no allocation, no JSON;
- ``outputs(outs)``: every ``Output`` a worker relays and every note the gateway writes in a
  job's stderr (the worker handler, the executor). With no observer registered it costs one
  truth test; otherwise each observer gets the tuple (it keeps what it wants);
- ``worker_gone(name, why)``: a worker was lost (``"lost"``) or left (``"left"``);
- ``job_ended(job, state, done, failed, error)``: a job ended (its record and outcome: the
  executor calls it only while someone observes, and the observer makes what it shows);
- ``sample(now)``: every tick (the gateway's ticker): the rate of settled tasks over the last
  ``RATE_WINDOW_S``.

An ``Observer`` (the dashboard's live feed) registers with ``watch`` while it has someone to
tell (a WebSocket open) and ``unwatch``es when the last one leaves, so a gateway nobody
watches does none of its work. The Prometheus collector reads the histograms when scraped.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.protocol import Output, Status

if TYPE_CHECKING:
    from gateway.server._registry import JobRecord

__all__ = ["LATENCY_BUCKETS_S", "Histogram", "Monitor", "Observer"]

# Upper bounds of the histograms' buckets, in seconds (the last bucket is +Inf).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
)  # fmt: skip
RATE_WINDOW_S = 3.0  # the task rate is measured over this much recent time


class Observer(Protocol):
    """What the monitor tells an observer; called on the gateway's loop, so keep it cheap."""

    def outputs(self, outs: Sequence[Output]) -> None: ...

    def worker_gone(self, name: str, why: str) -> None: ...

    def job_ended(
        self, job: JobRecord, state: Status, done: int, failed: int, error: str
    ) -> None: ...


@dataclass(slots=True)
class Histogram:
    """Counts per bucket of ``LATENCY_BUCKETS_S`` (non-cumulative; the last is +Inf)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def quantile(self, q: float, since: list[int] | None = None) -> float:
        """The upper bound of the bucket that holds quantile ``q`` of the observations (of
        those made after the snapshot ``since``, a copy of ``counts``); 0.0 with none."""
        counts = (
            self.counts
            if since is None
            else [a - b for a, b in zip(self.counts, since, strict=True)]
        )
        n = sum(counts)
        if n == 0:
            return 0.0
        rank, seen = q * n, 0
        for bound, c in zip((*self.bounds, float("inf")), counts, strict=True):
            seen += c
            if seen >= rank and c:
                return bound if bound != float("inf") else self.bounds[-1]
        return self.bounds[-1]


class Monitor:
    """See the module docstring."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.duration = Histogram()  # a task's run time on its worker
        self.latency = Histogram()  # from assignment to result, at the gateway
        self.tasks_ok = 0
        self.tasks_failed = 0
        self.observers: list[Observer] = []
        self._samples: deque[tuple[float, int]] = deque()  # (when, tasks settled by then)
        self._recent: deque[tuple[float, list[int]]] = deque()  # latency counts, recent

    # -- the hot path ---------------------------------------------------------------------

    def task_settled(self, ok: bool, duration_s: float, latency_s: float) -> None:
        if ok:
            self.tasks_ok += 1
        else:
            self.tasks_failed += 1
        self.duration.observe(duration_s)
        if latency_s >= 0.0:
            self.latency.observe(latency_s)

    def outputs(self, outs: Sequence[Output]) -> None:
        for o in self.observers:
            o.outputs(outs)

    def worker_gone(self, name: str, why: str) -> None:
        for o in self.observers:
            o.worker_gone(name, why)

    def job_ended(self, job: JobRecord, state: Status, done: int, failed: int, error: str) -> None:
        for o in self.observers:
            o.job_ended(job, state, done, failed, error)

    # -- observers ------------------------------------------------------------------------

    def watch(self, observer: Observer) -> None:
        if observer not in self.observers:
            self.observers.append(observer)

    def unwatch(self, observer: Observer) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    # -- rates ----------------------------------------------------------------------------

    @property
    def tasks_settled(self) -> int:
        return self.tasks_ok + self.tasks_failed

    def sample(self, now: float) -> None:
        """Called every tick: remember how many tasks had settled by ``now``."""
        self._samples.append((now, self.tasks_settled))
        self._recent.append((now, list(self.latency.counts)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        while len(self._recent) > 2 and now - self._recent[1][0] >= RATE_WINDOW_S:
            self._recent.popleft()

    def task_rate(self, now: float) -> float:
        """Tasks settled per second over about the last ``RATE_WINDOW_S``."""
        if not self._samples:
            return 0.0
        t0, n0 = self._samples[0]
        if now - t0 <= 0:
            return 0.0
        return (self.tasks_settled - n0) / (now - t0)

    def recent_latency(self, q: float) -> float:
        """Quantile ``q`` of the task latencies of about the last ``RATE_WINDOW_S``."""
        since = self._recent[0][1] if self._recent else None
        return self.latency.quantile(q, since)
