"""An argument's big buffer reaches a worker's task processes through shared memory.

The worker writes a buffer of 4 MiB or more once into a sealed memfd and answers its task
processes with where it is (``SharedBlob``); each maps it read-only (``worker._shared``). The
unit tests cover the two sides and what the task process refuses to map; the system test runs
two tasks at once on one worker's two task processes and looks at what they mapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

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
from worker._loader import BUFFER_CACHE_BYTES
from worker._shared import SHARE_MIN_BYTES, SharedBuffers, StaleBlob, map_shared, memfd_name

MB = 1 << 20
pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux's")


def _reply(content: bytes) -> BlobReply:
    return BlobReply("", frame_digest(content).hex(), True, Payload(content))


def _answer(shared: SharedBuffers, *replies: BlobReply) -> list[Any]:
    """What ``shared`` sends for each of ``replies``, asked at once on an event loop (the
    worker's side runs on one; its write on a thread of it)."""

    async def ask() -> list[Any]:
        loop = asyncio.get_running_loop()
        answers = [loop.create_future() for _ in replies]
        for reply, answer in zip(replies, answers, strict=True):
            shared.answer(reply, answer.set_result)
        return await asyncio.wait_for(asyncio.gather(*answers), 30)

    return asyncio.run(ask())


def test_a_big_buffer_is_answered_with_a_sealed_memfd_that_maps_to_the_same_bytes() -> None:
    content = os.urandom(SHARE_MIN_BYTES + 5)
    reply = _reply(content)
    cache = BlobCache()
    cache.put(reply.digest, reply.data)
    shared = SharedBuffers(cache)
    msg, again = _answer(shared, reply, reply)  # the second asked while the first is written
    assert isinstance(msg, SharedBlob) and (msg.pid, msg.nbytes) == (os.getpid(), len(content))
    assert again == msg and _answer(shared, reply) == [msg], "one memfd per blob"

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
    assert _answer(shared, small, failed, framed) == [small, failed, framed]
    assert len(shared) == 0


def test_the_task_process_maps_only_the_blob_it_was_told_of() -> None:
    first, second = _reply(os.urandom(SHARE_MIN_BYTES)), _reply(os.urandom(SHARE_MIN_BYTES))
    shared = SharedBuffers(BlobCache(), max_bytes=SHARE_MIN_BYTES)  # room for one
    (stale,) = _answer(shared, first)
    (fresh,) = _answer(shared, second)
    assert isinstance(stale, SharedBlob) and isinstance(fresh, SharedBlob)
    assert len(shared) == 1, "the first was evicted: its descriptor is closed"
    with pytest.raises(StaleBlob):  # closed, or its number reused by the second's memfd
        map_shared(stale)
    with pytest.raises(StaleBlob, match="not the blob"):  # a descriptor that is not a memfd
        map_shared(SharedBlob(second.digest, os.getpid(), 0, fresh.nbytes))
    with pytest.raises(StaleBlob, match="bytes long"):
        map_shared(SharedBlob(fresh.digest, fresh.pid, fresh.fd, fresh.nbytes + 1))
    with pytest.raises(StaleBlob):  # a process that is not there
        map_shared(SharedBlob(fresh.digest, 2**22 + 1, fresh.fd, fresh.nbytes))
    a, b = socket.socketpair()
    with a, b, pytest.raises(StaleBlob):  # a number reused for a socket, which cannot be opened
        map_shared(SharedBlob(fresh.digest, os.getpid(), a.fileno(), fresh.nbytes))
    assert map_shared(fresh) == second.data.data
    shared.close()


def test_an_unsealed_memfd_of_the_right_name_and_size_is_refused() -> None:
    content = os.urandom(SHARE_MIN_BYTES)
    digest = frame_digest(content).hex()
    fd = os.memfd_create(memfd_name(digest), os.MFD_CLOEXEC)  # writable: anyone could change it
    try:
        os.write(fd, content)
        with pytest.raises(StaleBlob, match="not sealed"):
            map_shared(SharedBlob(digest, os.getpid(), fd, len(content)))
    finally:
        os.close(fd)


def test_a_buffer_still_in_a_memfd_is_answered_from_it_and_replaces_a_received_copy() -> None:
    reply = _reply(os.urandom(SHARE_MIN_BYTES))
    cache = BlobCache()
    shared = SharedBuffers(cache)
    assert shared.known(reply.digest) is None
    (first,) = _answer(shared, reply)
    cache.put(reply.digest, reply.data)  # evicted from the cache, then received again
    assert shared.known(reply.digest) == first
    kept = cache.get(reply.digest)
    assert kept is not None and kept.data is not reply.data and kept.data == reply.data.data
    shared.close()
    assert _answer(shared, reply) == [reply], "closed: nothing more is shared"


def test_a_write_that_fails_answers_every_waiter_with_a_copy() -> None:
    strided = memoryview(np.zeros(2 * SHARE_MIN_BYTES + 2, np.uint8))[::2]  # cannot be cast
    reply = BlobReply("", "ef" * 32, True, Payload(strided))
    shared = SharedBuffers(BlobCache())
    assert _answer(shared, reply, reply) == [reply, reply]
    assert len(shared) == 0 and not shared._writing, "the next ask tries again"


def _memfds_named(digest: str) -> list[str]:
    gc.collect()  # a dropped mapping's descriptor closes when it is collected
    fds = os.listdir("/proc/self/fd")
    with contextlib.suppress(FileNotFoundError):
        return [f for f in fds if memfd_name(digest) in os.readlink(f"/proc/self/fd/{f}")]
    return []


def test_a_write_in_flight_at_close_tells_nobody_and_leaves_no_memfd() -> None:
    reply = _reply(os.urandom(SHARE_MIN_BYTES))
    shared = SharedBuffers(BlobCache())
    sent: list[Any] = []

    async def close_while_writing() -> None:
        shared.answer(reply, sent.append)
        shared.close()  # the worker closes while the write runs on its thread
        await asyncio.get_running_loop().shutdown_default_executor()  # the write ends
        for _ in range(3):  # its done-callback runs on the loop's next turns
            await asyncio.sleep(0)

    asyncio.run(close_while_writing())
    assert sent == [] and not shared._writing
    assert _memfds_named(reply.digest) == []


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


def _blobs_mapped(arr: np.ndarray) -> tuple[float, int]:
    """The array's first value, and how many blobs' memfds this task process maps."""
    with open("/proc/self/maps") as maps:
        names = {line.split()[-2] for line in maps if "/memfd:pilot-blob-" in line}
    return float(arr[0]), len(names)


def test_a_task_process_unmaps_the_buffers_its_cache_let_go_once_the_batch_is_done() -> None:
    """A task process's cache keeps ``BUFFER_CACHE_BYTES`` of buffers; one it evicts is let go
    of after the batch that evicted it (``Loader.release`` in ``serve``), so its memfd's pages
    are freed: without that, evicted mappings would pile up to another cache's worth."""
    size = 16 * MB
    kept = BUFFER_CACHE_BYTES // size  # buffers the cache holds
    arr = np.zeros(size // 8)
    counts = []
    with pilot.LocalCluster(workers=1, slots=1, timeouts=TEST_TIMEOUTS) as cluster:
        client = cluster.client()
        for i in range(kept + 16):  # one new buffer per task, a batch each
            arr[0] = i
            first, mapped = client.submit(_blobs_mapped, arr).result(60)
            assert first == i
            counts.append(mapped)
    assert max(counts[:kept]) == kept, counts  # all kept while the cache has room
    # then the cache's buffers, and the one this batch evicted (let go once it is done)
    assert max(counts[kept:]) <= kept + 1, counts


def _ask_as_a_task_process(tmp_path: Path, key: str, answers: list[Any]) -> tuple[Any, ...]:
    """The real task process's object, its worker played over a real socket: it asks for the
    buffer ``key``; each of its asks gets the next of ``answers``. Returns (its asks, what it
    got, whether it still asks for shared memory)."""
    url = f"ipc://{tmp_path}/tasks"
    ctx = zmq.Context.instance()
    worker = ctx.socket(zmq.ROUTER)
    worker.bind(url)
    codec = Codec(None)
    control = Control(tmp_path / "c0.control", create=True)
    proc = _TaskProcess(url, b"c0", str(tmp_path / "c0.control"), (tmp_path, MB))
    got: list[Any] = []
    asking = threading.Thread(target=lambda: got.append(proc._loader.buffer(key)))
    asks = []
    try:
        asking.start()
        for answer in answers:
            assert worker.poll(30_000), f"the task process did not ask (asks so far: {asks})"
            ident, *frames = worker.recv_multipart(copy=False)
            asks.append(codec.decode(frames).msg)
            worker.send_multipart([ident, *codec.encode(answer)], copy=False)
        asking.join(30)
        return asks, got, proc._loader.share
    finally:
        asking.join(30)
        proc._sock.close(0)
        proc._ctx.term()
        worker.close(0)
        control.close()


def test_a_task_process_told_of_a_stale_memfd_asks_again_and_maps_the_new_one(
    tmp_path: Path,
) -> None:
    reply = _reply(os.urandom(SHARE_MIN_BYTES))
    shared = SharedBuffers(BlobCache())
    stale = SharedBlob(reply.digest, os.getpid(), 2**20, reply.data.nbytes)  # no such descriptor
    try:
        asks, got, share = _ask_as_a_task_process(
            tmp_path, reply.digest, [stale, *_answer(shared, reply)]
        )
    finally:
        shared.close()
    assert asks == [GetBlob(reply.digest, True)] * 2
    assert got == [reply.data.data] and share, "a stale memfd does not stop the sharing"


def test_a_task_process_told_of_stale_memfds_twice_takes_a_copy(tmp_path: Path) -> None:
    reply = _reply(os.urandom(SHARE_MIN_BYTES))
    stale = SharedBlob(reply.digest, os.getpid(), 2**20, reply.data.nbytes)
    asks, got, share = _ask_as_a_task_process(tmp_path, reply.digest, [stale, stale, reply])
    assert asks == [GetBlob(reply.digest, True)] * 2 + [GetBlob(reply.digest, False)]
    assert got == [reply.data.data] and share
