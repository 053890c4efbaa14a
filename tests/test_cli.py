"""The ``pilot`` command line, driven as a user drives it: real subprocesses, real sockets.

Each server process (``pilot up``, ``pilot gateway``, ``pilot worker``) writes its stdout and
stderr to files in its own ``PILOT_HOME`` and is stopped (SIGINT, then SIGKILL of its process
group past a deadline) when its test or module ends, whatever happened. Start-up is awaited
through the servers' own signals (the connection file, ``pilot status --wait-workers``), never
with a sleep.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pilot
from gateway.client import dashboard_link
from gateway.protocol import Status

pytestmark = pytest.mark.system

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 90.0  # one `pilot ...` command, `--wait-workers` included


# -- helpers ----------------------------------------------------------------------------------


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The test process's environment with its own ``PILOT_HOME`` and no inherited target."""
    env = {k: v for k, v in os.environ.items() if k not in ("PILOT_CONNECT", "PILOT_KEY")}
    env["PILOT_HOME"] = str(home)
    env.update(extra)
    return env


def pilot_cli(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``pilot ARGS`` to completion (bounded by ``CLI_TIMEOUT_S``), ``stdin`` its input."""
    return subprocess.run(
        [sys.executable, "-m", "pilot", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, (
        f"{result.args[3:]} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


@dataclass
class Server:
    """A long-running ``pilot`` subprocess with its output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def logs(self) -> str:
        return f"stdout:\n{_tail(self.out)}\nstderr:\n{_tail(self.err)}"

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Until ``predicate()``, failing past ``START_TIMEOUT_S`` or if the process exits.

        Each round blocks on the process itself for a moment, so an early exit is seen at once
        and the loop needs no sleep."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.logs()}")
            try:
                code = self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"exited with {code} while waiting for {what}\n{self.logs()}")

    def interrupt(self) -> int:
        """SIGINT, as Ctrl-C does; return the exit code (fails past ``STOP_TIMEOUT_S``)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"did not stop within {STOP_TIMEOUT_S}s of SIGINT\n{self.logs()}")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<none>"


@contextlib.contextmanager
def running(
    args: list[str], env: dict[str, str], logs: Path, name: str, stdin: Path | None = None
) -> Iterator[Server]:
    """Start ``pilot ARGS`` (reading the file ``stdin``, else nothing) in its own process
    group; stop it (and its group) on the way out."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("wb") as fout, err.open("wb") as ferr, open(stdin or os.devnull, "rb") as fin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pilot", *args],
            env=env,
            stdin=fin,
            stdout=fout,
            stderr=ferr,
            start_new_session=True,  # its own group: a leftover is killed with its children
        )
    try:
        yield Server(proc, out, err)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT and wait; if it does not stop in time, or had died on its own (its children may
    live on), SIGKILL its process group, which this test created."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            if proc.wait(timeout=STOP_TIMEOUT_S) == 0:
                return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start_up(home: Path, workers: int = 2) -> contextlib.AbstractContextManager[Server]:
    return running(["up", "--workers", str(workers)], cli_env(home), home / "logs", "up")


