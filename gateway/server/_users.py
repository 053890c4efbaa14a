"""Who may talk to a secure gateway: its key pairs and its users, kept in its state directory.

Two files, both mode 0600, written atomically (a temporary file, then a rename):

- ``STATE/keys.json``: the gateway's own CURVE key pairs, made at its first secure start and
  kept across restarts (so connection files stay valid): ``server`` (its sockets), ``admin``
  (the client credential of the connection file ``pilot up``/``pilot gateway`` write) and
  ``worker`` (that file's worker credential, which its local workers use).
- ``STATE/users.json``: ``{"users": {NAME: {"role": "user"|"worker", "public_key": Z85,
  "created": UNIX_TIME}}}``; public keys only. ``pilot user add/remove`` change it
  (``add_user``, ``remove_user``) under an exclusive ``flock`` of ``STATE/users.lock``.

The gateway reads both through ``Users``: ``refresh()`` stats ``users.json`` and reloads it
when it changed; the gateway calls it at the start of each loop turn and before each
handshake it checks, so a removed user's next message is refused and a new user's first
handshake is accepted, without a restart or a signal. ``principal(domain, key)`` names who
holds a public key on a socket: the admin and users on the client socket, the admin's worker
key and workers on the worker socket (``ZAP_CLIENTS`` / ``ZAP_WORKERS``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.protocol import ZAP_CLIENTS, ZAP_WORKERS, ConfigError, KeyPair

__all__ = [
    "ADMIN",
    "GatewayKeys",
    "Principal",
    "UserEntry",
    "Users",
    "add_user",
    "list_users",
    "remove_user",
]

log = logging.getLogger("pilot.gateway")

ADMIN = "admin"
ROLES = ("user", "worker")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
KEYS_FILE = "keys.json"
USERS_FILE = "users.json"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a message: a name and whether they see every job (the admin)."""

    name: str
    admin: bool = False


@dataclass(frozen=True, slots=True)
class UserEntry:
    name: str
    role: str  # "user" (a client credential) or "worker"
    public_key: str
    created: float


@dataclass(frozen=True, slots=True)
class GatewayKeys:
    """The gateway's own key pairs (``STATE/keys.json``)."""

    server: KeyPair
    admin: KeyPair
    worker: KeyPair

    @classmethod
    def load_or_create(cls, state_dir: Path) -> GatewayKeys:
        path = state_dir / KEYS_FILE
        try:
            raw = json.loads(path.read_text())
            pairs = {k: KeyPair(raw[k]["public"], raw[k]["secret"]) for k in cls.__slots__}
            return cls(**pairs)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"Cannot read the gateway's keys in {path}: {exc}. Restore it from a backup, or "
                "remove it to make new keys (every connection file must then be made again)."
            ) from exc
        keys = cls(KeyPair.new(), KeyPair.new(), KeyPair.new())
        pairs = {k: {"public": p.public, "secret": p.secret} for k, p in keys._pairs()}
        _write_private(path, pairs)
        log.info("made the gateway's CURVE keys in %s", path)
        return keys

    def _pairs(self) -> Iterator[tuple[str, KeyPair]]:
        yield from (("server", self.server), ("admin", self.admin), ("worker", self.worker))


class Users:
    """The keys a secure gateway accepts, from ``GatewayKeys`` and ``users.json`` (see the
    module docstring). Owned by the gateway's loop."""

    def __init__(self, state_dir: Path, keys: GatewayKeys) -> None:
        self._path = state_dir / USERS_FILE
        self._stamp: tuple[int, int, int] | None = None
        self._fixed = {
            ZAP_CLIENTS: {keys.admin.public: Principal(ADMIN, admin=True)},
            ZAP_WORKERS: {keys.worker.public: Principal(ADMIN, admin=True)},
        }
        self._by_key: dict[str, dict[str, Principal]] = {d: dict(m) for d, m in self._fixed.items()}
        self.refresh()

    def refresh(self) -> None:
        """Reload ``users.json`` if it changed since the last look (one ``stat``)."""
        try:
            st = self._path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        by_key = {d: dict(m) for d, m in self._fixed.items()}
        try:
            entries = _read_users(self._path)
        except ConfigError:
            log.exception("kept the users as they were")
            return
        for e in entries.values():
            domain = ZAP_CLIENTS if e.role == "user" else ZAP_WORKERS
            by_key[domain].setdefault(e.public_key, Principal(e.name))
        self._by_key = by_key
        log.info("users: %d known", len(entries))

    def principal(self, domain: str, public_key: str) -> Principal | None:
        """Who holds ``public_key`` (Z85) on the socket of ``domain``; None: nobody here."""
        return self._by_key.get(domain, {}).get(public_key)

    def knows(self, who: Principal) -> bool:
        """Whether ``who`` is still a user of this gateway (the admin always is): a dashboard
        session of a removed user ends with their next request."""
        self.refresh()
        return who.admin or who in self._by_key[ZAP_CLIENTS].values()


# -- what `pilot user` does ------------------------------------------------------------------


def add_user(state_dir: Path, name: str, role: str = "user") -> tuple[UserEntry, KeyPair]:
    """A new user (or worker credential) ``name`` with a fresh key pair; the caller writes the
    secret half into that user's connection file and nowhere else. Raises ``ConfigError`` for a
    bad or taken name."""
    if role not in ROLES:
        raise ConfigError(f"A user's role is one of {', '.join(ROLES)} (got {role!r}).")
    if not NAME_RE.match(name) or name == ADMIN:
        raise ConfigError(
            f"Bad user name {name!r}: letters, digits and _.@- (up to 64), not {ADMIN!r}."
        )
    keys = KeyPair.new()
    with _locked(state_dir):
        users = _read_users(state_dir / USERS_FILE)
        if name in users:
            raise ConfigError(f"User {name} exists: `pilot user remove {name}` first.")
        users[name] = UserEntry(name, role, keys.public, time.time())
        _write_users(state_dir, users)
    return users[name], keys


def remove_user(state_dir: Path, name: str) -> bool:
    """Forget ``name``; False if there was no such user. The gateway refuses their next
    message."""
    with _locked(state_dir):
        users = _read_users(state_dir / USERS_FILE)
        if users.pop(name, None) is None:
            return False
        _write_users(state_dir, users)
    return True


def list_users(state_dir: Path) -> list[UserEntry]:
    return sorted(_read_users(state_dir / USERS_FILE).values(), key=lambda e: e.name)


def _read_users(path: Path) -> dict[str, UserEntry]:
    try:
        raw = json.loads(path.read_text())
        return {
            name: UserEntry(name, u["role"], u["public_key"], float(u.get("created", 0)))
            for name, u in raw.get("users", {}).items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from exc


def _write_users(state_dir: Path, users: dict[str, UserEntry]) -> None:
    body = {
        "users": {
            e.name: {"role": e.role, "public_key": e.public_key, "created": e.created}
            for e in users.values()
        }
    }
    _write_private(state_dir / USERS_FILE, body)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, body: Any) -> None:
    """Write JSON atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2)
    os.replace(tmp, path)
