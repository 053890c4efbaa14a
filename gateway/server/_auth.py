"""A secure gateway's gate: its keys and users, the ZAP handler, and who sent each message.

``Gatekeeper`` is the part of a secure ``Gateway`` that owns its ``GatewayKeys`` and ``Users``
(``_users``) and the ZAP handler, and answers ``sender(frames, domain)``: the ``Principal``
whose CURVE key ZAP accepted for the message's connection (the frame's ``User-Id``), looked up
again in the users as they are now, so a user removed since the handshake is refused (None,
counted as ``refused_messages``) before the message is decoded. ``users.json`` is looked at
once per loop turn (``end_turn()`` starts a new one).

``GatewayAuthenticator`` is pyzmq's ``AsyncioAuthenticator`` (``zmq.auth``) on the gateway's
loop, bound to the gateway's context before any socket of it binds (libzmq accepts every CURVE
handshake while no ZAP handler is bound). Both ZAP domains (``ZAP_CLIENTS`` for the client
socket, ``ZAP_WORKERS`` for the worker socket) use it as their credentials provider: a
handshake passes when ``Users.principal(domain, key)`` knows the client's public key there. So a
user's key opens the client socket only and a worker's key the worker socket only.

A refused handshake gets no answer (libzmq closes the connection); it is counted
(``counters["refused_handshakes"]``) and logged as a warning once per address and domain per
``LOG_EVERY_S`` (a peer with the wrong key retries every few seconds: one line, not thousands).
Only public keys are ever logged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator

from gateway.protocol import ZAP_CLIENTS, ZAP_WORKERS
from gateway.server._users import ADMIN, GatewayKeys, Principal, Users

__all__ = ["REMOVED", "Gatekeeper", "GatewayAuthenticator"]

log = logging.getLogger("pilot.gateway")

LOG_EVERY_S = 60.0
LOGGED_KEPT = 1024  # addresses remembered for the rate limit of the log
REMOVED = (
    "These credentials were removed from this gateway (`pilot user remove`): ask its admin for "
    "a new connection file."
)


class Gatekeeper:
    """See the module docstring. Made (and the ZAP handler started) before the gateway's
    sockets bind; ``stop()`` after they close."""

    def __init__(self, ctx: zmq.Context[Any], state_dir: Path, counters: dict[str, int]) -> None:
        self.keys = GatewayKeys.load_or_create(state_dir)
        self.users = Users(state_dir, self.keys)
        self._counters = counters
        self._fresh = False  # users.json looked at in this turn
        self._auth = GatewayAuthenticator(ctx, self.users, counters)
        self._auth.start()

    def connection_fields(self) -> dict[str, str]:
        """What the admin's connection file adds: the gateway's public key, the admin's client
        and worker key pairs."""
        k = self.keys
        return {
            "server_key": k.server.public,
            "user": ADMIN,
            "public_key": k.admin.public,
            "secret_key": k.admin.secret,
            "worker_public_key": k.worker.public,
            "worker_secret_key": k.worker.secret,
        }

    def sender(self, frames: list[zmq.Frame], domain: str) -> Principal | None:
        if not self._fresh:
            self.users.refresh()
            self._fresh = True
        key = frames[-1].get("User-Id")
        who = self.users.principal(domain, key)
        if who is None:
            self._counters["refused_messages"] += 1
            log.warning("refused a message from %r: key %s is no user's now", frames[0].bytes, key)
        return who

    def end_turn(self) -> None:
        self._fresh = False

    def stop(self) -> None:
        self._auth.stop()


class GatewayAuthenticator(AsyncioAuthenticator):
    """See the module docstring. ``start()`` before the sockets bind, ``stop()`` after they
    close."""

    def __init__(self, ctx: zmq.Context[Any], users: Users, counters: dict[str, int]) -> None:
        # pyzmq's own log lines at debug level name public keys only; ours say more, once.
        super().__init__(ctx, log=logging.getLogger("pilot.gateway.zap"))
        self._users = users
        self._counters = counters
        self._request: tuple[str, str, str] = ("", "", "")  # domain, address, key in progress
        self._logged: dict[tuple[str, str], float] = {}
        for domain in (ZAP_CLIENTS, ZAP_WORKERS):
            self.configure_curve_callback(domain, self)

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider (pyzmq calls it with the client's Z85 public key)."""
        self._users.refresh()  # a user added a moment ago may be the one knocking
        text = key.decode("ascii", "replace")
        self._request = (domain, self._request[1], text)
        return self._users.principal(domain, text) is not None

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        domain = msg[2].decode("utf-8", "replace") if len(msg) > 3 else ""
        address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        self._request = (domain, address, "")
        await super().handle_zap_message(msg)

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous"
    ) -> None:
        if status_code != b"200":
            self._refused(status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)

    def _refused(self, why: str) -> None:
        self._counters["refused_handshakes"] += 1
        domain, address, key = self._request
        now = time.monotonic()
        last = self._logged.get((domain, address))
        if last is not None and now - last < LOG_EVERY_S:
            return
        if len(self._logged) >= LOGGED_KEPT:
            self._logged.clear()
        self._logged[(domain, address)] = now
        side = "worker" if domain == ZAP_WORKERS else "client"
        log.warning(
            "refused a handshake from %s on the %s socket (%s; public key %s): not a key of "
            "this gateway's users. Give them a connection file with `pilot user add NAME`.",
            address,
            side,
            why,
            key or "?",
        )