def wait_until_up(server: Server, home: Path, workers: int = 2) -> None:
    """The gateway has written its connection file and ``workers`` workers registered."""
    conn = home / "connection.json"
    server.wait_for(conn.exists, "the connection file")
    result = pilot_cli(
        "status", "--wait-workers", str(workers), "--timeout", "60", env=cli_env(home)
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{server.logs()}"


# -- task functions (pickled by value: workers cannot import this module) ---------------------


def shout(x: int) -> int:
    print(f"shout {x} begins")
    print(f"shout {x} ends")
    return x * 10


def sleep_long(x: int) -> int:
    print(f"sleeping {x}", flush=True)
    time.sleep(60)
    return x


# -- `pilot up` and the commands that ask it things -------------------------------------------


@dataclass
class Up:
    server: Server
    home: Path
    env: dict[str, str]

    @property
    def connection_file(self) -> Path:
        return self.home / "connection.json"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``pilot up --workers 2`` in a PILOT_HOME of its own, shared by this module's tests."""
    home = tmp_path_factory.mktemp("pilot-up")
    with start_up(home) as server:
        wait_until_up(server, home)
        yield Up(server, home, cli_env(home))


@pytest.fixture(scope="module")
def up_client(up: Up) -> Iterator[pilot.Client]:
    with pilot.connect(up.connection_file) as client:
        yield client


def test_status_json_shows_the_workers_and_their_slots(up: Up) -> None:
    status = json.loads(ok(pilot_cli("status", "--json", env=up.env)))
    workers = {w["name"]: w for w in status["workers"]}
    assert sorted(workers) == ["local-0", "local-1"]
    assert all(w["slots"] == 1 for w in workers.values())
    assert status["gateway_id"]


def test_status_text_names_each_worker(up: Up) -> None:
    text = ok(pilot_cli("status", env=up.env))
    assert "2 workers" in text
    assert "local-0" in text and "local-1" in text


def test_connection_file_is_private_and_complete(up: Up) -> None:
    path = up.connection_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = json.loads(path.read_text())
    assert info["client_url"].startswith("tcp://")
    assert info["worker_url"].startswith("tcp://")
    assert len(bytes.fromhex(info["key"])) == 32


def test_a_job_shows_in_jobs_and_its_prints_in_logs(up: Up, up_client: pilot.Client) -> None:
    job = up_client.map(shout, [1, 2, 3], chunk=1)
    assert job.wait(60).results == [10, 20, 30]

    lines = ok(pilot_cli("jobs", env=up.env)).splitlines()
    mine = [line for line in lines if line.split()[:1] == [job.id]]
    assert len(mine) == 1, lines
    assert "done" in mine[0].split()
    listed = json.loads(ok(pilot_cli("jobs", "--json", env=up.env)))
    assert [j["state"] for j in listed if j["job_id"] == job.id] == [int(Status.DONE)]

    logs = ok(pilot_cli("logs", job.id, env=up.env))
    for x in (1, 2, 3):
        assert f"shout {x} begins\nshout {x} ends\n" in logs
    one_task = ok(pilot_cli("logs", job.id, "1", env=up.env))
    assert one_task == "shout 2 begins\nshout 2 ends\n"


def test_cancel_stops_a_running_job(up: Up, up_client: pilot.Client) -> None:
    job = up_client.map(sleep_long, [7], chunk=1)
    first = next(iter(job.events(timeout=60)), None)  # the task printed: it is running
    assert isinstance(first, pilot.Output) and first.data == b"sleeping 7\n", first

    assert ok(pilot_cli("cancel", job.id, env=up.env)).strip() == f"cancelled {job.id}"
    with pytest.raises(pilot.JobCancelled):
        job.wait(10)
    lines = ok(pilot_cli("jobs", env=up.env)).splitlines()
    assert any(line.split()[:1] == [job.id] and "cancelled" in line.split() for line in lines)


def test_cancel_of_an_unknown_job_says_so(up: Up) -> None:
    result = pilot_cli("cancel", "no-such-job", env=up.env)
    assert result.returncode != 0
    assert "no-such-job" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_with_zero_slots_fails_with_a_clear_message(up: Up) -> None:
    result = pilot_cli("worker", "--slots", "0", env=up.env)
    assert result.returncode != 0
    assert "--slots must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_with_negative_cores_fails_with_a_clear_message(up: Up) -> None:
    result = pilot_cli("worker", "--cores", "-1", env=up.env)
    assert result.returncode != 0
    assert "--cores must be 0 (every core) or more" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_reads_its_connection_file_on_stdin(up: Up) -> None:
    """``pilot worker --connect - < connection.json`` (``LocalCluster`` and ``pilot up`` pipe
    it in once the gateway is up: their workers start beside it)."""
    args = ["worker", "--connect", "-", "--name", "from-stdin"]
    with running(args, up.env, up.home / "logs", "stdin", stdin=up.connection_file) as worker:
        status = ok(pilot_cli("status", "--wait-workers", "3", "--json", env=up.env))
        names = sorted(w["name"] for w in json.loads(status)["workers"])
        assert names == ["from-stdin", "local-0", "local-1"], worker.logs()
        assert worker.interrupt() == 0, worker.logs()


def test_a_worker_given_no_connection_on_stdin_fails_with_a_clear_message(up: Up) -> None:
    for given in ("", "not json", "[1, 2]", '{"client_url": "tcp://127.0.0.1:1"}'):
        result = pilot_cli("worker", "--connect", "-", env=up.env, stdin=given)
        assert result.returncode != 0, given
        assert "the connection on stdin" in result.stderr.lower(), result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_status_without_a_gateway_says_to_run_pilot_up(tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    home.mkdir()
    result = pilot_cli("status", env=cli_env(home))
    assert result.returncode != 0
    assert "pilot up" in result.stderr
    assert "Traceback" not in result.stderr


def test_pilot_up_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with start_up(home) as server:
        wait_until_up(server, home)
        # `pilot up` handles Ctrl-C once it says so; before that, Ctrl-C aborts the start-up.
        server.wait_for(lambda: "Press Ctrl-C" in _tail(server.out), "pilot up's ready line")
        assert server.interrupt() == 0, server.logs()
        assert not (home / "connection.json").exists()
        assert "stopped." in _tail(server.out)


def _this_hosts_address() -> str:
    """An IPv4 address of this machine that is not loopback (its network interface's)."""
    import ipaddress

    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    pytest.fail("this machine has no IPv4 address but loopback: the test needs one")


def test_pilot_up_with_no_workers_on_every_interface_takes_a_worker_from_elsewhere(
    tmp_path: Path,
) -> None:
    """``pilot up --workers 0 --bind 0.0.0.0``, the gateway alone on a login node (issue 14):
    it is secure by default off loopback, and a worker reaches it at this host's address."""
    home = tmp_path / "home"
    env = cli_env(home)
    with running(["up", "--workers", "0", "--bind", "0.0.0.0"], env, home / "logs", "up") as server:
        server.wait_for(lambda: "Press Ctrl-C" in _tail(server.out), "pilot up's ready line")
        info = json.loads((home / "connection.json").read_text())
        assert info["worker_url"].startswith("tcp://0.0.0.0:"), info
        assert info.get("server_key"), "secure by default on every interface"
        port = info["worker_url"].rsplit(":", 1)[1]
        address = f"tcp://{_this_hosts_address()}:{port}"  # keys: from the connection file
        args = ["worker", "--connect", address, "--name", "elsewhere"]
        with running(args, env, home / "logs", "worker"):
            status = json.loads(ok(pilot_cli("status", "--wait-workers", "1", "--json", env=env)))
        assert [w["name"] for w in status["workers"]] == ["elsewhere"]


# -- a gateway and a worker started separately ------------------------------------------------


def test_gateway_on_free_ports_with_a_worker_given_the_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    conn = tmp_path / "conn" / "gateway.json"
    gateway_env = cli_env(tmp_path / "gateway-home")
    worker_env = cli_env(tmp_path / "worker-home")  # no connection file there: the key is all
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(
            running(
                [
                    "gateway",
                    "--client-port",
                    "0",
                    "--worker-port",
                    "0",
                    "--http-port",
                    "0",
                    "--state",
                    str(state),
                    "--connection-file",
                    str(conn),
                ],
                gateway_env,
                tmp_path / "logs",
                "gateway",
            )
        )
        gateway.wait_for(conn.exists, "the connection file")
        assert stat.S_IMODE(conn.stat().st_mode) == 0o600
        info = json.loads(conn.read_text())
        ports = {
            k: int(info[k].rstrip("/").rsplit(":", 1)[1])
            for k in ("client_url", "worker_url", "http_url")
        }
        assert all(ports.values()), info
        assert len(set(ports.values())) == 3, info

        worker_env["PILOT_KEY"] = info["key"]
        worker = stack.enter_context(
            running(
                [
                    "worker",
                    "--connect",
                    f"tcp://127.0.0.1:{ports['worker_url']}",
                    "--name",
                    "remote-1",
                    "--slots",
                    "2",
                ],
                worker_env,
                tmp_path / "logs",
                "worker",
            )
        )

        status = pilot_cli(
            "status",
            "--json",
            "--wait-workers",
            "1",
            "--timeout",
            "60",
            env=cli_env(tmp_path / "gateway-home", PILOT_CONNECT=str(conn)),
        )
        assert status.returncode == 0, f"{status.stderr}\n{gateway.logs()}\n{worker.logs()}"
        workers = json.loads(status.stdout)["workers"]
        assert [(w["name"], w["slots"]) for w in workers] == [("remote-1", 2)]

        with pilot.connect(conn) as client:
            assert client.submit(pow, 2, 10).result(60) == 1024
            login = dashboard_link(client).url  # the dashboard needs a login (a cookie)

        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        browser.open(login, timeout=10)
        with browser.open(info["http_url"] + "api/status", timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("application/json")
            page = json.loads(reply.read())
        assert page["gateway_id"] == info["gateway_id"]
        assert [w["name"] for w in page["workers"]] == ["remote-1"]
        assert page["workers"][0]["tasks_done"] == 1

        assert worker.interrupt() == 0, worker.logs()
        assert gateway.interrupt() == 0, gateway.logs()
        assert not conn.exists()
