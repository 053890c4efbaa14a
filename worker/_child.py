"""A task process: one of a worker's long-lived children. Runs one task at a time.

Started by the worker's pool as ``python -m worker._child URL IDENTITY``; talks to its worker
over a private IPC socket with an unsigned codec (the socket lives in a 0700 directory). It says
``Heartbeat`` when ready, then loops: receive one ``Assign``, run it, send its outputs, then its
``TaskResults``. SIGINT while a task runs interrupts the task (cancel); the worker follows with
SIGKILL if the task does not stop, and replaces the process.

Task modes (``Assignment.meta["mode"]``):

- ``call``: ``fn(*args, **kwargs)``; the result is the value.
- ``map``: args are ``(items, start)``; ``fn(item)`` for each item, with the output label set to
  the item's global index ``start + k``; the result is the list of values.
"""

from __future__ import annotations

import linecache
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any

import zmq

from gateway import Codec, Payload, dumps, loads
from gateway._messages import Assign, Goodbye, Heartbeat, Outputs, TaskResult, TaskResults
from gateway._messages import TaskStatus as S
from worker._capture import Capture
from worker._display import install_display

FUNCTION_CACHE = 64
_HERE = os.path.abspath(__file__)


class _TaskProcess:
    def __init__(self, url: str, identity: bytes) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, identity)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(url)
        self._codec = Codec(None)
        self._send_lock = threading.Lock()
        self.capture = Capture(self._emit)
        self._fns: OrderedDict[str, Any] = OrderedDict()
        self._running = False

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self._sock.send_multipart(self._codec.encode(msg), copy=False)

    def _emit(self, outputs: list[Any]) -> None:
        outputs = [o for o in outputs if o.job_id]  # between tasks: nobody to tell
        if outputs:
            self._send(Outputs(tuple(outputs)))

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._running:  # only a running task is interrupted; idle, the signal is moot
            raise KeyboardInterrupt

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        self.capture.start()
        install_display(self.capture)
        self._send(Heartbeat())
        while True:
            frames = self._sock.recv_multipart(copy=False)
            msg = self._codec.decode(frames).msg
            match msg:
                case Assign(tasks=tasks):
                    for a in tasks:
                        self._send(TaskResults((self.run(a),)))
                case Goodbye():
                    return

    def run(self, a: Any) -> TaskResult:
        mode = a.meta.get("mode", "call")
        self.capture.label = (a.job_id, a.index, -1)
        t0 = time.perf_counter()
        try:
            fn = self._function(a.fn_key, a.fn, a.meta)
            args = loads(a.args)
        except Exception:
            return self._fail(a, S.UNPICKLABLE, "Could not load the task on the worker", t0)
        self._running = True
        try:
            if mode == "map":
                items, start = args
                value = []
                for k, item in enumerate(items):
                    self.capture.label = (a.job_id, a.index, start + k)
                    value.append(fn(item))
            else:
                fargs, fkwargs = args
                value = fn(*fargs, **fkwargs)
        except KeyboardInterrupt:
            self._running = False
            return self._fail(a, S.CANCELLED, "Interrupted", t0, show_tb=False)
        except BaseException:
            self._running = False
            return self._fail(a, S.ERROR, "", t0)
        finally:
            self._running = False
        self.capture.label = (a.job_id, a.index, -1)
        try:
            payload: Payload = dumps(value, what="the result")
        except Exception as exc:
            return self._fail(a, S.UNPICKLABLE, str(exc), t0, show_tb=False)
        self.capture.drain()
        return TaskResult(a.job_id, a.index, a.attempt, int(S.OK), payload, "", _since(t0))

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
            raise LookupError(f"function {key} was never sent to this process")
        source, filename = meta.get("source"), meta.get("filename")
        if source and filename:  # so tracebacks show the notebook cell's lines
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        found = self._fns[key] = loads(fn)
        if len(self._fns) > FUNCTION_CACHE:
            self._fns.popitem(last=False)
        return found


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def _format_exception(etype: Any, value: Any, tb: Any) -> str:
    """The traceback without this module's frames: the user sees their own code."""
    te = traceback.TracebackException(etype, value, tb, capture_locals=False)
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if os.path.abspath(f.filename) != _HERE]
    )
    return "".join(te.format())


def main(argv: list[str]) -> None:
    url, identity = argv[1], argv[2].encode()
    _TaskProcess(url, identity).serve()
    os._exit(0)  # daemon threads and inherited fds: leave without ceremony


if __name__ == "__main__":
    main(sys.argv)
