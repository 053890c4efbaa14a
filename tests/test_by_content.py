"""Big argument buffers travel once, by content.

A buffer of a megabyte and more in a task's arguments (a numpy array) leaves the client as a
blob keyed by its BLAKE3 digest, once per gateway; the task's payload keeps a reference
(``Payload.refs``) that the task process resolves, from its own cache or its worker's. The unit
tests cover the pieces (splitting, the codec, the blob store, a forged reference); the system
tests count the bytes a real gateway receives, and cover a blob the gateway no longer has.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest

import pilot
from gateway.protocol import (
    Codec,
    JobError,
    Payload,
    ProtocolError,
    SerializationError,
    TaskDone,
    by_content,
    dumps,
    loads,
    split_big_buffers,
    with_buffers,
)
from gateway.protocol import _messages as m
from gateway.protocol._digest import frame_digest
from gateway.server._blobs import BlobStore, pack_payload, unpack_payload
from tests_support import TEST_TIMEOUTS, wait_until

KEY = os.urandom(32).hex()
MB = 1 << 20
DEADLINE_S = 60.0


def total_and_first(arr: np.ndarray, label: int) -> tuple[float, float, int]:
    return float(arr.sum()), float(arr[0]), label


def total_and_first_of(pair: tuple[np.ndarray, int]) -> tuple[float, float, int]:
    return total_and_first(*pair)


def slowly_total_and_first_of(pair: tuple[np.ndarray, int]) -> tuple[float, float, int]:
    import time

    time.sleep(0.2)
    return total_and_first(*pair)


def test_big_buffers_leave_the_payload_as_blobs_and_come_back_in_place() -> None:
    big = np.arange(MB // 4, dtype=np.float64)  # 2 MB: a blob
    small = np.arange(20_000, dtype=np.int32)  # 80 kB: out of band, but stays
    payload = dumps((small, big, "label"))
    assert len(payload.buffers) == 2
    split, blobs = split_big_buffers(payload)
    assert [len(b.data.data) for b in blobs] == [big.nbytes]
    assert split.refs == ((1, frame_digest(big).hex()),)
    assert len(split.buffers) == 1 and split.nbytes < big.nbytes
    with pytest.raises(SerializationError, match="with_buffers"):
        loads(split)
    store = {b.digest: b.data.data for b in blobs}
    s2, b2, label = loads(with_buffers(split, store.__getitem__))
    assert np.array_equal(s2, small) and np.array_equal(b2, big) and label == "label"


def test_a_job_sends_each_buffer_once_however_many_tasks_hold_it() -> None:
    arr = np.ones(MB // 8)
    args = tuple(dumps(((arr, i), {})) for i in range(5))
    blobs: dict[str, m.Blob] = {}
    out = by_content(args, set(), blobs)
    assert len(blobs) == 1 and all(len(a.refs) == 1 for a in out)
    again: dict[str, m.Blob] = {}
    by_content(args, set(blobs), again)
    assert again == {}, "a buffer the gateway has is not sent again"


def test_references_survive_the_codec_and_forged_ones_are_refused() -> None:
    split, blobs = split_big_buffers(dumps(np.zeros(MB // 8 + 1)))
    msg = m.Submit((), ((split,),), True, blobs)
    got = Codec(KEY).decode(Codec(KEY).encode(msg)).msg
    assert got.tasks[0][0].refs == split.refs
    # The gateway checks the key against the digest it verified: no second hash.
    assert got.blobs[0].data.digests == (bytes.fromhex(blobs[0].digest),)

    sender = Codec(None)
    for forged in ([[0, 7]], [[1, "a"], [0, "b"]], [[-1, "a"]], 5):
        ext = msgpack.ExtType(1, msgpack.packb([b"x", 0, 0, forged]))
        frames = sender.encode(m.Heartbeat())
        frames[3] = msgpack.packb([ext])
        frames[2] = frames[2].replace(b"Heartbeat", b"BlobReply")
        with pytest.raises(ProtocolError, match="Malformed"):
            Codec(None).decode(frames)


def test_the_blob_store_keeps_references_and_checks_keys(tmp_path: Path) -> None:
    payload = Payload(b"pickle", (b"b" * 10,), None, ((0, "ab" * 32),))
    assert unpack_payload(pack_payload(payload)).refs == payload.refs
    assert unpack_payload(pack_payload(Payload(b"p"))).refs == ()
    store = BlobStore(tmp_path)
    key = store.put(payload)
    assert store.get(key).refs == payload.refs
    assert bytes(store.get(store.put(Payload(b"plain" * 100))).data) == b"plain" * 100

    buf = os.urandom(2 * MB)
    digest = frame_digest(buf)
    assert store.put_checked(digest.hex(), Payload(buf, (), (digest,)))
    assert bytes(store.get(digest.hex()).data) == buf
    forged = frame_digest(b"other").hex()
    assert not store.put_checked(forged, Payload(buf, (), (digest,)))
    assert not store.path(forged).exists()
    plain = store.put(Payload(b"stored by someone"))
    assert not store.put_checked("ab" * 32, Payload(b"stored by someone"))  # a wrong digest
    assert store.path(plain).exists(), "refusing a forged key leaves the stored content alone"


@pytest.mark.system
def test_the_same_array_reaches_ten_tasks_but_the_gateway_once(
    cluster: pilot.LocalCluster, client: pilot.Client
) -> None:
    arr = np.random.default_rng(1).random(4 * MB // 8)  # 4 MB
    expected = float(arr.sum())
    before = client.status().counters.get("bytes_in", 0)
    jobs = [client.submit(total_and_first, arr, i) for i in range(10)]
    jobs += [client.map(total_and_first_of, [(arr, 10), (arr, 11)])]  # a map's items too
    results = [j.result(60) for j in jobs[:10]] + jobs[10].wait(60).results
    assert [r[2] for r in results] == list(range(12))
    assert all(r[:2] == (expected, float(arr[0])) for r in results)
    received = client.status().counters["bytes_in"] - before
    assert arr.nbytes <= received < 1.5 * arr.nbytes, f"{received:,} bytes for one array"

    other = arr.copy()
    other[0] = -1.0  # new content: sent again
    assert client.submit(total_and_first, other, 0).result(60)[1] == -1.0
    assert client.status().counters["bytes_in"] - before >= 2 * arr.nbytes


@pytest.mark.system
def test_a_buffer_the_gateway_lost_is_waited_for_then_fails_its_task_saying_so() -> None:
    wait = {"PILOT_BLOB_WAIT_S": "3"}  # the timeouts' blob_wait_s, 30 s by default
    with pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS, env=wait) as cluster:
        first = cluster.client()
        arr = np.random.default_rng(2).random(2 * MB // 8)
        assert first.submit(total_and_first, arr, 0).result(60)[2] == 0
        key = frame_digest(arr).hex()
        blob = cluster.home / "state" / "blobs" / key[:2] / key
        assert blob.exists(), "the buffer is in the gateway's store under its BLAKE3 key"

        def lose_it() -> None:  # a new worker has nothing cached; the client still believes
            blob.unlink()  # the gateway has it (as after a restart before it was written)
            worker = cluster.workers[-1]
            worker.kill()
            worker.wait(30)
            cluster.add_worker()

        lose_it()
        waiting = first.submit(total_and_first, arr, 1)
        wait_until(  # the worker asked, and the gateway looks for it again (blob_wait_s)
            lambda: first.status().counters.get("blobs_awaited", 0) >= 1,
            what="the gateway to wait for the buffer it lacks",
        )
        # Another client sends the array (as the first would, resending its Submit after a
        # restart): both tasks run.
        assert cluster.client().submit(total_and_first, arr, 2).result(60)[2] == 2
        assert waiting.result(60)[2] == 1

        lose_it()  # and nobody sends it again: the task fails once the grace is over
        job = first.submit(total_and_first, arr, 3)
        with pytest.raises(JobError, match=f"argument's buffer \\(blob {key[:12]}\\) could not"):
            job.result(60)
        assert first.status().counters["blobs_awaited"] == 2
        assert cluster.client().submit(total_and_first, arr, 4).result(60)[2] == 4


@pytest.mark.system
def test_a_gateway_killed_before_a_buffer_was_on_disk_is_sent_it_again() -> None:
    """A buffer big enough to be written behind, on a disk that fails the write: the job runs
    from memory, unacknowledged; the gateway and the worker are killed, the disk comes back,
    and the client's Submit, sent again, brings the buffer to the new gateway."""
    with pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        arr = np.random.default_rng(3).random(8 * MB // 8)  # over the off-loop threshold
        key = frame_digest(arr).hex()
        blobs = cluster.home / "state" / "blobs"
        blocker = blobs / key[:2]
        blocker.write_bytes(b"")  # where its directory goes: the write fails
        job = client.map(slowly_total_and_first_of, [(arr, i) for i in range(12)], chunk=1)
        next(ev for ev in job.events() if isinstance(ev, TaskDone))
        assert not (blobs / key[:2] / key).exists()
        cluster.kill_gateway()
        worker = cluster.workers[-1]
        worker.kill()
        worker.wait(30)
        blocker.unlink()
        cluster.start_gateway()
        cluster.add_worker()  # has nothing cached: asks the new gateway for the buffer
        job.wait(120)
        assert [r[2] for r in job.results] == list(range(12))
        assert all(r[:2] == (float(arr.sum()), float(arr[0])) for r in job.results)
        assert len(job.tasks) == 12, "one outcome per task"
        assert (blobs / key[:2] / key).exists(), "on disk, from the Submit sent again"


def test_a_buffer_is_written_behind_and_acknowledged_once_on_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``BlobStore.put_behind``: the buffer is served from memory at once, written by the
    store's thread, and ``after_writes`` (the gateway's ``Submitted``) waits for the disk,
    through failed writes; past ``behind_max_bytes`` waiting, the store is full."""
    store = BlobStore(tmp_path, behind_max_bytes=8 * MB)
    buf = os.urandom(8 * MB)
    digest = frame_digest(buf)
    key = digest.hex()
    (tmp_path / key[:2]).write_bytes(b"")  # where its directory goes: every write fails
    written = threading.Event()
    seen: list[bool] = []
    try:
        assert not store.put_behind(frame_digest(b"other").hex(), Payload(buf, (), (digest,)))
        assert store.put_behind(key, Payload(buf, (), (digest,)))
        assert bytes(store.get(key).data) == buf, "served from memory while it is written"
        assert store.put_checked(key, Payload(buf, (), (digest,))), "a second copy: taken"
        assert store.full, "8 MB wait to be written: the gateway takes no new work"
        other = os.urandom(MB)
        assert not store.put_behind(
            frame_digest(other).hex(), Payload(other, (), (frame_digest(other),))
        )
        store.after_writes(lambda: (seen.append(store.path(key).exists()), written.set()))
        wait_until(
            lambda: any("could not write blob" in r.getMessage() for r in caplog.records),
            what="a failed write",
        )
        assert store.writing() and not written.is_set(), "not acknowledged: not on disk"
        (tmp_path / key[:2]).unlink()  # the disk is back
        assert written.wait(DEADLINE_S) and seen == [True]
        assert not store.writing() and not store.full
        assert bytes(store.get(key).data) == buf, "from its file now"
        done: list[str] = []
        store.after_writes(lambda: done.append(threading.current_thread().name))
        assert done == [threading.current_thread().name], "nothing behind: at once"

        again = os.urandom(5 * MB)
        assert store.put_behind(
            frame_digest(again).hex(), Payload(again, (), (frame_digest(again),))
        )
    finally:
        store.close()
    assert store.path(frame_digest(again).hex()).exists(), "closing writes what is behind"
