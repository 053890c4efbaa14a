"""The worker's link to its gateway: one DEALER socket, signed messages, a fresh one to reconnect.

``connect()`` opens a DEALER whose identity is the worker's name (no inbound port: a worker can
sit behind NAT; a CURVE client with the worker key pair when the gateway is secure) and says
hello (``hello()`` builds the ``WorkerHello``: the worker's resources and the attempts it holds
now, so a gateway that restarted adopts them). Each message received
is decoded (one that does not verify is logged and dropped) and handed to ``on_message(msg)``;
each turn of reading ends with ``end_turn()``, where the worker dispatches and reports.

The link does not decide when to reconnect: ``silent_s`` tells the worker's heartbeat loop how
long the gateway has been silent. Owned by the worker's event loop; ``close()`` closes the
socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from gateway.protocol import (
    Codec,
    Drain,
    WorkerHello,
    WorkerSettings,
    curve_client,
    send_frames,
)

__all__ = ["RECONNECT_MAX_S", "GatewayLink"]

log = logging.getLogger("pilot.worker")

RECONNECT_MAX_S = 5.0


class GatewayLink:
    """See the module docstring."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        settings: WorkerSettings,
        *,
        hello: Callable[[], WorkerHello],
        on_message: Callable[[Any], None],
        end_turn: Callable[[], None],
    ) -> None:
        self._ctx = ctx
        self._settings = settings
        self._hello = hello
        self._on_message = on_message
        self._end_turn = end_turn
        self._codec = self._codec_for(settings)
        self._sock: zmq.Socket[Any] | None = None
        self._drain: Drain | None = None
        self._last_heard = time.monotonic()
        self._hello_at = 0.0

    @staticmethod
    def _codec_for(settings: WorkerSettings) -> Codec:
        return Codec(settings.connection.key, max_message_bytes=settings.max_message_bytes)

    def use(self, settings: WorkerSettings) -> None:
        """Settings with the gateway's connection, known only now (before ``connect()``)."""
        self._settings = settings
        self._codec = self._codec_for(settings)

    @property
    def silent_s(self) -> float:
        """Seconds since the gateway last said anything."""
        return time.monotonic() - self._last_heard

    @property
    def since_hello_s(self) -> float:
        return time.monotonic() - self._hello_at

    def connect(self) -> None:
        """Drop the socket there is (and what it still queues), open a fresh one, say hello."""
        self.close(linger=0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._settings.name.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(RECONNECT_MAX_S * 1000))
        info = self._settings.connection
        if info.secure:  # CurveZMQ: the gateway's public key and the worker key pair
            curve_client(sock, info.server_key, info.worker_keys())
        # A handshake the gateway refused (keys, or encryption on one side only) leaves no
        # connection to queue on: never block a send then (else it queues, without limit).
        sock.setsockopt(zmq.SNDTIMEO, 0)
        sock.connect(info.worker_url)
        self._sock = sock
        self._drain = Drain(sock, self._received, self._end_turn)
        self._last_heard = time.monotonic()
        self.say_hello()

    def say_hello(self) -> None:
        self._hello_at = time.monotonic()
        self.send(self._hello())

    def send(self, msg: Any) -> None:
        """Sign and send ``msg``. Raises ``RuntimeError`` before ``connect()``."""
        if self._sock is None:
            raise RuntimeError("the gateway link is not connected")
        try:
            send_frames(self._sock, self._codec.encode(msg))
        except zmq.Again:  # the gateway refused our handshake: we reconnect when it is silent
            log.debug("%s not sent: the gateway did not accept this worker", type(msg).__name__)
            return
        if self._drain is not None:
            # A send can swallow the socket's read edge (a message that arrived meanwhile
            # would then wait for a reconnect): sends from outside a turn (heartbeats,
            # hellos, blob requests) must look for it too.
            self._drain.kick()

    def kick(self) -> None:
        """Look for messages that a send made the descriptor miss (see ``Drain``)."""
        if self._drain is not None:
            self._drain.kick()

    def _received(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = self._codec.decode(frames).msg
        except Exception as exc:  # a bad message is dropped; the link lives on
            log.warning("rejected a message from the gateway: %s", exc)
            return
        self._last_heard = time.monotonic()
        self._on_message(msg)

    def close(self, linger: int = 0) -> None:
        if self._drain is not None:
            self._drain.close()
            self._drain = None
        if self._sock is not None:
            self._sock.close(linger=linger)
            self._sock = None
