"""Big argument buffers travel once, by content.

A buffer of a megabyte and more in a task's arguments (a numpy array) leaves the client as a
blob keyed by its BLAKE3 digest, once per gateway; the task's payload keeps a reference
(``Payload.refs``) that the task process resolves, from its own cache or its worker's. The unit
tests cover the pieces (splitting, the codec, the blob store, a forged reference); the system
tests count the bytes a real gateway receives, and cover a blob the gateway no longer has.
"""

from __future__ import annotations

import os
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
    by_content,
    dumps,
    loads,
    split_big_buffers,
    with_buffers,
)
from gateway.protocol import _messages as m
from gateway.protocol._digest import frame_digest
from gateway.server._blobs import BlobStore, pack_payload, unpack_payload
from tests_support import TEST_TIMEOUTS

KEY = os.urandom(32).hex()
MB = 1 << 20


def total_and_first(arr: np.ndarray, label: int) -> tuple[float, float, int]:
    return float(arr.sum()), float(arr[0]), label


def total_and_first_of(pair: tuple[np.ndarray, int]) -> tuple[float, float, int]:
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
def test_a_buffer_the_gateway_lost_fails_its_task_saying_so() -> None:
    with pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS) as cluster:
        first = cluster.client()
        arr = np.random.default_rng(2).random(2 * MB // 8)
        assert first.submit(total_and_first, arr, 0).result(60)[2] == 0
        key = frame_digest(arr).hex()
        blob = cluster.home / "state" / "blobs" / key[:2] / key
        assert blob.exists(), "the buffer is in the gateway's store under its BLAKE3 key"
        blob.unlink()
        # A new worker has nothing cached; the client still believes the gateway has it.
        cluster.workers[0].kill()
        cluster.workers[0].wait(30)
        cluster.add_worker()
        job = first.submit(total_and_first, arr, 1)
        with pytest.raises(JobError, match=f"argument's buffer \\(blob {key[:12]}\\) could not"):
            job.result(60)
        # A new client sends the array again, and the task runs.
        assert cluster.client().submit(total_and_first, arr, 2).result(60)[2] == 2
