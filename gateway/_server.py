"""The gateway: two ROUTER sockets, the scheduler, the state store, on one asyncio loop.

``Gateway`` is an async context manager: entering binds the sockets, opens the state, resumes
unfinished jobs and starts its loops in a TaskGroup it owns; leaving stops them and closes
everything. ``ready`` is set once the connection file is written.

A loop turn drains every message waiting on a socket, feeds the scheduler, sends the turn's
assignments to workers, commits the state (group commit), and only then sends to clients: a
result reaches a client only after it is on disk, and many results of one turn travel in one
message. (An assignment leaves before its commit, so the commit overlaps the task's first hop;
a crash in between can only make that task run again, and its result is still recorded once.)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import zmq

from gateway import _scheduler as sch
from gateway._blobs import BlobStore
from gateway._drain import Drain, send_frames
from gateway._errors import MessageTooLarge, PilotError, ProtocolError, VersionMismatch
from gateway._messages import (
    FROM_CLIENT,
    FROM_WORKER,
    Assign,
    Assignment,
    AttachJob,
    BlobReply,
    CancelJob,
    CancelTasks,
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
    Output,
    Outputs,
    Payload,
    PutBlob,
    Refused,
    Status,
    StatusQuery,
    StatusReply,
    Submit,
    Submitted,
    TaskAttempt,
    TaskDone,
    TaskEvents,
    TaskInput,
    TaskResult,
    TaskResults,
    TasksStarted,
    TaskStatus,
    Welcome,
    WorkerHello,
    WorkerInfo,
)
from gateway._settings import ConnectionInfo, GatewaySettings
from gateway._state import StateStore
from gateway._wire import Codec

__all__ = ["Gateway"]

log = logging.getLogger("pilot.gateway")

TICK_S = 0.2
MAX_BATCH = 2000  # messages drained per socket per turn


class GatewayState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(slots=True, eq=False)
class _Job:
    spec: JobSpec
    args: dict[int, Payload]  # unsettled tasks' arguments, loaded lazily after a restart
    subscribers: set[bytes]
    created: float
    done: int = 0
    failed: int = 0
    state: Status = Status.QUEUED
    error: str = ""
    kept_bytes: dict[int, int] = field(default_factory=dict)  # outputs kept per task
    owner: bytes | None = None  # the submitting client


@dataclass(slots=True, eq=False)
class _Worker:
    ident: bytes
    hello: WorkerHello
    since: float
    fns: set[str] = field(default_factory=set)
    done: int = 0


class Gateway:
    """See the module docstring."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.state = GatewayState.NEW
        self.ready = asyncio.Event()
        self.gateway_id = os.urandom(6).hex()
        self.connection: ConnectionInfo | None = None
        t = settings.timeouts
        self.scheduler = sch.Scheduler(
            heartbeat_timeout_s=t.heartbeat_timeout_s,
            orphan_grace_s=t.orphan_grace_s,
            prefetch=settings.prefetch,
            prefetch_max_task_s=settings.prefetch_max_task_s,
        )
        key = settings.key
        limits = dict(
            max_message_bytes=settings.max_message_bytes, replay_window_s=t.replay_window_s
        )
        self._client_codec = Codec(key, accept=FROM_CLIENT, **limits)  # type: ignore[arg-type]
        self._worker_codec = Codec(key, accept=FROM_WORKER, **limits)  # type: ignore[arg-type]
        self._jobs: dict[str, _Job] = {}
        self._workers: dict[str, _Worker] = {}
        self._fns: dict[str, Payload] = {}
        self._unschedulable: dict[str, str] = {}
        self._started_at: dict[tuple[str, int, int], float] = {}  # until the attempt ends
        self._client_seen: dict[bytes, float] = {}  # for leases: jobs that die with their client
        self._status_waiters: list[tuple[bytes, str, StatusQuery, float]] = []
        # what this turn will send, batched per peer
        self._to_clients: dict[bytes, list[Any]] = defaultdict(list)
        self._client_done: dict[bytes, list[TaskDone]] = defaultdict(list)
        self._client_outputs: dict[bytes, list[Output]] = defaultdict(list)
        # Submit acknowledgements wait for the next message to that client (or the next tick):
        # an ack alone would wake the client while its job's first hop is under way. A job's
        # end acknowledges it too: a short job needs no ack of its own.
        self._acks: dict[bytes, list[str]] = defaultdict(list)
        self._to_workers: dict[str, list[Any]] = defaultdict(list)
        self._assign: dict[str, list[Assignment]] = defaultdict(list)
        self._cancel: dict[str, list[TaskAttempt]] = defaultdict(list)
        self.counters: dict[str, int] = defaultdict(int)
        self._ctx = zmq.Context()
        self._drains: list[Drain] = []
        self._group: asyncio.TaskGroup | None = None
        self._http: Any = None

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(
            s.state_dir / "state.sqlite",
            BlobStore(s.state_dir / "blobs"),
            inline_bytes=s.inline_result_bytes,
        )
        self._clients_sock = self._bind(s.client_port)
        self._workers_sock = self._bind(s.worker_port, handover=True)
        client_url = self._clients_sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        worker_url = self._workers_sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        http_url = await self._start_http()
        self._resume()
        self.connection = ConnectionInfo(
            client_url=client_url,
            worker_url=worker_url,
            key=s.key,
            http_url=http_url,
            gateway_id=self.gateway_id,
            pid=os.getpid(),
        )
        if s.connection_file is not None:
            self.connection.save(s.connection_file)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._drains = [
            Drain(self._clients_sock, self._from_client, self._end_turn),
            Drain(self._workers_sock, self._from_worker, self._end_turn),
        ]
        self._group.create_task(self._ticker())
        self.state = GatewayState.RUNNING
        self.ready.set()
        log.info(
            "gateway %s ready: clients %s, workers %s", self.gateway_id, client_url, worker_url
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.state = GatewayState.STOPPED
        self._stopping.set()
        for drain in self._drains:
            drain.close()
        if self._group is not None:
            await self._group.__aexit__(None, None, None)
        if self._http is not None:
            self._http.stop()
        self.store.close()
        self._remove_connection_file()
        for sock in (self._clients_sock, self._workers_sock):
            sock.close(linger=0)
        self._ctx.term()

    def _remove_connection_file(self) -> None:
        """A stopped gateway's file would send clients to nobody; another's is left alone."""
        path = self.settings.connection_file
        if path is None:
            return
        try:
            if ConnectionInfo.load(path).gateway_id == self.gateway_id:
                path.unlink()
        except PilotError as exc:
            log.debug("connection file not removed: %s", exc)

    async def serve_forever(self) -> None:
        await self._stopping.wait()

    def stop(self) -> None:
        """Ask the loops to end; ``__aexit__`` waits for them."""
        self._stopping.set()

    @property
    def _stopping(self) -> asyncio.Event:
        ev = getattr(self, "_stop_event", None)
        if ev is None:
            ev = self._stop_event = asyncio.Event()
        return ev

    def _bind(self, port: int, handover: bool = False) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop: a ROUTER drops silently at the HWM
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A frame bigger than the limit is dropped by libzmq before it costs memory.
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes + 4096)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(f"tcp://{self.settings.bind}:{port}")
        return sock

    async def _start_http(self) -> str:
        if self.settings.http_port is None:
            return ""
        from gateway._http import start_http  # tornado is only needed with a dashboard

        self._http, url = start_http(self, self.settings.bind, self.settings.http_port)
        return url

    def _resume(self) -> None:
        """Rebuild jobs and scheduler state from the store after a restart."""
        now = time.monotonic()
        for u in self.store.unfinished_jobs():
            self._jobs[u.spec.job_id] = _Job(u.spec, {}, set(), time.time())
            self.scheduler.handle(
                sch.JobAdded(
                    u.spec.job_id,
                    u.spec.n_tasks,
                    u.spec.resources,
                    now,
                    u.spec.timeout_s,
                    self._retries(u.spec),
                    settled=u.settled,
                    orphans=tuple(TaskAttempt(u.spec.job_id, i, a) for i, a, _ in u.out),
                    orphan_workers=tuple(w for _, _, w in u.out),
                    family=u.spec.fn_key,
                    data_keys=tuple(u.spec.meta.get("data_keys") or ()),
                )
            )
            log.info(
                "resumed job %s: %d settled, %d out on workers",
                u.spec.job_id,
                len(u.settled),
                len(u.out),
            )

    def _retries(self, spec: JobSpec) -> int:
        return spec.retries if spec.retries >= 0 else self.settings.default_retries

    # -- the loops --------------------------------------------------------------------------

    def _from_client(self, frames: list[zmq.Frame]) -> None:
        self._client_seen[frames[0].bytes] = time.monotonic()
        self._receive(frames, self._on_client)

    def _from_worker(self, frames: list[zmq.Frame]) -> None:
        self._receive(frames, self._on_worker)

    def _receive(self, frames: list[zmq.Frame], handle: Any) -> None:
        ident = frames[0].bytes
        codec = self._client_codec if handle == self._on_client else self._worker_codec
        try:
            env = codec.decode(frames[1:])
        except VersionMismatch as exc:
            self.counters["rejected"] += 1
            log.warning("refused peer %r: %s", ident, exc)
            self._send(handle, ident, Refused(str(exc), retry=False))
            return
        except (MessageTooLarge, ProtocolError) as exc:
            self.counters["rejected"] += 1
            log.warning("rejected a message from %r: %s", ident, exc)
            return
        try:
            handle(ident, env.msg_id, env.msg)
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("error handling %s from %r", type(env.msg).__name__, ident)
            self._send(handle, ident, ErrorReply(env.msg_id, "internal gateway error: see its log"))

    def _send(self, handle: Any, ident: bytes, msg: Any) -> None:
        if handle == self._on_client:
            self._to_clients[ident].append(msg)
        else:
            self._send_raw(self._workers_sock, self._worker_codec, ident, msg)

    async def _ticker(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), TICK_S)
            now = time.monotonic()
            self._apply(self.scheduler.handle(sch.Tick(now)))
            self._expire_leases(now)
            self._answer_status_waiters(deadline_passed=True)
            self._end_turn(acks=True)

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

    def _end_turn(self, acks: bool = False) -> None:
        for ident, done in self._client_done.items():
            self._to_clients[ident].insert(0, TaskEvents(tuple(done)))
        for ident, outs in self._client_outputs.items():
            self._to_clients[ident].insert(0, Outputs(tuple(outs)))
        for ident in [i for i in self._acks if acks or i in self._to_clients]:
            msgs = self._to_clients[ident]
            ended = {m.job_id for m in msgs if isinstance(m, JobUpdate) and m.spec is None}
            ids = tuple(j for j in self._acks.pop(ident) if j not in ended)
            if ids:
                msgs.insert(0, Submitted(ids))
        self._client_done.clear()
        self._client_outputs.clear()
        for name, tasks in self._assign.items():
            self._to_workers[name].append(Assign(tuple(tasks)))
        for name, attempts in self._cancel.items():
            self._to_workers[name].append(CancelTasks(tuple(attempts)))
        self._assign.clear()
        self._cancel.clear()
        for name, msgs in self._to_workers.items():
            w = self._workers.get(name)
            if w is None:
                continue
            for msg in msgs:
                self._send_raw(self._workers_sock, self._worker_codec, w.ident, msg)
        self._to_workers.clear()
        self.store.flush()  # before anything reaches a client
        for ident, msgs in self._to_clients.items():
            for msg in _coalesce(msgs):
                self._send_raw(self._clients_sock, self._client_codec, ident, msg)
        self._to_clients.clear()
        for drain in self._drains:  # sending may have swallowed a read edge
            drain.kick()

    def _send_raw(self, sock: zmq.Socket[Any], codec: Codec, ident: bytes, msg: Any) -> None:
        try:
            frames = codec.encode(msg)
        except MessageTooLarge as exc:
            log.error("could not send %s: %s", type(msg).__name__, exc)
            return
        try:
            send_frames(sock, [ident, *frames])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is gone (ROUTER_MANDATORY)
            self.counters["unroutable"] += 1
            log.debug("peer %r unreachable for %s: %s", ident, type(msg).__name__, exc)

    # -- scheduler instructions -------------------------------------------------------------

    def _apply(self, instructions: list[sch.Instruction], result: TaskResult | None = None) -> None:
        for ins in instructions:
            match ins:
                case sch.AssignTask(worker=worker, job_id=job_id, index=index, attempt=attempt):
                    self._assign_task(worker, job_id, index, attempt)
                case sch.CancelAttempt(worker=worker, job_id=job_id, index=index, attempt=a):
                    self._cancel[worker].append(TaskAttempt(job_id, index, a))
                case sch.TaskSettled():
                    self._task_settled(ins, result)
                case sch.JobSettled(job_id=job_id, state=state):
                    self._job_settled(job_id, state)
                case sch.WorkerGone(name=name):
                    if self._workers.pop(name, None) is not None:
                        log.warning("worker %s is gone; its tasks went back to the queue", name)
                case sch.Unschedulable(job_id=job_id, resources=res):
                    self._unschedulable[job_id] = self._why_unschedulable(res)
                    self._apply(self.scheduler.handle(sch.JobCancel(job_id, time.monotonic())))

    def _assign_task(self, worker: str, job_id: str, index: int, attempt: int) -> None:
        job = self._jobs[job_id]
        w = self._workers[worker]
        spec = job.spec
        args = job.args.get(index)
        if args is None:
            args = job.args[index] = self.store.task_args(job_id, index)
        fn = None
        if spec.fn_key not in w.fns:
            fn = self._function(spec.fn_key)
            w.fns.add(spec.fn_key)
        res = spec.resources
        self._assign[worker].append(
            Assignment(
                job_id,
                index,
                attempt,
                spec.fn_key,
                fn,
                args,
                spec.timeout_s,
                spec.meta,
                max(1, res.cpus),
                res.gpus,
            )
        )
        self.store.attempt_assigned(job_id, index, attempt, worker)

    def _function(self, key: str) -> Payload:
        fn = self._fns.get(key)
        if fn is None:
            fn = self.store.function(key)
            if fn is None:
                raise KeyError(f"function {key} is not stored")
            self._fns[key] = fn
        return fn

    def _task_settled(self, ins: sch.TaskSettled, result: TaskResult | None) -> None:
        job = self._jobs.get(ins.job_id)
        if job is None:
            return
        value = error = None
        if result is not None and (result.job_id, result.index) == (ins.job_id, ins.index):
            value = result.value if ins.status == TaskStatus.OK else None
            error = result.error
        if not error and ins.status != TaskStatus.OK:
            error = _default_error(ins.status, ins.worker)
        done = TaskDone(
            ins.job_id,
            ins.index,
            int(ins.status),
            value,
            error or "",
            ins.worker,
            ins.attempts,
            result.duration_s if result is not None else 0.0,
            result.item if result is not None and value is None else -1,
            result.files if result is not None and value is not None else (),
        )
        if ins.status == TaskStatus.OK:
            job.done += 1
        elif ins.status != TaskStatus.CANCELLED:
            job.failed += 1
        job.args.pop(ins.index, None)
        self.store.task_settled(done)
        if ins.worker in self._workers and ins.status == TaskStatus.OK:
            self._workers[ins.worker].done += 1
        for ident in job.subscribers:
            self._client_done[ident].append(done)

    def _job_settled(self, job_id: str, state: Status) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        error = self._unschedulable.pop(job_id, "")
        if error:
            state = Status.FAILED
        job.state, job.error = state, error
        self.store.job_settled(job_id, state, error, job.done, job.failed)
        for ident in job.subscribers:
            self._to_clients[ident].append(JobUpdate(job_id, int(state), error))

    def _why_unschedulable(self, res: Any) -> str:
        have = "; ".join(
            f"{w.hello.name}: {w.hello.slots} slots, {len(w.hello.gpus)} GPUs, "
            f"tags [{', '.join(w.hello.tags)}]"
            for w in self._workers.values()
        )
        return (
            f"No connected worker can run this job: it asks for {max(1, res.cpus)} slots, "
            f"{res.gpus} GPUs, tags [{', '.join(res.tags)}]; the workers have: {have}. "
            "Ask for less, or start a worker that has it (`pilot worker --slots N --tags T`)."
        )

    # -- clients ----------------------------------------------------------------------------

    def _on_client(self, ident: bytes, msg_id: str, msg: Any) -> None:
        match msg:
            case Heartbeat() | ClientHello():
                s = self.settings.timeouts
                welcome = Welcome(self.gateway_id, s.heartbeat_interval_s, s.heartbeat_timeout_s)
                self._to_clients[ident].append(welcome)
            case Submit(jobs=jobs, tasks=tasks):
                self._submit(ident, jobs, tasks)
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
            digest = blobs.put(msg.data)
            if digest != msg.digest:
                blobs.path(digest).unlink(missing_ok=True)
                return BlobReply(msg_id, msg.digest, False, error="content does not match digest")
            return BlobReply(msg_id, digest, True)
        try:
            return BlobReply(msg_id, msg.digest, True, blobs.get(msg.digest))
        except FileNotFoundError:
            return BlobReply(msg_id, msg.digest, False, error=f"no blob {msg.digest} here")

    def _submit(self, ident: bytes, jobs: tuple[JobSpec, ...], tasks: Any) -> None:
        now = time.monotonic()
        accepted = []
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

    def _answer_status_waiters(self, deadline_passed: bool = False) -> None:
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

    # -- workers ----------------------------------------------------------------------------

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
                    self._apply(self.scheduler.handle(sch.WorkerLeft(name, now, TaskStatus.LOST)))
                    self._workers.pop(name, None)
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


