"""What a task process loads before it runs a task: functions and arguments' big buffers.

Both travel as blobs named by digest (see ``docs/protocol.md``, "Functions as blobs" and
"Arguments' big buffers as blobs"). A task process keeps the last ``FUNCTION_CACHE``
functions it loaded, unpickled, and ``BUFFER_CACHE_BYTES`` of buffers (read-only); for one it
lacks it asks its worker (``GetBlob``) and waits up to ``FUNCTION_WAIT_S``, keeping other
messages for after (``inbox``). A buffer of 4 MiB or more comes through the worker's shared
memory (``worker._shared``); one whose memfd went stale meanwhile is asked for again, and
one this process cannot map at all makes it ask for copies from then on.
One that cannot be had raises ``Unavailable``, which fails the task as UNPICKLABLE.

Owned by the task process's main thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from gateway.protocol import BlobReply, GetBlob, Goodbye, Payload, SharedBlob, loads
from worker._blobcache import BlobCache
from worker._shared import StaleBlob, map_shared

__all__ = ["BUFFER_CACHE_BYTES", "FUNCTION_CACHE", "FUNCTION_WAIT_S", "Loader", "Unavailable"]

FUNCTION_CACHE = 64  # functions kept loaded, by digest
BUFFER_CACHE_BYTES = 512 * 2**20  # arguments' big buffers kept (read-only), by key
# A function asked of the worker: longer than the worker's own fetch from the gateway
# (``worker._fetch.BLOB_FETCH_BASE_S``), whose clearer error should come first.
FUNCTION_WAIT_S = 90.0


class Unavailable(LookupError):
    """The task's function or buffer could not be had from the worker."""


class Loader:
    """See the module docstring. ``send(msg)`` reaches the worker; ``recv(timeout_s)`` is its
    next message, or None after ``timeout_s``; what is not an answer goes to ``inbox``."""

    def __init__(
        self,
        send: Callable[[Any], None],
        recv: Callable[[float], Any | None],
        inbox: deque[Any],
    ) -> None:
        self._send = send
        self._recv = recv
        self._inbox = inbox
        self._fns: OrderedDict[str, Any] = OrderedDict()
        self._buffers = BlobCache(BUFFER_CACHE_BYTES)
        self._evicted: list[Payload] = []  # until ``release``
        self.share = True  # ask for big buffers through shared memory (until that fails)

    def function(self, digest: str) -> Any:
        """The function whose blob is ``digest``, loaded (and kept). Raises ``Unavailable``,
        or what unpickling it raises."""
        found = self._fns.get(digest)
        if found is not None:
            self._fns.move_to_end(digest)
            return found
        found = self._fns[digest] = loads(self._fetch(digest))
        if len(self._fns) > FUNCTION_CACHE:
            self._fns.popitem(last=False)
        return found

    def buffer(self, key: str) -> Any:
        """An argument's buffer that travelled as a blob: kept here, or asked of the worker,
        mapped from its shared memory where it can."""
        if (found := self._buffers.get(key)) is None:
            found = self._fetch(key, "argument's buffer", self.share)
            for share_again in (True, False):
                if not isinstance(found, SharedBlob):
                    break
                try:
                    found = Payload(map_shared(found))
                except StaleBlob:  # evicted meanwhile: ask again (a copy the second time)
                    found = self._fetch(key, "argument's buffer", share_again)
                except PermissionError:  # the worker's descriptors are closed to us: copies
                    self.share = False
                    found = self._fetch(key, "argument's buffer")
            self._evicted += self._buffers.put(key, found)
            if sum(p.nbytes for p in self._evicted) > BUFFER_CACHE_BYTES:
                self.release()  # a long batch of new buffers: not more than the cache again
        return found.data

    def release(self) -> None:
        """Let go of the buffers evicted while loading (between batches, once their results
        are sent: unmapping the last mapping of a worker's memfd frees its pages, 20 ms for
        100 MB here, which a task's result should not wait for). A batch holds at most
        ``BUFFER_CACHE_BYTES`` of them: past that they go at once."""
        self._evicted.clear()

    def _fetch(self, digest: str, what: str = "function", shared: bool = False) -> Any:
        """Ask the worker for a blob and wait for it, up to ``FUNCTION_WAIT_S``: its
        ``Payload``, or with ``shared`` maybe a ``SharedBlob``."""
        self._send(GetBlob(digest, shared))
        deadline = time.monotonic() + FUNCTION_WAIT_S
        while True:
            msg = self._recv(max(0.0, deadline - time.monotonic()))
            match msg:
                case None:
                    raise Unavailable(
                        f"The worker did not send the task's {what} (blob {digest[:12]}) "
                        f"within {FUNCTION_WAIT_S:.0f}s."
                    )
                case BlobReply(digest=got, ok=ok, data=data, error=error) if got == digest:
                    if ok and data is not None:
                        return data
                    raise Unavailable(
                        f"The task's {what} (blob {digest[:12]}) is not on this worker and "
                        f"could not be had from the gateway: {error}"
                    )
                case SharedBlob(digest=got) if got == digest and shared:
                    return msg
                case BlobReply() | SharedBlob():  # the late answer to a wait that gave up
                    pass
                case Goodbye():  # the worker is closing: it answers nothing more
                    self._inbox.append(msg)
                    raise Unavailable("The worker closed while the task was loading.")
                case _:
                    self._inbox.append(msg)
