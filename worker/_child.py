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

Task modes (``Assignment.meta["mode"]``):

- ``call``: ``fn(*args, **kwargs)``; the result is the value.
- ``map``: args are ``(items, start)``; ``fn(item)`` for each item, with the output label set to
  the item's global index ``start + k``; the result is the list of values.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

import zmq

from gateway import Codec, Payload, dumps, loads
from gateway import _cell as _cell_module
from gateway._drain import readable, recv_frames, send_frames
from gateway._messages import Assign, Goodbye, Heartbeat, Outputs, PutBlob, TaskResult, TaskResults
from gateway._messages import TaskStatus as S
from worker._capture import Capture
from worker._control import Control
from worker._display import install_display
from worker._orphan import die_with_parent
from worker._taskdata import TaskFiles

FUNCTION_CACHE = 64
PARENT_CHECK_S = 1.0  # while idle, how often to check that the worker is still there
# Frames of ours that the user should not see in a task's traceback.
_HIDDEN = {os.path.abspath(__file__), os.path.abspath(_cell_module.__file__)}


class _TaskProcess:
    def __init__(self, url: str, identity: bytes, control: str, files: tuple[Path, int]) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, identity)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(url)
        self._fd = self._sock.getsockopt(zmq.FD)
        self._codec = Codec(None)
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
        self._ppid = os.getppid()
        self.capture = Capture(self._emit, self._emit_results)
        self._fns: OrderedDict[str, Any] = OrderedDict()
        self._files = TaskFiles(files[0], files[1], self._put_blob)
        self._seq = 0  # tasks received so far (the worker counts the same way)
        self._running = 0  # the sequence number of the task whose code runs now

    def _send(self, msg: Any) -> None:
        frames = self._codec.encode(msg)
        with self._sock_lock:
            send_frames(self._sock, frames)
            if self._waiting:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                    os.write(self._wake_w, b"!")

    def _recv(self) -> list[zmq.Frame]:
        """The next message (blocks); the worker gone means this process ends."""
        while True:
            with self._sock_lock:
                if readable(self._sock):
                    return recv_frames(self._sock)
                self._waiting = True
            ready, _, _ = select.select([self._fd, self._wake_r], [], [], PARENT_CHECK_S)
            self._waiting = False
            if self._wake_r in ready:
                while True:
                    try:
                        if not os.read(self._wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
            if not ready and os.getppid() != self._ppid:
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
        install_display(self.capture)
        self._send(Heartbeat())
        while True:
            msg = self._codec.decode(self._recv()).msg
            match msg:
                case Assign(tasks=tasks):
                    self._run_batch(tasks)
                case Goodbye():
                    return

    def _run_batch(self, tasks: tuple[Any, ...]) -> None:
        last = len(tasks) - 1
        control = self._control
        for i, a in enumerate(tasks):
            self._seq = seq = self._seq + 1
            control.running = seq  # from here until its result exists, a crash is its fault
            try:
                if control.cancelled(seq):
                    result = TaskResult(
                        a.job_id, a.index, a.attempt, int(S.CANCELLED), None, "Cancelled."
                    )
                else:
                    result = self.run(a, seq)
            finally:
                control.running = 0
            self.capture.hold(result, last=i == last)

    def run(self, a: Any, seq: int) -> TaskResult:
        """Run one task; its outputs stay pending in the capture, read up to its end."""
        mode = a.meta.get("mode", "call")
        self.capture.label = (a.job_id, a.index, -1)
        t0 = time.perf_counter()
        try:
            fn = self._function(a.fn_key, a.fn, a.meta)
            args = loads(a.args)
        except _MissingFunction as exc:  # the worker sends it with the task's next attempt
            return self._fail(a, S.MISSING_FUNCTION, str(exc), t0, show_tb=False)
        except Exception:
            return self._fail(a, S.UNPICKLABLE, "Could not load the task on the worker", t0)
        try:
            self._running = seq
            if self._control.cancelled(seq):  # flagged before the handler could see it run
                raise KeyboardInterrupt
            with self._task_files(a) as files:
                value = self._call(a, mode, fn, args)
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
        return TaskResult(
            a.job_id, a.index, a.attempt, int(S.OK), payload, "", _since(t0), files=tuple(files)
        )

    def _call(self, a: Any, mode: str, fn: Any, args: Any) -> Any:
        if mode != "map":
            fargs, fkwargs = args
            return fn(*fargs, **fkwargs)
        items, start = args
        value = []
        with_data = bool(a.meta.get("data"))
        for k, item in enumerate(items):
            self.capture.label = (a.job_id, a.index, start + k)
            if with_data:  # --data: this item's shard of each dataset, by name
                value.append(fn(item, **self._files.datasets(a.meta, start + k)))
            else:
                value.append(fn(item))
        return value

    def _task_files(self, a: Any) -> contextlib.AbstractContextManager[list[Any]]:
        return self._files.task(a.job_id, a.index, a.meta)

    def _fail(self, a: Any, status: S, headline: str, t0: float, show_tb: bool = True) -> Any:
        text = headline
        if show_tb:
            text = _format_exception(*sys.exc_info())
        item = self.capture.label[2]
        self.capture.drain()
        self.capture.label = ("", -1, -1)
        return TaskResult(a.job_id, a.index, a.attempt, int(status), None, text, _since(t0), item)

    def _function(self, key: str, fn: Payload | None, meta: dict[str, Any]) -> Any:
        found = self._fns.get(key)
        if found is not None:
            self._fns.move_to_end(key)
            return found
        if fn is None:
            raise _MissingFunction(f"function {key} is not in this process (evicted)")
        source, filename = meta.get("source"), meta.get("filename")
        if source and filename:  # so tracebacks show the notebook cell's lines
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        found = self._fns[key] = loads(fn)
        if len(self._fns) > FUNCTION_CACHE:
            self._fns.popitem(last=False)
        return found


class _MissingFunction(LookupError):
    """The task came without its function and this process no longer has it."""


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
    _TaskProcess(url, identity, control, files).serve()
    os._exit(0)  # daemon threads and inherited fds: leave without ceremony


if __name__ == "__main__":
    main(sys.argv)
