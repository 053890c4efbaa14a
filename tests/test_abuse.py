"""Bounded under abuse (issue 11): a task that prints a gigabyte, a result over the size limit,
ten thousand connections of garbage. Real gateway and worker processes on loopback; memory is
each process's resident set (psutil), read before and after."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator

import psutil
import pytest

import pilot
from gateway.client import Client
from gateway.protocol import Output, TaskError
from tests_support import TEST_TIMEOUTS

pytestmark = pytest.mark.system

MIB = 1 << 20
GROWTH_LIMIT_BYTES = 200 * MIB  # far under the gigabyte, far over the 16 MiB output budget
LIMIT_BYTES = 4 * MIB  # the message size limit of the small-limit cluster
GARBAGE_CONNECTIONS = 10_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pilot.LocalCluster]:
    env = {"PILOT_MAX_MESSAGE_BYTES": str(LIMIT_BYTES)}
    home = tmp_path_factory.mktemp("abuse")
    with pilot.LocalCluster(
        workers=1, home=home, env=env, secure=True, http=False, timeouts=TEST_TIMEOUTS
    ) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: pilot.LocalCluster) -> Client:
    return cluster.client()


def rss(pid: int | None = None) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def shout(gigabytes: float) -> int:
    """Print ``gigabytes`` GB to stdout, half through Python, half straight to fd 1; return
    how many bytes."""
    block = "x" * MIB
    n = int(gigabytes * 1024)
    for _ in range(n // 2):
        sys.stdout.write(block)
    raw = block.encode()
    for _ in range(n - n // 2):
        os.write(1, raw)
    return n * MIB


def test_a_task_that_prints_a_gigabyte_costs_its_output_budget_and_loses_no_result(
    cluster: pilot.LocalCluster, client: Client
) -> None:
    assert cluster.gateway is not None
    gateway_before, client_before = rss(cluster.gateway.pid), rss()
    job = client.map(shout, [1.0, 0.001])
    assert job.wait(300).results == [1024 * MIB, MIB]
    got = b"".join(ev.data for ev in job.events(timeout=1) if isinstance(ev, Output))
    assert b"[output truncated: " in got and b" bytes dropped]" in got
    assert 16 * MIB <= len(got) < 20 * MIB  # the budget of the loud task, all of the quiet one
    assert rss(cluster.gateway.pid) - gateway_before < GROWTH_LIMIT_BYTES
    assert rss() - client_before < GROWTH_LIMIT_BYTES
    kept = b"".join(o.data for o in client.logs(job.id) if isinstance(o.data, bytes))
    assert b"[output truncated]" in kept  # the gateway keeps 1 MiB of it for `pilot logs`


def test_a_result_over_the_size_limit_fails_its_item_with_a_clear_error(
    client: Client,
) -> None:
    job = client.map(lambda n: b"r" * n, [10, 2 * LIMIT_BYTES, 20])
    with pytest.raises(TaskError, match="over the message size limit") as raised:
        job.wait(60)
    assert raised.value.index == 1
    assert job.value(0) == [b"r" * 10] and job.value(2) == [b"r" * 20]


def test_ten_thousand_connections_of_garbage_leave_the_gateway_serving(
    cluster: pilot.LocalCluster, client: Client
) -> None:
    info, gateway = cluster.connection, cluster.gateway
    assert info is not None and gateway is not None
    before = rss(gateway.pid)
    ports = [int(info.client_url.rsplit(":", 1)[1]), int(info.worker_url.rsplit(":", 1)[1])]
    junk = os.urandom(512)
    for i in range(GARBAGE_CONNECTIONS):
        with socket.create_connection(("127.0.0.1", ports[i % 2]), timeout=5) as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST
            conn.sendall(junk[i % 256 :])
    assert client.map(abs, [-1, -2, -3]).wait(60).results == [1, 2, 3]
    assert len(client.status().workers) == 1
    assert rss(gateway.pid) - before < GROWTH_LIMIT_BYTES
