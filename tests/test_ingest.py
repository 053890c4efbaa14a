"""Big jobs are stored over several turns (``gateway.server._ingest``): the gateway answers
between them, and the job runs whole, once, when every task's row is on disk.

The gateway runs in this process (``ThreadGateway``) with a slice of 100 tasks, so a job of
1,000 tasks takes ten turns; the worker is a real ``pilot worker`` process and the client a
real ``Client``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from gateway.client import Client
from gateway.protocol import (
    AttachJob,
    ClientHello,
    Codec,
    ConnectionInfo,
    GatewaySettings,
    JobCancelled,
    StatusQuery,
    StatusReply,
    TaskDone,
    TaskEvents,
)
from gateway.server import _clientside, _replay
from tests_support import TEST_TIMEOUTS, ThreadGateway, thread_gateway_with_a_worker

pytestmark = pytest.mark.system

SLICE = 100


def square(x: int) -> int:
    return x * x


@pytest.fixture
def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ThreadGateway, Client]]:
    monkeypatch.setattr(_clientside, "INGEST_SLICE", SLICE)
    monkeypatch.setattr("gateway.server._ingest.SLICE", SLICE)
    conn = tmp_path / "connection.json"
    settings = GatewaySettings(
        state_dir=tmp_path / "state", http_port=None, connection_file=conn, timeouts=TEST_TIMEOUTS
    )
    with thread_gateway_with_a_worker(settings) as (gw, client):
        yield gw, client


def test_a_job_of_many_slices_runs_whole_and_each_result_comes_once(
    cluster: tuple[ThreadGateway, Client],
) -> None:
    gw, client = cluster
    seen: list[int] = []
    job = client.map(square, range(10 * SLICE + 7), chunk=1)
    for ev in job.events(timeout=120):
        if isinstance(ev, TaskDone):
            seen.append(ev.index)
    assert job.wait(60).results == [x * x for x in range(10 * SLICE + 7)]
    assert sorted(seen) == list(range(10 * SLICE + 7)), "every task's result, once"
    stored = gw.call(lambda g: g.store.settled_tasks(job.id))
    assert len(stored) == 10 * SLICE + 7
    # A client re-attaching after a gateway restart says what it has: the replay is the rest.
    known = bytearray(job.tasks.known())
    assert known == b"\x01" * (10 * SLICE + 7)
    known[3] = known[200] = 0
    missed = gw.call(lambda g: g.store.settled_tasks(job.id, bytes(known[:300])))
    assert [d.index for d in missed] == [3, 200, *range(300, 10 * SLICE + 7)]
    assert [d.index for d in missed] == [
        d.index for d in stored if d.index in {3, 200} or d.index >= 300
    ]
    assert all(d.status == 0 and d.value is not None for d in missed), "whole outcomes"
    assert (
        gw.call(lambda g: len(g.registry.jobs[job.id].args) if job.id in g.registry.jobs else 0)
        <= 4096
    )


def test_a_job_cancelled_while_it_is_stored_ends_cancelled(
    cluster: tuple[ThreadGateway, Client],
) -> None:
    _gw, client = cluster
    job = client.map(square, range(50 * SLICE), chunk=1)
    job.cancel()  # it reaches the gateway while the job's rows are being stored
    with pytest.raises(JobCancelled):
        job.wait(120)
    assert client.map(square, range(3)).wait(60).results == [0, 1, 4], "the gateway carries on"


def test_a_replay_to_an_attaching_client_goes_a_slice_a_turn_and_others_are_answered_between(
    cluster: tuple[ThreadGateway, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, client = cluster
    n = 10 * SLICE + 7
    job = client.map(square, range(n), chunk=1)
    assert job.wait(120).results == [x * x for x in range(n)]
    monkeypatch.setattr(_replay, "REPLAY_SLICE", 1)  # the replay takes 1,007 turns
    known = bytearray(b"\x01" * n)
    known[5] = known[n - 1] = 0  # the first and the last slices each owe one outcome

    info = ConnectionInfo.load(gw.settings.connection_file)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(info.client_url)
    codec = Codec(info.key)
    try:
        sock.send_multipart(codec.encode(ClientHello("replay-test")))
        sock.send_multipart(codec.encode(AttachJob(job.id, False, bytes(known))))
        sock.send_multipart(codec.encode(StatusQuery()))
        order: list[str] = []
        replayed: list[int] = []
        while len(replayed) < 2 or "status" not in order:
            assert sock.poll(30_000), f"no answer; so far {order}"
            msg = codec.decode(sock.recv_multipart()).msg
            if isinstance(msg, TaskEvents):
                replayed += [d.index for d in msg.done]
                order += [f"task {d.index}" for d in msg.done]
            elif isinstance(msg, StatusReply):
                order.append("status")
    finally:
        sock.close()
        ctx.term()
    assert replayed == [5, n - 1], "only what the client lacked, whole"
    assert order.index("status") < order.index(f"task {n - 1}"), (
        f"the status query waited for the whole replay: {order}"
    )
