"""Capturing what a task prints and displays, labelled with the task and item that made it.

Two paths, because both kinds of output exist:

- Python-level writes (``print``, ``sys.stderr.write``, ``display()``) go to in-process streams
  that record the *current* label exactly, with no system call per item;
- file-descriptor-level writes (C extensions, ``os.write``, subprocesses) go to pipes that
  replace fds 1 and 2; a reader thread tags them with the label current when it reads them.

A line (or a display) leaves at once when nothing was sent in the last ``FLUSH_S``; what is
written within ``FLUSH_S`` of a send, or a line not ended yet, waits for the flusher thread,
which sends it when due (at most ``FLUSH_S`` later; at once past ``FLUSH_BYTES``). So a line
printed now and then reaches the client in a millisecond or two, a line is not sent in halves,
and a task that prints in a tight loop costs its worker, gateway and client at most one
message per ``FLUSH_S``. A write wakes the flusher through a pipe of its own. ``drain()`` sends
everything written so far, in order.

Results go through here too, so that a task's outputs always leave before its result: ``hold``
queues a result behind the outputs read so far and sends both at the end of a batch; results
held for ``RESULT_HOLD_S`` are sent by the flusher thread (within ``IDLE_S``), so a long task
does not keep back the results of the short ones before it in the same batch.
Owned by the task process; ``emit`` and ``emit_results`` are called with the lock held, from
either thread.

A task's output has a budget (``budget_bytes``, 0: none; a task process uses
``OUTPUT_BUDGET_BYTES`` or ``$PILOT_OUTPUT_BUDGET_BYTES``): what a task prints past it is read
and dropped here, where it costs least (it never reaches the worker, the gateway or the
client), and its end shows ``[output truncated: N bytes dropped]`` on stderr, just before its
result. A task that prints a gigabyte costs its worker, gateway and client the budget, not
the gigabyte, and loses no result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.protocol import Output, OutputKind

__all__ = ["Capture"]

FLUSH_S = 0.01
RESULT_HOLD_S = 0.002  # results of a batch finishing within this of each other travel together
# The flusher's longest sleep: held results (a long task behind short ones in a batch) leave
# within it. A result does not wake the flusher (``hold``): in a burst, waking it per batch
# cost more than it saved; the batch's end sends them.
IDLE_S = 0.05
FLUSH_BYTES = 64 * 1024
_READ_BYTES = 64 * 1024
_STREAMS = (OutputKind.STDOUT, OutputKind.STDERR)  # consecutive writes merge into one Output
OUTPUT_BUDGET_BYTES = 16 << 20  # per task, in a task process (see the module docstring)


class _Stream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` inside a task: appends to the capture's pending list."""

    def __init__(self, capture: Capture, kind: OutputKind, fileno: int) -> None:
        self._capture = capture
        self._kind = kind
        self._fileno = fileno

    def write(self, s: str) -> int:
        if s:
            self._capture.add(self._kind, s.encode("utf-8", "replace"))
        return len(s)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fileno

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


