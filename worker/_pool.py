"""The worker's task processes: ``slots`` long-lived children behind one IPC ROUTER socket.

``TaskPool`` owns the socket and its unsigned codec (the socket lives in a 0700 directory: only
this user can reach it). It starts the processes (``python -m worker._child``), knows which are
idle, interrupts a task (SIGINT, then SIGKILL after a grace period) and reports a process's exit
through ``on_exit(child, returncode)``, so the owner can fail the task that ran and start
another. ``listen(on_message, end_turn)`` starts reading: each message, decoded, goes to
``on_message(ident, msg)`` (remote sessions share the socket, under identities of their own).
Owned by the worker's event loop.

A ``Child`` holds the batch of tasks it was handed, by sequence number (see ``worker._control``:
the page it shares with its process says which of them runs and which are cancelled).
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

from gateway.protocol import Assignment, Codec, Drain, Goodbye, send_frames
from worker._control import Control
from worker._orphan import parent

__all__ = ["Child", "TaskPool"]

log = logging.getLogger("pilot.worker")


@dataclass(slots=True, eq=False)
class Child:
    ident: bytes
    proc: asyncio.subprocess.Process
    control: Control
    ready: bool = False
    tasks: dict[int, Assignment] = field(default_factory=dict)  # seq -> task, in sent order
    sent: int = 0  # tasks sent to this process so far: the last sequence number used
    slots: int = 0  # slots held by its tasks
    interrupting: set[int] = field(default_factory=set)  # seqs cancelled while out

    def take(self, batch: list[Assignment]) -> None:
        """Record ``batch`` as handed to this process (the caller sends it)."""
        for a in batch:
            self.sent += 1
            self.control.clear(self.sent)
            self.tasks[self.sent] = a
        self.slots = max(a.cpus for a in batch)

    def seq_of(self, job_id: str, index: int, attempt: int) -> int | None:
        for seq, t in self.tasks.items():
            if t.job_id == job_id and t.index == index and t.attempt == attempt:
                return seq
        return None


class TaskPool:
    """See the module docstring."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        size: int,
        *,
        on_exit: Callable[[Child, int], None],
        env: dict[str, str] | None = None,
        max_message_bytes: int = 1 << 30,
    ) -> None:
        self.size = size
        self._on_exit = on_exit
        # The task processes learn the size limit here: a result over it fails its task there.
        # The worker's dict itself, not a copy: the worker completes it on entering (the
        # Blender it found) after this pool is made and before the first process starts.
        self._env = env if env is not None else dict(os.environ)
        self._env["PILOT_MAX_MESSAGE_BYTES"] = str(max_message_bytes)
        self._codec = Codec(None, max_message_bytes=max_message_bytes)
        self._drain: Drain | None = None
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

    def listen(
        self, on_message: Callable[[bytes, Any], None], end_turn: Callable[[], None]
    ) -> None:
        """Start reading the socket (on the running loop)."""

        def received(frames: list[zmq.Frame]) -> None:
            ident, *rest = frames
            on_message(ident.bytes, self._codec.decode(rest).msg)

        self._drain = Drain(self.sock, received, end_turn)

    def send(self, ident: bytes, msg: Any) -> None:
        """Send ``msg`` to the process (or session) ``ident``; dropped if it is gone."""
        send_frames(self.sock, [ident, *self._codec.encode(msg)])
        self.kick()  # sessions send outside turns: a send may swallow the read edge

    def kick(self) -> None:
        if self._drain is not None:
            self._drain.kick()

    async def spawn(self) -> Child:
        ident = f"c{next(self._ids)}".encode()
        control = Control(self._dir / f"{ident.decode()}.control", create=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker._child",
                self.url,
                ident.decode(),
                str(control.path),
                stdin=asyncio.subprocess.DEVNULL,
                env=parent(self._env),
                start_new_session=True,  # a Ctrl-C at the terminal is the worker's to handle
            )
        except BaseException:
            control.close()
            raise
        child = self.children[ident] = Child(ident, proc, control)
        watcher = asyncio.get_running_loop().create_task(self._watch(child))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return child

    async def _watch(self, child: Child) -> None:
        code = await child.proc.wait()
        self.children.pop(child.ident, None)
        try:
            if not self.closing:
                self._on_exit(child, code)
        finally:
            child.control.close()

    def idle(self) -> Child | None:
        for child in self.children.values():
            if child.ready and not child.tasks:
                return child
        return None

    def idle_count(self) -> int:
        return sum(1 for c in self.children.values() if c.ready and not c.tasks)

    @property
    def all_ready(self) -> bool:
        return len(self.children) >= self.size and all(c.ready for c in self.children.values())

    def interrupt(self, child: Child, seqs: list[int], grace_s: float) -> None:
        """Cancel tasks ``seqs`` of ``child``: flag them all, then one SIGINT. A task that has
        not started is skipped; a running one is interrupted (the process ignores the signal
        unless the task it runs is flagged, so it is safe to send whatever runs). Every flag
        is set before the signal: an interrupted task's batch-mates must not start unflagged.
        SIGKILL after ``grace_s`` if one of them still runs."""
        if not seqs:
            return
        for seq in seqs:
            child.interrupting.add(seq)
            child.control.cancel(seq)
        _signal(child, signal.SIGINT)
        cancelled = frozenset(seqs)

        def kill() -> None:
            if child.ident in self.children and child.control.running in cancelled:
                log.info("task process %s ignored SIGINT: killing it", child.ident.decode())
                _signal(child, signal.SIGKILL)

        asyncio.get_running_loop().call_later(grace_s, kill)

    async def close(self, grace_s: float = 2.0) -> None:
        """Ask every child to leave, kill those that don't, wait for all; close the socket."""
        self.closing = True
        for child in list(self.children.values()):
            self.send(child.ident, Goodbye())
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
        for child in self.children.values():
            child.control.close()
        if self._drain is not None:
            self._drain.close()
        self.sock.close(linger=0)
        for entry in self._dir.iterdir():
            entry.unlink(missing_ok=True)
        self._dir.rmdir()


def _signal(child: Child, sig: int) -> None:
    # Already gone is fine: its watcher reports the exit.
    with contextlib.suppress(ProcessLookupError):
        child.proc.send_signal(sig)
