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

from gateway.client import Client
from gateway.protocol import GatewaySettings, JobCancelled, TaskDone
from gateway.server import _clientside
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
