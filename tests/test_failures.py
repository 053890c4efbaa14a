"""Failures with real processes: killed workers, a killed gateway, hostile peers."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import zmq

import pilot
from gateway.protocol import PROTOCOL_FRAME, Codec, TaskDone
from gateway.protocol import _messages as m
from tests_support import TEST_TIMEOUTS, wait_until

pytestmark = pytest.mark.system


def slow_square(x: int) -> int:
    import time

    time.sleep(0.1)
    print(f"done {x}")
    return x * x


def _first_done(job: pilot.Job) -> None:
    next(ev for ev in job.events() if isinstance(ev, TaskDone))


def test_worker_killed_mid_job_every_item_exactly_once() -> None:
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        job = client.map(slow_square, range(40), chunk=2)
        _first_done(job)
        cluster.workers[0].kill()
        job.wait(120)
        assert job.results == [x * x for x in range(40)]
        assert len(job.tasks) == 20, "one outcome per task"
        survivors = {d.worker for d in job.tasks.values()}
        assert "local-1" in survivors


def test_gateway_killed_and_restarted_job_completes() -> None:
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        job = client.map(slow_square, range(60), chunk=3)
        _first_done(job)
        cluster.kill_gateway()
        cluster.start_gateway()  # same state directory, same ports
        job.wait(120)
        assert job.results == [x * x for x in range(60)]
        wait_until(  # the job can finish before the second worker is back
            lambda: len(client.status().workers) == 2,
            timeout=30,
            what="both workers reconnected by themselves",
        )


def test_gateway_restart_resumes_jobs_with_nobody_attached() -> None:
    with pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        job = client.map(slow_square, range(20), chunk=1)
        _first_done(job)
        job_id = job.id
        client.close()
        cluster.kill_gateway()
        cluster.start_gateway()
        other = cluster.client()
        again = other.attach(job_id)
        again.wait(120)
        assert again.results == [x * x for x in range(20)]


def test_sigterm_worker_hands_back_and_job_completes() -> None:
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        job = client.map(slow_square, range(30), chunk=1)
        _first_done(job)
        cluster.workers[0].send_signal(signal.SIGTERM)
        assert cluster.workers[0].wait(30) == 0, "a SIGTERM'd worker exits cleanly"
        job.wait(120)
        assert job.results == [x * x for x in range(30)]
        assert all(d.status == 0 and not d.error for d in job.tasks.values())
        assert len({d.worker for d in job.tasks.values()}) == 2, "both worked before the stop"


def test_gateway_keeps_serving_through_garbage(
    cluster: pilot.LocalCluster, client: pilot.Client
) -> None:
    info = cluster.connection
    assert info is not None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(info.client_url)
    try:
        forged = Codec(os.urandom(32).hex()).encode(m.StatusQuery())
        genuine = Codec(info.key)
        replayed = genuine.encode(m.JobsQuery())
        sock.send_multipart(forged)
        sock.send_multipart([b"garbage"])
        sock.send_multipart([PROTOCOL_FRAME, b"sig", b"\xc1\xc1", b"body"])
        sock.send_multipart(replayed)
        sock.send_multipart(replayed)  # the second copy is a replay
        wrong_version = list(genuine.encode(m.Heartbeat()))
        wrong_version[0] = b"PILOT/9"
        sock.send_multipart(wrong_version)
        assert sock.poll(10_000), "the other-version peer is told why"
        replies = []
        while sock.poll(2000):
            replies.append(genuine.decode(sock.recv_multipart()).msg)
            if any(isinstance(r, m.Refused) for r in replies):
                break
        refused = next(r for r in replies if isinstance(r, m.Refused))
        assert "same major version" in refused.reason
    finally:
        sock.close()
        ctx.term()
    wait_until(lambda: client.status().counters.get("rejected", 0) >= 5, what="rejections counted")
    counters = client.status().counters
    assert counters["rejected_client_AuthenticationError"] >= 3
    assert counters["rejected_client_VersionMismatch"] == 1
    assert client.submit(pow, 2, 10).result(30) == 1024, "still serving"


def test_no_gateway_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PILOT_HOME", str(tmp_path))
    with pytest.raises(pilot.NoGateway, match="pilot up"):
        pilot.connect()


def test_stalled_worker_is_lost_then_comes_back_and_works() -> None:
    with pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        assert client.submit(pow, 2, 5).result(30) == 32
        proc = cluster.workers[0]
        proc.send_signal(signal.SIGSTOP)  # silent past the gateway's 5 s deadline
        try:
            wait_until(lambda: not client.status().workers, timeout=30, what="worker lost")
        finally:
            proc.send_signal(signal.SIGCONT)
        wait_until(lambda: len(client.status().workers) == 1, timeout=30, what="re-registered")
        assert client.submit(pow, 3, 3).result(30) == 27, "it gets work again"


def test_client_facing_another_major_version_is_told_so() -> None:
    from gateway.protocol import ConnectionInfo, VersionMismatch

    key = os.urandom(32).hex()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        info = ConnectionInfo(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port}", key)

        def future_gateway() -> None:  # answers the hello in protocol 3
            ident, *_ = router.recv_multipart()
            reply = list(Codec(key).encode(m.Refused("hello")))
            reply[0] = b"PILOT/3"
            router.send_multipart([ident, *reply])

        t = threading.Thread(target=future_gateway)
        t.start()
        with pytest.raises(VersionMismatch, match="same major version"):
            pilot.Client(info)
        t.join(10)
    finally:
        router.close()
        ctx.term()
