"""The worker: connects out to a gateway, registers, runs what it is assigned, reports back.

``Worker`` is an async context manager. Entering starts the task processes and waits until they
are ready; ``run()`` then serves until ``stop()`` (SIGTERM) or a fatal refusal. It:

- connects a DEALER whose identity is its name (no inbound port: it can sit behind NAT), says
  ``WorkerHello`` with its resources and what it still holds, and heartbeats;
- reconnects with backoff when the gateway is silent past the deadline or refuses it with
  ``retry`` (the gateway restarted), re-announcing the attempts it holds so they are adopted;
- keeps assignments in a local queue, runs each on an idle task process when the slots it needs
  are free, forwards outputs as they come and results when they end;
- hands an idle task process several queued tasks at once when they are known to be short
  (their function's mean duration here is under ``SHORT_TASK_S``, with no timeout, one slot, no
  GPU), keeping some back for the next process to free up: each hop then carries many tasks
  per message. Only the task that was running when a process died is failed; the rest of its
  batch goes back to the queue;
- on cancel, interrupts the task (SIGINT, then SIGKILL after the grace period) or, if it is
  waiting in a task process's batch, has the process skip it (see ``worker._control``);
- on ``stop()``, hands back what it has not started, finishes what runs (up to ``stop_grace_s``),
  says goodbye and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import zmq

from gateway import Codec, Payload, WorkerSettings
from gateway._drain import Drain, send_frames
from gateway._messages import (
    Assign,
    Assignment,
    BlobReply,
    CancelTasks,
    Goodbye,
    Heartbeat,
    Output,
    Outputs,
    Refused,
    TaskAttempt,
    TaskInput,
    TaskResult,
    TaskResults,
    TasksStarted,
    Welcome,
    WorkerHello,
)
from worker._devices import cpu_count, detect_gpus, memory_bytes
from worker._pool import TaskPool
from worker._sessions import SessionHost
from worker._shipped import BlobFetcher
from worker._states import WorkerState
from worker._tasking import TaskProcesses

__all__ = ["Worker"]

log = logging.getLogger("pilot.worker")

RECONNECT_MAX_S = 5.0
FN_CACHE = 128
READY_TIMEOUT_S = 60.0
STARTED_DELAY_S = 0.005  # starts are reported with the results, or after this long


class Worker(TaskProcesses):
    """See the module docstring."""

    def __init__(self, settings: WorkerSettings, *, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.state = WorkerState.NEW
        self._ctx = zmq.Context()
        self._codec = Codec(settings.connection.key, max_message_bytes=settings.max_message_bytes)
        self._local = Codec(None, max_message_bytes=settings.max_message_bytes)
        self.cache_dir = settings.cache_dir or Path(tempfile.mkdtemp(prefix="pilot-cache-"))
        child_env = {
            **(env if env is not None else os.environ),
            "PILOT_CACHE_DIR": str(self.cache_dir),  # the task processes' shared disk cache
            "PILOT_CACHE_BYTES": str(settings.cache_bytes),
        }
        self.pool = TaskPool(self._ctx, settings.slots, on_exit=self._child_exited, env=child_env)
        self.blobs = BlobFetcher(self.cache_dir, self._send_gateway, self._blobs_arrived)
        self.sessions = SessionHost(
            self.pool.url,
            self._send_child,
            lambda outputs: self._outputs.extend(outputs),
            self._session_finished,
            settings.timeouts.cancel_grace_s,
        )
        self.gpus = detect_gpus()
        self._gw: zmq.Socket[Any] | None = None
        self._gw_drain: Drain | None = None
        self._children_drain: Drain | None = None
        self._idle = asyncio.Event()
        self._queue: deque[Assignment] = deque()
        self._holding: dict[tuple[str, int], Assignment] = {}
        self._fns: dict[str, Payload] = {}
        self._durations: dict[str, float] = {}  # fn_key -> mean task duration here (EWMA), s
        self._used_slots = 0
        self._to_gateway: list[Any] = []
        self._outputs: list[Output] = []
        self._started: list[TaskAttempt] = []
        self._started_since: float | None = None  # when the oldest unreported start was seen
        self._started_timer: asyncio.TimerHandle | None = None
        self._results: list[TaskResult] = []
        self._unsent_results: list[TaskResult] = []  # kept across reconnects
        self._last_heard = time.monotonic()
        self._hello_at = 0.0
        self._welcomed = asyncio.Event()
        self._stop = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self.gateway_id = ""

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        spawned = [self.pool.spawn() for _ in range(self.settings.slots)]
        await asyncio.gather(*spawned)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._children_drain = Drain(self.pool.sock, self._from_child, self._end_turn)
        await asyncio.wait_for(self._children_ready.wait(), READY_TIMEOUT_S)
        self._connect()
        self._group.create_task(self._heartbeat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._started_timer is not None:
            self._started_timer.cancel()
        if self._group is not None:
            await self._group.__aexit__(None, None, None)
        for drain in (self._gw_drain, self._children_drain):
            if drain is not None:
                drain.close()
        await self.sessions.close()
        await self.pool.close(self._send_child)
        if self._gw is not None:
            self._gw.close(linger=1000)
        self._ctx.term()
        self.state = WorkerState.STOPPED

    @property
    def _children_ready(self) -> asyncio.Event:
        ev = getattr(self, "_ready_ev", None)
        if ev is None:
            ev = self._ready_ev = asyncio.Event()
        return ev

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
        handed = tuple(TaskAttempt(a.job_id, a.index, a.attempt) for a in self._queue)
        for a in self._queue:
            self._holding.pop((a.job_id, a.index), None)
        self._queue.clear()
        self._send_gateway(Goodbye(handed, final=False))
        if self._used_slots:
            self._idle.clear()
            try:  # results keep arriving through the drains meanwhile
                await asyncio.wait_for(self._idle.wait(), self.settings.timeouts.stop_grace_s)
            except TimeoutError:
                log.warning("tasks still running after the stop grace period: handing back")
        left = tuple(TaskAttempt(a.job_id, a.index, a.attempt) for a in self._holding.values())
        self._flush(force=True)
        self._send_gateway(Goodbye(left, final=True))

    # -- gateway side -----------------------------------------------------------------------

    def _connect(self) -> None:
        if self._gw_drain is not None:
            self._gw_drain.close()
        if self._gw is not None:
            self._gw.close(linger=0)
        self.state = WorkerState.CONNECTING
        self._welcomed.clear()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.settings.name.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(RECONNECT_MAX_S * 1000))
        sock.connect(self.settings.connection.worker_url)
        self._gw = sock
        self._gw_drain = Drain(sock, self._from_gateway, self._end_turn)
        self._last_heard = time.monotonic()
        self._hello()

    def _hello(self) -> None:
        s = self.settings
        hello = WorkerHello(
            s.name,
            s.slots,
            cpu_count(),
            memory_bytes(),
            self.gpus,
            s.tags,
            tuple(TaskAttempt(a.job_id, a.index, a.attempt) for a in self._holding.values()),
            os.getpid(),
        )
        self._hello_at = time.monotonic()
        self._send_gateway(hello)

    def _send_gateway(self, msg: Any) -> None:
        assert self._gw is not None
        send_frames(self._gw, self._codec.encode(msg))
        if self._gw_drain is not None:
            # A send can swallow the socket's read edge (a message that arrived meanwhile
            # would then wait for a reconnect): sends from outside a turn (heartbeats,
            # hellos, blob requests) must look for it too.
            self._gw_drain.kick()

    def _from_gateway(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = self._codec.decode(frames).msg
        except Exception as exc:
            log.warning("rejected a message from the gateway: %s", exc)
            return
        self._last_heard = time.monotonic()
        self._on_gateway(msg)

    def _end_turn(self) -> None:
        self._dispatch()
        self._flush()
        for drain in (self._gw_drain, self._children_drain):
            if drain is not None:  # sending may have swallowed a read edge
                drain.kick()

    def _on_gateway(self, msg: Any) -> None:
        match msg:
            case Welcome(gateway_id=gateway_id):
                if self.state is WorkerState.CONNECTING:
                    log.info("registered with gateway %s as %s", gateway_id, self.settings.name)
                self.gateway_id = gateway_id
                self.state = WorkerState.RUNNING
                self._welcomed.set()
                if self._unsent_results:
                    self._results[:0] = self._unsent_results
                    self._unsent_results = []
            case Heartbeat():
                pass
            case Assign(tasks=tasks):
                for a in tasks:
                    if a.fn is not None:
                        self._remember_fn(a.fn_key, a.fn)
                    self._holding[(a.job_id, a.index)] = a
                    if not self.blobs.hold(a):  # its shipped files are here: it can run
                        self._queue.append(a)
            case CancelTasks(attempts=attempts):
                self._cancel(attempts)
            case TaskInput():
                self.sessions.input(msg)
            case BlobReply():
                self.blobs.arrived(msg)
            case Refused(reason=reason, retry=True):
                # Every message we sent before it knew us is refused: say hello once.
                if time.monotonic() - self._hello_at > self.settings.timeouts.heartbeat_interval_s:
                    log.info("gateway asks us to register again (%s)", reason)
                    self._hello()
            case Refused(reason=reason):
                log.error("gateway refused this worker: %s", reason)
                self._stop.set()

    def _remember_fn(self, key: str, fn: Payload) -> None:
        self._fns[key] = fn
        if len(self._fns) > FN_CACHE:
            self._fns.pop(next(iter(self._fns)))
        while len(self._durations) > FN_CACHE:
            self._durations.pop(next(iter(self._durations)))

    def _cancel(self, attempts: tuple[TaskAttempt, ...]) -> None:
        wanted = {(a.job_id, a.index, a.attempt) for a in attempts}
        kept = deque(a for a in self._queue if (a.job_id, a.index, a.attempt) not in wanted)
        for a in self._queue:
            if (a.job_id, a.index, a.attempt) in wanted:
                self._holding.pop((a.job_id, a.index), None)
        self._queue = kept
        self.sessions.cancel(wanted)
        grace = self.settings.timeouts.cancel_grace_s
        for child in list(self.pool.children.values()):
            for seq, t in child.tasks.items():
                if (t.job_id, t.index, t.attempt) in wanted and seq not in child.interrupting:
                    self.pool.interrupt(child, seq, grace)

    async def _heartbeat(self) -> None:
        t = self.settings.timeouts
        backoff = t.heartbeat_interval_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), t.heartbeat_interval_s)
            if self._stop.is_set():
                return
            silent = time.monotonic() - self._last_heard
            if silent > t.heartbeat_timeout_s + backoff:
                log.warning("gateway silent for %.1fs: reconnecting", silent)
                self._unsent_results.extend(self._results)
                self._results.clear()
                self._connect()
                backoff = min(backoff * 2, RECONNECT_MAX_S)
            else:
                if self.state is WorkerState.RUNNING:
                    backoff = t.heartbeat_interval_s
                self._send_gateway(Heartbeat(self.settings.slots - self._used_slots))

    def _flush(self, *, force: bool = False) -> None:
        """Send this turn's outputs, then starts and results (in that order).

        Starts wait for the next results, up to ``STARTED_DELAY_S``, and travel in the same
        ``TaskResults``: a short task's start and end cost the gateway one message and one
        commit, and a start reported a few milliseconds late changes nothing (its timeout, if
        it has one, runs a few milliseconds longer)."""
        if self.state is not WorkerState.RUNNING and self.state is not WorkerState.DRAINING:
            return
        if self._outputs:
            self._send_gateway(Outputs(tuple(self._outputs)))
            self._outputs.clear()
        started: tuple[TaskAttempt, ...] = ()
        if self._started:
            now = time.monotonic()
            if self._started_since is None:
                self._started_since = now
            due = self._started_since + STARTED_DELAY_S
            if self._results or force or now >= due:
                started = tuple(self._started)
                self._started.clear()
                self._started_since = None
                if self._started_timer is not None:
                    self._started_timer.cancel()
                    self._started_timer = None
            elif self._started_timer is None:
                loop = asyncio.get_running_loop()
                self._started_timer = loop.call_later(due - now, self._starts_due)
        if self._results:
            self._send_gateway(TaskResults(tuple(self._results), started))
            self._results.clear()
        elif started:
            self._send_gateway(TasksStarted(started))

    def _starts_due(self) -> None:
        self._started_timer = None
        self._end_turn()
