"""The worker's remote sessions: ``SessionHost`` starts and tends session processes.

An assignment of kind ``JobKind.SESSION`` does not go to the task pool: it gets a process of
its own (``worker._session``) that lives as long as the session, connected to the worker's IPC
socket like a task process. The host relays the client's messages to it by type (``RunCell``
and ``InputReply`` to its inbox; ``InterruptTask`` becomes SIGINT), passes its outputs and final
result on, ends it on cancel (goodbye, then SIGKILL after the grace period), and reports a
session whose process died as crashed. Owned by the worker's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.protocol import (
    Assign,
    Assignment,
    Goodbye,
    Heartbeat,
    InputReply,
    InterruptTask,
    Outputs,
    RunCell,
    TaskResult,
    TaskResults,
    TaskStatus,
)
from worker._orphan import parent

__all__ = ["SessionHost"]

log = logging.getLogger("pilot.worker")


@dataclass(slots=True, eq=False)
class _Session:
    ident: bytes
    task: Assignment
    proc: asyncio.subprocess.Process
    heard: frozenset[bytes] = frozenset()  # which of its two sockets said hello
    started: bool = False
    done: bool = False


class SessionHost:
    """See the module docstring. ``send(ident, msg)`` reaches a session process;
    ``outputs(list)`` and ``finished(task, result)`` report to the gateway."""

    def __init__(
        self,
        url: str,
        send: Callable[[bytes, Any], None],
        outputs: Callable[[list[Any]], None],
        finished: Callable[[Assignment, TaskResult], None],
        grace_s: float,
    ) -> None:
        self._url = url
        self._send = send
        self._outputs = outputs
        self._finished = finished
        self._grace_s = grace_s
        self._ids = itertools.count()
        self._by_ident: dict[bytes, _Session] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def owns(self, ident: bytes) -> bool:
        return ident in self._by_ident

    async def start(self, task: Assignment) -> None:
        ident = f"s{next(self._ids)}".encode()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker._session",
            self._url,
            ident.decode(),
            stdin=asyncio.subprocess.DEVNULL,
            env=parent(dict(os.environ)),
            start_new_session=True,
        )
        session = _Session(ident, task, proc)
        self._by_ident[ident] = session
        self._by_ident[ident + b":in"] = session
        watcher = asyncio.get_running_loop().create_task(self._watch(session))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    def on_message(self, ident: bytes, msg: Any) -> None:
        session = self._by_ident[ident]
        match msg:
            case Heartbeat() if not session.started:
                # Both of its sockets must be known to our ROUTER before we talk to its inbox.
                session.heard = session.heard | {ident}
                if len(session.heard) == 2:
                    session.started = True
                    self._send(session.ident + b":in", Assign((session.task,)))
            case Outputs(outputs=outputs):
                self._outputs(list(outputs))
            case TaskResults(results=results):
                for r in results:
                    self._end(session, r)

    def relay(self, msg: RunCell | InputReply | InterruptTask) -> None:
        """A message from the session's client, for the session running task ``msg.index``
        of job ``msg.job_id`` (dropped if none runs here: the client learns of its end)."""
        for session in self._sessions():
            if (session.task.job_id, session.task.index) != (msg.job_id, msg.index):
                continue
            match msg:
                case InterruptTask():  # the running cell only; the session lives on
                    with contextlib.suppress(ProcessLookupError):
                        session.proc.send_signal(signal.SIGINT)
                case RunCell() | InputReply():
                    self._send(session.ident + b":in", msg)

    def cancel(self, attempts: set[tuple[str, int, int]]) -> None:
        for session in self._sessions():
            t = session.task
            if (t.job_id, t.index, t.attempt) in attempts:
                self._stop(session)

    def _sessions(self) -> list[_Session]:
        return list({id(s): s for s in self._by_ident.values()}.values())

    def _stop(self, session: _Session) -> None:
        self._send(session.ident + b":in", Goodbye())

        def kill() -> None:
            if session.proc.returncode is None:
                log.info("session %s did not leave: killing it", session.ident.decode())
                with contextlib.suppress(ProcessLookupError):
                    session.proc.kill()

        asyncio.get_running_loop().call_later(self._grace_s, kill)

    def _end(self, session: _Session, result: TaskResult) -> None:
        if not session.done:
            session.done = True
            self._finished(session.task, result)

    async def _watch(self, session: _Session) -> None:
        code = await session.proc.wait()
        self._by_ident.pop(session.ident, None)
        self._by_ident.pop(session.ident + b":in", None)
        t = session.task
        text = f"The remote session's process ended (exit code {code})."
        self._end(session, TaskResult(t.job_id, t.index, t.attempt, TaskStatus.CRASHED, None, text))

    async def close(self) -> None:
        for session in self._sessions():
            self._stop(session)
        procs = [s.proc for s in self._sessions()]
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=5)
        for p in procs:
            if p.returncode is None:
                p.kill()
        for w in list(self._watchers):
            w.cancel()
