"""The gateway's client side: what it does for each message a client sends.

A mixin of ``Gateway`` (it uses the gateway's state, store, scheduler and send queues): submit,
cancel, attach (with the replay of a job's finished tasks and kept outputs), status, jobs,
logs, blobs, input for running tasks, and the leases that end a session whose client died."""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway import _scheduler as sch
from gateway._messages import (
    AttachJob,
    BlobReply,
    CancelJob,
    ClientHello,
    ErrorReply,
    GetBlob,
    Goodbye,
    Heartbeat,
    JobInfo,
    JobSpec,
    JobsQuery,
    JobsReply,
    JobUpdate,
    LogsQuery,
    LogsReply,
    Outputs,
    PutBlob,
    StatusQuery,
    StatusReply,
    Submit,
    TaskEvents,
    TaskInput,
    Welcome,
    WorkerInfo,
)
from gateway._records import _Job

__all__ = ["ClientSide"]

log = logging.getLogger("pilot.gateway")


class ClientSide:
    """Handlers for client messages; mixed into ``Gateway``."""

    def _on_client(self, ident: bytes, msg_id: str, msg: Any) -> None:
        match msg:
            case Heartbeat() | ClientHello():
                s = self.settings.timeouts
                welcome = Welcome(self.gateway_id, s.heartbeat_interval_s, s.heartbeat_timeout_s)
                self._to_clients[ident].append(welcome)
            case Submit(jobs=jobs, tasks=tasks, fresh=fresh):
                self._submit(ident, jobs, tasks, fresh)
            case CancelJob(job_id=job_id):
                self._apply(self.scheduler.handle(sch.JobCancel(job_id, time.monotonic())))
            case AttachJob():
                self._attach(ident, msg_id, msg)
            case StatusQuery():
                self._status_waiters.append(
                    (ident, msg_id, msg, time.monotonic() + max(0.0, msg.timeout_s))
                )
                self._answer_status_waiters()
            case JobsQuery(limit=limit):
                self._to_clients[ident].append(JobsReply(tuple(self.store.jobs(limit)), msg_id))
            case LogsQuery(job_id=job_id, index=index):
                self.store.flush()
                if self.store.job_spec(job_id) is None:
                    self._to_clients[ident].append(
                        ErrorReply(msg_id, f"No job {job_id} in this gateway.", "JobNotFound")
                    )
                    return
                outs = tuple(self.store.outputs(job_id, index))
                self._to_clients[ident].append(LogsReply(outs, msg_id))
            case PutBlob() | GetBlob():
                self._to_clients[ident].append(self._blob(msg_id, msg))
            case TaskInput(job_id=job_id, index=index):
                worker = self.scheduler.worker_of(job_id, index)
                if worker is None:
                    self._to_clients[ident].append(
                        ErrorReply(msg_id, f"Task {job_id}[{index}] is not running.", "NotRunning")
                    )
                else:
                    self._to_workers[worker].append(msg)
            case Goodbye():
                for job_id, job in list(self._jobs.items()):
                    job.subscribers.discard(ident)
                    if job.spec.meta.get("lease") and job.owner == ident:
                        self._apply(self.scheduler.handle(sch.JobCancel(job_id, time.monotonic())))
                self._client_seen.pop(ident, None)

    def _blob(self, msg_id: str, msg: PutBlob | GetBlob) -> BlobReply:
        """Store or fetch a blob (shipped files, result files) for a client or a worker."""
        blobs = self.store.blobs
        if isinstance(msg, PutBlob):
            self.counters["blob_puts"] += 1
            digest = blobs.put(msg.data)
            if digest != msg.digest:
                blobs.path(digest).unlink(missing_ok=True)
                return BlobReply(msg_id, msg.digest, False, error="content does not match digest")
            return BlobReply(msg_id, digest, True)
        try:
            return BlobReply(msg_id, msg.digest, True, blobs.get(msg.digest))
        except FileNotFoundError:
            return BlobReply(msg_id, msg.digest, False, error=f"no blob {msg.digest} here")

    def _submit(
        self, ident: bytes, jobs: tuple[JobSpec, ...], tasks: Any, fresh: bool = False
    ) -> None:
        now = time.monotonic()
        accepted = []
        stored: set[str] = set()
        if not fresh:  # it may be a re-sent submit: look for its jobs in the store
            stored = self.store.known_jobs([s.job_id for s in jobs if s.job_id not in self._jobs])
        for spec, args in zip(jobs, tasks, strict=True):
            accepted.append(spec.job_id)
            if spec.job_id in self._jobs or spec.job_id in stored:
                continue  # a re-sent submit after a reconnect: already have it
            if spec.fn is not None and spec.fn_key not in self._fns:
                self._fns[spec.fn_key] = spec.fn
                self.store.put_function(spec.fn_key, spec.fn)
            elif spec.fn_key not in self._fns and self.store.function(spec.fn_key) is None:
                self._to_clients[ident].append(
                    ErrorReply(spec.job_id, f"unknown function {spec.fn_key}", "UnknownFunction")
                )
                accepted.pop()
                continue
            self.store.add_job(spec, args, time.time())
            self._jobs[spec.job_id] = _Job(
                spec, dict(enumerate(args)), {ident}, time.time(), owner=ident
            )
            self._apply(
                self.scheduler.handle(
                    sch.JobAdded(
                        spec.job_id,
                        spec.n_tasks,
                        spec.resources,
                        now,
                        spec.timeout_s,
                        self._retries(spec),
                        family=spec.fn_key,
                        data_keys=tuple(spec.meta.get("data_keys") or ()),
                    )
                )
            )
        self._acks[ident].extend(accepted)
        self.counters["jobs_submitted"] += len(jobs)

    def _attach(self, ident: bytes, msg_id: str, msg: AttachJob) -> None:
        self.store.flush()
        found = self.store.job_spec(msg.job_id)
        if found is None:
            self._to_clients[ident].append(
                ErrorReply(msg_id, f"No job {msg.job_id} in this gateway.", "JobNotFound")
            )
            return
        spec, state, error = found
        job = self._jobs.get(msg.job_id)
        if job is not None:
            job.subscribers.add(ident)
        self._to_clients[ident].append(JobUpdate(msg.job_id, int(state), error, spec))
        if msg.replay_outputs:
            outs = self.store.outputs(msg.job_id)
            if outs:
                self._to_clients[ident].append(Outputs(tuple(outs)))
        settled = self.store.settled_tasks(msg.job_id)
        if settled:
            self._to_clients[ident].append(TaskEvents(tuple(settled)))
        if job is None:  # finished: say so after the replay
            self._to_clients[ident].append(JobUpdate(msg.job_id, int(state), error))

    def _answer_status_waiters(self) -> None:
        if not self._status_waiters:
            return
        now = time.monotonic()
        keep = []
        for ident, msg_id, q, deadline in self._status_waiters:
            if len(self._workers) >= q.wait_workers or now >= deadline:
                self._to_clients[ident].append(self._status_reply(msg_id))
            else:
                keep.append((ident, msg_id, q, deadline))
        self._status_waiters = keep

    def _status_reply(self, request_id: str = "") -> StatusReply:
        workers = tuple(
            WorkerInfo(
                w.hello.name,
                w.hello.slots,
                w.hello.cpus,
                w.hello.memory_bytes,
                w.hello.gpus,
                w.hello.tags,
                self.scheduler.running_on(w.hello.name),
                time.monotonic() - w.since,
                w.done,
            )
            for w in self._workers.values()
        )
        jobs = tuple(
            JobInfo(job_id, j.spec.name, int(j.state), j.spec.n_tasks, j.done, j.failed, j.created)
            for job_id, j in self._jobs.items()
        )
        counters = dict(self.counters)
        for side, codec in (("client", self._client_codec), ("worker", self._worker_codec)):
            for reason, n in codec.rejected.items():
                counters[f"rejected_{side}_{reason}"] = n
        return StatusReply(self.gateway_id, workers, jobs, counters, request_id)

    def _expire_leases(self, now: float) -> None:
        """A job submitted with ``meta["lease"]`` (a remote session) ends when its client has
        been silent past the heartbeat deadline: a kernel killed without a goodbye."""
        deadline = self.settings.timeouts.heartbeat_timeout_s
        for job_id, job in list(self._jobs.items()):
            if not job.spec.meta.get("lease") or job.owner is None:
                continue
            if now - self._client_seen.get(job.owner, now) > deadline:
                log.info("lease of job %s expired: its client went silent", job_id)
                self._apply(self.scheduler.handle(sch.JobCancel(job_id, now)))

    # -- end of turn: commit, then send -----------------------------------------------------
