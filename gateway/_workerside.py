"""The gateway's worker side: registration, liveness, starts, results and outputs.

A mixin of ``Gateway``. A worker's first message is its hello (its name is its socket
identity); a message from a worker we do not know gets ``Refused(retry=True)`` so it says
hello again (the gateway restarted, or had declared it lost), and its results still count."""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway import _scheduler as sch
from gateway._messages import (
    GetBlob,
    Goodbye,
    Heartbeat,
    Output,
    Outputs,
    PutBlob,
    Refused,
    Status,
    TaskAttempt,
    TaskResults,
    TasksStarted,
    TaskStatus,
    Welcome,
    WorkerHello,
)
from gateway._records import _Worker

__all__ = ["WorkerSide"]

log = logging.getLogger("pilot.gateway")


class WorkerSide:
    """Handlers for worker messages; mixed into ``Gateway``."""

    def _on_worker(self, ident: bytes, msg_id: str, msg: Any) -> None:
        now = time.monotonic()
        if isinstance(msg, WorkerHello):
            self._worker_hello(ident, msg, now)
            return
        name = ident.decode(errors="replace")
        w = self._workers.get(name)
        if w is None or w.ident != ident:
            # Not registered (we restarted, or declared it lost): it must say hello again.
            # Its results are authenticated and still count: the first result wins anyway.
            self._send_raw(
                self._workers_sock, self._worker_codec, ident, Refused("say hello", retry=True)
            )
            if not isinstance(msg, TaskResults | Outputs | PutBlob):
                return
        else:
            self._apply(self.scheduler.handle(sch.WorkerHeard(name, now)))
        match msg:
            case Heartbeat():
                self._to_workers[name].append(Heartbeat())
            case TasksStarted(attempts=attempts):
                self._tasks_started(name, attempts, now)
            case TaskResults(results=results, started=attempts):
                self._tasks_started(name, attempts, now)  # starts first: they came first
                for r in results:
                    if r.status == TaskStatus.MISSING_FUNCTION and w is not None:
                        job = self._jobs.get(r.job_id)
                        if job is not None:  # its cache dropped it: the next assignment sends it
                            w.fns.discard(job.spec.fn_key)
                    started = self._started_at.pop((r.job_id, r.index, r.attempt), 0.0)
                    self.store.attempt_ended(
                        r.job_id, r.index, r.attempt, r.status, r.error, started
                    )
                    ins = self.scheduler.handle(
                        sch.TaskFinished(
                            name,
                            r.job_id,
                            r.index,
                            r.attempt,
                            TaskStatus(r.status),
                            now,
                            r.duration_s,
                        )
                    )
                    self._apply(ins, r)
            case Outputs(outputs=outputs):
                self._outputs(outputs)
            case PutBlob() | GetBlob():
                self._to_workers[name].append(self._blob(msg_id, msg))
            case Goodbye(handed_back=handed_back, final=final):
                self._apply(self.scheduler.handle(sch.WorkerDraining(name, now, handed_back)))
                if final:
                    self._workers.pop(name, None)  # left, not lost: nothing to warn about
                    self._apply(self.scheduler.handle(sch.WorkerLeft(name, now, TaskStatus.LOST)))
                    log.info("worker %s left", name)
                else:
                    log.info("worker %s is draining", name)

    def _tasks_started(self, name: str, attempts: tuple[TaskAttempt, ...], now: float) -> None:
        wall = time.time()
        for a in attempts:
            self._started_at[(a.job_id, a.index, a.attempt)] = wall
            started = sch.TaskStarted(name, a.job_id, a.index, a.attempt, now)
            self._apply(self.scheduler.handle(started))
            job = self._jobs.get(a.job_id)
            if job is not None and job.state is Status.QUEUED:
                job.state = Status.RUNNING
                self.store.job_running(a.job_id)

    def _worker_hello(self, ident: bytes, hello: WorkerHello, now: float) -> None:
        name = ident.decode(errors="replace")
        if hello.name != name:
            self._send_raw(
                self._workers_sock,
                self._worker_codec,
                ident,
                Refused("the worker's socket identity must be its name", retry=False),
            )
            return
        old = self._workers.get(name)
        same_process = old is not None and old.hello.pid == hello.pid
        self._workers[name] = _Worker(ident, hello, now, old.fns if same_process else set())
        t = self.settings.timeouts
        self._to_workers[name].append(
            Welcome(self.gateway_id, t.heartbeat_interval_s, t.heartbeat_timeout_s)
        )
        self._apply(
            self.scheduler.handle(
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
        )
        self._answer_status_waiters()
        log.info("worker %s joined: %d slots, %d GPUs", name, hello.slots, len(hello.gpus))

    def _outputs(self, outputs: tuple[Output, ...]) -> None:
        limit = self.settings.outputs_kept_bytes
        for out in outputs:
            job = self._jobs.get(out.job_id)
            if job is None:
                continue
            for ident in job.subscribers:
                self._client_outputs[ident].append(out)
            size = len(out.data) if isinstance(out.data, bytes | str) else 1024
            kept = job.kept_bytes.get(out.index, 0)
            if kept + size <= limit:
                self.store.add_output(out)
            elif kept <= limit:
                self.store.add_output(
                    Output(out.job_id, out.index, out.item, "stderr", b"[output truncated]\n")
                )
            job.kept_bytes[out.index] = kept + size
