"""An argument's big buffer handed to a task process through shared memory, not a copy.

A task process that needs an argument's big buffer (``Payload.refs``) asks its worker with
``GetBlob(digest, shared=True)``. Over the private IPC socket the buffer would be copied
twice (into the kernel, out into the task process's new memory); instead the worker writes it
once into a memfd (Linux's anonymous shared memory, ``os.memfd_create``), seals it against any
change, and answers ``SharedBlob(digest, pid, fd, nbytes)``. The task process opens
``/proc/PID/fd/FD`` read-only, checks that what it opened is that blob's memfd (its name,
size and seals), and maps it: every task process of the worker reads the same pages.

- **Worker** (``SharedBuffers``): one memfd per digest, kept, least recently used out first,
  while they hold more than ``SHARED_BYTES`` (its blob cache's bound; the last one always
  kept). Closing its descriptor frees nothing a task process still maps. The worker's blob
  cache then holds the memfd's mapping instead of the received frame: one copy of the bytes on
  the host, however many task processes use them; a buffer still in a memfd is answered from
  it, not fetched again. Where memfds do not exist (not Linux) or one cannot be made, the
  answer is the ``BlobReply`` as before. The write runs on a thread (44-58 ms for 100 MB
  here), so the worker's loop never waits for it.
- **Task process** (``map_shared``): ``StaleBlob`` when the descriptor is no longer that
  blob's memfd (the worker evicted it meanwhile, and maybe reused its number: the name, size
  and seals catch that), or cannot be mapped now; the task process asks again, and after a
  second stale answer takes a copy. A ``PermissionError`` (this process may not open the
  worker's descriptors) makes it ask for copies from then on.

Below ``SHARE_MIN_BYTES`` (4 MiB) a buffer is copied as before. ``SharedBuffers`` is owned by
the worker's event loop (only the write runs on a thread); ``map_shared`` runs on the task
process's main thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gateway.protocol import BlobReply, SharedBlob
from worker._blobcache import BLOB_CACHE_BYTES, BlobCache

__all__ = [
    "SHARED_BYTES",
    "SHARE_MIN_BYTES",
    "SharedBuffers",
    "StaleBlob",
    "map_shared",
    "memfd_name",
]

log = logging.getLogger("pilot.worker")

# Buffers this big and more are shared, smaller ones copied. Each mapping holds a descriptor
# (Python's mmap keeps a duplicate): 4 MiB keeps a task process's 512 MiB of buffers (its
# cache) under 128 of them.
SHARE_MIN_BYTES = 4 << 20
SHARED_BYTES = BLOB_CACHE_BYTES  # memfds the worker keeps: its blob cache's bound
_CAN = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")  # Linux
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE if _CAN else 0


def memfd_name(digest: str) -> str:
    """The memfd's name, which ``/proc/PID/fd`` shows as ``/memfd:NAME (deleted)``."""
    return f"pilot-blob-{digest}"