class Capture:
    """See the module docstring. ``emit(outputs)`` sends a list of ``Output``s."""

    def __init__(
        self,
        emit: Callable[[list[Output]], None],
        emit_results: Callable[[list[Any]], None] | None = None,
        *,
        budget_bytes: int = 0,
    ) -> None:
        self._emit = emit
        self._emit_results = emit_results
        self.lock = threading.Lock()
        self._pending: list[tuple[tuple[str, int, int], OutputKind, Any, dict[str, Any]]] = []
        self._pending_bytes = 0
        self._results: list[Any] = []
        self._held_since: float | None = None  # monotonic time of the oldest held result
        self.label: tuple[str, int, int] = ("", -1, -1)
        self._stop = threading.Event()
        self._sent_at = 0.0  # monotonic time of the last send of outputs
        self._pending_since: float | None = None  # ...and of the oldest output not sent
        self._wake_r, self._wake_w = os.pipe()  # wakes the flusher: something waits to be sent
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._pipes: dict[int, OutputKind] = {}
        self._fds: list[int] = []
        self._thread: threading.Thread | None = None
        self._budget = budget_bytes
        self._budget_key: tuple[str, int] | None = None  # the task whose bytes are counted
        self._spent = 0  # its bytes let through
        self._dropped = 0  # its bytes dropped

    def start(self) -> None:
        """Redirect fds 1 and 2 and ``sys.stdout``/``sys.stderr``; start the flusher."""
        for fd, kind in ((1, OutputKind.STDOUT), (2, OutputKind.STDERR)):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
            self._pipes[r] = kind
        self._fds = list(self._pipes)
        sys.stdout = _Stream(self, OutputKind.STDOUT, 1)
        sys.stderr = _Stream(self, OutputKind.STDERR, 2)
        self._thread = threading.Thread(target=self._run, name="pilot-capture", daemon=True)
        self._thread.start()

    def add(self, kind: OutputKind, data: Any, extra: dict[str, Any] | None = None) -> None:
        """Record output under the current label (any thread)."""
        with self.lock:
            if self._budget and kind in _STREAMS:
                data = self._within_budget_locked(data)
                if not data:
                    return
            first = not self._pending
            self._pending.append((self.label, kind, data, extra or {}))
            self._pending_bytes += len(data) if isinstance(data, bytes) else 1024
            if self._due_locked():
                self._send_locked()
            elif first or kind not in _STREAMS or data.endswith(b"\n"):
                self._wake()  # the flusher sends it when due

    def drain(self) -> None:
        """Send every output written so far."""
        with self.lock:
            self._read_pipes_locked()
            self._send_locked()

    def send(self, output: Output) -> None:
        """Send ``output`` now, after every output written before it (any thread): news that
        must not wait for the next flush, such as a rendered frame for the live preview."""
        with self.lock:
            self._read_pipes_locked()
            self._send_locked()
            self._emit([output])

    def hold(self, result: Any, *, last: bool) -> None:
        """Queue a task's result behind the outputs written so far (read now, under the
        current label). With ``last`` (the batch ends), or once results have waited
        ``RESULT_HOLD_S``, send the outputs and then every held result."""
        with self.lock:
            self._read_pipes_locked()
            self._truncated_locked()
            self._budget_key = None  # the next task has a budget of its own
            self._results.append(result)
            now = time.monotonic()
            if self._held_since is None:
                self._held_since = now  # the flusher looks at least every IDLE_S
            if last or now - self._held_since >= RESULT_HOLD_S:
                self._send_locked()
                self._send_results_locked()

    def _due_at_locked(self) -> float:
        """When the pending outputs are due: ``FLUSH_S`` after the first of them, or, once the
        last one ends a line (or is not text), ``FLUSH_S`` after the last send. A line is not
        sent in halves (``print`` writes its text, then the newline)."""
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        if self._pending_bytes >= FLUSH_BYTES:
            return 0.0
        _, kind, data, _ = self._pending[-1]
        whole = kind not in _STREAMS or data.endswith(b"\n")
        return min(self._pending_since, self._sent_at if whole else math.inf) + FLUSH_S

    def _due_locked(self) -> bool:
        return bool(self._pending) and time.monotonic() >= self._due_at_locked()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: wake-ups enough are waiting
            os.write(self._wake_w, b"w")

    def _timeout_locked(self) -> float | None:
        """How long the flusher may sleep: until the pending outputs or the held results are
        due, or ``IDLE_S``."""
        now = time.monotonic()
        due = []
        if self._pending:
            due.append(self._due_at_locked() - now)
        if self._held_since is not None:
            due.append(self._held_since + RESULT_HOLD_S - now)
        return max(0.0, min(due)) if due else IDLE_S

    def _run(self) -> None:
        fds = [*self._fds, self._wake_r]
        while not self._stop.is_set():
            with self.lock:
                timeout = self._timeout_locked()
            readable, _, _ = select.select(fds, [], [], timeout)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            with self.lock:
                if readable:
                    self._read_pipes_locked()
                if self._due_locked():
                    self._send_locked()
                held = self._held_since
                if held is not None and time.monotonic() - held >= RESULT_HOLD_S:
                    self._send_results_locked()

    def _send_results_locked(self) -> None:
        if self._results and self._emit_results is not None:
            results, self._results = self._results, []
            self._held_since = None
            self._emit_results(results)

    def _read_pipes_locked(self) -> None:
        if not self._fds:
            return
        ready, _, _ = select.select(self._fds, [], [], 0)  # one call, not a read per pipe
        for r in ready:
            kind = self._pipes[r]
            while True:
                try:
                    chunk = os.read(r, _READ_BYTES)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                if self._budget:
                    chunk = self._within_budget_locked(chunk)
                    if not chunk:
                        continue  # dropped: read on, the pipe must not fill up
                self._pending.append((self.label, kind, chunk, {}))
                if len(chunk) < _READ_BYTES:
                    break

    def _within_budget_locked(self, data: bytes) -> bytes:
        """What of ``data`` the current task's budget still lets through; the rest is counted
        as dropped."""
        key = (self.label[0], self.label[1])
        if key != self._budget_key:  # another task speaks now (fd writes are read late)
            self._truncated_locked()
            self._budget_key, self._spent = key, 0
        room = self._budget - self._spent
        if len(data) <= room:
            self._spent += len(data)
            return data
        kept = data[: max(room, 0)]
        self._spent += len(kept)
        self._dropped += len(data) - len(kept)
        return kept

    def _truncated_locked(self) -> None:
        """The marker of the counted task's dropped output, if it dropped any."""
        if self._dropped and self._budget_key is not None:
            job_id, index = self._budget_key
            text = f"\n[output truncated: {self._dropped} bytes dropped]\n".encode()
            self._pending.append(((job_id, index, -1), OutputKind.STDERR, text, {}))
            self._dropped = 0

    def _send_locked(self) -> None:
        if not self._pending:
            return
        outputs: list[Output] = []
        for label, kind, data, extra in self._pending:
            last = outputs[-1] if outputs else None
            if (
                last is not None
                and kind in _STREAMS
                and last.kind == kind
                and (last.job_id, last.index, last.item) == label
            ):
                outputs[-1] = dataclasses.replace(last, data=last.data + data)
            else:
                outputs.append(Output(*label, kind, data, extra))
        self._pending.clear()
        self._pending_bytes = 0
        self._sent_at = time.monotonic()
        self._pending_since = None
        self._emit(outputs)
