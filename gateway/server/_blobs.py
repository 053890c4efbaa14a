"""The blob store: payloads too big for the database, addressed by content hash.

A directory of files named by SHA-256 (two-level fan-out). A stored payload is a small msgpack
header (the length of the data and of each buffer) followed by the raw bytes; reading maps the
file, so a large result is loaded without a copy. A file of ``DIRECT_MIN_BYTES`` or more is
written around the page cache (``write_file``), which costs the CPU a small part of a buffered
write's. Owned by the gateway.

An argument's big buffer is written behind (``put_behind``): a thread of the store writes it
while the gateway already hands it to a worker from memory, since writing 100 MB here took
30-450 ms, most of the way from a client to its task. ``after_writes`` says when everything
handed over so far is on disk: the gateway acknowledges a ``Submit`` only then, so a gateway
killed meanwhile is sent the job and its blobs again by its client. A write that fails (a full
disk) is tried again every ``RETRY_S``, and those queued behind it wait, in memory: past
``BEHIND_MAX_BYTES`` of them the store is ``full``, and the gateway takes no new work
(``StateStore.healthy``) until they are written.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from gateway.protocol import Payload, Submit

__all__ = ["BlobStore", "known_key", "pack_payload", "unpack_payload", "write_ahead"]

_LEN = struct.Struct("<I")
RETRY_S = 1.0  # a write behind that failed (a full disk?) is tried again this often
BEHIND_MAX_BYTES = 1 << 30  # blobs waiting to be written, at most (then: ``full``)
DIRECT_MIN_BYTES = 4 << 20  # files this big are written around the page cache (``write_file``)
_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux, some BSDs
_BLOCK = 4096  # the alignment direct I/O asks for here (a device wanting more: buffered)
# copied into with the GIL held, then written without it: 1 MiB keeps the gateway's loop from
# waiting long for the GIL (8 MiB made one commit in ten take 10-14 ms while a blob was written)
_STAGE_BYTES = 1 << 20

log = logging.getLogger(__name__)


def pack_payload(p: Payload) -> bytes:
    """A payload as one bytes object (for the database: small payloads only)."""
    parts = [bytes(p.data), [bytes(b) for b in p.buffers]]
    return msgpack.packb([*parts, [list(r) for r in p.refs]] if p.refs else parts)


def unpack_payload(raw: bytes) -> Payload:
    data, buffers, *refs = msgpack.unpackb(raw, use_list=False)
    return Payload(data, tuple(buffers), None, _refs(refs[0] if refs else ()))


def _refs(pairs: Any) -> tuple[tuple[int, str], ...]:
    """Stored blob references as ``Payload.refs`` (older rows and files have none)."""
    return tuple((int(pos), str(key)) for pos, key in pairs)


class BlobStore:
    """Content-addressed files under ``root``. ``put`` is idempotent."""

    def __init__(self, root: Path, behind_max_bytes: int = BEHIND_MAX_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # written behind: what is not on disk yet, and who waits for it (see the docstring)
        self._lock = threading.Lock()
        self._pending: dict[str, Payload] = {}
        self._queue: queue.SimpleQueue[tuple[int, str, Payload] | None] = queue.SimpleQueue()
        self._queued = self._written = 0  # writes handed over and done, counted
        self._waiters: list[tuple[int, Callable[[], None]]] = []
        self._writer: threading.Thread | None = None
        self._closing = threading.Event()
        self.behind_max_bytes = behind_max_bytes
        self._behind_bytes = 0

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, p: Payload, key: str | None = None) -> str:
        """Store ``p``; return its digest, or store it under ``key`` (64 hex digits the caller
        derived from the content, e.g. from digests it already has) and return that. Writes to
        a temporary file, then renames."""
        parts = _parts(p)
        digest = key if key is not None else _sha256(parts)
        path = self._path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(exist_ok=True)
        sizes = [part.nbytes for part in parts]
        head = msgpack.packb([sizes, [list(r) for r in p.refs]] if p.refs else sizes)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")  # two may write
        write_file(tmp, [memoryview(_LEN.pack(len(head))), memoryview(head), *parts])
        os.replace(tmp, path)
        return digest

    def put_checked(self, digest: str, p: Payload) -> bool:
        """Store ``p`` under ``digest`` if that is its content's: the SHA-256 of its parts (a
        function, a shipped file), or the BLAKE3 of its one frame that the codec verified (an
        argument's buffer: nothing is hashed again). False, storing nothing, otherwise."""
        with self._lock:
            if digest in self._pending:  # taken by ``put_behind``, which checked it
                return True
        if _verified(p, digest):
            self.put(p, key=digest)
            return True
        if _sha256(_parts(p)) != digest:  # hashed before writing: nothing stored is touched
            return False
        self.put(p, key=digest)
        return True

    def put_behind(self, digest: str, p: Payload) -> bool:
        """Take ``p`` to be written behind under ``digest``, if that is the BLAKE3 of its one
        frame that the codec verified; False (nothing taken) otherwise. Any thread."""
        if not _verified(p, digest):
            return False
        with self._lock:
            if digest in self._pending or self._path(digest).exists():
                return True
            if self._behind_bytes >= self.behind_max_bytes:
                return False  # written now, by the caller
            self._pending[digest] = p
            self._behind_bytes += p.nbytes
            self._queued += 1
            self._queue.put((self._queued, digest, p))
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_behind, name="pilot-blobs", daemon=True
                )
                self._writer.start()
        return True

    @property
    def full(self) -> bool:
        """Whether ``behind_max_bytes`` of blobs wait to be written (the disk is slow, or
        failing)."""
        return self._behind_bytes >= self.behind_max_bytes

    def writing(self) -> bool:
        """Whether a blob handed to ``put_behind`` is not on disk yet."""
        return self._written < self._queued

    def after_writes(self, then: Callable[[], None]) -> None:
        """Call ``then`` once every blob handed to ``put_behind`` so far is on disk: now, on
        this thread, or later on the writer's."""
        with self._lock:
            if self._written < self._queued:
                self._waiters.append((self._queued, then))
                return
        then()

    def _write_behind(self) -> None:  # the writer's thread
        written = True  # every blob so far (one abandoned at close: none after it counts)
        while (item := self._queue.get()) is not None:
            seq, digest, p = item
            written = self._write(digest, p) and written
            with self._lock:
                del self._pending[digest]
                self._behind_bytes -= p.nbytes
                self._written = seq
                ready = [then for at, then in self._waiters if at <= seq]
                self._waiters = [(at, then) for at, then in self._waiters if at > seq]
            if written:  # else the gateway is stopping: nobody is told it is on disk
                for then in ready:
                    then()

    def _write(self, digest: str, p: Payload) -> bool:
        """Write one blob behind, trying again while it fails, unless the store is closing."""
        while True:
            try:
                self.put(p, key=digest)
                return True
            except Exception:
                log.exception("could not write blob %s; trying again", digest[:12])
                if self._closing.wait(RETRY_S):
                    log.error("blob %s was not written: the gateway stopped", digest[:12])
                    return False

    def close(self) -> None:
        """Write what is still behind (one more try each, if the disk fails), then stop."""
        if self._writer is not None:
            self._closing.set()
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def get(self, digest: str) -> Payload:
        """The payload: from memory while it is written behind, else mapped from its file.
        Raises ``FileNotFoundError`` if it is not there."""
        with self._lock:
            behind = self._pending.get(digest)
        if behind is not None:
            return behind
        with open(self._path(digest), "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        (hlen,) = _LEN.unpack(view[: _LEN.size])
        head = msgpack.unpackb(view[_LEN.size : _LEN.size + hlen], use_list=False)
        # [sizes, refs], or only the sizes for a payload without references
        sizes, refs = (head, ()) if type(head[0]) is int else head
        pos = _LEN.size + hlen
        parts = []
        for size in sizes:
            parts.append(view[pos : pos + size])
            pos += size
        return Payload(parts[0], tuple(parts[1:]), None, _refs(refs))

    def path(self, digest: str) -> Path:
        return self._path(digest)


def write_file(path: Path, parts: list[memoryview]) -> None:
    """Write ``parts`` one after the other as the file ``path``: through the page cache, or, from
    ``DIRECT_MIN_BYTES`` on, around it (``O_DIRECT``) where the file system allows it. On this
    project's VM a buffered 100 MB write costs 260-320 ms of CPU once a few have been written
    (the page cache's new pages), a direct one 16-29 ms (the staging copy; 50-80 ms of wall
    time): the CPU the gateway's writer took from the rest of a big argument's way
    (``decisions.md``)."""
    total = sum(part.nbytes for part in parts)
    if total >= DIRECT_MIN_BYTES and _DIRECT:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _DIRECT, 0o644)
        except OSError as e:  # tmpfs and some others take no direct I/O
            if e.errno != errno.EINVAL:
                raise
        else:
            try:
                if _write_direct(fd, parts, total):
                    return
            finally:
                os.close(fd)
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)


