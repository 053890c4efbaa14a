"""The ``pilot`` command line. Builds settings from flags and ``PILOT_*`` variables (the edge),
then runs the gateway, a worker, a local cluster, or asks a running gateway something."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.protocol import (
    ConfigError,
    ConnectionInfo,
    GatewaySettings,
    NoGateway,
    PilotError,
    Timeouts,
    WorkerSettings,
    default_home,
    new_key,
)
from pilot._ask_cli import add_ask_parsers
from pilot._dashboard_cli import add_dashboard_parsers
from pilot._discovery import worker_connection
from pilot._malloc import keep_freed_memory
from pilot._scale_cli import add_scale_parser
from pilot._user_cli import add_user_parser

if TYPE_CHECKING:  # imported where used: `pilot gateway` and `pilot worker` start faster
    pass

__all__ = ["ConnectionInfo", "main"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("PILOT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except PilotError as exc:
        print(f"pilot: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pilot", description="Parallel Pilot")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="gateway + local workers (the embedded default)")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--slots", type=int, default=1)
    up.add_argument("--blender", default=None, help="Blender for the workers to render with")
    up.add_argument("--secure", action="store_true", help="CurveZMQ on every socket, users")
    up.add_argument(
        "--bind", default="127.0.0.1", help="the gateway's address (0.0.0.0: every interface)"
    )
    up.set_defaults(run=_up)

    gw = sub.add_parser("gateway", help="run a gateway")
    gw.add_argument("--bind", default="127.0.0.1")
    gw.add_argument("--client-port", type=int, default=0)
    gw.add_argument("--worker-port", type=int, default=0)
    gw.add_argument("--http-port", default="0", help="a port, 0 for any, or 'none'")
    gw.add_argument("--state", type=Path, default=None, help="default $PILOT_HOME/state")
    gw.add_argument("--connection-file", type=Path, default=None)
    gw.add_argument("--ready-line", action="store_true", help=argparse.SUPPRESS)
    secure = gw.add_mutually_exclusive_group()
    secure.add_argument(
        "--secure", action="store_true", default=None, help="default when --bind is not loopback"
    )
    secure.add_argument("--insecure", dest="secure", action="store_false", help="no encryption")
    gw.add_argument("--advertise", action="store_true", help="announce it on the LAN (zeroconf)")
    gw.set_defaults(run=_gateway)

    wk = sub.add_parser("worker", help="run a worker")
    wk.add_argument(
        "--connect", default=None, help="connection file, tcp://HOST:PORT, or - (stdin)"
    )
    wk.add_argument("--discover", action="store_true", help="find the gateway on the LAN")
    wk.add_argument("--keys", default=None, help="with --discover: a connection file's keys")
    wk.add_argument("--slots", type=int, default=1)
    wk.add_argument("--cores", type=int, default=0, help="cores it counts as its own (0: all)")
    wk.add_argument("--tags", default="")
    wk.add_argument("--name", default=None)
    wk.add_argument("--cache-size", default="20GB")
    wk.add_argument("--cache-dir", type=Path, default=None, help="default $PILOT_HOME/cache/NAME")
    wk.add_argument(
        "--stop-grace", type=float, default=None, help="on SIGTERM, s to finish running tasks"
    )
    render = wk.add_mutually_exclusive_group()
    render.add_argument(
        "--blender", default=None, help="Blender to render with (default $PILOT_BLENDER, PATH)"
    )
    render.add_argument(
        "--no-blender", action="store_true", help="take no render jobs, even with Blender here"
    )
    wk.set_defaults(run=_worker)

    for add_parsers in (add_ask_parsers, add_scale_parser, add_user_parser, add_dashboard_parsers):
        add_parsers(sub)

    kernel = sub.add_parser("kernel", help="install the Parallel Pilot Jupyter kernel")
    ksub = kernel.add_subparsers(required=True, metavar="ACTION")
    for action in ("install", "uninstall"):
        k = ksub.add_parser(action)
        where = k.add_mutually_exclusive_group()
        where.add_argument("--user", action="store_true")
        where.add_argument("--sys-prefix", action="store_true")
        where.add_argument("--prefix", default=None)
        k.add_argument("--name", default="parallel-pilot")
        k.set_defaults(run=_kernel, action=action)
    return p


# -- servers ------------------------------------------------------------------------------


def _load_or_create_key(state: Path) -> str:
    path = state / "key"
    if path.exists():
        return path.read_text().strip()
    state.mkdir(parents=True, exist_ok=True)
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def _previous_ports(state: Path) -> dict[str, int]:
    """A restarted gateway takes its old ports again, so peers reconnect by themselves."""
    try:
        return json.loads((state / "ports.json").read_text())
    except (OSError, ValueError):
        return {}


def _gateway(args: argparse.Namespace) -> int:
    from gateway.server import Gateway

    keep_freed_memory()  # a client's big message lands in memory already faulted in
    home = default_home()
    state = args.state or home / "state"
    old = _previous_ports(state)
    secure = args.secure
    if secure is None:  # on by default where others can reach the gateway
        secure = not _loopback(args.bind)
    elif not secure and not _loopback(args.bind):
        logging.getLogger("pilot").warning(
            "--insecure on %s: anyone on that network can read the traffic, and anyone with "
            "the connection file's key can do anything; see docs/security.md",
            args.bind,
        )
    http: int | None = None if args.http_port == "none" else int(args.http_port)
    blob_wait_s = os.environ.get("PILOT_BLOB_WAIT_S")  # tests shorten it
    settings = GatewaySettings(
        state_dir=state,
        bind=args.bind,
        client_port=args.client_port or old.get("client", 0),
        worker_port=args.worker_port or old.get("worker", 0),
        http_port=None if http is None else (http or old.get("http", 0)),
        key=_load_or_create_key(state),
        connection_file=args.connection_file or home / "connection.json",
        max_message_bytes=int(os.environ.get("PILOT_MAX_MESSAGE_BYTES", 1 << 30)),
        secure=secure,
        timeouts=Timeouts(blob_wait_s=float(blob_wait_s)) if blob_wait_s else Timeouts(),
    )

    async def serve() -> None:
        async with Gateway(settings) as gw, contextlib.AsyncExitStack() as stack:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, gw.stop)
            info = gw.connection
            assert info is not None
            ports = {
                "client": _port(info.client_url),
                "worker": _port(info.worker_url),
                "http": _port(info.http_url) if info.http_url else 0,
                "client_url": info.client_url,  # for `pilot user add` while it is stopped
                "worker_url": info.worker_url,
            }
            (state / "ports.json").write_text(json.dumps(ports))
            if args.advertise:
                from pilot._discovery import Advertiser

                await stack.enter_async_context(Advertiser(args.bind, info))
            if args.ready_line:  # the secrets stay in the connection file
                print("READY " + json.dumps(info.public()), flush=True)
            else:
                print(f"gateway ready: clients {info.client_url}, workers {info.worker_url}")
                print(f"connection file: {settings.connection_file}")
                if info.http_url:
                    print(f"dashboard: {info.http_url}")
            await gw.serve_forever()

    asyncio.run(serve())
    return 0


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _worker(args: argparse.Namespace) -> int:
    from worker import Worker, parse_size

    keep_freed_memory()  # the gateway's big blob lands in memory already faulted in
    if args.slots < 1:
        raise ConfigError(f"--slots must be at least 1 (got {args.slots}).")
    later = None
    try:
        if args.connect == "-":  # read once the task processes have started (LocalCluster)
            connection, later = ConnectionInfo(client_url="", worker_url="", key=""), _on_stdin
        else:
            connection = worker_connection(args.connect, args.discover, args.keys)
    except NoGateway as exc:
        if args.discover:
            raise
        raise NoGateway(
            f"{exc.args[0].split(':')[0]}: give the gateway with --connect FILE (its "
            "connection.json) or --connect tcp://HOST:PORT (its worker port, with PILOT_KEY "
            "set), or start one here with `pilot up`."
        ) from None
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    settings = WorkerSettings(
        connection=connection,
        name=name,
        cache_dir=args.cache_dir or default_home() / "cache" / name,
        slots=args.slots,
        cores=args.cores,
        tags=tuple(t for t in args.tags.split(",") if t),
        cache_bytes=parse_size(args.cache_size),
        max_message_bytes=int(os.environ.get("PILOT_MAX_MESSAGE_BYTES", 1 << 30)),
        blender=args.blender or "",
        blender_env=os.environ.get("PILOT_BLENDER", ""),
        use_blender=not args.no_blender,
        # a worker in a Slurm job says which (the script `pilot scale slurm` writes sets it)
        slurm_job_id=os.environ.get("PILOT_SLURM_JOB_ID") or os.environ.get("SLURM_JOB_ID", ""),
    )
    if args.stop_grace is not None:
        if args.stop_grace < 0:
            raise ConfigError(f"--stop-grace cannot be negative (got {args.stop_grace}).")
        settings = replace(
            settings, timeouts=replace(settings.timeouts, stop_grace_s=args.stop_grace)
        )

    async def serve() -> None:
        async with Worker(settings, connection=later) as w:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, w.stop)
            await w.run()

    asyncio.run(serve())
    return 0


async def _on_stdin() -> ConnectionInfo:
    """``pilot worker --connect -``: the connection file's text on stdin, read to its end
    (``LocalCluster`` starts its workers with the gateway, and writes it once that is up)."""
    # Read from a copy of descriptor 0, which then becomes /dev/null: closed, the next file
    # opened would take number 0, and every process started from here would read from it.
    pipe = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    with open(os.devnull, "rb") as null:
        os.dup2(null.fileno(), sys.stdin.fileno())
    if stat.S_ISREG(os.fstat(pipe.fileno()).st_mode):  # `< connection.json`
        with pipe:
            text = pipe.read()
    else:  # a pipe or a terminal: read without blocking the loop (or a thread at exit)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            text = await reader.read()
        finally:
            transport.close()  # closes the copy
    return ConnectionInfo.parse(text.decode(errors="replace"), "the connection on stdin")


def _up(args: argparse.Namespace) -> int:
    from pilot._cluster import LocalCluster

    home = default_home()
    t0 = time.perf_counter()
    if args.workers < 0:
        raise ConfigError(f"--workers cannot be negative (got {args.workers}).")
    cluster = LocalCluster(
        args.workers,
        slots=args.slots,
        home=home,
        blender=args.blender,
        secure=args.secure,
        gateway_args=("--bind", args.bind),
    )
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    with cluster:
        took = time.perf_counter() - t0
        info = cluster.connection
        assert info is not None
        print(f"Parallel Pilot is up: {args.workers} workers ready in {took:.2f}s.")
        print(f"  connection file  {cluster.connection_file}")
        print(f"  state            {home / 'state'}")
        if info.http_url:
            print(f"  dashboard        {info.http_url}")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: terminal closed
            signal.signal(sig, on_signal)
        print("Press Ctrl-C to stop.", flush=True)
        while not stop:
            signal.pause()
    print("stopped.")
    return 0


def _kernel(args: argparse.Namespace) -> int:
    from pilot_kernel import install, uninstall

    where = {"user": args.user, "sys_prefix": args.sys_prefix, "prefix": args.prefix}
    if args.action == "install":
        path = install(name=args.name, **where)
        print(f"installed kernelspec {args.name} in {path}")
    else:
        path = uninstall(name=args.name, **where)
        print(f"removed {path}")
    return 0
