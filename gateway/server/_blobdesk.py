"""Blobs that peers give and ask for: ``BlobDesk``.

Clients and workers store blobs the same way (``PutBlob``: shipped files, result files) and
fetch them (``GetBlob``: functions, arguments' big buffers, shipped files, result files), from
the functions kept in memory (the instruction executor's), a buffer still being written behind,
or the blob store's files.

A blob that a worker asks for and that is not here is looked for again every ``LOOK_S`` for
``wait_s`` (the timeouts' ``blob_wait_s``, 30 s) before the answer says so: after a gateway
restart, a client whose ``Submit`` was not acknowledged sends it again with its blobs
(``BlobStore.put_behind``), and a worker may ask for one of them first. A client's ``GetBlob``
(a result file) is answered at once. Owned by the gateway loop.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.protocol import Blob, BlobReply, GetBlob, Payload, PutBlob
from gateway.server._blobs import BlobStore

__all__ = ["LOOK_S", "BlobDesk"]

LOOK_S = 0.25  # how often a blob asked for and not here is looked for again


class BlobDesk:
    """See the module docstring. ``kept(digest)`` is a function blob kept in memory;
    ``later(fn, delay_s)`` runs ``fn`` in a turn of its own."""

    def __init__(
        self,
        blobs: BlobStore,
        kept: Callable[[str], Blob | None],
        counters: dict[str, int],
        later: Callable[[Callable[[], None], float], None],
    ) -> None:
        self._blobs = blobs
        self._kept = kept
        self._counters = counters
        self._later = later

    def answer(
        self,
        msg_id: str,
        msg: PutBlob | GetBlob,
        send: Callable[[BlobReply], None],
        wait_s: float = 0.0,
        waited_s: float = 0.0,
    ) -> None:
        """Store or fetch a blob for any peer, and ``send`` the answer; one not here, after
        looking for it for ``wait_s`` (in later turns: see the module docstring)."""
        if isinstance(msg, PutBlob):
            self._counters["blob_puts"] += 1
            ok, error = self.put(msg.digest, msg.data)
            send(BlobReply(msg_id, msg.digest, ok, error=error))
            return
        kept = self._kept(msg.digest)
        if kept is not None:
            send(BlobReply(msg_id, msg.digest, True, kept.data))
            return
        try:
            send(BlobReply(msg_id, msg.digest, True, self._blobs.get(msg.digest)))
        except FileNotFoundError:
            if waited_s >= wait_s:
                send(BlobReply(msg_id, msg.digest, False, error=f"no blob {msg.digest} here"))
                return
            if not waited_s:
                self._counters["blobs_awaited"] += 1
            waited_s += LOOK_S
            self._later(lambda: self.answer(msg_id, msg, send, wait_s, waited_s), LOOK_S)

    def put(self, digest: str, data: Payload) -> tuple[bool, str]:
        """Store ``data`` under ``digest``: (True, "") or (False, why not)."""
        if self._blobs.put_checked(digest, data):
            return True, ""
        return False, "content does not match digest"
