"""Raw pyzmq, the limit the other backends of ``bench/throughput.py`` are measured against.

``RawZmq``: a DEALER client -> a ROUTER/ROUTER broker (a subprocess, or a thread) -> DEALER
worker processes; pickle protocol 5 with numpy buffers as separate zero-copy frames; no
signing, no bookkeeping beyond task ids. The framing:

    client DEALER  -> [task_id, payload, *buffers]
    broker ROUTER  <- [client_id, task_id, payload, *buffers]     (frontend)
    broker ROUTER  -> [worker_id, client_id, task_id, payload, *buffers]   (backend)
    worker DEALER  <- [client_id, task_id, payload, *buffers]
    worker DEALER  -> [client_id, task_id, result, *buffers]  (or [b"READY"] once)
    broker         -> client [client_id, task_id, result, *buffers]

payload = pickle.dumps((fn, args)), result = pickle.dumps((ok, value)), protocol 5,
out-of-band buffers as separate frames, every hop with copy=False.

``bench._baselines`` (the other backends, and the ``Backend`` this builds on) re-exports
``RawZmq``: import it from there; this module is imported at its end.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from bench._baselines import (
    Backend,
    BackendError,
    BackendStartError,
    WrongResult,
    _chunks,
    _python_path,
    inc_chunk,
    noop,
)

__all__ = ["RawZmq", "RawZmqChain"]


def _dumps(obj: Any) -> list:
    bufs: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    return [data, *(b.raw() for b in bufs)]


def _loads(frames: list[zmq.Frame]) -> Any:
    return pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])


def _unlimited(sock: zmq.Socket) -> zmq.Socket:
    # No high-water marks: a ROUTER silently drops at HWM, and the no-op workload
    # deliberately queues everything before reading anything back.
    sock.sndhwm = 0
    sock.rcvhwm = 0
    sock.linger = 0
    return sock


def _waiting(sock: zmq.Socket) -> Iterator[list[zmq.Frame]]:
    """Every message waiting on ``sock`` now, without blocking."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return


def _parent_gone(ppid: int) -> bool:
    return ppid > 0 and os.getppid() != ppid


def _broker_serve(
    ctx: zmq.Context,
    n_workers: int,
    report: Callable[[str], None],
    control_addr: str | None = None,
    ppid: int = 0,
) -> None:
    """ROUTER/ROUTER broker: least-outstanding load balancing over registered workers."""
    frontend = _unlimited(ctx.socket(zmq.ROUTER))
    backend = _unlimited(ctx.socket(zmq.ROUTER))
    front_port = frontend.bind_to_random_port("tcp://127.0.0.1")
    back_port = backend.bind_to_random_port("tcp://127.0.0.1")
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    control = None
    if control_addr:
        control = ctx.socket(zmq.PAIR)
        control.linger = 0
        control.connect(control_addr)
        poller.register(control, zmq.POLLIN)
    report(f"PORTS {front_port} {back_port}")

    outstanding: dict[bytes, int] = {}
    waiting: deque[list] = deque()  # tasks that arrived before any worker registered
    announced = False

    def dispatch(msg: list) -> None:
        wid = min(outstanding, key=outstanding.__getitem__)
        outstanding[wid] += 1
        backend.send_multipart([wid, *msg], copy=False)

    try:
        while True:
            events = dict(poller.poll(1000))
            if not events:
                if _parent_gone(ppid):
                    return
                continue
            if control is not None and control in events:
                return
            if backend in events:
                for msg in _waiting(backend):
                    wid = msg[0].bytes
                    if len(msg) == 2:  # [worker_id, b"READY"]
                        outstanding[wid] = 0
                        while waiting:
                            dispatch(waiting.popleft())
                        if not announced and len(outstanding) >= n_workers:
                            announced = True
                            report(f"READY {len(outstanding)}")
                    else:
                        outstanding[wid] -= 1
                        frontend.send_multipart(msg[1:], copy=False)
            if frontend in events:
                for msg in _waiting(frontend):
                    if outstanding:
                        dispatch(msg)
                    else:
                        waiting.append(msg)
    finally:
        for s in (frontend, backend, control):
            if s is not None:
                s.close(0)


