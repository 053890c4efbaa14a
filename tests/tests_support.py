"""Helpers shared by test modules (the fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.protocol import GatewaySettings, Timeouts
from gateway.server import Gateway

# Fast failure detection in tests: a lost worker is noticed within 2 s.
TEST_TIMEOUTS = Timeouts(heartbeat_interval_s=0.25, heartbeat_timeout_s=2.0, orphan_grace_s=2.0)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until true, failing the test past ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)  # a poll interval under a deadline, not a wait for start-up


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class KernelDriver:
    """A real kernel started through jupyter_client; ``run(code)`` returns the IOPub messages
    whose parent is that execution, and its reply. Stop it with ``shutdown()``."""

    def __init__(self, kernel_name: str = "python3", env: dict[str, str] | None = None) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(
            kernel_name=kernel_name, env={**os.environ, **(env or {})}
        )

    def run(self, code: str, timeout: float = 60.0, allow_stdin: bool = False) -> Execution:
        msg_id = self.kc.execute(code, allow_stdin=allow_stdin)
        return self.collect(msg_id, timeout)

    def collect(self, msg_id: str, timeout: float = 60.0) -> Execution:
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            messages.append(msg)
        reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        return Execution(messages, reply)

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


class Execution:
    def __init__(self, messages: list[dict], reply: dict) -> None:
        self.messages = messages
        self.reply = reply

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    def of(self, *types: str) -> list[dict]:
        return [m for m in self.messages if m["msg_type"] in types]

    @property
    def stdout(self) -> str:
        return "".join(
            m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stdout"
        )

    @property
    def stderr(self) -> str:
        return "".join(
            m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stderr"
        )

    @property
    def error(self) -> dict:
        errors = self.of("error")
        assert errors, f"no error; messages: {[m['msg_type'] for m in self.messages]}"
        return errors[0]["content"]


@contextlib.contextmanager
def pilot_up(env: dict[str, str], workers: int = 2) -> Iterator[dict[str, str]]:
    """`pilot up` as a subprocess with ``env``, ready (workers registered) on entry, stopped
    with Ctrl-C (then killed past a deadline) on exit."""
    env = {**env, "PILOT_LOG_LEVEL": "WARNING"}
    env.pop("PILOT_CONNECT", None)
    up = subprocess.Popen([sys.executable, "-m", "pilot", "up", "--workers", str(workers)], env=env)
    try:
        wait = ["status", "--wait-workers", str(workers), "--timeout", "60"]
        ready = subprocess.run(
            [sys.executable, "-m", "pilot", *wait],
            env=env,
            capture_output=True,
            timeout=90,
        )
        assert ready.returncode == 0, ready.stderr
        yield env
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)


class ThreadGateway:
    """A ``Gateway`` on its own loop in a daemon thread; ``call(fn)`` runs ``fn(gateway)``
    on that loop and returns its value."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.gateway = Gateway(settings)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            async with self.gateway as gw:
                self._ready.set()
                await gw.serve_forever()

        self.loop.run_until_complete(main())

    def __enter__(self) -> ThreadGateway:
        self._thread.start()
        assert self._ready.wait(30), "the gateway did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.gateway.stop)
        self._thread.join(30)

    def call(self, fn: Callable[[Gateway], Any]) -> Any:
        async def go() -> Any:
            return fn(self.gateway)

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)


@contextlib.contextmanager
def thread_gateway_with_a_worker(
    settings: GatewaySettings,
) -> Iterator[tuple[ThreadGateway, Any]]:
    """A ``ThreadGateway`` with ``settings`` (which name its ``connection_file``), one real
    ``pilot worker`` process (``w1``) registered with it, and a ``Client``; all stopped after."""
    from gateway.client import Client
    from gateway.protocol import ConnectionInfo

    conn = settings.connection_file
    assert conn is not None
    with ThreadGateway(settings) as gw:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pilot", "worker", "--connect", str(conn), "--name", "w1"]
        )
        client = Client(ConnectionInfo.load(conn), timeouts=TEST_TIMEOUTS)
        try:
            client.wait_for_workers(1, timeout=60)
            yield gw, client
        finally:
            client.close()
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)


def run_notebook(
    path: Path, env: dict[str, str], *, timeout: float = 120, kernel_name: str = "python3"
) -> Any:
    """Execute the notebook at ``path`` in its folder through nbclient, with ``env`` in the
    kernel's environment (it inherits PILOT_HOME); returns the executed notebook. Each cell has
    ``timeout`` seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    old = dict(os.environ)
    os.environ.update(env)
    try:
        return client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)


def run_notebook_on_pilot_up(notebook: Path, tmp_path: Path, timeout: float) -> Any:
    """``notebook`` copied into a fresh directory and run (nbclient) against a ``pilot up`` of
    its own in ``tmp_path``; the executed notebook."""
    import shutil

    work = tmp_path / "notebook"
    work.mkdir()
    shutil.copy(notebook, work / notebook.name)
    env = {**os.environ, "PILOT_HOME": str(tmp_path / "home")}
    with pilot_up(env) as up:
        return run_notebook(
            work / notebook.name, {**up, "IPYTHONDIR": str(tmp_path / "ipython")}, timeout=timeout
        )


def outputs_of(nb: Any, starts: str) -> list[dict]:
    """The outputs of the one code cell whose source starts with ``starts``."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts)]
    return cell.outputs
