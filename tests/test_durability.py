"""Durable before sent: a gateway whose database cannot grow (a real ``SQLITE_FULL``, made with
``PRAGMA max_page_count``) sends nothing it has not stored, refuses new work with a clear error,
loses nothing, and carries on when space comes back.

The gateway runs in this process (on its own loop in a thread) so the test can cap its
database; the worker is a real ``pilot worker`` process and the client a real ``Client``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import Client
from gateway.protocol import GatewaySettings, JobError
from tests_support import TEST_TIMEOUTS, ThreadGateway, thread_gateway_with_a_worker, wait_until

pytestmark = pytest.mark.system


def padded(x: int) -> bytes:
    return bytes([x % 256]) * 4000  # results that need new pages in the database


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ThreadGateway, Client]]:
    conn = tmp_path / "connection.json"
    settings = GatewaySettings(
        state_dir=tmp_path / "state",
        http_port=None,
        connection_file=conn,
        timeouts=TEST_TIMEOUTS,
        inline_result_bytes=1 << 20,
    )
    with thread_gateway_with_a_worker(settings) as (gw, client):
        yield gw, client


def test_a_full_database_holds_the_turn_refuses_new_work_and_loses_nothing(
    cluster: tuple[ThreadGateway, Client],
) -> None:
    gw, client = cluster
    assert client.map(padded, range(5)).wait(60).results == [padded(x) for x in range(5)]

    gw.call(lambda g: g.store.limit_pages(g.store.page_count()))  # no room for one more page
    held = client.map(padded, range(40), chunk=1)
    wait_until(
        lambda: client.status().counters.get("commit_failures", 0) >= 5,
        timeout=30,
        what="several turns whose commit failed",
    )
    # Turns went by and the worker is connected, yet nothing unstored left the gateway: no
    # assignment (so no task ran), no result, no acknowledgement of the job's end.
    assert held.progress == (0, 40)
    assert not held.done()
    assert client.status().jobs == () or all(j.done == 0 for j in client.status().jobs)

    refused = client.map(padded, range(3))
    with pytest.raises(JobError, match="cannot write its state"):
        refused.wait(30)

    gw.call(lambda g: g.store.limit_pages(0))  # space comes back
    assert held.wait(120).results == [padded(x) for x in range(40)], "nothing was lost"
    assert client.map(padded, range(3)).wait(60).results == [padded(x) for x in range(3)]
    stored = gw.call(lambda g: g.store.settled_tasks(held.id))
    assert len(stored) == 40, "every result is on disk, once"
