"""The worker: connects out to a gateway, registers, runs what it is assigned, reports back.

``Worker`` is an async context manager. Entering looks for Blender (``settings.blender``...:
found, the worker registers its version and the ``blender`` tag and takes render tasks; a
Blender that was named but does not work is a ``RenderError``), then starts the task processes
and waits until they are ready; ``run()`` then serves until ``stop()`` (SIGTERM) or a fatal
refusal. It is built from
parts that each own their state and get what they use in their constructor:

- ``GatewayLink`` (``worker._link``): the DEALER socket to the gateway, signed, and hello;
- ``Reports`` (``worker._reports``): outputs, starts and results, sent at the end of a turn;
- ``BlobCache`` (``worker._blobcache``): the functions' blobs, by digest, in memory;
- ``BlobFetcher`` (``worker._fetch``): blobs asked of the gateway (functions, shipped files);
- ``TaskRunner`` (``worker._runner``): the task processes, the queue, batching, cancel;
- ``SessionHost`` (``worker._sessions``): remote sessions, each a process of its own;
- ``RankHost`` (``worker._ranks``): training ranks, each a fresh process, and their rendezvous.

The worker itself routes: what the gateway says goes to the part it concerns (``match`` on the
message type), what a process says to the runner or the session host; each turn ends with
dispatch and a flush of the reports. It also keeps the link alive: it heartbeats, and
reconnects with backoff when the gateway is silent past the deadline or refuses it with
``retry`` (the gateway restarted), re-announcing the attempts it holds so they are adopted.

On ``stop()`` it hands back what has not started, finishes what runs (up to
``stop_grace_s``), says goodbye and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from gateway.protocol import (
    Assign,
    BlobReply,
    CancelTasks,
    ConnectionInfo,
    ErrorReply,
    Goodbye,
    Heartbeat,
    InputReply,
    InterruptTask,
    Refused,
    Rendezvous,
    RunCell,
    Welcome,
    WorkerHello,
    WorkerSettings,
)
from worker._blender import BlenderError, BlenderInfo, find_blender
from worker._blobcache import BLOB_CACHE_BYTES, BlobCache
from worker._devices import cpu_count, detect_gpus, machine_load, memory_bytes
from worker._fetch import BlobFetcher
from worker._link import RECONNECT_MAX_S, GatewayLink
from worker._ranks import RankHost
from worker._render_task import BLENDER_TAG
from worker._reports import Reports
from worker._runner import TaskRunner
from worker._sessions import SessionHost
from worker._states import WorkerState

__all__ = ["Worker"]

log = logging.getLogger("pilot.worker")

READY_TIMEOUT_S = 60.0  # task processes that are not ready by then fail the start


class Worker:
    """See the module docstring. ``env`` is the task processes' environment (default: this
    process's); ``blob_cache_bytes`` bounds the functions kept in memory. ``connection``, when
    the gateway's connection is known only later (``pilot worker --connect -``), is awaited
    once the task processes have started, and replaces ``settings.connection``."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        env: dict[str, str] | None = None,
        blob_cache_bytes: int = BLOB_CACHE_BYTES,
        connection: Callable[[], Awaitable[ConnectionInfo]] | None = None,
    ) -> None:
        self.settings = settings
        self._connection_later = connection
        self.state = WorkerState.NEW
        self.gateway_id = ""
        self.gpus = detect_gpus()
        self._beat_at = 0.0  # when our last heartbeat left (0: answered)
        self._rtt_s = -1.0  # its round trip, reported with the next
        self.cache_dir = settings.cache_dir or Path(tempfile.mkdtemp(prefix="pilot-cache-"))
        self.blender: BlenderInfo | None = None  # found on entering
        # Completed on entering with the Blender found, before the first task process starts.
        self._child_env = child_env = {
            **(env if env is not None else os.environ),
            "PILOT_CACHE_DIR": str(self.cache_dir),  # the task processes' shared disk cache
            "PILOT_CACHE_BYTES": str(settings.cache_bytes),
        }
        self._ctx = zmq.Context()
        self.link = GatewayLink(
            self._ctx,
            settings,
            hello=self._hello,
            on_message=self._on_gateway,
            end_turn=self._end_turn,
        )
        self.reports = Reports(self.link.send, wake=self._end_turn)
        self.blobs = BlobCache(blob_cache_bytes)
        self.fetcher = BlobFetcher(self.link.send, self.blobs, self.cache_dir)
        self.tasks = TaskRunner(
            self._ctx,
            settings,
            env=child_env,
            files_dir=self.cache_dir,
            reports=self.reports,
            fetcher=self.fetcher,
            forward=self.link.send,
            start_session=self._start_session,
            start_rank=self._start_rank,
            spawn=self._spawn,
            wake=self._end_turn,
        )
        self.sessions = SessionHost(
            self.tasks.pool.url,
            self.tasks.pool.send,
            self.reports.outputs,
            self.tasks.session_ended,
            settings.timeouts.cancel_grace_s,
        )
        self.ranks = RankHost(
            settings,
            env=child_env,
            work_dir=self.cache_dir,
            gpus=[g.index for g in self.gpus],
            outputs=self.reports.outputs,
            fetcher=self.fetcher,
            forward=self.link.send,
            ended=self.tasks.rank_ended,
            wake=self._end_turn,
        )
        self._welcomed = asyncio.Event()
        self._stop = asyncio.Event()
        self._closing = False
        self._left = False  # the final goodbye is sent: the gateway must not take us back
        self._group: asyncio.TaskGroup | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        try:
            self.blender = await asyncio.to_thread(self._find_blender)  # Blender starts: seconds
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if self.blender is not None:
            self._child_env["PILOT_BLENDER_PATH"] = self.blender.path
            self._child_env["PILOT_BLENDER_VERSION"] = self.blender.version
        await self.tasks.start()
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        try:
            self.tasks.pool.listen(self._from_process, self._end_turn)
            await asyncio.wait_for(self.tasks.ready.wait(), READY_TIMEOUT_S)
            if self._connection_later is not None:
                self._use(await self._connection_later())
            self._connect()
            self._group.create_task(self._heartbeat())
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        self.reports.close()
        self.fetcher.close()
        if self._group is not None:
            await self._group.__aexit__(None, None, None)
        self._closing = True  # what the processes still say is not reported any more
        await self.ranks.close()
        await self.sessions.close()
        await self.tasks.close()
        self.link.close(linger=1000)  # the goodbye still queued leaves
        self._ctx.term()
        self.state = WorkerState.STOPPED

    async def wait_welcomed(self, timeout: float) -> None:
        await asyncio.wait_for(self._welcomed.wait(), timeout)

    async def run(self) -> None:
        """Serve until ``stop()``; then drain and say goodbye."""
        await self._stop.wait()
        await self._drain()

    def stop(self) -> None:
        """Stop taking tasks, finish or hand back what runs, leave (the SIGTERM handler)."""
        self._stop.set()

    async def _drain(self) -> None:
        self.state = WorkerState.DRAINING
        self.link.send(Goodbye(self.tasks.hand_back(), final=False))
        # results keep arriving through the sockets' turns meanwhile
        if not await self.tasks.wait_idle(self.settings.timeouts.stop_grace_s):
            log.warning("tasks still running after the stop grace period: handing back")
        left = self.tasks.held()
        if self.state is WorkerState.DRAINING:  # not reconnecting
            self.reports.flush(force=True)
        self.link.send(Goodbye(left, final=True))
        self._left = True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the worker's task group (so it is awaited on exit)."""
        if self._group is None or self._closing:
            coro.close()
            return
        self._group.create_task(coro)

    # -- the gateway ------------------------------------------------------------------------

    def _use(self, connection: ConnectionInfo) -> None:
        self.settings = replace(self.settings, connection=connection)  # checks the keys again
        self.link.use(self.settings)
        self.ranks.use(self.settings)

    def _connect(self) -> None:
        self.state = WorkerState.CONNECTING
        self._welcomed.clear()
        self.link.connect()

    def _hello(self) -> WorkerHello:
        s = self.settings
        tags = s.tags
        if self.blender is not None and BLENDER_TAG not in tags:
            tags = (*tags, BLENDER_TAG)  # render jobs ask for it
        return WorkerHello(
            s.name,
            s.slots,
            s.cores or cpu_count(),
            memory_bytes(),
            self.gpus,
            tags,
            self.tasks.held(),
            os.getpid(),
            blender=self.blender.version if self.blender is not None else "",
            host=socket.gethostname(),
            slurm_job_id=s.slurm_job_id,
        )

    def _find_blender(self) -> BlenderInfo | None:
        """The Blender to render with, probed; None without one. Raises ``BlenderError``
        for one named by --blender or $PILOT_BLENDER that does not work."""
        s = self.settings
        if not s.use_blender:
            log.info("rendering is off on this worker (--no-blender)")
            return None
        try:
            found = find_blender(s.blender or None, s.blender_env or None)
        except BlenderError as exc:
            if s.blender or s.blender_env:
                raise
            log.info("no Blender here: this worker takes no render jobs (%s)", exc)
            return None
        log.info("rendering with Blender %s at %s", found.version, found.path)
        return found

    def _on_gateway(self, msg: Any) -> None:
        match msg:
            case Welcome(gateway_id=gateway_id, policy=policy):
                if self.state is WorkerState.CONNECTING:
                    log.info("registered with gateway %s as %s", gateway_id, self.settings.name)
                self.gateway_id = gateway_id
                if policy is not None:
                    self.tasks.policy = self.reports.policy = policy
                draining = self.tasks.draining
                self.state = WorkerState.DRAINING if draining else WorkerState.RUNNING
                self._welcomed.set()
                self.fetcher.resend()  # a gateway that restarted never saw them
            case Heartbeat():  # the answer to ours: its round trip goes in the next one
                if self._beat_at:
                    self._rtt_s, self._beat_at = time.monotonic() - self._beat_at, 0.0
            case Assign(tasks=tasks):
                for a in tasks:
                    self.tasks.assign(a)
            case CancelTasks(attempts=attempts):
                wanted = {(a.job_id, a.index, a.attempt) for a in attempts}
                self.tasks.cancel(wanted)
                self.sessions.cancel(wanted)
                self.ranks.cancel(wanted)
            case Rendezvous():
                self.ranks.rendezvous(msg)
            case RunCell() | InputReply() | InterruptTask():
                self.sessions.relay(msg)
            case BlobReply():
                self.fetcher.arrived(msg)
            case Refused(reason=reason, retry=True):
                # Every message we sent before it knew us is refused: say hello once. Not
                # after leaving: what a stopping rank still reports must not re-register us.
                if self._left:
                    log.debug("refused after leaving (%s): not registering again", reason)
                elif self.link.since_hello_s > self.settings.timeouts.heartbeat_interval_s:
                    log.info("gateway asks us to register again (%s)", reason)
                    self.link.say_hello()
            case Refused(reason=reason):
                log.error("gateway refused this worker: %s", reason)
                self._stop.set()
            case ErrorReply(error=error, code=code):
                log.error(
                    "the gateway could not handle a message of ours (%s): %s", code.name, error
                )
            case _:
                log.warning("unexpected message from the gateway: %s", type(msg).__name__)

    def _from_process(self, ident: bytes, msg: Any) -> None:
        if self.sessions.owns(ident):
            self.sessions.on_message(ident, msg)
        else:
            self.tasks.on_message(ident, msg)

    def _start_session(self, task: Any) -> None:
        self._spawn(self.sessions.start(task))

    def _start_rank(self, task: Any) -> None:
        self.ranks.start(task)

    def _end_turn(self) -> None:
        if self._closing:
            return
        self.tasks.dispatch()
        if self.state is WorkerState.RUNNING or self.state is WorkerState.DRAINING:
            self.reports.flush()
        # sending may have swallowed a read edge
        self.link.kick()
        self.tasks.pool.kick()

    async def _heartbeat(self) -> None:
        t = self.settings.timeouts
        backoff = t.heartbeat_interval_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), t.heartbeat_interval_s)
            if self._stop.is_set():
                return
            silent = self.link.silent_s
            if silent > t.heartbeat_timeout_s + backoff:
                log.warning("gateway silent for %.1fs: reconnecting", silent)
                self._connect()
                backoff = min(backoff * 2, RECONNECT_MAX_S)
            else:
                if self.state is WorkerState.RUNNING:
                    backoff = t.heartbeat_interval_s
                cpu, memory = machine_load()
                self._beat_at = time.monotonic()
                self.link.send(Heartbeat(self.tasks.free_slots, cpu, memory, self._rtt_s))
