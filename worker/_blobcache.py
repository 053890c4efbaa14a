"""The worker's function blobs: one content-addressed cache in memory, bounded by bytes.

A job's function travels as a blob, named by the SHA-256 of its pickled payload
(``Assignment.fn_digest``). A worker that lacks one asks the gateway once (``GetBlob``,
``worker._fetch``) and keeps it here, least recently used out first, and hands it to its task
processes when they ask (``GetBlob`` over the private socket). One evicted is fetched again.

``BlobCache`` is a plain container: no I/O, no loop. Owned by the worker's event loop.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.protocol import Payload

__all__ = ["BLOB_CACHE_BYTES", "BlobCache"]

BLOB_CACHE_BYTES = 256 * 2**20


class BlobCache:
    """Payloads by digest, least recently used evicted first once they hold more than
    ``max_bytes``. The blob put last is always kept, however large (a task needs it now)."""

    def __init__(self, max_bytes: int = BLOB_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._blobs: OrderedDict[str, Payload] = OrderedDict()

    def __contains__(self, digest: object) -> bool:
        return digest in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def get(self, digest: str) -> Payload | None:
        """The payload stored under ``digest`` (now the most recently used), or None."""
        found = self._blobs.get(digest)
        if found is not None:
            self._blobs.move_to_end(digest)
        return found

    def put(self, digest: str, payload: Payload) -> list[Payload]:
        """Store ``payload`` under ``digest`` (the caller vouches that it is its digest: it
        came from the gateway, over a signed message), evicting the least recently used.
        Returns what it evicted (a caller may hold them a while: freeing 100 MB takes time)."""
        old = self._blobs.pop(digest, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._blobs[digest] = payload
        self.nbytes += payload.nbytes
        evicted = []
        while self.nbytes > self.max_bytes and len(self._blobs) > 1:
            evicted.append(self._blobs.popitem(last=False)[1])
            self.nbytes -= evicted[-1].nbytes
        return evicted
