"""``LocalCluster``: the embedded default. A gateway and N workers as local processes.

Entering starts ``pilot gateway`` (state in ``home/state``: SQLite and blobs), waits for its
ready line, starts the workers and waits until they are registered; leaving stops the workers
(SIGTERM: they finish or hand back) and then the gateway. ``pilot up`` is this, in the
foreground. Every process it starts, it stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from gateway.client import Client
from gateway.protocol import ConnectionInfo, PilotError, PilotTimeout, Timeouts
from worker import kill_with_this_thread

__all__ = ["LocalCluster"]

GATEWAY_READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's stdout, or b"" past the deadline."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return b""
        return stream.readline()
    finally:
        sel.close()


class LocalCluster:
    """A gateway plus ``workers`` local workers of ``slots`` slots each.

    ``home`` holds the state and the connection file (a temporary directory when None, removed
    at exit). ``env`` is added to the processes' environment. ``blender``: the Blender the
    workers render with (``--blender``; by default ``$PILOT_BLENDER``, else ``blender`` on PATH).
    ``secure``: CurveZMQ on every socket (``pilot gateway --secure``); ``gateway_args`` are
    more options of ``pilot gateway``.

    Each worker counts its share of this process's cores as its own (``pilot worker --cores``),
    as a machine of its own would: it registers those and gives its training ranks
    ``OMP_NUM_THREADS`` from them, so N workers on one machine neither count its cores N times
    nor start N times too many threads. Nothing is pinned: the OS still places every process
    on any core, which keeps ranks clear of other load. With fewer cores than workers, each
    counts them all.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        slots: int = 1,
        home: str | Path | None = None,
        http: bool = True,
        env: dict[str, str] | None = None,
        worker_args: tuple[str, ...] = (),
        timeouts: Timeouts | None = None,
        blender: str | os.PathLike[str] | None = None,
        secure: bool = False,
        gateway_args: tuple[str, ...] = (),
    ) -> None:
        self.n_workers = workers
        self.slots = slots
        self._tmp = None if home is not None else tempfile.TemporaryDirectory(prefix="pilot-")
        self.home = Path(home if home is not None else self._tmp.name)  # type: ignore[union-attr]
        self.http = http
        self.env = {**os.environ, **(env or {}), "PILOT_HOME": str(self.home)}
        self.worker_args = worker_args
        if blender is not None:
            self.worker_args = ("--blender", os.fspath(blender), *worker_args)
        self.timeouts = timeouts or Timeouts()
        self.gateway_args = (*(("--secure",) if secure else ()), *gateway_args)
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.connection: ConnectionInfo | None = None
        self._clients: list[Client] = []

    @property
    def connection_file(self) -> Path:
        return self.home / "connection.json"

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait: bool = True) -> None:
        # The workers start first and import while the gateway starts (a third of the time to
        # ready); each waits for the connection on its stdin, written once the gateway is up.
        early = [self._spawn_worker("-") for _ in range(self.n_workers)]
        self.start_gateway()
        text = self.connection_file.read_bytes()
        for proc in early:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it died: wait_for_workers says so
                proc.stdin.write(text)
            _close(proc.stdin)
        if wait:
            self.wait_for_workers(self.n_workers)

    def start_gateway(self) -> ConnectionInfo:
        """Start (or restart, on the same state) the gateway; return its connection."""
        cmd = [
            sys.executable,
            "-m",
            "pilot",
            "gateway",
            "--state",
            str(self.home / "state"),
            "--connection-file",
            str(self.connection_file),
            "--ready-line",
            *self.gateway_args,
        ]
        if not self.http:
            cmd += ["--http-port", "none"]
        self.gateway = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, env=self.env, preexec_fn=_ends_with_us()
        )
        assert self.gateway.stdout is not None
        line = _read_line(self.gateway.stdout, GATEWAY_READY_TIMEOUT_S)
        if not line.startswith(b"READY "):
            code = self.gateway.poll()
            raise PilotError(
                f"The gateway did not start (exit code {code}); see the messages above."
            )
        # The ready line leaves the secrets out: they are in the connection file (0600).
        public = json.loads(line[6:])
        self.connection = ConnectionInfo.load(self.connection_file)
        if self.connection.gateway_id != public["gateway_id"]:
            raise PilotError(f"{self.connection_file} is another gateway's.")
        return self.connection

    def add_worker(self, *extra: str, name: str | None = None) -> subprocess.Popen[bytes]:
        """Start one more worker of the running gateway."""
        return self._spawn_worker(str(self.connection_file), *extra, name=name)

    def _spawn_worker(
        self, connect: str, *extra: str, name: str | None = None
    ) -> subprocess.Popen[bytes]:
        index = len(self.workers)
        cores = _core_share(index, self.n_workers)
        cmd = [
            sys.executable,
            "-m",
            "pilot",
            "worker",
            "--connect",
            connect,
            "--slots",
            str(self.slots),
            "--name",
            name or f"local-{index}",
            *(("--cores", str(cores)) if cores else ()),
            *self.worker_args,
            *extra,
        ]
        stdin = subprocess.PIPE if connect == "-" else None
        proc = subprocess.Popen(cmd, stdin=stdin, env=self.env, preexec_fn=_ends_with_us())
        self.workers.append(proc)
        return proc

    def client(self) -> Client:
        """A client of this cluster, closed with it."""
        if self.connection is None:
            raise PilotError("The cluster is not started.")
        c = Client(self.connection, timeouts=self.timeouts)
        self._clients.append(c)
        return c

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` workers are registered. Raises ``PilotError`` at once if a worker
        process exits meanwhile, ``PilotTimeout`` past ``timeout``."""
        deadline = time.monotonic() + timeout
        with Client(self.connection, timeouts=self.timeouts) as c:  # type: ignore[arg-type]
            while True:
                left = deadline - time.monotonic()
                reply = c.status(wait_workers=n, timeout=max(0.0, min(1.0, left)))
                if len(reply.workers) >= n:
                    return
                dead = [p for p in self.workers if p.poll() is not None]
                if dead:
                    raise PilotError(
                        f"A local worker exited with code {dead[0].returncode} before "
                        "registering; see its messages above."
                    )
                if left <= 0:
                    raise PilotTimeout(f"Only {len(reply.workers)} of {n} workers connected.")

    def kill_gateway(self) -> None:
        """SIGKILL the gateway (for failure tests)."""
        if self.gateway is not None:
            self.gateway.kill()
            self.gateway.wait()

    def stop(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except PilotError as exc:  # a dead gateway must not keep us from stopping
                print(f"closing a client: {exc}", file=sys.stderr)
        self._clients.clear()
        procs = [p for p in self.workers if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in self.workers:
            if p.stdin is not None:  # the gateway never came up: nothing more to say
                _close(p.stdin)
        _wait_all(procs, STOP_TIMEOUT_S)
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            _wait_all([self.gateway], STOP_TIMEOUT_S)
        if self.gateway is not None and self.gateway.stdout is not None:
            self.gateway.stdout.close()
        self.workers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _close(pipe: IO[bytes]) -> None:
    with contextlib.suppress(BrokenPipeError):  # the process at the other end is gone
        pipe.close()


def _ends_with_us() -> Any:
    """The gateway and workers of a local cluster get SIGTERM (and stop cleanly: workers hand
    back or finish their tasks) if the process that started them dies, even by SIGKILL: a
    closed terminal or a killed `pilot up` leaves nothing running."""
    return kill_with_this_thread(signal.SIGTERM)


def _core_share(index: int, workers: int) -> int:
    """How many of this process's cores worker ``index`` counts as its own: the cores split
    into ``workers`` parts as even as they go (a worker added later counts as ``index %
    workers``); 0 (every core) for a single worker or with fewer cores than workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if workers < 2 or not cores or cores < workers:
        return 0
    part = index % workers
    return (part + 1) * cores // workers - part * cores // workers


def _wait_all(procs: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if procs and any(p.returncode is None for p in procs):
        raise PilotTimeout("Some local processes did not stop.")
