"""Settings as values, and the connection file.

Settings are frozen dataclasses built once at the edge (the CLI, ``PILOT_*`` environment
variables, the connection file) and passed down. Nothing below this module reads
``os.environ``.

The connection file (``$PILOT_HOME/connection.json``, mode 0600) is written by the gateway once
its sockets are bound; every client and local worker finds the gateway through it. A secure
gateway's file also holds its public key and the admin's key pairs; ``pilot user add`` writes
one per user (see ``docs/security.md``). Readers ignore fields they do not know.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.protocol._curve import KeyPair
from gateway.protocol._errors import ConfigError, NoGateway
from gateway.protocol._policy import SchedulingPolicy

__all__ = [
    "ConnectionInfo",
    "GatewaySettings",
    "Timeouts",
    "WorkerSettings",
    "default_home",
    "find_connection",
    "new_key",
]

CONNECTION_FILE_NAME = "connection.json"


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """``$PILOT_HOME``, or ``~/.pilot``."""
    env = os.environ if env is None else env
    return Path(env.get("PILOT_HOME") or Path.home() / ".pilot").expanduser()


def new_key() -> str:
    """A fresh signing key: 32 random bytes, hex."""
    return secrets.token_hex(32)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every deadline of the system, in seconds."""

    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0  # a peer silent this long is lost
    # a worker whose connection dropped and that stays silent this long is lost (more than a
    # heartbeat interval, so a live worker speaks first)
    disconnect_grace_s: float = 1.5
    request_s: float = 10.0  # a client request (status, submit ack) without an answer
    cancel_grace_s: float = 1.0  # SIGINT, then SIGKILL after this long
    orphan_grace_s: float = 5.0  # after a gateway restart: wait this long for workers to return
    # a worker's GetBlob for a blob the gateway lacks waits this long for a client to send it
    # again (after a restart, one whose Submit was not acknowledged); PILOT_BLOB_WAIT_S
    blob_wait_s: float = 30.0
    stop_grace_s: float = 30.0  # a SIGTERM'd worker finishes running tasks for this long
    replay_window_s: float = 300.0  # messages older than this are refused


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """How to reach a gateway: its endpoints and the signing key; for a secure gateway also
    its public key (``server_key``) and whose credentials these are: ``user`` and a client key
    pair (a user's or the admin's), a worker key pair, or both (the admin's file). Secrets
    stay out of ``repr``."""

    client_url: str
    worker_url: str
    key: str = field(repr=False)
    http_url: str = ""
    gateway_id: str = ""
    pid: int = 0
    server_key: str = ""  # the gateway's CURVE public key; "": the gateway does not encrypt
    user: str = ""  # "admin", a user's name, or "" (an insecure gateway: everyone is admin)
    public_key: str = ""  # the client key pair (submits, lists, attaches)
    secret_key: str = field(default="", repr=False)
    worker_public_key: str = ""  # the worker key pair (registers as a worker)
    worker_secret_key: str = field(default="", repr=False)

    @property
    def secure(self) -> bool:
        """Whether the gateway encrypts (CurveZMQ) its sockets."""
        return bool(self.server_key)

    def client_keys(self) -> KeyPair:
        """The client key pair. Raises ``ConfigError`` where this file has none (a worker's
        credentials cannot submit jobs)."""
        if not (self.public_key and self.secret_key):
            raise ConfigError(
                "This connection file holds no client credentials (a worker's file cannot "
                "submit jobs): use your own (`pilot user add NAME` on the gateway's machine "
                "writes one) or the admin's connection.json."
            )
        return KeyPair(self.public_key, self.secret_key)

    def worker_keys(self) -> KeyPair:
        """The worker key pair. Raises ``ConfigError`` where this file has none (a user's
        credentials cannot register a worker)."""
        if not (self.worker_public_key and self.worker_secret_key):
            raise ConfigError(
                "This connection file holds no worker credentials (a user's file cannot "
                "register a worker): use the admin's connection.json, or one that `pilot user "
                "add NAME --worker` wrote on the gateway's machine."
            )
        return KeyPair(self.worker_public_key, self.worker_secret_key)

    def public(self) -> dict[str, Any]:
        """The fields without the secrets (what may be printed)."""
        hidden = ("key", "secret_key", "worker_secret_key")
        return {k: ("***" if k in hidden and v else v) for k, v in asdict(self).items()}

    @classmethod
    def from_url(cls, url: str, key: str) -> ConnectionInfo:
        """A gateway given as ``tcp://HOST:PORT``: its client port for a client, its worker
        port for a worker. The key must be known."""
        return cls(client_url=url, worker_url=url, key=key)

    @classmethod
    def load(cls, path: Path | str) -> ConnectionInfo:
        """Read a connection file. Raises ``NoGateway`` if it is missing, ``ConfigError`` if
        it cannot be parsed."""
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise NoGateway(
                f"No gateway found: {path} does not exist. Run `pilot up`, or connect to a "
                "gateway with `pilot.connect('tcp://HOST:PORT')` / `%pilot connect tcp://HOST:PORT`."
            ) from None
        except OSError as exc:
            raise ConfigError(f"Cannot read connection file {path}: {exc}") from exc
        return cls.parse(text, f"connection file {path}")

    @classmethod
    def parse(cls, text: str, source: str = "the connection file") -> ConnectionInfo:
        """A connection file's text (``source`` names it in errors). Raises ``ConfigError``
        if it cannot be parsed."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"Cannot read {source}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"Cannot read {source}: it is not a JSON object.")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        try:
            return cls(**known)
        except TypeError as exc:
            raise ConfigError(f"{source[0].upper()}{source[1:]} lacks a field: {exc}") from exc

    def save(self, path: Path | str) -> Path:
        """Write atomically with mode 0600 (it holds the key)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
        os.replace(tmp, path)
        return path


