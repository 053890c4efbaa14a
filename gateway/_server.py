"""The gateway: two ROUTER sockets, the scheduler, the state store, on one asyncio loop.

``Gateway`` is an async context manager: entering binds the sockets, opens the state, resumes
unfinished jobs and starts its loops in a TaskGroup it owns; leaving stops them and closes
everything. ``ready`` is set once the connection file is written.

A loop turn drains every message waiting on a socket, feeds the scheduler, commits the state
(group commit), and only then sends what the turn produced, workers first: a result reaches a
client only after it is on disk, an assignment reaches a worker only after its attempt is (a
restarted gateway numbers attempts from what it finds on disk), and many results of one turn
travel in one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections import defaultdict
from typing import Any

import zmq

from gateway import _scheduler as sch
from gateway._blobs import BlobStore
from gateway._clientside import ClientSide
from gateway._drain import Drain, send_frames
from gateway._errors import MessageTooLarge, PilotError, ProtocolError, VersionMismatch
from gateway._instructions import Instructions
from gateway._messages import (
    FROM_CLIENT,
    FROM_WORKER,
    Assign,
    Assignment,
    CancelTasks,
    ErrorReply,
    JobSpec,
    JobUpdate,
    Output,
    Outputs,
    Payload,
    Refused,
    StatusQuery,
    Submitted,
    TaskAttempt,
    TaskDone,
    TaskEvents,
)
from gateway._records import _Job, _Worker
from gateway._settings import ConnectionInfo, GatewaySettings
from gateway._state import StateStore
from gateway._wire import Codec
from gateway._workerside import WorkerSide

__all__ = ["Gateway"]

log = logging.getLogger("pilot.gateway")

TICK_S = 0.2
MAX_BATCH = 2000  # messages drained per socket per turn


class GatewayState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Gateway(ClientSide, WorkerSide, Instructions):
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
        self.counters["bytes_in"] += sum(len(f) for f in frames)  # to show what we relay
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
            self._answer_status_waiters()
            self._end_turn(acks=True)

    def _end_turn(self, acks: bool = False) -> None:
        self.store.flush()
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
        # Workers first: an assignment is on the critical path, an acknowledgement is not.
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
        self.counters["bytes_out"] += sum(memoryview(f).nbytes for f in frames)
        try:
            send_frames(sock, [ident, *frames])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is gone (ROUTER_MANDATORY)
            self.counters["unroutable"] += 1
            log.debug("peer %r unreachable for %s: %s", ident, type(msg).__name__, exc)


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
