"""Training across hosts: a ``ranks=2`` job over a real network, one rank per host.

Four hosts made of network namespaces (tests/hosts.py): the gateway on ``gw``, a worker of one
slot on each of ``a`` and ``b``, and the client on ``cl``. Each host reaches the others only
over the bridge, and its ``127.0.0.1`` is its own: a rendezvous address that only works on
loopback (rank 0 listening on 127.0.0.1, or a ``MASTER_ADDR`` of 127.0.0.1) cannot meet here,
so this is the test that catches it. The ranks train a tiny model with DDP (gloo) and report
the address they reach the gateway from, their torchrun environment and a hash of their
parameters; the client script prints them as one JSON line.

Needs root and ``ip netns`` (CI has both); skips only with ``HostsUnavailable``'s reason (or
fails where ``PILOT_TEST_REQUIRE_HOSTS=1``). The ``network`` fixture kills every process it
started and removes the namespaces, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import pytest
from hosts import (
    CommandFailed,
    Host,
    Network,
    network_fixture,  # noqa: F401 (provides the `network` fixture)
    read_line,
)

pytest.importorskip("torch")

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(420)]

GATEWAY_READY_TIMEOUT_S = 60.0  # a Python start and a SQLite state on a loaded machine
JOB_TIMEOUT_S = 240.0  # two ranks importing torch on a shared 2-core machine
CLIENT_TIMEOUT_S = JOB_TIMEOUT_S + 60.0
STEPS = 5
LOG_TAIL_CHARS = 3000

# Runs in the client's host: argv = connection file, the gateway's IP, steps. Prints one line,
# {"ranks": [rank 0's report, rank 1's], "reference": the parameters of one process}.
CLIENT = r"""
import json, sys
import pilot

connection, gateway_ip, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
GLOBAL_BATCH = 16


def batch(step):
    import torch
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def train(gateway_ip, steps):
    import hashlib, os, socket
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The source address towards the gateway: this rank's host (a UDP connect sends nothing).
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((gateway_ip, 9))
    address = probe.getsockname()[0]
    probe.close()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = GLOBAL_BATCH // world
    for step in range(steps):
        x, y = batch(step)
        mine = slice(rank * per, (rank + 1) * per)
        loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = [p.detach().flatten() for p in model.module.parameters()]
    flat = torch.cat(params)
    peers = [None] * world
    dist.all_gather_object(peers, address)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GLOO_SOCKET_IFNAME")
    return {
        "rank": rank,
        "address": address,
        "peers": peers,
        "hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "params": flat.tolist(),
        "env": {k: os.environ.get(k) for k in keys},
    }


def reference(steps):
    import torch
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


with pilot.connect(connection) as client:
    client.wait_for_workers(2, timeout=60)
    job = client.train(train, gateway_ip, steps, ranks=2, init_timeout=60)
    job.wait(%(job_timeout)s)
    print(json.dumps({"ranks": job.results, "reference": reference(steps)}), flush=True)
"""


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


class _Logs:
    """Each server's stderr in a file of ``tmp_path``, quoted when the test fails."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: list[Path] = []

    def open(self, name: str) -> IO[bytes]:
        path = self.root / f"{name}.log"
        self.paths.append(path)
        return path.open("wb")

    def text(self) -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in self.paths)


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PILOT_HOME": str(home), "PILOT_LOG_LEVEL": "INFO"}
    env.pop("PILOT_CONNECT", None)
    return env


def _start_gateway(host: Host, root: Path, logs: _Logs) -> Path:
    """``pilot gateway`` bound to ``host``'s address, without encryption (a test network);
    returns its connection file once its ready line is out."""
    connection = root / "gateway" / "connection.json"
    argv: Sequence[str] = ["-m", "pilot", "gateway", "--bind", host.ip, "--insecure"]
    argv = [*argv, "--http-port", "none", "--ready-line", "--state", str(root / "gateway")]
    argv = [*argv, "--connection-file", str(connection)]
    with logs.open("gateway") as stderr:
        proc = host.python_popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, env=_env(root / "gateway"), text=True
        )
    line = read_line(proc, timeout=GATEWAY_READY_TIMEOUT_S)
    assert line.startswith("READY "), f"the gateway's ready line: {line!r}\n{logs.text()}"
    return connection


def _start_worker(host: Host, connection: Path, root: Path, logs: _Logs) -> None:
    argv = ["-m", "pilot", "worker", "--connect", str(connection), "--slots", "1"]
    argv += ["--name", host.name, "--no-blender"]
    with logs.open(f"worker-{host.name}") as stderr:
        host.python_popen(argv, stdout=stderr, stderr=subprocess.STDOUT, env=_env(root / host.name))


def test_ranks_on_two_hosts_meet_at_rank_0s_address_and_train_identically(
    network: Network, tmp_path: Path
) -> None:
    gw, a, b, cl = (network.add_host(name) for name in ("gw", "a", "b", "cl"))
    logs = _Logs(tmp_path)
    connection = _start_gateway(gw, tmp_path, logs)
    for host in (a, b):
        _start_worker(host, connection, tmp_path, logs)

    script = CLIENT % {"job_timeout": JOB_TIMEOUT_S}
    argv = ["-c", script, str(connection), gw.ip, str(STEPS)]
    try:
        done = cl.python(argv, timeout=CLIENT_TIMEOUT_S)
    except (CommandFailed, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"the client failed: {exc}\n{logs.text()}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])

    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1], "one result per rank, in rank order"
    addresses = [r["address"] for r in ranks]
    assert sorted(addresses) == sorted([a.ip, b.ip]), "one rank on each worker's host"
    master = ranks[0]["env"]["MASTER_ADDR"]
    assert master == addresses[0], "MASTER_ADDR is rank 0's host, as the others reach it"
    assert master != "127.0.0.1" and master != gw.ip
    for r in ranks:
        assert r["env"]["MASTER_ADDR"] == master
        assert r["env"]["MASTER_PORT"] == ranks[0]["env"]["MASTER_PORT"]
        assert r["env"]["WORLD_SIZE"] == "2" and r["env"]["LOCAL_WORLD_SIZE"] == "1"
        assert r["env"]["GLOO_SOCKET_IFNAME"] == a.ifname, "the interface that reaches rank 0"
        assert r["peers"] == addresses, "each rank heard the other over the network"
    assert ranks[0]["hash"] == ranks[1]["hash"], "parameters bit-identical on every rank"
    assert ranks[0]["params"] == pytest.approx(report["reference"], rel=1e-5, abs=1e-6), (
        "DDP over two hosts trains as one process on the global batch"
    )
