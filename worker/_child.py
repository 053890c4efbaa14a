"""A task process: one of a worker's long-lived children. Runs its tasks one at a time.

Started by the worker's pool as ``python -m worker._child URL IDENTITY CONTROL``; talks to its
worker over a private IPC socket with an unsigned codec (the socket lives in a 0700 directory).
It says ``Heartbeat`` when ready, then loops: receive an ``Assign`` (a batch of one or more
tasks), run its tasks in order, and send each task's outputs, then its result.

Results of a batch travel together: a result waits until the batch ends, or until results have
waited ``RESULT_HOLD_S`` (the capture's flusher thread sends them then, so a long task in a
batch does not keep the results before it; see ``worker._capture``). Outputs of a task always
leave before its result.

Cancel and crashes go through the control page shared with the worker (``worker._control``):
this process writes the sequence number of the task it runs there, skips a task whose cancel
flag is set, and on SIGINT interrupts the running task only if that task's flag is set. The
worker follows with SIGKILL if the task does not stop, and replaces the process.

Task kinds (``Assignment.kind``):

- ``CALL``: ``fn(*args, **kwargs)``; the result is the value.
- ``MAP``: args are ``(items, start)``; ``fn(item)`` for each item, with the output label set to
  the item's global index ``start + k`` (and, with datasets, the item's shard of each as keyword
  arguments); the result is the list of values.
- ``RENDER``: args are the chunk's frames; no function of the user's. Blender renders them
  (``worker._render_task``), each frame stored and announced as it is saved; the result is the
  tuple of frames stored. The Blender to use is the worker's (``PILOT_BLENDER_PATH`` and
  ``PILOT_BLENDER_VERSION``, set by the worker: none when unset).

Functions and arguments' big buffers (``Payload.refs``) travel as blobs named by digest; the
``worker._loader.Loader`` keeps them, asks the worker for one it lacks, and maps a big buffer
from the worker's shared memory. One it cannot get fails the task as UNPICKLABLE.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import zmq

from gateway.protocol import (
    Assign,
    BlobReply,
    CellFunction,
    Codec,
    Goodbye,
    Heartbeat,
    JobKind,
    Outputs,
    Payload,
    PutBlob,
    SharedBlob,
    TaskResult,
    TaskResults,
    dumps,
    loads,
    readable,
    recv_frames,
    send_frames,
    with_buffers,
)
from gateway.protocol import TaskStatus as S
from worker._blender import BlenderInfo
from worker._capture import OUTPUT_BUDGET_BYTES, Capture
from worker._control import Control
from worker._display import install_display_on_import
from worker._loader import Loader, Unavailable
from worker._orphan import die_with_parent, parent_gone
from worker._render_task import render_task
from worker._taskdata import TaskFiles

PARENT_CHECK_S = 1.0  # while idle, how often to check that the worker is still there
RESULT_OVERHEAD_BYTES = 64 * 1024  # a result's message besides its value (ids, error text)
# Frames of ours that the user should not see in a task's traceback.
_HIDDEN = {
    os.path.abspath(__file__),
    os.path.abspath(sys.modules[CellFunction.__module__].__file__ or ""),
}


class _TaskProcess:
    def __init__(
        self,
        url: str,
        identity: bytes,
        control: str,
        files: tuple[Path, int],
        blender: BlenderInfo | None = None,
        limits: tuple[int, int] = (1 << 30, OUTPUT_BUDGET_BYTES),
    ) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, identity)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(url)
        self._fd = self._sock.getsockopt(zmq.FD)
        # The worker's message size limit (a larger result fails its task, see ``run``) and
        # the output budget per task (``worker._capture``).
        self._max_bytes, budget = limits
        self._codec = Codec(None, max_message_bytes=self._max_bytes)
        # ZeroMQ sockets are not thread-safe: every use of the socket, from this thread or the
        # capture's flusher, holds this lock. While idle, this thread waits for the socket's
        # descriptor outside the lock; a send from the flusher then wakes it (``_wake``), as
        # the send may have consumed the descriptor's edge.
        self._sock_lock = threading.Lock()
        self._waiting = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._control = Control(control)
        self.capture = Capture(self._emit, self._emit_results, budget_bytes=budget)
        self._inbox: deque[Any] = deque()  # what came while a function was awaited
        self._loader = Loader(self._send, self._recv_msg, self._inbox)
        self._files = TaskFiles(files[0], files[1], self._put_blob)
        self._blender = blender  # render tasks: the worker's Blender, or None
        self._seq = 0  # tasks received so far (the worker counts the same way)
        self._running = 0  # the sequence number of the task whose code runs now

    def _send(self, msg: Any) -> None:
        frames = self._codec.encode(msg)
        with self._sock_lock:
            send_frames(self._sock, frames)
            if self._waiting:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                    os.write(self._wake_w, b"!")

    def _next(self) -> Any:
        """The next message: one kept while a function was awaited, or the socket's."""
        if self._inbox:
            return self._inbox.popleft()
        return self._recv_msg()

    def _recv_msg(self, timeout_s: float | None = None) -> Any | None:
        """The next message from the socket, decoded; None after ``timeout_s``."""
        frames = self._recv(timeout_s)
        return None if frames is None else self._codec.decode(frames).msg

    def _recv(self, timeout_s: float | None = None) -> list[zmq.Frame] | None:
        """The next message's frames; blocks, or None after ``timeout_s``. The worker gone
        means this process ends."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._sock_lock:
                if readable(self._sock):
                    return recv_frames(self._sock)
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                self._waiting = True
            wait = PARENT_CHECK_S
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            ready, _, _ = select.select([self._fd, self._wake_r], [], [], wait)
            self._waiting = False
            if self._wake_r in ready:
                while True:
                    try:
                        if not os.read(self._wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
            if not ready and parent_gone():
                os._exit(0)  # the worker is gone: nobody will ever send us a task

    def _put_blob(self, digest: str, payload: Payload) -> None:
        """A result file, to the gateway's blob store (the worker forwards it, ahead of the
        task's result)."""
        self._send(PutBlob(digest, payload))

    def _emit(self, outputs: list[Any]) -> None:
        outputs = [o for o in outputs if o.job_id]  # between tasks: nobody to tell
        if outputs:
            self._send(Outputs(tuple(outputs)))

    def _emit_results(self, results: list[TaskResult]) -> None:
        self._send(TaskResults(tuple(results)))

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Only a running task that the worker flagged is interrupted: the signal may have been
        # meant for a task of the batch that has finished or not started.
        seq = self._running
        if seq and self._control.cancelled(seq):
            raise KeyboardInterrupt

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        self.capture.start()
        install_display_on_import(self.capture)
        self._send(Heartbeat())
        while True:
            match self._next():
                case Assign(tasks=tasks):
                    self._run_batch(tasks)
                    self._loader.release()
                case Goodbye():
                    return
                case BlobReply() | SharedBlob():  # the late answer to a wait that gave up
                    pass

    def _run_batch(self, tasks: tuple[Any, ...]) -> None:
        last = len(tasks) - 1
        control = self._control
        for i, a in enumerate(tasks):
            self._seq = seq = self._seq + 1
            control.running = seq  # from here until its result exists, a crash is its fault
            try:
                if control.cancelled(seq):
                    result = TaskResult(
                        a.job_id, a.index, a.attempt, S.CANCELLED, None, "Cancelled."
                    )
                else:
                    result = self.run(a, seq)
            finally:
                control.running = 0
            self.capture.hold(result, last=i == last)

    def run(self, a: Any, seq: int) -> TaskResult:
        """Run one task; its outputs stay pending in the capture, read up to its end."""
        self.capture.label = (a.job_id, a.index, -1)
        t0 = time.perf_counter()
        if a.kind == JobKind.RENDER:
            return self._render(a, seq, t0)
        try:
            fn = self._loader.function(a.fn_digest)
            args = loads(with_buffers(a.args, self._loader.buffer))
        except Unavailable as exc:
            return self._fail(a, S.UNPICKLABLE, str(exc), t0, show_tb=False)
        except Exception:
            return self._fail(a, S.UNPICKLABLE, "Could not load the task on the worker", t0)
        try:
            self._running = seq
            if self._control.cancelled(seq):  # flagged before the handler could see it run
                raise KeyboardInterrupt
            with self._task_files(a) as files:
                value = self._call(a, fn, args)
        except KeyboardInterrupt:
            self._running = 0
            return self._fail(a, S.CANCELLED, "Interrupted", t0, show_tb=False)
        except BaseException:
            self._running = 0
            return self._fail(a, S.ERROR, "", t0)
        finally:
            self._running = 0
        self.capture.label = (a.job_id, a.index, -1)
        try:
            payload: Payload = dumps(value, what="the result")
        except Exception as exc:
            return self._fail(a, S.UNPICKLABLE, str(exc), t0, show_tb=False)
        if payload.nbytes > self._max_bytes - RESULT_OVERHEAD_BYTES:
            text = (
                f"The result is {payload.nbytes:,} bytes pickled: over the message size limit "
                f"of {self._max_bytes:,} bytes ($PILOT_MAX_MESSAGE_BYTES). Return less, or "
                "write big results to files under pilot.output_dir() (they travel apart)."
            )
            return self._fail(a, S.UNPICKLABLE, text, t0, show_tb=False)
        return TaskResult(
            a.job_id, a.index, a.attempt, S.OK, payload, "", _since(t0), files=tuple(files)
        )

    def _call(self, a: Any, fn: Any, args: Any) -> Any:
        if a.kind != JobKind.MAP:
            fargs, fkwargs = args
            return fn(*fargs, **fkwargs)
        items, start = args
        value = []
        data = a.data if a.data is not None and a.data.refs else None
        for k, item in enumerate(items):
            self.capture.label = (a.job_id, a.index, start + k)
            if data is not None:  # --data: this item's shard of each dataset, by name
                value.append(fn(item, **self._files.datasets(data, start + k)))
            else:
                value.append(fn(item))
        return value

    def _render(self, a: Any, seq: int, t0: float) -> TaskResult:
        """A render task: its failures come back as results, a cancel as KeyboardInterrupt."""
        try:
            self._running = seq
            if self._control.cancelled(seq):  # flagged before the handler could see it run
                raise KeyboardInterrupt
            with self._task_files(a):
                return render_task(a, self._blender, capture=self.capture, put=self._put_blob)
        except KeyboardInterrupt:
            self._running = 0
            return self._fail(a, S.CANCELLED, "Interrupted", t0, show_tb=False)
        except BaseException:
            self._running = 0
            return self._fail(a, S.ERROR, "", t0)
        finally:
            self._running = 0

    def _task_files(self, a: Any) -> contextlib.AbstractContextManager[list[Any]]:
        return self._files.task(a.job_id, a.index, a.data)

    def _fail(self, a: Any, status: S, headline: str, t0: float, show_tb: bool = True) -> Any:
        text = headline
        if show_tb:
            text = _format_exception(*sys.exc_info())
        item = self.capture.label[2]
        self.capture.drain()
        self.capture.label = ("", -1, -1)
        return TaskResult(a.job_id, a.index, a.attempt, status, None, text, _since(t0), item)


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def _format_exception(etype: Any, value: Any, tb: Any) -> str:
    """The traceback without this module's frames: the user sees their own code."""
    te = traceback.TracebackException(etype, value, tb, capture_locals=False)
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if os.path.abspath(f.filename) not in _HIDDEN]
    )
    return "".join(te.format())


def main(argv: list[str]) -> None:
    die_with_parent()
    url, identity, control = argv[1], argv[2].encode(), argv[3]
    # The worker's disk cache, shared by its task processes (set by the worker: the edge).
    files = (Path(os.environ["PILOT_CACHE_DIR"]), int(os.environ["PILOT_CACHE_BYTES"]))
    blender = None
    if os.environ.get("PILOT_BLENDER_PATH"):  # the Blender the worker found and probed
        blender = BlenderInfo(os.environ["PILOT_BLENDER_PATH"], os.environ["PILOT_BLENDER_VERSION"])
    # The worker's message size limit, set by its pool; the output budget per task, from the
    # worker's environment.
    limits = (
        int(os.environ.get("PILOT_MAX_MESSAGE_BYTES") or 1 << 30),
        int(os.environ.get("PILOT_OUTPUT_BUDGET_BYTES") or OUTPUT_BUDGET_BYTES),
    )
    _TaskProcess(url, identity, control, files, blender, limits).serve()
    os._exit(0)  # daemon threads and inherited fds: leave without ceremony


if __name__ == "__main__":
    main(sys.argv)
