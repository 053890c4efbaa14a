"""Parallel Pilot across hosts (issue 11): a gateway on one network-namespace host, workers on
others, the client on another, all on one bridge (``tests/hosts.py``). Encryption is checked on
the wire (a capture of the bridge), faults are real (a host's cable pulled for 10 s, netem
delay and loss), and LAN discovery uses real multicast. Every host and process is torn down by
the ``network`` fixture, on failure too."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hosts import (
    Host,
    HostsError,
    HostsUnavailable,
    Network,
    network_fixture,  # noqa: F401 (provides the `network` fixture)
    read_line,
    skip_unavailable,
)

from gateway.protocol import ConnectionInfo
from pilot._cli import main

pytestmark = [pytest.mark.system, pytest.mark.slow]

START_TIMEOUT_S = 60.0
CUT_S = 10.0  # how long a cable stays pulled: twice the gateway's heartbeat deadline

# The client's side of each test, run inside the client's host. argv: connection file, workers
# to wait for, mode, mode's argument. Prints progress lines, then one JSON line.
CLIENT = r"""
import json, sys, time
import pilot
from gateway.protocol import Output

conn, n_workers, mode, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = pilot.connect(conn)
c.wait_for_workers(n_workers, 60)

def outputs(job):
    return b"".join(e.data for e in job.events(timeout=2) if isinstance(e, Output)
                    and isinstance(e.data, bytes))

if mode == "marker":  # arg: the marker; it travels reversed and is printed by the task
    job = c.map(lambda s: print(s[::-1], flush=True) or len(s), [arg[::-1]] * 3, chunk=1)
    job.wait(120)
    print(json.dumps({"results": job.results, "received": arg.encode() in outputs(job)}))
elif mode == "slow":  # arg: tasks; each takes 3 s; "BUSY" once two run at the same time
    def slow(i):
        print(f"start {i}", flush=True)
        time.sleep(3)
        return i
    job = c.map(slow, range(int(arg)), chunk=1)
    seen = set()
    for ev in job.events():
        if isinstance(ev, Output) and b"start" in ev.data:
            seen.add(ev.index)
            if len(seen) == 2:
                break
    print("BUSY", flush=True)
    job.wait(240)
    workers = len(c.status(wait_workers=n_workers, timeout=60).workers)
    done = [j.done for j in c.jobs() if j.job_id == job.id]
    tasks = {i: [t.worker, t.attempts] for i, t in job.tasks.items()}
    print(json.dumps({"results": job.results, "tasks": tasks, "workers": workers, "done": done}))
elif mode == "many":  # arg: items, in chunks of 10
    job = c.map(lambda x: x * 2, range(int(arg)), chunk=10)
    job.wait(600)
    done = [j.done for j in c.jobs() if j.job_id == job.id]
    print(json.dumps({"results": job.results, "done": done}))
