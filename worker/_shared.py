"""An argument's big buffer handed to a task process through shared memory, not a copy.

A task process that needs an argument's big buffer (``Payload.refs``) asks its worker with
``GetBlob(digest, shared=True)``. Over the private IPC socket the buffer would be copied
twice (into the kernel, out into the task process's new memory); instead the worker writes it
once into a memfd (Linux's anonymous shared memory, ``os.memfd_create``), seals it against any
change, and answers ``SharedBlob(digest, pid, fd, nbytes)``. The task process opens
``/proc/PID/fd/FD`` read-only, checks that what it opened is that blob's memfd (its name,
size and seals), and maps it: every task process of the worker reads the same pages.

- **Worker** (``SharedBuffers``): one memfd per digest, kept, least recently used out first,
  while they hold more than ``SHARED_BYTES`` (the last one always kept). Closing its
  descriptor frees nothing a task process still maps. The worker's blob cache then holds the
  memfd's mapping instead of the received frame: one copy of the bytes on the host, however
  many task processes use them. Where memfds do not exist (not Linux) or one cannot be made,
  the answer is the ``BlobReply`` as before.
- **Task process** (``map_shared``): an ``OSError`` when the memfd is not what it should be:
  the worker closed it meanwhile (evicted, and its number maybe reused: the name and size
  catch that), or ``/proc`` is not readable. The task process then asks again without
  ``shared`` and gets the bytes inline.

Below ``SHARE_MIN_BYTES`` (4 MiB) a buffer is copied as before. Both sides are single-threaded
(the worker's loop; the task process's main thread).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
from collections import OrderedDict
from typing import Any

from gateway.protocol import BlobReply, Payload, SharedBlob
from worker._blobcache import BlobCache

__all__ = ["SHARED_BYTES", "SHARE_MIN_BYTES", "SharedBuffers", "map_shared"]

log = logging.getLogger("pilot.worker")

# Buffers this big and more are shared, smaller ones copied. Each mapping holds a descriptor
# (Python's mmap keeps a duplicate): 4 MiB keeps a task process's 512 MiB of buffers (its
# cache) under 128 of them.
SHARE_MIN_BYTES = 4 << 20
SHARED_BYTES = 512 * 2**20  # memfds the worker keeps open (a task process's buffer cache)
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
        self._fds: OrderedDict[str, tuple[int, int]] = OrderedDict()  # digest: (fd, nbytes)

    def __len__(self) -> int:
        return len(self._fds)

    def answer(self, reply: BlobReply) -> BlobReply | SharedBlob:
        """What to send a task process that asked with ``shared``: a ``SharedBlob`` for a big
        buffer (a payload of one frame, no buffers), else ``reply`` itself."""
        p = reply.data
        if not (_CAN and reply.ok and p is not None and not p.buffers):
            return reply
        if len(p.data) < SHARE_MIN_BYTES:
            return reply
        found = self._fds.get(reply.digest)
        if found is None:
            try:
                found = self._put(reply.digest, p.data)
            except OSError as e:  # no memory for it, out of descriptors: copy instead
                log.debug("could not share blob %s: %s", reply.digest[:12], e)
                return reply
            if reply.digest in self._cache:  # keep the shared copy, drop the received one
                with contextlib.suppress(OSError):  # no room to map it: keep the received one
                    mapped = memoryview(mmap.mmap(found[0], found[1], prot=mmap.PROT_READ))
                    self._cache.put(reply.digest, Payload(mapped, (), p.digests))
        else:
            self._fds.move_to_end(reply.digest)
        return SharedBlob(reply.digest, os.getpid(), found[0], found[1])

    def _put(self, digest: str, data: Any) -> tuple[int, int]:
        view = memoryview(data).cast("B")
        fd = os.memfd_create(memfd_name(digest), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, view.nbytes)
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], done)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        except OSError:
            os.close(fd)
            raise
        self._fds[digest] = found = (fd, view.nbytes)
        self.nbytes += view.nbytes
        while self.nbytes > self.max_bytes and len(self._fds) > 1:
            _, (old, size) = self._fds.popitem(last=False)
            os.close(old)
            self.nbytes -= size
        return found

    def close(self) -> None:
        """Close every memfd (a task process's mappings stay valid)."""
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.nbytes = 0


def map_shared(msg: SharedBlob) -> memoryview:
    """The task process's side: the blob ``msg`` names, mapped read-only. Raises ``OSError``
    when the descriptor cannot be opened or is not that blob's sealed memfd."""
    fd = os.open(f"/proc/{msg.pid}/fd/{msg.fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name != f"/memfd:{memfd_name(msg.digest)} (deleted)":
            raise OSError(f"descriptor {msg.fd} of process {msg.pid} is {name!r}, not the blob")
        if os.fstat(fd).st_size != msg.nbytes:
            raise OSError(f"the blob's memfd is not {msg.nbytes} bytes long")
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise OSError("the blob's memfd is not sealed against writes")
        mapped = mmap.mmap(fd, msg.nbytes, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return memoryview(mapped)
