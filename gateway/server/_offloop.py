"""Big client messages decoded off the gateway's loop: ``OffLoopDecoder``.

A ``Submit`` of a million tasks is a message of some 30 MB, and decoding it (a ``Payload`` per
argument) takes the codec more than a second. Decoded on the loop, it would hold everyone else
for that long: ``pilot status`` and ``pilot jobs`` would wait, workers' results would queue. So
a client message of at least ``BIG_BYTES`` is decoded on a thread, while the loop goes on
(the thread holds the GIL for one switch interval at a time), and is handled once decoded, in
a turn of its own (``turn_later``).

The thread also hands a decoded ``Submit``'s blobs to the blob store (``prepare``): an
argument's buffer to be written behind (``BlobStore.put_behind``), anything else written now;
the loop's own store then finds them, written or being written.

Each client's messages are still handled in the order it sent them: while a client's big
message is being decoded, its next messages wait here, and are handled right after it.

The thread decodes with a codec of its own (a codec's decoding is not reentrant). Replays are
still refused: a message is always checked by the codec that its size picks, and a codec
refuses a message id of a session that is not newer than the last it saw. Owned by the
gateway loop; ``close()`` ends the thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from gateway.protocol import Codec, Envelope

__all__ = ["BIG_BYTES", "OffLoopDecoder"]

log = logging.getLogger("pilot.gateway")

BIG_BYTES = 4 << 20  # about 50 ms of the codec's time: the loop's longest wait for a message

Decoded = Envelope | Exception  # what a message became: an envelope, or why it is refused


class OffLoopDecoder:
    """See the module docstring. ``handle(frames, who, decoded)`` handles a message decoded
    here; ``receive(frames, who)`` decodes and handles one on the loop (those that waited
    behind a big one); ``turn_later(fn)`` runs ``fn`` in a turn of its own; ``prepare(msg)``
    runs on the thread once a message is decoded."""

    def __init__(
        self,
        codec: Codec,
        handle: Callable[[list[zmq.Frame], Any, Decoded], None],
        receive: Callable[[list[zmq.Frame], Any], None],
        turn_later: Callable[[Callable[[], None]], None],
        prepare: Callable[[Any], None] = lambda msg: None,
    ) -> None:
        self._codec = codec
        self._prepare = prepare
        self._handle = handle
        self._receive = receive
        self._turn_later = turn_later
        self._waiting: dict[bytes, deque[tuple[list[zmq.Frame], Any]]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pilot-decode")
        self._closed = False

    def takes(self, ident: bytes, size: int) -> bool:
        """Whether a message of ``size`` bytes from ``ident`` goes through here: it is big, or
        that client's big message is still being decoded."""
        return size >= BIG_BYTES or ident in self._waiting

    def take(self, ident: bytes, frames: list[zmq.Frame], who: Any) -> None:
        waiting = self._waiting.get(ident)
        if waiting is not None:
            waiting.append((frames, who))
        else:
            self._waiting[ident] = deque()
            self._start(ident, frames, who)

    def _start(self, ident: bytes, frames: list[zmq.Frame], who: Any) -> None:
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._decode, frames)

        def decoded(f: asyncio.Future[Decoded]) -> None:
            if not self._closed and not f.cancelled():
                self._turn_later(lambda: self._done(ident, frames, who, f.result()))

        future.add_done_callback(decoded)

    def _decode(self, frames: list[zmq.Frame]) -> Decoded:  # on the thread
        try:
            decoded = self._codec.decode(frames[1:])
        except Exception as exc:  # the loop says what was wrong, as it does for the others
            return exc
        try:
            self._prepare(decoded.msg)
        except Exception:  # the loop writes it again, and answers what went wrong
            log.warning("could not write a message's blobs ahead", exc_info=True)
        return decoded

    def _done(self, ident: bytes, frames: list[zmq.Frame], who: Any, decoded: Decoded) -> None:
        self._handle(frames, who, decoded)
        waiting = self._waiting[ident]
        while waiting:
            frames, who = waiting.popleft()
            if sum(len(f) for f in frames) >= BIG_BYTES:  # the rest wait behind this one
                self._start(ident, frames, who)
                return
            self._receive(frames, who)
        del self._waiting[ident]

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