def _broker_main(n_workers: str, ppid: str) -> None:
    """Entry point of the broker subprocess: reports on stdout, stopped by SIGTERM."""
    ctx = zmq.Context()
    _broker_serve(ctx, int(n_workers), lambda line: print(line, flush=True), ppid=int(ppid))


def _worker_main(addr: str, ppid: str) -> None:
    """Entry point of a worker process: run ``fn(*args)`` for each task, send the result."""
    parent = int(ppid)
    ctx = zmq.Context()
    sock = _unlimited(ctx.socket(zmq.DEALER))
    sock.connect(addr)
    sock.send(b"READY")
    while True:
        if not sock.poll(1000):
            if _parent_gone(parent):
                return
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                fn, args = _loads(frames[2:])
                reply = _dumps((True, fn(*args)))
            except Exception:
                reply = _dumps((False, traceback.format_exc()))
            sock.send_multipart([frames[0], frames[1], *reply], copy=False)


def _relay_main(addr: str, ppid: str) -> None:
    """Entry point of a relaying worker (``RawZmqChain``): it starts one task process of its
    own (``_worker_main``) behind an IPC socket, as a Parallel Pilot worker does, and passes
    every message through, both ways, untouched."""
    parent = int(ppid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop() terminates: clean up
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="raw-zmq-") as tmp:
        down = _unlimited(ctx.socket(zmq.DEALER))
        down.bind(f"ipc://{tmp}/tasks")
        child = _spawn("_worker_main", f"ipc://{tmp}/tasks", str(os.getpid()))
        up = _unlimited(ctx.socket(zmq.DEALER))
        up.connect(addr)
        poller = zmq.Poller()
        poller.register(up, zmq.POLLIN)
        poller.register(down, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(1000))
                if not events:
                    if _parent_gone(parent) or child.poll() is not None:
                        return
                    continue
                if down in events:  # the task process's READY, then its results
                    for msg in _waiting(down):
                        up.send_multipart(msg, copy=False)
                if up in events:
                    for msg in _waiting(up):
                        down.send_multipart(msg, copy=False)
        finally:
            child.terminate()
            child.wait(5)
            up.close(0)
            down.close(0)


def _spawn(entry: str, *args: str, stdout: int | None = None) -> subprocess.Popen:
    # through bench._baselines, which this module builds on (a cycle entered from there)
    code = f"import sys, bench._baselines as b; b.RawZmq; from bench._raw_zmq import {entry}"
    code += f"; {entry}(*sys.argv[1:])"
    with _python_path():
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=stdout,
            stdin=subprocess.DEVNULL,
            env=os.environ.copy(),
            text=stdout is not None,
        )


