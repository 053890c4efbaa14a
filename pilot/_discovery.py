"""LAN discovery: ``pilot gateway --advertise`` and ``pilot worker --discover`` (zeroconf).

The gateway announces itself over multicast DNS (python-zeroconf) as a service of type
``SERVICE_TYPE``, named ``pilot-<gateway id>``, at the address it binds (every non-loopback
address of the machine when it binds 0.0.0.0), with TXT properties:

====================  =====================================================================
``gateway_id``        the gateway's id (as in its connection file)
``client_port``       its client socket's port
``worker_port``       its worker socket's port
``server_key``        its CURVE public key ("" when it does not encrypt)
``version``           the protocol version (``VERSION``)
====================  =====================================================================

Nothing secret is announced: finding a gateway is not joining it. A worker that discovers one
still needs the keys (``pilot worker --discover --keys FILE``: a connection file whose
endpoints are ignored; ``discover`` picks the gateway whose ``server_key`` is the file's, so a
worker never joins another gateway on the same network). ``Advertiser`` runs on the gateway's
asyncio loop; ``discover`` blocks (the worker calls it before its loop starts).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from gateway.protocol import VERSION, ConnectionInfo, NoGateway, find_connection

__all__ = ["SERVICE_TYPE", "Advertiser", "Found", "discover", "worker_connection"]

SERVICE_TYPE = "_pilot-gateway._tcp.local."
DISCOVER_TIMEOUT_S = 10.0
INFO_TIMEOUT_MS = 3000


@dataclass(frozen=True, slots=True)
class Found:
    """A gateway found on the LAN."""

    gateway_id: str
    host: str
    client_port: int
    worker_port: int
    server_key: str

    @property
    def client_url(self) -> str:
        return f"tcp://{self.host}:{self.client_port}"

    @property
    def worker_url(self) -> str:
        return f"tcp://{self.host}:{self.worker_port}"


def _addresses(bind: str) -> list[str]:
    """The addresses to announce for a gateway bound to ``bind``."""
    if bind not in ("0.0.0.0", "*", ""):
        return [bind]
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return found


class Advertiser:
    """Announces a gateway while entered (``async with``): ``bind`` is its bound address,
    ``info`` its ``ConnectionInfo``."""

    def __init__(self, bind: str, info: Any) -> None:
        self._bind = bind
        self._info = info
        self._zc: Any = None
        self._service: Any = None

    async def __aenter__(self) -> Advertiser:
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        addresses = _addresses(self._bind)
        ports = {
            "client_port": self._info.client_url.rsplit(":", 1)[1],
            "worker_port": self._info.worker_url.rsplit(":", 1)[1],
        }
        name = f"pilot-{self._info.gateway_id}"
        self._service = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=int(ports["client_port"]),
            properties={
                "gateway_id": self._info.gateway_id,
                "server_key": self._info.server_key,
                "version": VERSION,
                **ports,
            },
            server=f"{name}.local.",
        )
        interfaces: Any = addresses if self._bind not in ("0.0.0.0", "*", "") else None
        self._zc = AsyncZeroconf(interfaces=interfaces) if interfaces else AsyncZeroconf()
        await self._zc.async_register_service(self._service)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._zc is not None:
            await self._zc.async_unregister_service(self._service)
            await self._zc.async_close()


def discover(
    server_key: str = "", timeout_s: float = DISCOVER_TIMEOUT_S, interface: str | None = None
) -> Found:
    """The first gateway announced on the LAN within ``timeout_s`` (whose public key is
    ``server_key``, when given). ``interface``: the local address to listen on (default:
    all). Raises ``NoGateway``."""
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    found: list[Found] = []
    ready = threading.Event()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is not ServiceStateChange.Added:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=INFO_TIMEOUT_MS)
        if info is None:
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        hosts = info.parsed_addresses()
        if not hosts or (server_key and props.get("server_key") != server_key):
            return
        found.append(
            Found(
                props.get("gateway_id", ""),
                hosts[0],
                int(props["client_port"]),
                int(props["worker_port"]),
                props.get("server_key", ""),
            )
        )
        ready.set()

    zc = Zeroconf(interfaces=[interface]) if interface else Zeroconf()
    started = time.monotonic()
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        ready.wait(timeout_s)
        browser.cancel()
    finally:
        zc.close()
    if not found:
        which = "with this connection file's key " if server_key else ""
        raise NoGateway(
            f"No gateway {which}announced itself on this network within "
            f"{time.monotonic() - started:.0f}s: start it with `pilot gateway --advertise`, "
            "or give the worker --connect FILE|tcp://HOST:PORT."
        )
    return found[0]


def worker_connection(connect: str | None, lan: bool, keys: str | None) -> ConnectionInfo:
    """Where ``pilot worker`` connects: ``connect`` (a connection file or ``tcp://HOST:PORT``),
    or with ``lan`` a gateway found on the LAN joined with the keys of the connection file
    ``keys`` (its endpoints are ignored; default: the local one). Raises ``NoGateway``."""
    if not lan:
        return find_connection(connect)
    known = find_connection(keys)  # its HMAC key, and a secure gateway's keys
    found = discover(server_key=known.server_key)
    return replace(known, client_url=found.client_url, worker_url=found.worker_url)
