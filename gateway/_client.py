"""The async client: one DEALER socket to a gateway, used by the sync facade, the magic and the
CLI. Lives on one asyncio loop (the sync facade's IO thread).

It submits jobs (many per message when they come in bursts), follows their events, and survives
a gateway restart: it notices the new ``gateway_id`` in the heartbeat answer, re-sends submits
that were never acknowledged, and re-attaches every unfinished job, whose replay fills in what
it missed. Each job's events go to the ``JobState.listener`` the caller set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from gateway._drain import Drain, send_frames
from gateway._errors import JobNotFound, NoGateway, PilotError, PilotTimeout, VersionMismatch
from gateway._messages import (
    AttachJob,
    BlobReply,
    CancelJob,
    ClientHello,
    ErrorReply,
    GetBlob,
    Goodbye,
    Heartbeat,
    JobSpec,
    JobsQuery,
    JobsReply,
    JobUpdate,
    LogsQuery,
    LogsReply,
    Outputs,
    Payload,
    PutBlob,
    Refused,
    Status,
    StatusQuery,
    StatusReply,
    Submit,
    Submitted,
    TaskDone,
    TaskEvents,
    TaskInput,
    Welcome,
)
from gateway._settings import ConnectionInfo, Timeouts
from gateway._wire import Codec

__all__ = ["AsyncClient", "JobState"]

log = logging.getLogger("pilot.client")


@dataclass(slots=True, eq=False)
class JobState:
    """What the client knows of one job. Mutated on the client's loop only."""

    job_id: str
    spec: JobSpec | None = None
    state: Status = Status.QUEUED
    error: str = ""
    done: dict[int, TaskDone] = field(default_factory=dict)
    listener: Callable[[Any], None] | None = None  # gets TaskDone, Output and JobUpdate

    @property
    def finished(self) -> bool:
        return self.state.finished


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
        self.jobs: dict[str, JobState] = {}
        self._unacked: dict[str, tuple[JobSpec, tuple[Payload, ...]]] = {}
        self._fn_sent: dict[str, Payload] = {}
        self._outbox: list[tuple[JobSpec, tuple[Payload, ...]]] = []
        self._requests: dict[str, asyncio.Future[Any]] = {}
        self._attaching: dict[str, asyncio.Future[JobState]] = {}
        self._attach_requests: dict[str, str] = {}  # AttachJob msg_id -> job id
        self.gateway_id = ""
        self._welcome = asyncio.Event()
        self._last_heard = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> AsyncClient:
        """Connect and wait for the gateway's welcome. Raises ``NoGateway`` after
        ``timeouts.request_s`` without one."""
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.connect(self.connection.client_url)
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
                "address and that its key matches."
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
        send_frames(self._sock, self._codec.encode(msg))
        if self._drain is not None:
            self._drain.kick()
        return self._codec.last_msg_id

    def submit_nowait(self, spec: JobSpec, args: tuple[Payload, ...]) -> JobState:
        """Queue a job; it leaves with the other jobs queued in this loop turn."""
        job = self.jobs[spec.job_id] = JobState(spec.job_id, spec)
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((spec, args))
        return job

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        fresh = not any(spec.job_id in self._unacked for spec, _ in batch)  # none re-sent
        specs = []
        for spec, args in batch:
            self._unacked[spec.job_id] = (spec, args)
            specs.append(self._with_fn(spec))
        self._send(Submit(tuple(specs), tuple(args for _, args in batch), fresh))

    def _with_fn(self, spec: JobSpec) -> JobSpec:
        """Carry the function only the first time the gateway sees its key."""
        if spec.fn is None:
            return spec
        if spec.fn_key in self._fn_sent:
            return JobSpec(
                spec.job_id,
                spec.name,
                spec.fn_key,
                None,
                spec.n_tasks,
                spec.resources,
                spec.timeout_s,
                spec.retries,
                spec.meta,
            )
        self._fn_sent[spec.fn_key] = spec.fn
        return spec

    def send_input(self, job_id: str, index: int, kind: str, data: Any = None) -> None:
        """Something for a running task (a remote session's cell, an input() reply, an
        interrupt); fire and forget."""
        self._flush()
        self._send(TaskInput(job_id, index, kind, data))

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

    async def attach(self, job_id: str, listener: Callable[[Any], None] | None = None) -> JobState:
        """Follow a job submitted elsewhere; its finished tasks and kept outputs are replayed
        to ``listener``. Raises ``JobNotFound``."""
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobState(job_id, listener=listener)
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
                    self._unacked.pop(job_id, None)
            case TaskEvents(done=done, ended=ended):
                for d in done:
                    job = self.jobs.get(d.job_id)
                    if job is not None and d.index not in job.done:
                        job.done[d.index] = d
                        if job.listener:
                            job.listener(d)
                for update in ended:
                    self._job_update(update)
            case Outputs(outputs=outputs):
                for out in outputs:
                    job = self.jobs.get(out.job_id)
                    if job is not None and job.listener:
                        job.listener(out)
            case JobUpdate():
                self._job_update(msg)
            case StatusReply() | JobsReply() | LogsReply() | BlobReply():
                fut = self._requests.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            case ErrorReply(request_id=request_id, error=error, kind=kind):
                self._error(request_id, error, kind)

    def _job_update(self, msg: JobUpdate) -> None:
        job = self.jobs.get(msg.job_id)
        if job is None:
            return
        if msg.spec is not None:
            job.spec = msg.spec
        job.state, job.error = Status(msg.state), msg.error
        if job.state.finished:
            self._unacked.pop(msg.job_id, None)  # its end acknowledges its submit
        fut = self._attaching.get(msg.job_id)
        if fut is not None and not fut.done():
            fut.set_result(job)
        if job.listener:
            job.listener(msg)

    def _error(self, request_id: str, error: str, kind: str) -> None:
        if kind == "UnknownFunction":  # the gateway lost a function: send it again
            self._fn_sent.clear()
            job_id = request_id
            if job_id in self._unacked:
                self._outbox.append(self._unacked.pop(job_id))
            return
        if kind == "JobNotFound" and request_id in self._attach_requests:
            job_id = self._attach_requests.pop(request_id)
            fut = self._attaching.get(job_id)
            if fut is not None and not fut.done():
                self.jobs.pop(job_id, None)
                fut.set_exception(JobNotFound(error))
            return
        if kind == "JobNotFound":
            fut = self._requests.get(request_id)
            if fut is not None and not fut.done():
                fut.set_exception(JobNotFound(error))
            return
        fut = self._requests.get(request_id)
        if fut is not None and not fut.done():
            fut.set_exception(PilotError(error))
        else:
            log.error("gateway error: %s", error)

    def _gateway_restarted(self) -> None:
        log.warning("the gateway restarted: re-sending and re-attaching unfinished jobs")
        self._fn_sent.clear()
        self._outbox[:0] = list(self._unacked.values())
        for job in self.jobs.values():
            if not job.finished and job.job_id not in self._unacked:
                self._send(AttachJob(job.job_id, replay_outputs=False))

    async def _heartbeat(self) -> None:
        interval = self.timeouts.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)  # the heartbeat's period, not a wait for a condition
            self._send(Heartbeat())
