"""The worker's task processes: ``slots`` long-lived children behind one IPC ROUTER socket.

``TaskPool`` starts them (``python -m worker._child``), knows which is idle, sends a task to one,
interrupts one (SIGINT, then SIGKILL after a grace period), and replaces any that dies. Exits
are reported through ``on_exit(child, returncode)`` so the worker can fail the task it ran.
Owned by the worker's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from gateway._messages import Assignment, Goodbye

__all__ = ["Child", "TaskPool"]

log = logging.getLogger("pilot.worker")


@dataclass(slots=True, eq=False)
class Child:
    ident: bytes
    proc: asyncio.subprocess.Process
    ready: bool = False
    task: Assignment | None = None
    fns: set[str] = field(default_factory=set)
    interrupting: bool = False


class TaskPool:
    """See the module docstring."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        size: int,
        *,
        on_exit: Callable[[Child, int], None],
        env: dict[str, str] | None = None,
    ) -> None:
        self.size = size
        self._on_exit = on_exit
        self._env = env
        self._dir = Path(tempfile.mkdtemp(prefix="pilot-worker-"))
        os.chmod(self._dir, 0o700)  # only this user may talk to the task processes
        self.url = f"ipc://{self._dir}/tasks"
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(self.url)
        self.children: dict[bytes, Child] = {}
        self._ids = itertools.count()
        self._watchers: set[asyncio.Task[None]] = set()
        self.closing = False

    async def spawn(self) -> Child:
        ident = f"c{next(self._ids)}".encode()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker._child",
            self.url,
            ident.decode(),
            stdin=asyncio.subprocess.DEVNULL,
            env=self._env,
            start_new_session=True,  # a Ctrl-C at the terminal is the worker's to handle
        )
        child = self.children[ident] = Child(ident, proc)
        watcher = asyncio.get_running_loop().create_task(self._watch(child))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return child

    async def _watch(self, child: Child) -> None:
        code = await child.proc.wait()
        self.children.pop(child.ident, None)
        if not self.closing:
            self._on_exit(child, code)

    def idle(self) -> Child | None:
        for child in self.children.values():
            if child.ready and child.task is None:
                return child
        return None

    @property
    def all_ready(self) -> bool:
        return len(self.children) >= self.size and all(c.ready for c in self.children.values())

    def interrupt(self, child: Child, grace_s: float) -> None:
        """SIGINT now; SIGKILL after ``grace_s`` if it still runs the same task."""
        task = child.task
        child.interrupting = True
        _signal(child, signal.SIGINT)

        def kill() -> None:
            if child.task is task and child.ident in self.children:
                log.info("task process %s ignored SIGINT: killing it", child.ident.decode())
                _signal(child, signal.SIGKILL)

        asyncio.get_running_loop().call_later(grace_s, kill)

    async def close(self, send: Callable[[bytes, Any], None], grace_s: float = 2.0) -> None:
        """Ask every child to leave, kill those that don't, wait for all."""
        self.closing = True
        for child in list(self.children.values()):
            send(child.ident, Goodbye())
        procs = [c.proc for c in self.children.values()]
        if procs:
            _done, _pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=grace_s
            )
            for p in procs:
                if p.returncode is None:
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for w in list(self._watchers):
            w.cancel()
        self.sock.close(linger=0)
        for entry in self._dir.iterdir():
            entry.unlink(missing_ok=True)
        self._dir.rmdir()


def _signal(child: Child, sig: int) -> None:
    # Already gone is fine: its watcher reports the exit.
    with contextlib.suppress(ProcessLookupError):
        child.proc.send_signal(sig)