"""


def env_for(tmp: Path, name: str) -> dict[str, str]:
    home = tmp / name
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PILOT_HOME": str(home), "PILOT_LOG_LEVEL": "WARNING"}


def start_gateway(host: Host, tmp: Path, *extra: str) -> ConnectionInfo:
    """``pilot gateway --bind HOST_IP`` inside ``host``; its connection (the admin's file).
    Its log goes to ``tmp/gateway.log``."""
    conn = tmp / "gateway" / "connection.json"
    argv = ["-m", "pilot", "gateway", "--bind", host.ip, "--state", str(tmp / "gateway" / "state")]
    argv += ["--connection-file", str(conn), "--http-port", "none", "--ready-line", *extra]
    env = {**env_for(tmp, "gw"), "PILOT_LOG_LEVEL": "INFO"}
    with open(tmp / "gateway.log", "w") as log:
        proc = host.python_popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = read_line(proc, START_TIMEOUT_S)
    except (HostsError, TimeoutError) as exc:
        raise AssertionError(f"{exc}; its log:\n{(tmp / 'gateway.log').read_text()}") from None
    assert line.startswith("READY "), line
    return ConnectionInfo.load(conn)


def start_worker(host: Host, tmp: Path, *connect: str) -> subprocess.Popen[Any]:
    argv = ["-m", "pilot", "worker", *connect, "--name", host.name, "--no-blender"]
    return host.python_popen(argv, env=env_for(tmp, host.name))


def start_client(host: Host, tmp: Path, workers: int, mode: str, arg: Any) -> Any:
    conn = str(tmp / "gateway" / "connection.json")
    argv = ["-c", CLIENT, conn, str(workers), mode, str(arg)]
    return host.python_popen(argv, stdout=subprocess.PIPE, text=True, env=env_for(tmp, "client"))


def last_json(proc: Any, timeout: float) -> dict[str, Any]:
    line = read_line(proc, timeout)
    while not line.startswith("{"):
        line = read_line(proc, timeout)
    return dict(json.loads(line))


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "insecure"])
def test_a_capture_of_the_bridge_shows_what_a_task_prints_only_without_encryption(
    network: Network, tmp_path: Path, secure: bool
) -> None:
    gw, wk, cl = (network.add_host(n) for n in ("gw", "wk", "cl"))
    info = start_gateway(gw, tmp_path, *(() if secure else ("--insecure",)))
    assert info.secure == secure  # on by default when the gateway binds a real address
    start_worker(wk, tmp_path, "--connect", str(tmp_path / "gateway" / "connection.json"))
    capture = network.capture("tcp")
    marker = f"pilot-marker-{secrets.token_hex(8)}"
    client = start_client(cl, tmp_path, 1, "marker", marker)
    got = last_json(client, START_TIMEOUT_S * 2)
    pcap = capture.stop()
    assert got == {"results": [len(marker)] * 3, "received": True}
    assert len(pcap) > 10_000  # the job's traffic crossed the bridge
    assert (marker.encode() in pcap) is not secure


def busy_pool(network: Network, tmp_path: Path) -> tuple[Any, Any, Any]:
    """A gateway, two workers and a client host; the client's 8 slow tasks under way. Returns
    the first worker's host, the client's host and the client process."""
    gw, w1, w2, cl = (network.add_host(n) for n in ("gw", "wone", "wtwo", "cl"))
    start_gateway(gw, tmp_path)
    for w in (w1, w2):
        start_worker(w, tmp_path, "--connect", str(tmp_path / "gateway" / "connection.json"))
    client = start_client(cl, tmp_path, 2, "slow", 8)
    assert read_line(client, START_TIMEOUT_S * 2) == "BUSY"
    return w1, cl, client


def test_a_workers_cable_cut_for_ten_seconds_requeues_its_tasks_and_it_comes_back(
    network: Network, tmp_path: Path
) -> None:
    w1, _cl, client = busy_pool(network, tmp_path)
    w1.cut()
    time.sleep(CUT_S)  # the fault's length: the heartbeat deadline (5 s) passes meanwhile
    w1.restore()
    got = last_json(client, 240)
    assert got["results"] == list(range(8)) and got["done"] == [8]  # each result once
    log = (tmp_path / "gateway.log").read_text()
    assert "worker wone is gone; its tasks went back to the queue" in log  # at the deadline
    assert got["workers"] == 2  # the cut worker registered again by itself


def test_the_clients_cable_cut_for_ten_seconds_mid_job_loses_no_result(
    network: Network, tmp_path: Path
) -> None:
    _w1, cl, client = busy_pool(network, tmp_path)
    cl.cut()
    time.sleep(CUT_S)  # the fault's length
    cl.restore()
    got = last_json(client, 240)
    assert got["results"] == list(range(8)) and got["done"] == [8]


def test_with_delay_and_loss_a_thousand_items_complete_exactly_once(
    network: Network, tmp_path: Path
) -> None:
    gw, w1, w2, cl = (network.add_host(n) for n in ("gw", "wone", "wtwo", "cl"))
    try:
        for host in (gw, w1, w2, cl):
            host.delay(50, loss_pct=1)
    except HostsUnavailable as exc:
        skip_unavailable(exc)
    start_gateway(gw, tmp_path)
    for w in (w1, w2):
        start_worker(w, tmp_path, "--connect", str(tmp_path / "gateway" / "connection.json"))
    got = last_json(start_client(cl, tmp_path, 2, "many", 1000), 600)
    assert got["results"] == [2 * x for x in range(1000)] and got["done"] == [100]


def test_a_worker_finds_an_advertised_gateway_on_the_lan_and_joins_with_its_keys(
    network: Network, tmp_path: Path
) -> None:
    gw, wk, cl = (network.add_host(n) for n in ("gw", "wk", "cl"))
    info = start_gateway(gw, tmp_path, "--advertise")
    assert info.secure
    rack = tmp_path / "rack.json"  # a worker credential: no endpoints needed, only keys
    state = str(tmp_path / "gateway" / "state")
    conn = str(tmp_path / "gateway" / "connection.json")
    assert main(["user", "add", "rack", "--worker", "--state", state, "--connection-file", conn,
                 "--out", str(rack)]) == 0  # fmt: skip
    start_worker(wk, tmp_path, "--discover", "--keys", str(rack))
    got = last_json(start_client(cl, tmp_path, 1, "marker", "found"), START_TIMEOUT_S * 2)
    assert got["results"] == [5, 5, 5]


def test_a_gateway_with_another_key_is_not_joined(network: Network, tmp_path: Path) -> None:
    gw, wk = network.add_host("gw"), network.add_host("wk")
    start_gateway(gw, tmp_path, "--advertise")
    stranger = tmp_path / "stranger.json"
    keys = {"server_key": "k" * 40, "worker_public_key": "p" * 40, "worker_secret_key": "s" * 40}
    ConnectionInfo("tcp://x:1", "tcp://x:1", "00" * 32, **keys).save(stranger)
    worker = start_worker(wk, tmp_path, "--discover", "--keys", str(stranger))
    assert worker.wait(60) == 1  # nothing with that key announced itself: NoGateway
