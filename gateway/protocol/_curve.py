"""CurveZMQ for the peers' sockets: key pairs, and the socket options that turn it on.

A secure gateway (``pilot gateway --secure``) encrypts and authenticates both of its sockets
with CurveZMQ. Keys are pyzmq's (``zmq.curve_keypair()``): 32-byte Curve25519 keys written as
40 characters of Z85, the form they take in connection files and in ``STATE/users.json``.

- The gateway's sockets are CURVE servers with its ``server`` key pair; each has its own ZAP
  domain (``ZAP_CLIENTS``, ``ZAP_WORKERS``), so the authenticator (``gateway.server._auth``)
  accepts a user's key on the client socket only and a worker's key on the worker socket only.
- A client's or worker's DEALER is a CURVE client: it knows the gateway's public key (the
  connection file's ``server_key``) and has a key pair of its own.

Secret keys never appear in a ``repr`` or a log line: ``KeyPair`` hides its secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zmq

from gateway.protocol._errors import ConfigError

__all__ = ["ZAP_CLIENTS", "ZAP_WORKERS", "KeyPair", "curve_client", "curve_server"]

ZAP_CLIENTS = "pilot-clients"
ZAP_WORKERS = "pilot-workers"
Z85_KEY_CHARS = 40


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair in Z85 text. ``new()`` makes a fresh one."""

    public: str
    secret: str = field(repr=False)

    @classmethod
    def new(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))

    def __post_init__(self) -> None:
        for text in (self.public, self.secret):
            if len(text) != Z85_KEY_CHARS:
                raise ConfigError(
                    f"A CURVE key must be {Z85_KEY_CHARS} characters of Z85 (got "
                    f"{len(text)}): the connection file is damaged; ask for a new one "
                    "(`pilot user add NAME`)."
                )


def curve_client(sock: zmq.Socket[Any], server_key: str, keys: KeyPair) -> None:
    """Make ``sock`` (a DEALER, before it connects) a CURVE client of the gateway whose public
    key is ``server_key``."""
    if len(server_key) != Z85_KEY_CHARS:
        raise ConfigError(
            f"The gateway's public key must be {Z85_KEY_CHARS} characters of Z85 (got "
            f"{len(server_key)}): the connection file is damaged."
        )
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode("ascii"))
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))


def curve_server(sock: zmq.Socket[Any], keys: KeyPair, domain: str) -> None:
    """Make ``sock`` (a ROUTER, before it binds) a CURVE server whose handshakes the ZAP
    handler checks under ``domain``."""
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode("ascii"))
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))