def find_connection(
    target: str | Path | None = None, env: Mapping[str, str] | None = None
) -> ConnectionInfo:
    """Resolve what a client should connect to.

    ``target`` may be a connection file path or ``tcp://HOST:PORT``; without it,
    ``PILOT_CONNECT`` (same forms), then ``$PILOT_HOME/connection.json``. A bare URL takes the
    rest from the local connection file (the key, and a secure gateway's keys), the key from
    ``PILOT_KEY`` first.
    """
    env = os.environ if env is None else env
    target = target or env.get("PILOT_CONNECT") or None
    if target is None:
        return ConnectionInfo.load(default_home(env) / CONNECTION_FILE_NAME)
    text = str(target)
    if text.startswith(("tcp://", "ipc://")):
        key = env.get("PILOT_KEY")
        local = default_home(env) / CONNECTION_FILE_NAME
        if local.exists():  # its key, and a secure gateway's keys, for another address
            known = ConnectionInfo.load(local)
            return replace(known, client_url=text, worker_url=text, key=key or known.key)
        if not key:
            raise ConfigError(
                f"To connect to {text} the gateway's key is needed: set PILOT_KEY, or copy the "
                "gateway's connection.json here and pass its path instead."
            )
        return ConnectionInfo.from_url(text, key)
    return ConnectionInfo.load(text)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Everything a gateway needs; built by ``pilot gateway`` / ``pilot up``."""

    state_dir: Path
    bind: str = "127.0.0.1"
    client_port: int = 0  # 0: pick a free port
    worker_port: int = 0
    http_port: int | None = 0  # None: no HTTP dashboard
    key: str = field(default_factory=new_key)
    connection_file: Path | None = None
    max_message_bytes: int = 1 << 30
    policy: SchedulingPolicy = field(default_factory=SchedulingPolicy)
    outputs_kept_bytes: int = 1 << 20  # per task, for `pilot logs` and re-attach
    inline_result_bytes: int = 1 << 20  # larger results go to the blob store
    timeouts: Timeouts = field(default_factory=Timeouts)
    # CurveZMQ on both sockets, users and owners; keys and users live in ``state_dir``
    secure: bool = False

    def with_(self, **changes: Any) -> GatewaySettings:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Everything a worker needs; built by ``pilot worker``."""

    connection: ConnectionInfo
    name: str
    slots: int = 1
    tags: tuple[str, ...] = ()
    cache_dir: Path | None = None
    cache_bytes: int = 20 * 10**9
    max_message_bytes: int = 1 << 30
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Blender for render tasks: ``blender`` (--blender) or ``blender_env`` ($PILOT_BLENDER, read
    # by the CLI) must work when given; else ``blender`` on PATH if there is one. With
    # ``use_blender`` False (--no-blender) the worker renders nothing.
    blender: str = ""
    blender_env: str = ""
    use_blender: bool = True
    slurm_job_id: str = ""  # the Slurm job it runs in: $PILOT_SLURM_JOB_ID, $SLURM_JOB_ID
    # The cores it counts as its own (--cores): what it registers and shares among its training
    # ranks (OMP_NUM_THREADS). 0: every core it may run on. Local workers get their share.
    cores: int = 0

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ConfigError(f"--slots must be at least 1 (got {self.slots}).")
        if self.cores < 0:
            raise ConfigError(f"--cores must be 0 (every core) or more (got {self.cores}).")
        if self.connection.secure:
            self.connection.worker_keys()  # raises: a user's file cannot register a worker