class RawZmq(Backend):
    """Raw pyzmq: DEALER client -> ROUTER/ROUTER broker -> DEALER worker processes.

    ``broker="process"`` (default) runs the broker as a subprocess, ``"thread"`` in a
    thread of this process (it then shares the GIL with the client).
    """

    name = "raw_zmq"
    worker_entry = "_worker_main"

    def __init__(self, n_workers: int = 2, *, broker: str = "process", **kwargs: Any):
        super().__init__(n_workers, **kwargs)
        if broker not in ("process", "thread"):
            raise ValueError(f"broker must be 'process' or 'thread', not {broker!r}")
        self.broker = broker
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._control: zmq.Socket | None = None
        self._broker_thread: threading.Thread | None = None
        self._procs: list[subprocess.Popen] = []
        self._next_id = 0

    @property
    def pids(self) -> list[int]:
        """Process ids of the broker (process mode) and worker processes."""
        return [p.pid for p in self._procs]

    def start(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        self._ctx = zmq.Context()
        lines: queue.Queue[str] = queue.Queue()
        ppid = str(os.getpid())
        if self.broker == "process":
            proc = _spawn("_broker_main", str(self.n_workers), ppid, stdout=subprocess.PIPE)
            self._procs.append(proc)

            def pump(stream: Any = proc.stdout) -> None:
                for line in stream:
                    lines.put(line.strip())

            threading.Thread(target=pump, name="raw-zmq-broker-out", daemon=True).start()
        else:
            control_addr = f"inproc://raw-zmq-control-{id(self)}"
            self._control = self._ctx.socket(zmq.PAIR)
            self._control.linger = 0
            self._control.bind(control_addr)
            self._broker_thread = threading.Thread(
                target=_broker_serve,
                args=(self._ctx, self.n_workers, lines.put, control_addr),
                name="raw-zmq-broker",
                daemon=True,
            )
            self._broker_thread.start()

        def expect(prefix: str) -> list[str]:
            while True:
                left = deadline - time.monotonic()
                try:
                    line = lines.get(timeout=max(left, 0.001))
                except queue.Empty:
                    raise BackendStartError(
                        f"raw_zmq broker: no {prefix!r} within {self.start_timeout:g}s"
                    ) from None
                if line.startswith(prefix):
                    return line.split()[1:]

        front_port, back_port = expect("PORTS")
        for _ in range(self.n_workers):
            self._procs.append(_spawn(self.worker_entry, f"tcp://127.0.0.1:{back_port}", ppid))
        self._sock = _unlimited(self._ctx.socket(zmq.DEALER))
        self._sock.connect(f"tcp://127.0.0.1:{front_port}")
        expect("READY")

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._control is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._control.send(b"stop")
        if self._broker_thread is not None:
            self._broker_thread.join(10)
            self._broker_thread = None
        if self._control is not None:
            self._control.close(0)
            self._control = None
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stdout is not None:
                p.stdout.close()
        self._procs = []
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- client side ---------------------------------------------------------------------

    def _send(self, fn: Callable, *args: Any) -> bytes:
        tid = self._next_id.to_bytes(8, "little")
        self._next_id += 1
        self._sock.send_multipart([tid, *_dumps((fn, args))], copy=False)
        return tid

    def _recv(self) -> tuple[bytes, Any]:
        if not self._sock.poll(self.task_timeout * 1000):
            raise BackendError(f"raw_zmq: no result within {self.task_timeout:g}s")
        frames = self._sock.recv_multipart(copy=False)
        ok, value = _loads(frames[1:])
        if not ok:
            raise BackendError(f"raw_zmq task failed:\n{value}")
        return frames[0].bytes, value

    def _gather(self, tids: list[bytes]) -> list:
        results = dict(self._recv() for _ in tids)
        return [results[t] for t in tids]

    def _run_noops(self, n: int) -> list:
        return self._gather([self._send(noop, i) for i in range(n)])

    def _run_map(self, items: list[int], chunk: int) -> list[int]:
        tids = [self._send(inc_chunk, c) for c in _chunks(items, chunk)]
        return [x for part in self._gather(tids) for x in part]

    def _run_one(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        tid = self._send(fn, arg)
        got, value = self._recv()
        if got != tid:
            raise WrongResult(f"raw_zmq: expected result for task {tid!r}, got {got!r}")
        return value


class RawZmqChain(RawZmq):
    """Raw pyzmq through Parallel Pilot's hops: client -> broker -> worker process -> the
    worker's own task process (over IPC), and back the same way. Each worker relays, untouched,
    to one task process that runs the tasks (``_relay_main``). Nothing is signed, recorded or
    decoded on the way: the cost of the topology alone, next to which Parallel Pilot's own
    work shows."""

    name = "raw_zmq_chain"
    worker_entry = "_relay_main"
