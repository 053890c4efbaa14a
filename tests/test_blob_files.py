"""The gateway's blob files (``gateway/server/_blobs.py``) written around the page cache, and a
task process's evicted buffers let go only between batches (``worker/_loader.py``).

Real files: on this machine's disk (``tmp_path``, which takes ``O_DIRECT``) and on a tmpfs
(``/dev/shm``, which refuses it: the buffered write is the fallback)."""

from __future__ import annotations

import collections
import errno
import fcntl
import gc
import mmap
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.protocol import BlobReply, GetBlob, Payload
from gateway.server._blobs import _STAGE_BYTES, DIRECT_MIN_BYTES, BlobStore, write_file
from worker._loader import Loader

# around the direct threshold and the staging buffer's edges above it, a last block not whole
# (each part list adds 5 bytes) and one whole (a file of staging buffers exactly)
SIZES = [
    0,
    5,
    DIRECT_MIN_BYTES - 6,
    DIRECT_MIN_BYTES - 5,
    DIRECT_MIN_BYTES + _STAGE_BYTES - 5,
    DIRECT_MIN_BYTES + _STAGE_BYTES + 1,
    DIRECT_MIN_BYTES + 2 * _STAGE_BYTES + 4097,
]


@pytest.fixture(params=["disk", "tmpfs"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "disk":
        yield tmp_path
        return
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


@pytest.mark.parametrize("size", SIZES)
def test_a_file_holds_its_parts_exactly(folder: Path, size: int) -> None:
    parts = [memoryview(b"ab"), memoryview(os.urandom(size)), memoryview(b"xyz")]
    write_file(folder / "f", parts)
    assert (folder / "f").read_bytes() == b"".join(bytes(p) for p in parts)


def _refusing_direct_writes(monkeypatch: pytest.MonkeyPatch, after: int, errno_: int) -> None:
    """The system's ``pwrite`` on a descriptor opened with ``O_DIRECT`` fails with ``errno_``
    from its ``after``-th call on (a file system or device that wants another alignment, or a
    full disk); buffered writes go through."""
    real, calls = os.pwrite, [0]

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls[0] += 1
            if calls[0] > after:
                raise OSError(errno_, os.strerror(errno_))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("after", [0, 2])  # refused at the first write, or midway
def test_a_file_system_that_refuses_direct_writes_gets_the_bytes_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    data = os.urandom(DIRECT_MIN_BYTES + 3 * _STAGE_BYTES + 7)
    _refusing_direct_writes(monkeypatch, after, errno.EINVAL)
    write_file(tmp_path / "f", [memoryview(data)])
    assert (tmp_path / "f").read_bytes() == data


def test_a_full_disk_midway_raises_its_error_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path / "blobs")
    _refusing_direct_writes(monkeypatch, 2, errno.ENOSPC)
    with pytest.raises(OSError) as raised:  # the disk's error, not one of closing the buffer
        store.put(Payload(os.urandom(DIRECT_MIN_BYTES + 3 * _STAGE_BYTES)), key="e" * 64)
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(FileNotFoundError):
        store.get("e" * 64)


def test_a_file_written_again_is_replaced_whole(folder: Path) -> None:
    write_file(folder / "f", [memoryview(os.urandom(3 * DIRECT_MIN_BYTES))])
    again = os.urandom(DIRECT_MIN_BYTES + 1)
    write_file(folder / "f", [memoryview(again)])
    assert (folder / "f").read_bytes() == again


def test_a_big_blob_with_buffers_and_refs_comes_back_as_it_went(folder: Path) -> None:
    store = BlobStore(folder / "blobs")
    p = Payload(os.urandom(7), (os.urandom(DIRECT_MIN_BYTES + 3), b"tail"), None, ((1, "k" * 64),))
    key = store.put(p)
    back = store.get(key)
    assert bytes(back.data) == p.data and back.refs == p.refs
    assert [bytes(b) for b in back.buffers] == list(p.buffers)


def test_an_evicted_buffer_is_let_go_between_batches_not_while_loading() -> None:
    """Unmapping a worker's memfd for the last time frees its pages (20 ms for 100 MB here):
    the loader holds what its cache evicts until ``release`` (after the batch's results)."""
    maps = {key: mmap.mmap(-1, 64) for key in ("a" * 64, "b" * 64)}
    alive = {key: weakref.ref(m) for key, m in maps.items()}
    sent: list[GetBlob] = []

    def recv(timeout_s: float) -> BlobReply:
        digest = sent[-1].digest
        return BlobReply("m", digest, True, Payload(memoryview(maps.pop(digest))))

    loader = Loader(sent.append, recv, collections.deque())
    loader.share = False  # plain copies: the cache is what is tested
    loader._buffers.max_bytes = 100  # room for one of the two
    assert len(loader.buffer("a" * 64)) == 64
    assert len(loader.buffer("b" * 64)) == 64  # evicts a
    gc.collect()
    assert alive["a" * 64]() is not None  # evicted, still held
    loader.release()
    gc.collect()
    assert alive["a" * 64]() is None and alive["b" * 64]() is not None


def test_a_long_batch_holds_no_more_evicted_buffers_than_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    maps = {key * 64: mmap.mmap(-1, 64) for key in "abc"}
    alive = {key: weakref.ref(m) for key, m in maps.items()}
    sent: list[GetBlob] = []

    def recv(timeout_s: float) -> BlobReply:
        digest = sent[-1].digest
        return BlobReply("m", digest, True, Payload(memoryview(maps.pop(digest))))

    monkeypatch.setattr("worker._loader.BUFFER_CACHE_BYTES", 100)
    loader = Loader(sent.append, recv, collections.deque())
    loader.share = False
    loader._buffers.max_bytes = 100
    for key in "ab":
        loader.buffer(key * 64)
    gc.collect()
    assert alive["a" * 64]() is not None  # 64 bytes evicted: held
    loader.buffer("c" * 64)  # b evicted too: 128 bytes, more than the cache holds
    gc.collect()
    assert [k[0] for k, ref in alive.items() if ref() is not None] == ["c"]
