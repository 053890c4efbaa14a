"""``pilot user``: the users of a secure gateway, from its machine.

::

    pilot user add NAME [--worker] [--host HOST] [--out FILE] [--state DIR] [--connection-file F]
    pilot user list [--state DIR] [--json]
    pilot user remove NAME [--state DIR]

``add`` makes a key pair for ``NAME``, records its public half in ``STATE/users.json`` and
writes the secret half into a new connection file for that user (mode 0600; by default
``$PILOT_HOME/users/NAME.json``), whose path it prints: the gateway's endpoints (from the
admin's connection file, or the state when the gateway is stopped; ``--host`` puts the address
others reach it by in place of the bound one), its public key, the HMAC key and the user's key
pair. With ``--worker`` the file holds a worker key pair instead: it registers a worker on
another machine and can submit nothing. The running gateway notices ``users.json`` change by
itself: no restart, no signal. ``remove`` forgets a user; the gateway refuses their next
message. See ``docs/security.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.protocol import ConfigError, ConnectionInfo, default_home

__all__ = ["add_user_parser", "state_connection"]


def add_user_parser(sub: Any) -> None:
    """Add ``user`` (add, list, remove) to the ``pilot`` subcommands."""
    user = sub.add_parser("user", help="users of a secure gateway (run on its machine)")
    actions = user.add_subparsers(required=True, metavar="ACTION")
    add = actions.add_parser("add", help="a new user: writes their connection file")
    add.add_argument("name")
    add.add_argument("--worker", action="store_true", help="worker credentials, not a user's")
    add.add_argument("--host", default=None, help="the gateway's address for that user")
    add.add_argument("--out", type=Path, default=None, help="default $PILOT_HOME/users/NAME.json")
    add.set_defaults(run=_add)
    ls = actions.add_parser("list", help="the users")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_list)
    rm = actions.add_parser("remove", help="forget a user: their next message is refused")
    rm.add_argument("name")
    rm.set_defaults(run=_remove)
    for p in (add, ls, rm):
        p.add_argument("--state", type=Path, default=None, help="default $PILOT_HOME/state")
    add.add_argument("--connection-file", type=Path, default=None, help="the admin's")


def _state(args: argparse.Namespace) -> Path:
    return args.state or default_home() / "state"


def state_connection(state: Path) -> ConnectionInfo:
    """The admin's connection as the gateway's state records it (``ports.json``, ``key``,
    ``keys.json``): for when its connection file is gone (the gateway is stopped)."""
    from gateway.server import GatewayKeys

    try:
        ports = json.loads((state / "ports.json").read_text())
        key = (state / "key").read_text().strip()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"No gateway state in {state} ({exc}): start the gateway once with --secure, or "
            "give --state / --connection-file."
        ) from None
    keys = GatewayKeys.load_or_create(state)
    return ConnectionInfo(
        ports.get("client_url", ""),
        ports.get("worker_url", ""),
        key,
        server_key=keys.server.public,
    )


def _add(args: argparse.Namespace) -> int:
    from gateway.server import add_user

    state = _state(args)
    path = args.connection_file or default_home() / "connection.json"
    admin = ConnectionInfo.load(path) if path.exists() else state_connection(state)
    if not admin.secure:
        raise ConfigError(
            "This gateway does not encrypt, so it has no users (everyone is the admin): start "
            "it with `pilot gateway --secure` (or bind a non-loopback address), then add users."
        )
    entry, keys = add_user(state, args.name, "worker" if args.worker else "user")
    client_url, worker_url = admin.client_url, admin.worker_url
    if args.host:
        client_url, worker_url = (
            _with_host(client_url, args.host),
            _with_host(worker_url, args.host),
        )
    empty = dict(public_key="", secret_key="", worker_public_key="", worker_secret_key="")
    mine = (
        dict(worker_public_key=keys.public, worker_secret_key=keys.secret)
        if args.worker
        else dict(public_key=keys.public, secret_key=keys.secret)
    )
    info = replace(
        admin,
        client_url=client_url,
        worker_url=worker_url,
        user=entry.name,
        pid=0,
        **{**empty, **mine},
    )
    out = info.save(args.out or _users_dir() / f"{entry.name}.json")
    print(out)
    return 0


def _users_dir() -> Path:
    path = default_home() / "users"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _with_host(url: str, host: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{host}:{parts.port}"


def _list(args: argparse.Namespace) -> int:
    from gateway.server import list_users

    users = list_users(_state(args))
    if args.json:
        print(json.dumps([asdict(u) for u in users], indent=2))
        return 0
    print("admin    (the gateway's connection.json)")
    for u in users:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(u.created))
        print(f"{u.name:8} {u.role:6}  added {when}  public key {u.public_key}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from gateway.server import remove_user

    if not remove_user(_state(args), args.name):
        raise ConfigError(f"No user {args.name} (see `pilot user list`).")
    print(f"removed {args.name}: the gateway refuses their next message")
    return 0
