"""The async client: one DEALER socket to a gateway, used by the sync facade, the magic and the
CLI. Lives on one asyncio loop (the sync facade's IO thread).

It submits jobs (many per message when they come in bursts), follows their events, and survives
a gateway restart: it notices the new ``gateway_id`` in the heartbeat answer, re-sends submits
that were never acknowledged, and re-attaches every unfinished job, whose replay fills in what
it missed. Jobs are the caller's records (``JobRecord``: the sync facade's ``Job``, the one
record of a job on the client side); this client keeps them by id and hands each its events
on this loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Protocol

import zmq

from gateway.client._unacked import Unacked
from gateway.protocol import (
    AttachJob,
    Blob,
    BlobReply,
    CancelJob,
    ClientHello,
    Codec,
    ConnectionInfo,
    DashboardLink,
    Drain,
    ErrorCode,
    ErrorReply,
    GetBlob,
    Goodbye,
    Heartbeat,
    InputReply,
    InterruptTask,
    JobKind,
    JobSpec,
    JobsQuery,
    JobsReply,
    JobUpdate,
    LogsQuery,
    LogsReply,
    NoGateway,
    Outputs,
    Payload,
    PilotError,
    PilotTimeout,
    PutBlob,
    Refused,
    RunCell,
    StatsReply,
    Status,
    StatusQuery,
    StatusReply,
    Submit,
    Submitted,
    TaskDone,
    TaskEvents,
    Timeouts,
    VersionMismatch,
    Welcome,
    by_content,
    curve_client,
    error_for,
    send_frames,
)

__all__ = ["AsyncClient", "JobRecord"]

log = logging.getLogger("pilot.client")


class JobRecord(Protocol):
    """What this client needs of a job record (``gateway.client.Job`` is one): its id, its
    spec once known, its state and finished tasks (which ``on_event`` maintains: it is given
    every ``TaskDone`` once, ``Output``s, and ``JobUpdate``s), all touched on this loop only."""

    id: str
    spec: JobSpec | None
    state: Status
    tasks: dict[int, TaskDone]

    def on_event(self, ev: Any) -> None: ...


class AsyncClient:
    """See the module docstring. ``await start()`` before use, ``await close()`` after."""

    def __init__(
        self,
        connection: ConnectionInfo,
        *,
        name: str = "client",
        timeouts: Timeouts | None = None,
        max_message_bytes: int = 1 << 30,
    ) -> None:
        self.connection = connection
        self.name = name
        self.timeouts = timeouts or Timeouts()
        self._codec = Codec(connection.key, max_message_bytes=max_message_bytes)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[Any] | None = None
        self._drain: Drain | None = None
        self.jobs: dict[str, JobRecord] = {}
        self._unacked = Unacked()  # jobs (and their functions) to send again after a restart
        self._blobs_sent: set[str] = set()  # function digests this gateway has from us
        self._outbox: list[tuple[JobSpec, tuple[Payload, ...]]] = []
        self._requests: dict[str, asyncio.Future[Any]] = {}
        self._attaching: dict[str, asyncio.Future[JobRecord]] = {}
        self._attach_requests: dict[str, str] = {}  # AttachJob msg_id -> job id
        self.gateway_id = ""
        self._welcome = asyncio.Event()
        self._last_heard = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> AsyncClient:
        """Connect and wait for the gateway's welcome. Raises ``NoGateway`` after
        ``timeouts.request_s`` without one; ``ConfigError`` for a file without client keys."""
        info = self.connection
        keys = info.client_keys() if info.secure else None  # raises before a socket exists
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if keys is not None:  # CurveZMQ: the gateway's public key and this user's key pair
            curve_client(sock, info.server_key, keys)
        sock.setsockopt(zmq.SNDTIMEO, 0)  # a refused handshake leaves nothing to queue on
        sock.connect(info.client_url)
        self._drain = Drain(sock, self._receive, self._end_turn)
        self._tasks.add(asyncio.get_running_loop().create_task(self._heartbeat()))
        self._send(ClientHello(self.name, os.getpid()))
        try:
            await asyncio.wait_for(self._welcome.wait(), self.timeouts.request_s)
        except TimeoutError:
            await self.close()
            raise NoGateway(
                f"No gateway answered at {self.connection.client_url} within "
                f"{self.timeouts.request_s:.0f}s. Start one with `pilot up`, or check the "
                "address and its keys (a secure gateway does not answer keys it does not know)."
            ) from None
        if self._refused is not None:
            await self.close()
            raise self._refused
        return self

    _refused: PilotError | None = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sock is not None and self._welcome.is_set():
            self._flush()
            self._send(Goodbye())
        for task in self._tasks:
            task.cancel()
        if self._drain is not None:
            self._drain.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=100)
        self._ctx.term()
        for fut in [*self._requests.values(), *self._attaching.values()]:
            if not fut.done():
                fut.set_exception(PilotError("The client was closed."))

    # -- sending ----------------------------------------------------------------------------

    def _send(self, msg: Any) -> str:
        assert self._sock is not None
        try:
            send_frames(self._sock, self._codec.encode(msg))
        except zmq.Again:  # a gateway that refused our handshake: nothing is waited on
            log.debug("%s not sent: the gateway did not accept this client", type(msg).__name__)
        if self._drain is not None:
            self._drain.kick()
        return self._codec.last_msg_id

    def submit_nowait(
        self, job: JobRecord, spec: JobSpec, args: tuple[Payload, ...], fn: Payload | None
    ) -> None:
        """Queue a job (``fn`` is the payload of ``spec.fn_digest``, None for a job without a
        function); it leaves with the other jobs queued in this loop turn."""
        self.jobs[spec.job_id] = job
        self._unacked.queued(spec, fn)
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((spec, args))

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        fresh = not any(spec.job_id in self._unacked for spec, _ in batch)  # none re-sent
        blobs: dict[str, Blob] = {}
        tasks = []
        for spec, args in batch:
            self._unacked.sent(spec, args)
            digest = spec.fn_digest
            if digest and digest not in self._blobs_sent and digest not in blobs:
                blobs[digest] = Blob(digest, self._unacked.functions[digest])
            if spec.kind in (JobKind.CALL, JobKind.MAP):  # a task process loads the args
                args = by_content(args, self._blobs_sent, blobs)
            tasks.append(args)
        self._blobs_sent.update(blobs)
        specs = tuple(spec for spec, _ in batch)
        self._send(Submit(specs, tuple(tasks), fresh, tuple(blobs.values())))

    def send(self, msg: RunCell | InputReply | InterruptTask) -> None:
        """A message for a running task (a remote session's cell, an ``input()`` reply, an
        interrupt), relayed by the gateway to its worker; fire and forget."""
        self._flush()
        self._send(msg)

    async def cancel(self, job_id: str) -> None:
        self._flush()
        self._send(CancelJob(job_id))

    async def _request(self, msg: Any, timeout: float | None = None) -> Any:
        self._flush()
        msg_id = self._send(msg)
        fut = self._requests[msg_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(fut, timeout or self.timeouts.request_s)
        except TimeoutError:
            raise PilotTimeout(
                f"The gateway did not answer {type(msg).__name__} in time; is it running?"
            ) from None
        finally:
            self._requests.pop(msg_id, None)

    async def status(self, wait_workers: int = 0, timeout: float = 0.0) -> StatusReply:
        q = StatusQuery(wait_workers, timeout)
        reply: StatusReply = await self._request(q, timeout + self.timeouts.request_s)
        return reply

    async def list_jobs(self, limit: int = 50) -> JobsReply:
        reply: JobsReply = await self._request(JobsQuery(limit))
        return reply

    async def put_blob(self, digest: str, data: Payload) -> None:
        """Store bytes in the gateway's blob store. Raises ``PilotError`` on a mismatch."""
        reply: BlobReply = await self._request(PutBlob(digest, data), self.timeouts.request_s * 6)
        if not reply.ok:
            raise PilotError(f"The gateway refused blob {digest}: {reply.error}")

    async def get_blob(self, digest: str) -> Payload:
        """A stored blob's bytes. Raises ``PilotError`` if the gateway has none."""
        reply: BlobReply = await self._request(GetBlob(digest), self.timeouts.request_s * 6)
        if not reply.ok or reply.data is None:
            raise PilotError(f"The gateway has no blob {digest}: {reply.error}")
        return reply.data

    async def logs(self, job_id: str, index: int = -1) -> LogsReply:
        reply: LogsReply = await self._request(LogsQuery(job_id, index))
        return reply

    async def attach(self, job: JobRecord) -> JobRecord:
        """Follow a job submitted elsewhere; its finished tasks and kept outputs are replayed
        to ``job.on_event``. Raises ``JobNotFound``."""
        job_id = job.id
        self.jobs.setdefault(job_id, job)
        fut = self._attaching[job_id] = asyncio.get_running_loop().create_future()
        self._attach_requests[self._send(AttachJob(job_id))] = job_id
        try:
            return await asyncio.wait_for(fut, self.timeouts.request_s)
        except TimeoutError:
            raise PilotTimeout(f"The gateway did not answer about job {job_id}.") from None
        finally:
            self._attaching.pop(job_id, None)

    # -- receiving --------------------------------------------------------------------------

    def _receive(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = self._codec.decode(frames).msg
        except VersionMismatch as exc:
            self._refused = exc  # start() raises it instead of waiting for a welcome
            self._welcome.set()
            return
        except PilotError as exc:
            log.warning("rejected a message from the gateway: %s", exc)
            return
        self._last_heard = time.monotonic()
        try:
            self._on_message(msg)
        except Exception:
            log.exception("error handling %s", type(msg).__name__)

    def _end_turn(self) -> None:
        self._flush()

    def _on_message(self, msg: Any) -> None:
        match msg:
            case Welcome(gateway_id=gateway_id):
                if self.gateway_id and gateway_id != self.gateway_id:
                    self._gateway_restarted()
                self.gateway_id = gateway_id
                self._welcome.set()
            case Refused(reason=reason):
                self._refused = VersionMismatch(reason)
                self._welcome.set()
            case Submitted(job_ids=job_ids):
                for job_id in job_ids:
                    self._unacked.acked(job_id)
            case TaskEvents(done=done, ended=ended):
                for d in done:
                    job = self.jobs.get(d.job_id)
                    if job is not None and d.index not in job.tasks:
                        job.on_event(d)
                for update in ended:
                    self._job_update(update)
            case Outputs(outputs=outputs):
                for out in outputs:
                    job = self.jobs.get(out.job_id)
                    if job is not None:
                        job.on_event(out)
            case JobUpdate():
                self._job_update(msg)
            case (
                StatusReply()
                | JobsReply()
                | LogsReply()
                | BlobReply()
                | StatsReply()
                | DashboardLink()
            ):
                fut = self._requests.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            case ErrorReply(request_id=request_id, error=error, code=code):
                self._error(request_id, error, code)

    def _job_update(self, msg: JobUpdate) -> None:
        job = self.jobs.get(msg.job_id)
        if job is None:
            return
        job.on_event(msg)  # the record takes the spec and the state
        if msg.state.finished:
            self._unacked.acked(msg.job_id)  # its end acknowledges its submit
            if msg.spec is None:
                self._forget(msg.job_id)
        fut = self._attaching.get(msg.job_id)
        if fut is not None and not fut.done():
            fut.set_result(job)

    def _forget(self, job_id: str) -> None:
        """A finished job needs nothing more from this client (its record lives on with the
        user): drop it, and each function no job queued or unacked needs."""
        self.jobs.pop(job_id, None)
        self._unacked.drop_unused_functions()

    def _error(self, request_id: str, error: str, code: ErrorCode) -> None:
        if request_id in self._unacked:  # a refused submit (its request id is the job id)
            self._unacked.acked(request_id)
            job = self.jobs.get(request_id)
            if job is not None:
                job.on_event(JobUpdate(request_id, Status.FAILED, error))
            self._forget(request_id)
            return
        exc = error_for(code, error)
        if request_id in self._attach_requests:
            job_id = self._attach_requests.pop(request_id)
            fut = self._attaching.get(job_id)
            if fut is not None and not fut.done():
                self.jobs.pop(job_id, None)
                fut.set_exception(exc)
            return
        fut = self._requests.get(request_id)
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        else:
            log.error("gateway error: %s", error)

    def _gateway_restarted(self) -> None:
        log.warning("the gateway restarted: re-sending and re-attaching unfinished jobs")
        self._blobs_sent.clear()  # its blob store may be another one: send functions again
        self._outbox[:0] = list(self._unacked.jobs.values())
        for job in self.jobs.values():
            if not job.state.finished and job.id not in self._unacked:
                self._send(AttachJob(job.id, replay_outputs=False, known=job.tasks.known()))

    async def _heartbeat(self) -> None:
        interval = self.timeouts.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)  # the heartbeat's period, not a wait for a condition
            self._send(Heartbeat())
