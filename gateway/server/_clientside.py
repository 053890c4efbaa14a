"""The gateway's client side: what it does for each message a client sends.

``ClientHandler`` is one part of the ``Gateway``, built from what it uses (the registry, the
instruction executor and through it the scheduler, the store, the outbox): submit (functions
arrive as blobs, stored before any job is accepted), cancel, attach (with the replay of a job's
finished tasks and kept outputs), status, jobs, logs, blobs, messages for running tasks (relayed
to their worker), and the leases that end a remote session whose client died.

While the store cannot write (``store.healthy`` is false), new work is refused with
``ErrorCode.STORE_UNAVAILABLE``: nothing is accepted that could not be made durable.

Ownership: each message comes with its sender's ``Principal`` (the gateway's, from the CURVE
key; the admin on an insecure gateway). A job records who submitted it; a user lists (jobs,
status), attaches to, reads the logs of, cancels and talks to (sessions) only their own jobs,
and another's gets ``ErrorCode.NOT_YOURS`` and none of its data; the admin sees every job.
Dataset secrets are accepted only by a secure gateway (``_secrets``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gateway.protocol import (
    AttachJob,
    CancelJob,
    ClientHello,
    Codec,
    DashboardLink,
    DashboardLogin,
    ErrorCode,
    ErrorReply,
    GatewaySettings,
    GetBlob,
    Goodbye,
    Heartbeat,
    InputReply,
    InterruptTask,
    JobInfo,
    JobSpec,
    JobsQuery,
    JobsReply,
    JobUpdate,
    LogsQuery,
    LogsReply,
    Outputs,
    PutBlob,
    RunCell,
    StatsQuery,
    StatsReply,
    StatusQuery,
    StatusReply,
    Submit,
    Welcome,
    WorkerInfo,
)
from gateway.server import _scheduler as sch
from gateway.server._auth import REMOVED
from gateway.server._blobdesk import BlobDesk
from gateway.server._ingest import SLICE as INGEST_SLICE
from gateway.server._ingest import Ingest
from gateway.server._instructions import Executor
from gateway.server._outbox import Outbox
from gateway.server._registry import ARGS_KEPT, JobRecord, Registry
from gateway.server._replay import replay
from gateway.server._sched_events import job_added
from gateway.server._secrets import has_secrets
from gateway.server._state import StateStore
from gateway.server._stats import job_stats
from gateway.server._users import ADMIN, Principal

__all__ = ["ClientHandler"]

log = logging.getLogger("pilot.gateway")

ANYONE = Principal(ADMIN, admin=True)


class ClientHandler:
    """Handlers for client messages (see the module docstring)."""

    def __init__(
        self,
        settings: GatewaySettings,
        gateway_id: str,
        registry: Registry,
        executor: Executor,
        store: StateStore,
        outbox: Outbox,
        counters: dict[str, int],
        codecs: Callable[[], dict[str, Codec]],
        later: Callable[[Callable[[], None], float], None],
    ) -> None:
        self._settings = settings
        self._gateway_id = gateway_id
        self._registry = registry
        self._executor = executor
        self._scheduler = executor.scheduler
        self._store = store
        self._outbox = outbox
        self._counters = counters
        self._codecs = codecs
        self._seen: dict[bytes, float] = {}  # client -> last heard (leases)
        self._status_waiters: list[tuple[bytes, str, StatusQuery, float, Principal]] = []
        self.dashboard: Any = None  # the HTTP side (``_http.Dashboard``), set by the gateway
        self._later = later
        self.ingest = Ingest(store, later, self._ingested)  # big jobs, over several turns
        self.blobs = BlobDesk(store.blobs, executor.known_blob, counters, later)

    def handle(self, ident: bytes, msg_id: str, msg: Any, who: Principal = ANYONE) -> None:
        self._seen[ident] = time.monotonic()
        out = self._outbox
        match msg:
            case Heartbeat() | ClientHello():
                t = self._settings.timeouts
                out.client(
                    ident, Welcome(self._gateway_id, t.heartbeat_interval_s, t.heartbeat_timeout_s)
                )
            case Submit():
                self._submit(ident, msg_id, msg, who)
            case CancelJob(job_id=job_id):
                if self.ingest.cancel(job_id, who.name, who.admin):
                    pass  # cancelled once it is stored
                elif self._mine(ident, msg_id, job_id, who):
                    self._executor.handle(sch.JobCancel(job_id, time.monotonic()))
            case AttachJob():
                self._attach(ident, msg_id, msg, who)
            case StatusQuery():
                deadline = time.monotonic() + max(0.0, msg.timeout_s)
                self._status_waiters.append((ident, msg_id, msg, deadline, who))
                self.answer_status_waiters()
            case JobsQuery(limit=limit):
                jobs = self._store.jobs(limit, owner=None if who.admin else who.name)
                out.client(ident, JobsReply(tuple(map(self._live, jobs)), msg_id))
            case LogsQuery(job_id=job_id, index=index):
                self._store.flush()
                if self._store.job_spec(job_id) is None and job_id not in self._registry.jobs:
                    out.client(ident, _not_found(msg_id, job_id))
                    return
                if self._mine(ident, msg_id, job_id, who):
                    # task by task, each in the order it printed (tasks run side by side)
                    outputs = sorted(self._store.outputs(job_id, index), key=lambda o: o.index)
                    out.client(ident, LogsReply(tuple(outputs), msg_id))
            case PutBlob() | GetBlob():
                self.blobs.answer(msg_id, msg, lambda reply: self._outbox.client(ident, reply))
            case StatsQuery(job_id=job_id):
                self._store.flush()
                stats = job_stats(self._store, job_id, time.time())
                if stats is None:
                    out.client(ident, _not_found(msg_id, job_id))
                elif self._mine(ident, msg_id, job_id, who):
                    out.client(ident, StatsReply(stats, msg_id))
            case DashboardLogin(scrape=scrape):
                link = DashboardLink("") if self.dashboard is None else self.dashboard.login(who)
                if scrape and who.admin and self.dashboard is not None:
                    link = replace(link, scrape_token=self.dashboard.scrape_token)
                out.client(ident, replace(link, request_id=msg_id))
            case RunCell() | InputReply() | InterruptTask():
                if not self._mine(ident, msg_id, msg.job_id, who):
                    return
                worker = self._scheduler.worker_of(msg.job_id, msg.index)
                if worker is None:
                    text = f"Task {msg.job_id}[{msg.index}] is not running."
                    out.client(ident, ErrorReply(msg_id, text, ErrorCode.NOT_RUNNING))
                else:
                    out.worker(worker, msg)
            case Goodbye():
                for job_id, job in list(self._registry.jobs.items()):
                    job.subscribers.discard(ident)
                    if job.spec.lease and job.owner == ident:
                        self._executor.handle(sch.JobCancel(job_id, time.monotonic()))
                self._seen.pop(ident, None)

    def removed(self, ident: bytes, msg_id: str, msg: Any, who: None = None) -> None:
        """A message from a user removed since they connected: refused, with the reason."""
        self._outbox.client(ident, ErrorReply(msg_id, REMOVED, ErrorCode.UNKNOWN_USER))

    def _mine(self, ident: bytes, msg_id: str, job_id: str, who: Principal) -> bool:
        """Whether ``who`` may see job ``job_id`` (theirs, or they are the admin, or there is
        no such job: the caller says so). If not, the client is told, and nothing else."""
        if who.admin:
            return True
        live = self._registry.jobs.get(job_id)
        owner = live.user if live is not None else self._store.job_owner(job_id)
        if owner is None or owner == who.name:
            return True
        self._counters["not_yours"] += 1
        text = (
            f"Job {job_id} is not yours: it belongs to another user of this gateway. You can "
            "list, attach to, read the logs of and cancel your own jobs only."
        )
        self._outbox.client(ident, ErrorReply(msg_id, text, ErrorCode.NOT_YOURS))
        return False

    def _submit(self, ident: bytes, msg_id: str, msg: Submit, who: Principal) -> None:
        if not self._store.healthy:
            text = (
                "The gateway cannot write its state right now (see its log: a full disk?); it "
                "takes no new work until it can. Free space where it keeps its state, then "
                "submit again."
            )
            for spec in msg.jobs:
                self._outbox.client(
                    ident, ErrorReply(spec.job_id, text, ErrorCode.STORE_UNAVAILABLE)
                )
            return
        for blob in msg.blobs:  # the functions, before any job that names them
            ok, error = self.blobs.put(blob.digest, blob.data)
            if not ok:
                self._outbox.client(ident, ErrorReply(msg_id, error, ErrorCode.BAD_REQUEST))
                return
            self._executor.remember(blob)
        now = time.monotonic()
        stored: set[str] = set()
        if not msg.fresh:  # it may be a re-sent submit: look for its jobs in the store
            stored = self._store.known_jobs(
                [s.job_id for s in msg.jobs if s.job_id not in self._registry.jobs]
            )
        for spec, args in zip(msg.jobs, msg.tasks, strict=True):
            if spec.job_id in self._registry.jobs or spec.job_id in stored:
                # Sent again after a restart (it was not acknowledged): the job is here, and
                # its client hears of it again (it sends no AttachJob for such a job).
                self._attach(ident, msg_id, AttachJob(spec.job_id, replay_outputs=False), who)
                continue
            if spec.job_id in self.ingest:
                continue  # ...or being stored: acknowledged once it is
            if not self._settings.secure and has_secrets(spec):  # a client that did not check
                text = "Dataset secrets travel only to a gateway started with --secure."
                self._outbox.client(ident, ErrorReply(spec.job_id, text, ErrorCode.BAD_REQUEST))
                continue
            if len(args) > INGEST_SLICE:
                self.ingest.start(ident, spec, args, who.name)
                continue
            self._store.add_tasks(spec.job_id, args, 0, len(args))
            self._record(ident, spec, args, who.name, now, kept=len(args))
        self._ack(ident, [s.job_id for s in msg.jobs if s.job_id not in self.ingest])
        self._counters["jobs_submitted"] += len(msg.jobs)

    def _ack(self, ident: bytes, job_ids: list[str]) -> None:
        """Acknowledge ``job_ids`` once every blob received so far is on disk (a blob the
        jobs use may still be written behind: ``BlobStore.put_behind``)."""
        if not self._store.blobs.writing():
            self._outbox.ack(ident, job_ids)
            return
        loop = asyncio.get_running_loop()

        def ack() -> None:
            self._outbox.ack(ident, job_ids)

        def written() -> None:  # on the blob writer's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._later, ack, 0.0)

        self._store.blobs.after_writes(written)

    def _record(
        self, ident: bytes, spec: JobSpec, args: Any, user: str, now: float, kept: int
    ) -> None:
        """The job's row, its record (with the first ``kept`` arguments) and its tasks."""
        wall = time.time()
        self._store.add_job(spec, wall, owner=user)
        kept_args = dict(enumerate(args[:kept]))
        self._registry.add(JobRecord(spec, kept_args, {ident}, wall, owner=ident, user=user))
        self._executor.handle(job_added(spec, now, self._settings))

    def _ingested(self, ident: bytes, spec: JobSpec, args: Any, user: str, cancelled: bool) -> None:
        """A big job whose tasks' rows are on disk: recorded, acknowledged, maybe cancelled."""
        now = time.monotonic()
        self._record(ident, spec, args, user, now, kept=ARGS_KEPT)
        self._ack(ident, [spec.job_id])
        if cancelled:
            self._executor.handle(sch.JobCancel(spec.job_id, now))

    def _attach(self, ident: bytes, msg_id: str, msg: AttachJob, who: Principal) -> None:
        self._store.flush()
        found = self._store.job_spec(msg.job_id)
        if found is None:
            self._outbox.client(ident, _not_found(msg_id, msg.job_id))
            return
        if not self._mine(ident, msg_id, msg.job_id, who):
            return
        spec, state, error = found
        job = self._registry.jobs.get(msg.job_id)
        if job is not None:
            job.subscribers.add(ident)
        self._outbox.client(ident, JobUpdate(msg.job_id, state, error, spec))
        if msg.replay_outputs:
            outs = self._store.outputs(msg.job_id)
            if outs:
                self._outbox.client(ident, Outputs(tuple(outs)))
        ended = JobUpdate(msg.job_id, state, error) if job is None else None  # after the replay
        replay(self._store, self._outbox, self._later, ident, msg.job_id, msg.known,
               spec.n_tasks, ended)  # fmt: skip

    def answer_status_waiters(self) -> None:
        if not self._status_waiters:
            return
        now = time.monotonic()
        keep = []
        for ident, msg_id, q, deadline, who in self._status_waiters:
            if len(self._registry.workers) >= q.wait_workers or now >= deadline:
                self._outbox.client(ident, self.status_reply(msg_id, who))
            else:
                keep.append((ident, msg_id, q, deadline, who))
        self._status_waiters = keep

    def status_reply(self, request_id: str = "", who: Principal = ANYONE) -> StatusReply:
        """Workers, live jobs (``who``'s only, unless the admin) and counters now."""
        now = time.monotonic()
        workers = tuple(
            WorkerInfo(
                w.hello.name,
                w.hello.slots,
                w.hello.cpus,
                w.hello.memory_bytes,
                w.hello.gpus,
                w.hello.tags,
                self._scheduler.running_on(w.hello.name),
                now - w.since,
                w.done,
                w.hello.slurm_job_id,
            )
            for w in self._registry.workers.values()
        )
        jobs = []
        for job_id, j in self._registry.jobs.items():
            if not (who.admin or j.user == who.name):
                continue
            state, done, failed = self._scheduler.job_progress(job_id)
            jobs.append(
                JobInfo(
                    job_id,
                    j.spec.name,
                    state,
                    j.spec.n_tasks,
                    done,
                    failed,
                    j.created,
                    queued=self._scheduler.job_queued(job_id),
                    resources=j.spec.resources,
                    owner=j.user,
                )
            )
        return StatusReply(self._gateway_id, workers, tuple(jobs), self.counters(), request_id)

    def _live(self, info: JobInfo) -> JobInfo:
        """A stored job row with a live job's progress (its row counts what is done only at
        its end)."""
        if info.job_id not in self._scheduler.jobs:
            return info
        state, done, failed = self._scheduler.job_progress(info.job_id)
        queued = self._scheduler.job_queued(info.job_id)
        return replace(info, state=state, done=done, failed=failed, queued=queued)

    def counters(self) -> dict[str, int]:
        """The gateway's counters, with each codec's refused messages by reason."""
        counters = dict(self._counters)
        for side, codec in self._codecs().items():
            for reason, n in codec.rejected.items():
                counters[f"rejected_{side}_{reason}"] = n
        return counters

    def expire_leases(self, now: float) -> None:
        """A job with a lease (a remote session) ends when its client has been silent past the
        policy's lease deadline: a kernel killed without a goodbye."""
        deadline = (
            self._settings.policy.lease_timeout_s or self._settings.timeouts.heartbeat_timeout_s
        )
        for job_id in list(self._registry.leased):
            job = self._registry.jobs[job_id]
            if job.owner is None:
                continue
            if now - self._seen.get(job.owner, now) > deadline:
                log.info("lease of job %s expired: its client went silent", job_id)
                self._executor.handle(sch.JobCancel(job_id, now))


def _not_found(msg_id: str, job_id: str) -> ErrorReply:
    return ErrorReply(msg_id, f"No job {job_id} in this gateway.", ErrorCode.JOB_NOT_FOUND)