def _coalesce(msgs: list[Any]) -> list[Any]:
    """Fold job ends (``JobUpdate`` without a spec) into the ``TaskEvents`` just before them,
    or into one ``TaskEvents`` per run of them: the order of everything is kept, and a burst of
    small jobs costs one message per turn, not one per job."""
    out: list[Any] = []
    ended: list[JobUpdate] = []  # job ends to add to out[-1], a TaskEvents
    for msg in msgs:
        if isinstance(msg, JobUpdate) and msg.spec is None:
            if not ended and not (out and isinstance(out[-1], TaskEvents)):
                out.append(TaskEvents(()))
            ended.append(msg)
            continue
        if ended:
            out[-1] = TaskEvents(out[-1].done, (*out[-1].ended, *ended))
            ended = []
        out.append(msg)
    if ended:
        out[-1] = TaskEvents(out[-1].done, (*out[-1].ended, *ended))
    return out


def _default_error(status: TaskStatus, worker: str) -> str:
    match status:
        case TaskStatus.LOST:
            return f"Worker {worker} was lost while running this task, on every try."
        case TaskStatus.TIMEOUT:
            return "The task ran past its timeout (--timeout) on every try."
        case TaskStatus.CRASHED:
            return f"The process running this task on {worker} died."
        case TaskStatus.CANCELLED:
            return "Cancelled."
    return f"Task ended with status {status.name}."