class SharedBuffers:
    """The worker's side: see the module docstring."""

    def __init__(self, cache: BlobCache, max_bytes: int = SHARED_BYTES) -> None:
        self._cache = cache
        self.max_bytes = max_bytes
        self.nbytes = 0
        # digest: (its memfd, its size, the worker's own read-only mapping of it)
        self._kept: OrderedDict[str, tuple[int, int, memoryview]] = OrderedDict()
        self._writing: dict[str, list[Callable[[Any], None]]] = {}  # digest: who waits
        self._closed = False

    def __len__(self) -> int:
        return len(self._kept)

    def ask(
        self, digest: str, send: Callable[[Any], None], fetch: Callable[[str, Any], None]
    ) -> None:
        """A task process asked for buffer ``digest`` with ``shared``: answer from a memfd
        kept here (none to fetch, even if the blob cache let it go), else ``fetch(digest,
        then)`` it (the worker's ``BlobFetcher.function``) and ``answer`` the reply."""
        if (known := self.known(digest)) is not None:
            send(known)
        else:
            fetch(digest, lambda reply: self.answer(reply, send))

    def answer(self, reply: BlobReply, send: Callable[[Any], None]) -> None:
        """``send`` a task process that asked with ``shared`` its answer: for a big buffer (a
        payload of one frame, no buffers) a ``SharedBlob`` once the buffer is in a memfd,
        written on a thread while the loop goes on (several asks of one buffer wait for one
        write); else, or if the write fails, ``reply`` itself."""
        p = reply.data
        big = p is not None and not p.buffers and len(p.data) >= SHARE_MIN_BYTES
        if self._closed or not _CAN or not reply.ok or not big:
            send(reply)
        elif (known := self.known(reply.digest)) is not None:  # written since it was asked
            send(known)
        elif (waiting := self._writing.get(reply.digest)) is not None:
            waiting.append(send)
        else:
            self._writing[reply.digest] = [send]
            try:
                loop = asyncio.get_running_loop()
                written = loop.run_in_executor(None, _write_memfd, reply.digest, p.data)
            except RuntimeError as e:  # no thread for it (the loop is closing): a copy
                log.debug("could not share blob %s: %s", reply.digest[:12], e)
                for waiter in self._writing.pop(reply.digest):
                    waiter(reply)
                return
            written.add_done_callback(lambda done: self._written(reply, done))

    def known(self, digest: str) -> SharedBlob | None:
        """The answer for a blob already in a memfd here, or None."""
        found = self._kept.get(digest)
        if found is None:
            return None
        self._kept.move_to_end(digest)
        self._cache_the_mapping(digest, found[2])
        return SharedBlob(digest, os.getpid(), found[0], found[1])

    def _written(self, reply: BlobReply, done: asyncio.Future[tuple[int, memoryview]]) -> None:
        """The write of ``reply``'s buffer ended: keep the memfd and tell who waits (nobody,
        once closed: the task processes were told goodbye)."""
        waiters = self._writing.pop(reply.digest, [])
        answer: BlobReply | SharedBlob = reply
        try:
            fd, mapped = done.result()
        except OSError as e:  # no memory for it, out of descriptors: a copy instead
            log.debug("could not share blob %s: %s", reply.digest[:12], e)
        except (Exception, asyncio.CancelledError):  # not expected: say so, send a copy
            log.warning("could not share blob %s", reply.digest[:12], exc_info=True)
        else:
            if self._closed:
                os.close(fd)
                return
            self._keep(reply.digest, fd, mapped)
            self._cache_the_mapping(reply.digest, mapped)
            answer = SharedBlob(reply.digest, os.getpid(), fd, mapped.nbytes)
        if not self._closed:
            for waiter in waiters:
                waiter(answer)

    def _cache_the_mapping(self, digest: str, mapped: memoryview) -> None:
        """The worker's cache keeps the shared copy, not the one received: one copy here."""
        cached = self._cache.get(digest)
        if cached is not None and cached.data is not mapped:
            self._cache.put(digest, dataclasses.replace(cached, data=mapped))

    def _keep(self, digest: str, fd: int, mapped: memoryview) -> None:
        self._kept[digest] = (fd, mapped.nbytes, mapped)
        self.nbytes += mapped.nbytes
        while self.nbytes > self.max_bytes and len(self._kept) > 1:
            _, (old, size, _) = self._kept.popitem(last=False)
            os.close(old)
            self.nbytes -= size

    def close(self) -> None:
        """Close every memfd (a task process's mappings stay valid); share nothing more."""
        self._closed = True
        for fd, _, _ in self._kept.values():
            os.close(fd)
        self._kept.clear()
        self._writing.clear()  # a write in flight closes its memfd when it ends
        self.nbytes = 0


def _write_memfd(digest: str, data: Any) -> tuple[int, memoryview]:
    """A new memfd holding ``data``, sealed, and a read-only mapping of it (on a thread)."""
    view = memoryview(data).cast("B")
    fd = os.memfd_create(memfd_name(digest), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, view.nbytes)
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], done)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        return fd, memoryview(mmap.mmap(fd, view.nbytes, prot=mmap.PROT_READ))
    except BaseException:
        os.close(fd)
        raise


class StaleBlob(OSError):
    """The descriptor a ``SharedBlob`` names is no longer that blob's memfd (the worker
    evicted it, and maybe reused the number): ask again."""


def map_shared(msg: SharedBlob) -> memoryview:
    """The task process's side: the blob ``msg`` names, mapped read-only. Raises
    ``StaleBlob`` when the descriptor is gone, is not that blob's sealed memfd, or cannot be
    mapped now; ``PermissionError`` when the worker's descriptors may not be opened at all."""
    path = f"/proc/{msg.pid}/fd/{msg.fd}"
    try:  # O_NONBLOCK: a number reused for a pipe must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except PermissionError:  # this process may not open the worker's descriptors
        raise
    except OSError as e:  # closed, or reused for what cannot be opened (a socket: ENXIO)
        raise StaleBlob(f"descriptor {msg.fd} of process {msg.pid}: {e.strerror}") from None
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name != f"/memfd:{memfd_name(msg.digest)} (deleted)":
            raise StaleBlob(f"descriptor {msg.fd} of process {msg.pid} is {name!r}, not the blob")
        if os.fstat(fd).st_size != msg.nbytes:
            raise StaleBlob(f"the blob's memfd is not {msg.nbytes} bytes long")
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise StaleBlob("the blob's memfd is not sealed against writes")
        mapped = mmap.mmap(fd, msg.nbytes, prot=mmap.PROT_READ)
    except StaleBlob:
        raise
    except OSError as e:  # no room to map it now (descriptors, mappings): a copy this time
        raise StaleBlob(f"could not map the blob's memfd: {e.strerror}") from None
    finally:
        os.close(fd)
    return memoryview(mapped)