def _write_direct(fd: int, parts: list[memoryview], total: int) -> bool:
    """Write through a page-aligned staging buffer in whole blocks (as ``O_DIRECT`` wants: the
    parts' own memory is aligned anyhow), the last one padded, then cut to ``total``. False
    if the file system refuses a direct write anywhere (``EINVAL``: it wants no direct I/O, or
    a bigger alignment than ``_BLOCK``): the caller writes the file again, buffered."""
    with mmap.mmap(-1, _STAGE_BYTES) as stage:
        view = memoryview(stage)
        try:
            fill = offset = 0
            for part in parts:
                pos = 0
                while pos < part.nbytes:
                    n = min(part.nbytes - pos, _STAGE_BYTES - fill)
                    view[fill : fill + n] = part[pos : pos + n]
                    fill, pos = fill + n, pos + n
                    if fill == _STAGE_BYTES:
                        if not _pwrite_direct(fd, view, fill, offset):
                            return False
                        offset, fill = offset + fill, 0
            if fill:
                padded = -(-fill // _BLOCK) * _BLOCK
                view[fill:padded] = bytes(padded - fill)
                if not _pwrite_direct(fd, view, padded, offset):
                    return False
        finally:
            view.release()  # before the mapping closes, whatever was raised
    os.ftruncate(fd, total)
    return True


def _pwrite_direct(fd: int, stage: memoryview, n: int, offset: int) -> bool:
    """Write ``stage[:n]`` at ``offset``; False if direct I/O is refused (``EINVAL``). Other
    errors (a full disk) are raised as they are, the slices released first."""
    done = 0
    while done < n:
        try:
            with stage[done:n] as rest:
                done += os.pwrite(fd, rest, offset + done)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
    return True


def _verified(p: Payload, digest: str) -> bool:
    """Whether ``digest`` is the BLAKE3 of ``p``'s one frame, as the codec verified it."""
    known = p.digests
    return bool(known) and len(known) == 1 and not p.buffers and known[0].hex() == digest


def _parts(p: Payload) -> list[memoryview]:
    return [memoryview(p.data), *(memoryview(b).cast("B") for b in p.buffers)]


def _sha256(parts: list[memoryview]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def write_ahead(blobs: BlobStore, msg: Any) -> None:
    """Store a ``Submit``'s blobs (on the thread that decoded it: ``_offloop``): an argument's
    buffer is handed to the writer, anything else written now. The loop checks them again when
    it handles the message, and finds them stored or being written."""
    if isinstance(msg, Submit):
        for blob in msg.blobs:
            if not blobs.put_behind(blob.digest, blob.data):
                blobs.put_checked(blob.digest, blob.data)


def known_key(p: Payload) -> str | None:
    """A blob key for ``p`` made from the SHA-256 of its frames that the codec computed when it
    verified them (``Payload.digests``), so a 100 MB argument is not hashed a second time. The
    key hashes a tag and every part's digest: content-addressed, and apart from plain content
    digests. None when the digests are not known."""
    known = p.digests
    if not known:
        return None
    if len(known) == len(p.buffers):  # the data travelled inline: hash it (it is small)
        known = (hashlib.sha256(p.data).digest(), *known)
    elif len(known) != len(p.buffers) + 1:
        return None
    refs = "".join(f"{pos}:{key};" for pos, key in p.refs).encode()  # they are content too
    return hashlib.sha256(b"pilot-payload-v1\0" + b"".join(known) + refs).hexdigest()
