"""The dashboard's live feed: one WebSocket per open page, batched updates every ``BATCH_S``.

``Feed`` is owned by the gateway's HTTP side and runs on the gateway's loop. While at least one
page is open it is an observer of the gateway's ``Monitor`` (it keeps the outputs of the jobs a
page looks at, and hears of workers that left or were lost) and a task of its own wakes every
``BATCH_S`` to build one snapshot of the gateway (workers, the latest ``JOBS_SHOWN`` live jobs,
recent finished ones, the gateway's figures) and send each page what changed since what that
page last got: rows that changed or went away, the gateway's figures, and the events (metrics
points, frames, output text, failed tasks) of the job it looks at. A gateway running 10,000
tasks a second costs the same few rows a batch; with no page open the feed does nothing and
the monitor tells it nothing.

In a storm of jobs (more than ``STORM_ROWS`` rows of a page's list changed in one batch: a
burst of thousands of small jobs), that page gets its next update ``STORM_BATCHES`` batches
later (a second) rather than at the next one: nobody reads a list that changes whole four
times a second, and a page need not lay it out that often (``bench/dashboard.py --chromium``
did not show a measurable gain on the gateway's own 2 cores, see docs/dashboard.md). The
difference is made from what the page last got, so nothing is lost; the events of the job it
looks at wait with the rest (``EVENTS_MAX``). A batch in which every page is held, or still
writing, builds no snapshot at all.

Each page sees its user's jobs only (all of them for the admin), and each job row says whether
it is the viewer's own (``mine``: the page offers a cancel button on those only). A page whose
previous message is still being written is skipped in that batch; it gets the difference from
what it last received in the next one, so a slow browser never makes the gateway buffer more.

Messages to the page (JSON): ``{"t": "snap", "who", "workers", "jobs", "gateway"}`` when it
connects, then ``{"t": "delta", "b": batch, "workers": {name: row|null}, "jobs": {id:
row|null}, "gateway", "events": [...]}`` (``b`` counts the feed's batches), and ``{"t":
"detail", ...}`` in answer to the page's ``{"watch": JOB_ID}`` (``_dash_view.job_detail``: the
job's kept outputs and failed tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import tornado.websocket

from gateway.protocol import JobInfo, JobKind, Output, Status
from gateway.server._dash_auth import Authed, still_a_user
from gateway.server._dash_view import (
    failed_rows,
    gateway_row,
    job_detail,
    live_job_row,
    output_event,
    stored_job_row,
    worker_row,
)

if TYPE_CHECKING:
    from gateway.server._registry import JobRecord
    from gateway.server._server import Gateway
    from gateway.server._users import Principal

__all__ = ["BATCH_S", "Feed", "FeedSocket"]

log = logging.getLogger("pilot.gateway")

BATCH_S = 0.25  # one update per page per this long, whatever the task rate
JOBS_SHOWN = 100  # live jobs in the list (the latest); the figures count them all
FINISHED_SHOWN = 50  # finished jobs in the list
GONE_SHOWN = 50  # workers that left or were lost, still listed as such
PENDING_MAX = 20_000  # outputs kept between two batches; past it the oldest go
EVENTS_MAX = 5_000  # events one page may have waiting (a page that reads slowly)
STORM_ROWS = 50  # more rows than this changed in a page's list: a storm...
STORM_BATCHES = 4  # ...and that page's next update comes this many batches later


class FeedSocket(Authed, tornado.websocket.WebSocketHandler):
    """One open page. The session cookie is checked before the upgrade (``Authed.prepare``)
    and the ``Origin`` by tornado (another site's page is refused)."""

    who: Principal
    watching: str | None
    sent_workers: dict[str, Any]
    sent_jobs: dict[str, Any]
    events: list[dict[str, Any]]
    synced: int
    held_until: int
    writing: Any

    async def open(self, *args: str) -> None:
        self.who = self.session.who
        self.watching = None
        self.sent_workers, self.sent_jobs, self.events = {}, {}, []
        self.synced = 0  # the batch this page last got (0: none yet)
        self.held_until = 0  # no update before this batch (a storm: see the module docstring)
        self.writing = None
        self.ctx.feed.add(self)

    def on_message(self, message: str | bytes) -> None:
        try:
            asked = json.loads(message)
            job = asked.get("watch")
        except (ValueError, AttributeError):
            return
        self.ctx.feed.watch(self, job if isinstance(job, str) else None)

    def on_close(self) -> None:
        self.ctx.feed.remove(self)

    def busy(self) -> bool:
        return self.writing is not None and not self.writing.done()

    def waits(self, batch: int) -> bool:
        """Whether this page gets nothing in ``batch``: held by a storm, or still writing."""
        return batch < self.held_until or self.busy()

    def send(self, body: dict[str, Any] | str) -> None:
        text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
        try:
            self.writing = self.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            self.ctx.feed.remove(self)


class Feed:
    """See the module docstring."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._sockets: list[FeedSocket] = []
        self._pending: list[Output] = []
        self._watched: dict[str, int] = {}  # job id -> pages looking at it
        self._gone: OrderedDict[str, dict[str, Any]] = OrderedDict()  # left or lost workers
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # jobs that ended since the last batch, with their final rows (the latest only)
        self._ended: deque[tuple[Any, ...]] = deque(maxlen=FINISHED_SHOWN)
        self._kinds: dict[str, JobKind] = {}
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.cost_s = 0.0  # CPU time of the loop's thread spent in batches, all told

    # -- pages --------------------------------------------------------------------------

    def add(self, sock: FeedSocket) -> None:
        if not self._sockets:
            self._finished.clear()
            for info in reversed(self._gw.store.jobs(FINISHED_SHOWN)):
                if info.job_id not in self._gw.registry.jobs:
                    self._finished[info.job_id] = stored_job_row(info, self._kind(info.job_id))
            self._gw.monitor.watch(self)
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._sockets.append(sock)
        workers, jobs, gateway = self._snapshot()
        mine = self._visible(sock, jobs)
        sock.sent_workers, sock.sent_jobs = dict(workers), mine
        sock.send(
            {
                "t": "snap",
                "who": {"name": sock.who.name, "admin": sock.who.admin},
                "workers": list(workers.values()),
                "jobs": list(mine.values()),
                "gateway": gateway,
            }
        )

    def remove(self, sock: FeedSocket) -> None:
        if sock not in self._sockets:
            return
        self._sockets.remove(sock)
        self.watch(sock, None)
        if not self._sockets:
            self._gw.monitor.unwatch(self)
            self._pending.clear()
            if self._task is not None:
                self._task.cancel()
                self._task = None

    def watch(self, sock: FeedSocket, job_id: str | None) -> None:
        """``sock``'s page looks at ``job_id`` now (None: at no job): send its detail."""
        old = sock.watching
        if old is not None:
            self._watched[old] -= 1
            if not self._watched[old]:
                del self._watched[old]
        sock.watching = None
        if job_id is None or sock not in self._sockets or not self._may_see(sock, job_id):
            return
        sock.watching = job_id
        self._watched[job_id] = self._watched.get(job_id, 0) + 1
        self._gw.store.flush()  # what this turn kept, so that the detail misses nothing
        sock.events = []
        sock.send({"t": "detail", **job_detail(self._gw, job_id)})

    def _may_see(self, sock: FeedSocket, job_id: str) -> bool:
        if sock.who.admin:
            return True
        live = self._gw.registry.jobs.get(job_id)
        owner = live.user if live is not None else self._gw.store.job_owner(job_id)
        return owner == sock.who.name

    # -- the monitor's observer ---------------------------------------------------------

    def outputs(self, outs: Sequence[Output]) -> None:
        watched = self._watched
        if not watched:
            return
        self._pending.extend(o for o in outs if o.job_id in watched)
        if len(self._pending) > PENDING_MAX:
            del self._pending[: len(self._pending) - PENDING_MAX]

    def job_ended(self, job: JobRecord, state: Status, done: int, failed: int, error: str) -> None:
        self._ended.append((job, state, done, failed, error, time.time()))  # no more here

    def worker_gone(self, name: str, why: str) -> None:
        self._gone[name] = {"name": name, "state": why, "heard": round(time.time())}
        while len(self._gone) > GONE_SHOWN:
            self._gone.popitem(last=False)

    # -- batches ------------------------------------------------------------------------

    async def _run(self) -> None:
        while self._sockets:
            await asyncio.sleep(BATCH_S)  # the batch period: updates are sent at this rate
            try:
                t0 = time.thread_time()
                self.flush()
                self.cost_s += time.thread_time() - t0
            except Exception:  # a bug here must not stop the feed nor touch the gateway
                log.exception("dashboard feed: a batch failed")

    def flush(self) -> None:
        """One batch: a snapshot, and to each page what changed for it (module docstring)."""
        self.batches += 1
        events: dict[str, list[dict[str, Any]]] = {}
        for out in self._pending:
            e = output_event(out)
            if e is not None:
                events.setdefault(out.job_id, []).append(e)
        self._pending = []
        for sock in list(self._sockets):
            if not still_a_user(self._gw, sock.who):  # removed: their page is closed
                sock.close(4001, "logged out")
                self.remove(sock)
            elif sock.watching is not None:
                sock.events.extend(events.get(sock.watching, ()))
                del sock.events[:-EVENTS_MAX]
        if all(sock.waits(self.batches) for sock in self._sockets):
            return  # no snapshot: nobody would get it
        workers, jobs, gateway = self._snapshot()
        shared: dict[Any, tuple[str, dict[str, Any], int]] = {}
        for sock in list(self._sockets):
            if sock.waits(self.batches):
                continue
            if sock.watching is not None:
                row, last = jobs.get(sock.watching), sock.sent_jobs.get(sock.watching)
                if row is not None and last is not None and row["failed"] != last["failed"]:
                    self._gw.store.flush()
                    sock.events.append(_failed_event(self._gw, sock.watching))
            # Pages of one user that got the same batch last time get the same delta: it is
            # made and encoded once (three admins' pages cost one).
            key = (sock.who, sock.synced) if sock.synced and not sock.events else None
            if key is None or key not in shared:
                mine = self._visible(sock, jobs)
                delta: dict[str, Any] = {"t": "delta", "b": self.batches, "gateway": gateway}
                if d := _diff(sock.sent_workers, workers):
                    delta["workers"] = d
                if d := _diff(sock.sent_jobs, mine):
                    delta["jobs"] = d
                held = STORM_BATCHES if len(d) > STORM_ROWS else 0
                if sock.events:
                    delta["events"], sock.events = sock.events, []
                made = shared[key] = (json.dumps(delta, separators=(",", ":")), mine, held)
            text, mine, held = made if key is None else shared[key]
            sock.sent_workers, sock.sent_jobs, sock.synced = workers, mine, self.batches
            sock.held_until = self.batches + held
            sock.send(text)

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        gw, now = self._gw, time.monotonic()
        workers = {n: dict(r) for n, r in self._gone.items()}
        for name, w in gw.registry.workers.items():
            workers[name] = worker_row(gw, w, now)
            self._gone.pop(name, None)
        out_by_job: dict[str, int] = {}
        out_total = 0
        for sw in gw.scheduler.workers.values():
            for job_id, _ in sw.out:
                out_by_job[job_id] = out_by_job.get(job_id, 0) + 1
                out_total += 1
        unsettled = sum(j.unsettled for j in gw.scheduler.jobs.values())
        live_ids = list(gw.registry.jobs)[-JOBS_SHOWN:]
        for job, state, done, failed, error, when in self._ended:  # ended since: final rows
            spec = job.spec
            info = JobInfo(
                spec.job_id, spec.name, state, spec.n_tasks, done, failed, job.created, when,
                error, owner=job.user,
            )  # fmt: skip
            self._finished[spec.job_id] = stored_job_row(info, spec.kind)
            self._finished.move_to_end(spec.job_id)
        self._ended.clear()
        while len(self._finished) > FINISHED_SHOWN:
            self._finished.popitem(last=False)
        jobs = dict(self._finished)
        for job_id in live_ids:
            j = gw.registry.jobs[job_id]
            self._kinds[job_id] = j.spec.kind
            jobs[job_id] = live_job_row(gw, job_id, j, out_by_job.get(job_id, 0))
        figures = gateway_row(gw, max(0, unsettled - out_total), out_total, now)
        figures["feed_ms"] = round(1e3 * self.cost_s / max(1, self.batches - 1), 3)
        return workers, jobs, figures

    def _kind(self, job_id: str) -> JobKind | None:
        if job_id not in self._kinds:
            found = self._gw.store.job_spec(job_id)
            if found is None:
                return None
            self._kinds[job_id] = found[0].kind
            while len(self._kinds) > 4 * (JOBS_SHOWN + FINISHED_SHOWN):
                del self._kinds[next(iter(self._kinds))]
        return self._kinds[job_id]

    def _visible(self, sock: FeedSocket, jobs: dict[str, Any]) -> dict[str, Any]:
        who = sock.who
        return {
            k: {**row, "mine": row["owner"] == who.name}
            for k, row in jobs.items()
            if who.admin or row["owner"] == who.name
        }

    async def close(self) -> None:
        for sock in list(self._sockets):
            with contextlib.suppress(Exception):
                sock.close()
            self.remove(sock)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The rows of ``new`` that differ from ``old``, and None for those that went away."""
    d: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    d.update({k: None for k in old if k not in new})
    return d


def _failed_event(gw: Gateway, job_id: str) -> dict[str, Any]:
    return {"k": "x", "job": job_id, "failed": failed_rows(gw, job_id)}
