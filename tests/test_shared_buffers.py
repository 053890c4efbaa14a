"""An argument's big buffer reaches a worker's task processes through shared memory.

The worker writes a buffer of 4 MiB or more once into a sealed memfd and answers its task
processes with where it is (``SharedBlob``); each maps it read-only (``worker._shared``). The
unit tests cover the two sides and what the task process refuses to map; the system test runs
two tasks at once on one worker's two task processes and looks at what they mapped.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

import pilot
from gateway.protocol import BlobReply, Codec, GetBlob, Payload, SharedBlob
from gateway.protocol._digest import frame_digest
from tests_support import TEST_TIMEOUTS
from worker._blobcache import BlobCache
from worker._child import _TaskProcess
from worker._control import Control
from worker._shared import SHARE_MIN_BYTES, SharedBuffers, map_shared

MB = 1 << 20
pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux's")


def _reply(content: bytes) -> BlobReply:
    return BlobReply("", frame_digest(content).hex(), True, Payload(content))


def test_a_big_buffer_is_answered_with_a_sealed_memfd_that_maps_to_the_same_bytes() -> None:
    content = os.urandom(SHARE_MIN_BYTES + 5)
    reply = _reply(content)
    cache = BlobCache()
    cache.put(reply.digest, reply.data)
    shared = SharedBuffers(cache)
    msg = shared.answer(reply)
    assert isinstance(msg, SharedBlob) and (msg.pid, msg.nbytes) == (os.getpid(), len(content))
    assert shared.answer(reply) == msg, "one memfd per blob, however often it is asked for"

    view = map_shared(msg)
    assert view.readonly and view == content
    kept = cache.get(reply.digest)
    assert kept is not None and kept.data is not reply.data and kept.data == content, (
        "the worker's cache holds the shared copy, not the received one"
    )
    fd = os.open(f"/proc/self/fd/{msg.fd}", os.O_RDWR)  # even the worker cannot change it
    try:
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
    finally:
        os.close(fd)
    shared.close()
    assert view == content, "a mapping outlives the worker's descriptor"


def test_a_small_buffer_a_failed_reply_or_a_payload_of_frames_is_answered_as_it_was() -> None:
    shared = SharedBuffers(BlobCache())
    small = _reply(os.urandom(SHARE_MIN_BYTES - 1))
    failed = BlobReply("", "ab" * 32, False, None, "not in the store")
    framed = BlobReply("", "cd" * 32, True, Payload(b"pickle", (os.urandom(SHARE_MIN_BYTES),)))
    assert [shared.answer(r) for r in (small, failed, framed)] == [small, failed, framed]
    assert len(shared) == 0


def test_the_task_process_maps_only_the_blob_it_was_told_of() -> None:
    first, second = _reply(os.urandom(SHARE_MIN_BYTES)), _reply(os.urandom(SHARE_MIN_BYTES))
    shared = SharedBuffers(BlobCache(), max_bytes=SHARE_MIN_BYTES)  # room for one
    stale = shared.answer(first)
    fresh = shared.answer(second)
    assert isinstance(stale, SharedBlob) and isinstance(fresh, SharedBlob)
    assert len(shared) == 1, "the first was evicted: its descriptor is closed"
    with pytest.raises(OSError):  # closed, or its number reused by the second's memfd
        map_shared(stale)
    with pytest.raises(OSError, match="not the blob"):  # a descriptor that is not a memfd
        map_shared(SharedBlob(second.digest, os.getpid(), 0, fresh.nbytes))
    with pytest.raises(OSError, match="bytes long"):
        map_shared(SharedBlob(fresh.digest, fresh.pid, fresh.fd, fresh.nbytes + 1))
    with pytest.raises(OSError) as gone:  # a process that is not there
        map_shared(SharedBlob(fresh.digest, 2**22 + 1, fresh.fd, fresh.nbytes))
    assert gone.value.errno == errno.ENOENT
    assert map_shared(fresh) == second.data.data
    shared.close()


def _sum_and_mapped(arr: np.ndarray, key: str, pause_s: float) -> tuple[float, list[str], int]:
    """The array's sum, the inodes of the memfd named after ``key`` that this task process
    maps, and its pid; after ``pause_s``, so that two such tasks overlap."""
    time.sleep(pause_s)
    with open("/proc/self/maps") as maps:
        inodes = {line.split()[4] for line in maps if f"/memfd:pilot-blob-{key}" in line}
    return float(arr.sum()), sorted(inodes), os.getpid()


@pytest.mark.system
def test_two_task_processes_of_a_worker_map_one_copy_of_a_big_argument() -> None:
    big = np.random.default_rng(7).random(8 * MB // 8)
    small = np.random.default_rng(8).random(2 * MB // 8)  # 2 MiB: copied as before
    keys = [frame_digest(a).hex() for a in (big, small)]
    with pilot.LocalCluster(workers=1, slots=2, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        both = [client.submit(_sum_and_mapped, big, keys[0], 1.0) for _ in range(2)]
        (s1, inodes1, pid1), (s2, inodes2, pid2) = (j.result(60) for j in both)
        assert s1 == s2 == float(big.sum())
        assert pid1 != pid2, "the two tasks ran in the two task processes"
        assert inodes1 and inodes1 == inodes2, "both mapped the same memfd"
        total, inodes, _ = client.submit(_sum_and_mapped, small, keys[1], 0.0).result(60)
        assert total == float(small.sum()) and inodes == []


def test_a_task_process_that_cannot_map_the_buffer_asks_for_a_copy(tmp_path: Path) -> None:
    """The real task process's object, its worker played over a real socket: told of a memfd
    that is gone, it asks again without ``shared``, gets the bytes, and asks for copies from
    then on."""
    content = os.urandom(SHARE_MIN_BYTES)
    reply = _reply(content)
    url = f"ipc://{tmp_path}/tasks"
    ctx = zmq.Context.instance()
    worker = ctx.socket(zmq.ROUTER)
    worker.bind(url)
    codec = Codec(None)
    control = Control(tmp_path / "c0.control", create=True)
    proc = _TaskProcess(url, b"c0", str(tmp_path / "c0.control"), (tmp_path, MB))
    got: list[object] = []
    asking = threading.Thread(target=lambda: got.append(proc._loader.buffer(reply.digest)))
    try:
        asking.start()
        asks = []
        for answer in (SharedBlob(reply.digest, os.getpid(), 2**20, len(content)), reply):
            assert worker.poll(30_000), "the task process did not ask"
            ident, *frames = worker.recv_multipart(copy=False)
            asks.append(codec.decode(frames).msg)
            worker.send_multipart([ident, *codec.encode(answer)], copy=False)
        asking.join(30)
        assert asks == [GetBlob(reply.digest, True), GetBlob(reply.digest, False)]
        assert got == [content] and proc._loader.share is False
    finally:
        asking.join(30)
        proc._sock.close(0)
        proc._ctx.term()
        worker.close(0)
        control.close()
