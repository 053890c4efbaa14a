"""The gateway's worker side: registration, liveness, starts, results and outputs.

``WorkerHandler`` is one part of the ``Gateway``, built from what it uses. A worker's first
message is its hello (its name is its socket identity); a message from a worker we do not know
gets ``Refused(retry=True)`` so it says hello again (the gateway restarted, or had declared it
lost), and its results still count (the first result of a task wins anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.protocol import (
    BlobReply,
    GatewaySettings,
    GetBlob,
    Goodbye,
    Heartbeat,
    Output,
    OutputKind,
    Outputs,
    PutBlob,
    Refused,
    Rendezvous,
    RendezvousReady,
    TaskAttempt,
    TaskResults,
    TasksStarted,
    TaskStatus,
    Welcome,
    WorkerHello,
)
from gateway.server import _scheduler as sch
from gateway.server._auth import REMOVED
from gateway.server._instructions import Executor
from gateway.server._monitor import Monitor
from gateway.server._outbox import Outbox
from gateway.server._registry import Registry, WorkerRecord
from gateway.server._state import StateStore

__all__ = ["WorkerHandler"]

log = logging.getLogger("pilot.gateway")

TRUNCATED = b"[output truncated]\n"


class WorkerHandler:
    """Handlers for worker messages (see the module docstring). ``send_now(ident, msg)``
    sends at once (to a worker not registered, so not reachable by name); ``blob`` answers
    blob requests; ``joined`` is called when a worker registers."""

    def __init__(
        self,
        settings: GatewaySettings,
        gateway_id: str,
        registry: Registry,
        executor: Executor,
        store: StateStore,
        outbox: Outbox,
        send_now: Callable[[bytes, Any], None],
        blob: Callable[[str, PutBlob | GetBlob, Callable[[BlobReply], None], float], None],
        joined: Callable[[], None],
        counters: dict[str, int],
        monitor: Monitor | None = None,
    ) -> None:
        self._settings = settings
        self._gateway_id = gateway_id
        self._monitor = monitor or Monitor()
        self._registry = registry
        self._executor = executor
        self._store = store
        self._outbox = outbox
        self._send_now = send_now
        self._blob = blob
        self._joined = joined
        self._counters = counters
        self._dropped: dict[str, float] = {}  # worker -> when its connection dropped
        self.connections: dict[int, bytes] = {}  # descriptor -> the worker last heard on it
        self._started_at: dict[tuple[str, int, int], float] = {}  # until the attempt ends

    def handle(self, ident: bytes, msg_id: str, msg: Any) -> None:
        now = time.monotonic()
        if isinstance(msg, WorkerHello):
            self._hello(ident, msg, now)
            return
        name = ident.decode(errors="replace")
        if self._dropped:
            self._dropped.pop(name, None)  # it speaks: it was only reconnecting
        w = self._registry.workers.get(name)
        if w is None or w.ident != ident:
            # Not registered (we restarted, or declared it lost): it must say hello again.
            self._send_now(ident, Refused("say hello", retry=True))
            if not isinstance(msg, TaskResults | Outputs | PutBlob):
                return
        else:
            self._executor.handle(sch.WorkerHeard(name, now))
        match msg:
            case Heartbeat():
                if w is not None:
                    w.load = msg  # what it reported: CPU, memory, round trip (the dashboard)
                self._outbox.worker(name, Heartbeat())
            case TasksStarted(attempts=attempts):
                self._started(name, attempts, now)
            case TaskResults(results=results, started=attempts):
                self._started(name, attempts, now)  # starts first: they came first
                for r in results:
                    started = self._started_at.pop((r.job_id, r.index, r.attempt), 0.0)
                    self._store.attempt_ended(
                        r.job_id, r.index, r.attempt, r.status, r.error, started
                    )
                    finished = sch.TaskFinished(
                        name,
                        r.job_id,
                        r.index,
                        r.attempt,
                        r.status,
                        now,
                        r.duration_s,
                        r.progressed,
                    )
                    self._executor.handle(finished, r)
            case Outputs(outputs=outputs):
                self._outputs(outputs)
            case RendezvousReady(job_id=job_id, restart=restart, host=host, port=port):
                where = Rendezvous(job_id, restart, host, port)
                for other in self._executor.scheduler.workers_of(job_id):
                    if other != name:
                        self._outbox.worker(other, where)
            case PutBlob() | GetBlob():
                wait_s = self._settings.timeouts.blob_wait_s
                self._blob(msg_id, msg, lambda r: self._blob_reply(name, ident, r), wait_s)
            case Goodbye(handed_back=handed_back, final=final):
                self._executor.handle(sch.WorkerDraining(name, now, handed_back))
                if final:
                    self._registry.workers.pop(name, None)  # left, not lost: nothing to warn
                    self._executor.handle(sch.WorkerLeft(name, now, TaskStatus.LOST))
                    self._monitor.worker_gone(name, "left")
                    log.info("worker %s left", name)
                else:
                    log.info("worker %s is draining", name)

    def _blob_reply(self, name: str, ident: bytes, reply: BlobReply) -> None:
        """A blob for the worker that asked: with its turn's messages if it is registered on
        that connection, else at once (a worker saying hello again still gets it)."""
        w = self._registry.workers.get(name)
        if w is not None and w.ident == ident:
            self._outbox.worker(name, reply)
        else:
            self._send_now(ident, reply)

    def removed(self, ident: bytes) -> None:
        """A message from a worker whose credentials were removed (``pilot user remove``): it
        is refused, and sent away (its tasks go back to the queue at once)."""
        self._send_now(ident, Refused(REMOVED, retry=False))
        name = ident.decode(errors="replace")
        w = self._registry.workers.get(name)
        if w is not None and w.ident == ident:
            del self._registry.workers[name]
            log.warning("worker %s refused: its credentials were removed", name)
            self._executor.handle(sch.WorkerLeft(name, time.monotonic(), TaskStatus.LOST))

    def disconnected(self, fd: int) -> None:
        """The connection on descriptor ``fd`` dropped (the socket monitor). Its worker is lost
        unless it speaks again within ``Timeouts.disconnect_grace_s`` (more than a heartbeat
        interval): a worker that is only reconnecting says hello on its new connection at once,
        and a new connection that reused the descriptor speaks too (``expire_disconnected``)."""
        ident = self.connections.pop(fd, None)
        if ident is None:
            return
        name = ident.decode(errors="replace")
        w = self._registry.workers.get(name)
        if w is not None and w.ident == ident:
            self._dropped[name] = time.monotonic()

    def expire_disconnected(self, now: float) -> None:
        """Called every tick: workers whose connection dropped and who stayed silent are lost
        now (their tasks go back to the queue), long before the heartbeat deadline."""
        grace = self._settings.timeouts.disconnect_grace_s
        for name, since in list(self._dropped.items()):
            if now - since < grace:
                continue
            del self._dropped[name]
            if name in self._registry.workers:
                self._counters["workers_disconnected"] += 1
                log.warning("worker %s disconnected; its tasks go back to the queue", name)
                self._executor.handle(sch.WorkerLeft(name, now, TaskStatus.LOST))

    def _started(self, name: str, attempts: tuple[TaskAttempt, ...], now: float) -> None:
        wall = time.time()
        for a in attempts:
            self._started_at[(a.job_id, a.index, a.attempt)] = wall
            self._executor.handle(sch.TaskStarted(name, a.job_id, a.index, a.attempt, now))

    def _hello(self, ident: bytes, hello: WorkerHello, now: float) -> None:
        name = ident.decode(errors="replace")
        self._dropped.pop(name, None)
        if hello.name != name:
            self._send_now(
                ident, Refused("the worker's socket identity must be its name", retry=False)
            )
            return
        old = self._registry.workers.get(name)
        same_process = old is not None and old.hello.pid == hello.pid
        self._registry.workers[name] = WorkerRecord(ident, hello, now)
        t = self._settings.timeouts
        welcome = Welcome(
            self._gateway_id, t.heartbeat_interval_s, t.heartbeat_timeout_s, self._settings.policy
        )
        self._outbox.worker(name, welcome)
        self._executor.handle(
            sch.WorkerJoined(
                name,
                hello.slots,
                len(hello.gpus),
                frozenset(hello.tags),
                now,
                hello.running,
                same_process,
            )
        )
        self._joined()
        log.info("worker %s joined: %d slots, %d GPUs", name, hello.slots, len(hello.gpus))

    def _outputs(self, outputs: tuple[Output, ...]) -> None:
        if self._monitor.observers:  # the dashboard's live feed, while a page is open
            self._monitor.outputs(outputs)
        limit = self._settings.outputs_kept_bytes
        for out in outputs:
            job = self._registry.jobs.get(out.job_id)
            if job is None:
                continue
            for ident in job.subscribers:
                self._outbox.output(ident, out)
            if job.keep(out):  # frames and checkpoints are results: always kept
                self._store.add_output(out)
                continue
            size = len(out.data) if isinstance(out.data, bytes | str) else 1024
            kept = job.kept_bytes.get(out.index, 0)
            if kept + size <= limit:
                self._store.add_output(out)
            elif kept <= limit:
                self._store.add_output(
                    Output(out.job_id, out.index, out.item, OutputKind.STDERR, TRUNCATED)
                )
            job.kept_bytes[out.index] = kept + size
