"""A remote session's process: one persistent IPython namespace on a worker.

Started by the worker for an assignment of kind ``JobKind.SESSION`` (``%pilot remote`` in the
Parallel Pilot kernel), as ``python -m worker._session URL IDENTITY``, outside the task pool. It
talks to its worker like a task process (unsigned IPC), and lives until the session ends. Its
control messages travel as ``Output``s of kind ``SESSION`` whose data is a typed record:

- ``Assign`` starts it; it answers with ``SessionReady``;
- ``RunCell`` runs a cell with IPython's ``run_cell`` (magics, the last expression's value,
  tracebacks as IPython makes them); what the cell prints and displays streams back as
  ``Output``s, then ``CellDone`` with the outcome;
- ``input()``/``getpass()`` in a cell send ``InputRequest`` and wait for ``InputReply``;
- SIGINT (sent by the worker on the kernel's interrupt) interrupts the running cell only;
- ``Goodbye`` ends it; it then reports the task's result.

A reader thread receives messages into a queue, because ``input()`` must wait for its reply
while the main thread is inside a cell.
"""

from __future__ import annotations

import builtins
import getpass
import os
import queue
import signal
import socket
import sys
import threading
from typing import Any

import zmq
from IPython.core.displayhook import DisplayHook

from gateway.protocol import (
    Assign,
    CellDone,
    Codec,
    Goodbye,
    Heartbeat,
    InputReply,
    InputRequest,
    OutputKind,
    Outputs,
    RunCell,
    SessionReady,
    TaskResult,
    TaskResults,
)
from gateway.protocol import TaskStatus as S
from worker._capture import Capture
from worker._display import install_display
from worker._orphan import die_with_parent

__all__ = ["main"]


class _ResultHook(DisplayHook):
    """The value of a cell's last expression goes back as an ``EXECUTE_RESULT`` bundle."""

    capture: Capture | None = None

    def write_output_prompt(self) -> None:
        pass

    def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
        if self.capture is not None:
            extra = {"metadata": md_dict or {}, "execution_count": self.prompt_count}
            self.capture.add(OutputKind.EXECUTE_RESULT, format_dict, extra)

    def finish_displayhook(self) -> None:
        pass


class _Session:
    def __init__(self, url: str, identity: bytes) -> None:
        self._ctx = zmq.Context()
        # Two sockets, one owner each: sends (main and capture threads, under a lock) and the
        # inbox (the reader thread). The worker addresses the inbox as IDENTITY + b":in".
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, identity)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(url)
        self._in = self._ctx.socket(zmq.DEALER)
        self._in.setsockopt(zmq.ROUTING_ID, identity + b":in")
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.connect(url)
        self._codec = Codec(None)
        self._lock = threading.Lock()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._replies: queue.Queue[str] = queue.Queue()
        self.capture = Capture(self._emit)
        self.task: Any = None
        self._last_error: tuple[str, str, tuple[str, ...]] | None = None
        self._running_cell = False

    # -- wire -------------------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        with self._lock:
            self._sock.send_multipart(self._codec.encode(msg), copy=False)

    def _emit(self, outputs: list[Any]) -> None:
        outputs = [o for o in outputs if o.job_id]
        if outputs:
            self._send(Outputs(tuple(outputs)))

    def _read(self) -> None:
        while True:
            msg = self._codec.decode(self._in.recv_multipart()).msg
            match msg:
                case InputReply(text=text):  # the main thread waits in input()
                    self._replies.put(text)
                case Goodbye():
                    self._inbox.put(msg)
                    return
                case _:
                    self._inbox.put(msg)

    def close(self) -> None:
        """Flush what is still queued (the last result), then drop the sockets."""
        self._in.close(linger=0)
        self._sock.close(linger=2000)
        self._ctx.term()

    # -- the session --------------------------------------------------------------------------

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        self.capture.start()
        shell = install_display(self.capture)
        _ResultHook.capture = self.capture
        shell.displayhook = _ResultHook(shell=shell, cache_size=1000)
        shell.display_trap.hook = shell.displayhook
        shell._showtraceback = self._keep_traceback  # type: ignore[method-assign]
        builtins.input = self._input  # type: ignore[assignment]
        getpass.getpass = self._getpass  # type: ignore[assignment]
        self.shell = shell
        threading.Thread(target=self._read, name="pilot-session-inbox", daemon=True).start()
        self._send(Heartbeat())  # from the sending socket: ready
        self._in.send_multipart(self._codec.encode(Heartbeat()))  # makes the inbox routable
        while True:
            try:
                msg = self._inbox.get()
            except KeyboardInterrupt:
                continue  # an interrupt between cells interrupts nothing
            match msg:
                case Assign(tasks=(task, *_)):
                    self._start(task)
                case RunCell(cell_id=cell_id, code=code):
                    self._cell(cell_id, code)
                case Goodbye():
                    break
        if self.task is not None:
            t = self.task
            self._send(TaskResults((TaskResult(t.job_id, t.index, t.attempt, S.OK),)))

    def _on_sigint(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def _start(self, task: Any) -> None:
        self.task = task
        self.capture.label = (task.job_id, task.index, -1)
        ready = SessionReady(socket.gethostname(), os.getpid(), sys.version.split()[0], os.getcwd())
        self.capture.add(OutputKind.SESSION, ready)
        self.capture.drain()

    def _cell(self, cell_id: str, code: str) -> None:
        self._last_error = None
        self._running_cell = True
        try:
            result = self.shell.run_cell(code, store_history=True, silent=False)
        finally:
            self._running_cell = False
        sys.stdout.flush()
        count = self.shell.execution_count - 1
        if result.success:
            done = CellDone(cell_id, True, count)
        else:
            ename, evalue, tb = self._last_error or ("Error", "", ())
            done = CellDone(cell_id, False, count, ename, evalue, tb)
        self.capture.add(OutputKind.SESSION, done)
        self.capture.drain()

    def _keep_traceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
        self._last_error = (getattr(etype, "__name__", str(etype)), str(evalue), tuple(stb))

    def _input(self, prompt: str = "") -> str:
        return self._ask(str(prompt), password=False)

    def _getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        return self._ask(str(prompt), password=True)

    def _ask(self, prompt: str, password: bool) -> str:
        self.capture.add(OutputKind.SESSION, InputRequest(prompt, password))
        self.capture.drain()
        while True:
            try:
                return self._replies.get(timeout=0.1)
            except queue.Empty:
                continue


def main(argv: list[str]) -> None:
    die_with_parent()
    url, identity = argv[1], argv[2].encode()
    session = _Session(url, identity)
    session.serve()
    session.close()
    os._exit(0)  # the capture thread and redirected fds: leave without ceremony


if __name__ == "__main__":
    main(sys.argv)
