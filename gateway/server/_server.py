"""The gateway: two ROUTER sockets and the parts that serve them, on one asyncio loop.

``Gateway`` is an async context manager: entering binds the sockets, opens the state, builds
its parts, resumes unfinished jobs and starts its loops in a TaskGroup it owns; leaving stops
them and closes everything. ``ready`` is set once the connection file is written.

Parts, each owning its state and built from what it uses: the ``Registry`` (job and worker
records), the ``Scheduler`` (a pure state machine that alone owns job and task state), the
``StateStore`` (SQLite and the blob store), the ``Outbox`` (what a turn sends), the
``Executor`` (carries out the scheduler's instructions), the ``ClientHandler`` and the
``WorkerHandler`` (one per socket). A secure gateway (``settings.secure``) also has its
``Gatekeeper`` (``_auth``: its keys, its users and the ZAP handler that checks each handshake),
which names the sender of each message (a ``Principal``: whose jobs it may see) before it is
handled; a removed user's or worker's next message is refused. Everyone is the admin when the
gateway does not encrypt. The ``OffLoopDecoder`` (``_offloop``) decodes a client's big messages
(a ``Submit`` of a million tasks) on a thread, so the loop answers others meanwhile.

A loop turn drains every message waiting on a socket, feeds the handlers, commits the state
(group commit), and only then sends what the turn produced, workers first: a result reaches a
client only after it is on disk, an assignment reaches a worker only after its attempt is (a
restarted gateway numbers attempts from what it finds on disk). If the commit fails, the rows
stay buffered, only messages that report no stored state leave, new work is refused, and the
next turn tries again (``StateStore.flush``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import time
from collections import defaultdict
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from gateway.protocol import (
    FROM_CLIENT,
    FROM_WORKER,
    ZAP_CLIENTS,
    ZAP_WORKERS,
    Codec,
    ConnectionInfo,
    Drain,
    Envelope,
    ErrorReply,
    GatewaySettings,
    MessageTooLarge,
    PilotError,
    ProtocolError,
    Refused,
    StatusReply,
    VersionMismatch,
    curve_server,
    send_frames,
)
from gateway.server import _scheduler as sch
from gateway.server._auth import Gatekeeper
from gateway.server._blobs import BlobStore, write_ahead
from gateway.server._clientside import ClientHandler
from gateway.server._instructions import Executor
from gateway.server._monitor import Monitor
from gateway.server._offloop import BIG_BYTES, OffLoopDecoder
from gateway.server._outbox import Outbox
from gateway.server._registry import Registry
from gateway.server._resume import resume
from gateway.server._state import StateStore
from gateway.server._users import ADMIN, Principal
from gateway.server._workerside import WorkerHandler

__all__ = ["Gateway"]

log = logging.getLogger("pilot.gateway")

TICK_S = 0.2
EVERYONE = Principal(ADMIN, admin=True)  # who sends what an insecure gateway receives
GC_YOUNG_OBJECTS = 20_000  # allocations between collections of the youngest generation


class GatewayState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Gateway:
    """See the module docstring."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.state = GatewayState.NEW
        self.ready = asyncio.Event()
        self.gateway_id = os.urandom(6).hex()
        self.connection: ConnectionInfo | None = None
        key = settings.key
        limits = dict(
            max_message_bytes=settings.max_message_bytes,
            replay_window_s=settings.timeouts.replay_window_s,
        )
        self._client_codec = Codec(key, accept=FROM_CLIENT, **limits)  # type: ignore[arg-type]
        self._worker_codec = Codec(key, accept=FROM_WORKER, **limits)  # type: ignore[arg-type]
        self.counters: dict[str, int] = defaultdict(int)
        self.registry = Registry()
        self.outbox = Outbox(self._send_client, self._send_worker)
        self._ctx = zmq.Context()
        self._drains: list[Drain] = []
        self._group: asyncio.TaskGroup | None = None
        self._stop_event = asyncio.Event()
        self._http: Any = None  # the dashboard (``_http.Dashboard``), when it has one
        self.monitor = Monitor()  # cheap measurements, and the dashboard's live feed
        self.gate: Gatekeeper | None = None  # a secure gateway's keys and users
        self._offloop = OffLoopDecoder(  # big client messages, decoded on a thread
            Codec(key, accept=FROM_CLIENT, **limits),  # type: ignore[arg-type]
            lambda frames, hw, decoded: self._handle(
                frames, decoded, hw[0], self._send_client, hw[1]
            ),
            lambda frames, hw: self._receive(
                frames, self._client_codec, hw[0], self._send_client, hw[1]
            ),
            self._turn_later,
            lambda msg: write_ahead(self.store.blobs, msg),
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(
            s.state_dir / "state.sqlite",
            BlobStore(s.state_dir / "blobs"),
            inline_bytes=s.inline_result_bytes,
        )
        t = s.timeouts
        self.scheduler = sch.Scheduler(
            s.policy, heartbeat_timeout_s=t.heartbeat_timeout_s, orphan_grace_s=t.orphan_grace_s
        )
        self.executor = Executor(
            self.scheduler, self.registry, self.store, self.outbox, self.counters, self.monitor
        )
        self.clients = ClientHandler(
            s,
            self.gateway_id,
            self.registry,
            self.executor,
            self.store,
            self.outbox,
            self.counters,
            lambda: {"client": self._client_codec, "worker": self._worker_codec},
            self._turn_later,
        )
        self.workers = WorkerHandler(
            s,
            self.gateway_id,
            self.registry,
            self.executor,
            self.store,
            self.outbox,
            self._send_worker_ident,
            self.clients.blobs.answer,
            self.clients.answer_status_waiters,
            self.counters,
            self.monitor,
        )
        if s.secure:  # the ZAP handler first: libzmq lets any key in while none is bound
            self.gate = Gatekeeper(self._ctx, s.state_dir, self.counters)
        self._clients_sock = self._bind(s.client_port, ZAP_CLIENTS)
        self._workers_sock = self._bind(s.worker_port, ZAP_WORKERS, handover=True)
        client_url = self._clients_sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        worker_url = self._workers_sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        http_url = await self._start_http()
        resume(self.store, self.registry, self.executor, self.settings)
        self.connection = ConnectionInfo(
            client_url=client_url,
            worker_url=worker_url,
            key=s.key,
            http_url=http_url,
            gateway_id=self.gateway_id,
            pid=os.getpid(),
            **(self.gate.connection_fields() if self.gate is not None else {}),
        )
        if s.connection_file is not None:
            self.connection.save(s.connection_file)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._monitor = self._workers_sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._drains = [
            Drain(self._clients_sock, self._from_client, self._end_turn),
            Drain(self._workers_sock, self._from_worker, self._end_turn),
            Drain(self._monitor, self._from_monitor, self._end_turn),
        ]
        self._group.create_task(self._ticker())
        # The gateway holds many long-lived records (every live job and task) and makes few
        # reference cycles: a young generation collected every GC_YOUNG_OBJECTS allocations,
        # and everything alive at start-up left out of collections, keep the collector from
        # re-walking that heap in the hot path.
        gc.freeze()
        gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
        self.state = GatewayState.RUNNING
        self.ready.set()
        log.info(
            "gateway %s ready: clients %s, workers %s", self.gateway_id, client_url, worker_url
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.state = GatewayState.STOPPED
        self._stop_event.set()
        for drain in self._drains:
            drain.close()
        if self._group is not None:
            await self._group.__aexit__(None, None, None)
        if self._http is not None:
            await self._http.stop()
        self._offloop.close()
        self.store.close()
        self._remove_connection_file()
        self._workers_sock.disable_monitor()
        for sock in (self._monitor, self._clients_sock, self._workers_sock):
            sock.close(linger=0)
        if self.gate is not None:
            self.gate.stop()
        self._ctx.term()

    def _remove_connection_file(self) -> None:
        """A stopped gateway's file would send clients to nobody; another's is left alone."""
        path = self.settings.connection_file
        if path is None:
            return
        try:
            if ConnectionInfo.load(path).gateway_id == self.gateway_id:
                path.unlink()
        except PilotError as exc:
            log.debug("connection file not removed: %s", exc)

    async def serve_forever(self) -> None:
        await self._stop_event.wait()

    def stop(self) -> None:
        """Ask the loops to end; ``__aexit__`` waits for them."""
        self._stop_event.set()

    def status_reply(self) -> StatusReply:
        """Workers, live jobs and counters now (for the HTTP status API)."""
        return self.clients.status_reply()

    def _bind(self, port: int, domain: str, handover: bool = False) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop: a ROUTER drops silently at the HWM
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A frame bigger than the limit is dropped by libzmq before it costs memory.
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes + 4096)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.gate is not None:
            curve_server(sock, self.gate.keys.server, domain)
        sock.bind(f"tcp://{self.settings.bind}:{port}")
        return sock

    async def _start_http(self) -> str:
        if self.settings.http_port is None:
            return ""
        from gateway.server._http import start_http  # tornado is only needed with a dashboard

        self._http = start_http(self, self.settings.bind, self.settings.http_port)
        self.clients.dashboard = self._http
        return str(self._http.url)

    # -- the loops --------------------------------------------------------------------------

    def _from_client(self, frames: list[zmq.Frame]) -> None:
        who = self.gate.sender(frames, ZAP_CLIENTS) if self.gate is not None else EVERYONE
        handle = self.clients.handle if who is not None else self.clients.removed
        size = sum(len(f) for f in frames)
        self.counters["bytes_in"] += size  # to show what we relay
        if self._offloop.takes(frames[0].bytes, size):  # a big Submit, or one behind it
            self.counters["decoded_off_loop"] += size >= BIG_BYTES
            self._offloop.take(frames[0].bytes, frames, (handle, who))
        else:
            self._receive(frames, self._client_codec, handle, self._send_client, who)

    def _from_worker(self, frames: list[zmq.Frame]) -> None:
        if self.gate is not None and self.gate.sender(frames, ZAP_WORKERS) is None:
            self.workers.removed(frames[0].bytes)
            return
        # The connection (its descriptor) each worker speaks on, for the socket monitor.
        self.workers.connections[frames[0].get(zmq.SRCFD)] = frames[0].bytes
        self.counters["bytes_in"] += sum(len(f) for f in frames)
        self._receive(frames, self._worker_codec, self.workers.handle, self._send_worker_ident)

    def _from_monitor(self, frames: list[zmq.Frame]) -> None:
        """The worker socket's monitor: a connection dropped (its process died, and the kernel
        closed its socket): its worker's tasks go back at once, not at the heartbeat deadline.
        (ZeroMQ's ROUTER_NOTIFY would name the peer, but it is a draft API in libzmq 4.3.)"""
        event = parse_monitor_message([f.bytes for f in frames])
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self.workers.disconnected(int(event["value"]))

    def _receive(
        self, frames: list[zmq.Frame], codec: Codec, handle: Any, reply: Any, *who: Any
    ) -> None:
        try:
            decoded: Envelope | Exception = codec.decode(frames[1:])
        except (VersionMismatch, MessageTooLarge, ProtocolError) as exc:
            decoded = exc
        self._handle(frames, decoded, handle, reply, *who)

    def _handle(
        self, frames: list[zmq.Frame], decoded: Any, handle: Any, reply: Any, *who: Any
    ) -> None:
        ident = frames[0].bytes
        if isinstance(decoded, Exception):
            self.counters["rejected"] += 1
            if isinstance(decoded, VersionMismatch):
                log.warning("refused peer %r: %s", ident, decoded)
                reply(ident, Refused(str(decoded), retry=False))
            elif isinstance(decoded, MessageTooLarge | ProtocolError):
                log.warning("rejected a message from %r: %s", ident, decoded)
            else:  # decoded off the loop (``_offloop``): a bug, not the peer's fault
                log.error("could not decode a message from %r", ident, exc_info=decoded)
            return
        try:
            handle(ident, decoded.msg_id, decoded.msg, *who)
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("error handling %s from %r", type(decoded.msg).__name__, ident)
            reply(ident, ErrorReply(decoded.msg_id, "internal gateway error: see its log"))

    async def _ticker(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), TICK_S)
            now = time.monotonic()
            self.monitor.sample(now)
            self.executor.handle(sch.Tick(now))
            self.clients.expire_leases(now)
            self.workers.expire_disconnected(now)
            self.clients.answer_status_waiters()
            self._end_turn(acks=True)

    def _turn_later(self, fn: Any, delay_s: float = 0.0) -> None:
        """Run ``fn`` in a turn of its own, after what waits on the sockets."""

        def turn() -> None:
            if self.state is not GatewayState.STOPPED:
                fn()
                self._end_turn()

        asyncio.get_running_loop().call_later(delay_s, turn)

    def _end_turn(self, acks: bool = False) -> None:
        if self.gate is not None:
            self.gate.end_turn()
        durable = self.store.flush()
        if not durable:
            self.counters["commit_failures"] += 1
        elif self.registry.unstored:
            self.registry.trim_stored()
        self.outbox.send(durable=durable, acks=acks)
        for drain in self._drains:  # sending may have swallowed a read edge
            drain.kick()

    # -- sending ----------------------------------------------------------------------------

    def _send_client(self, ident: bytes, msg: Any) -> None:
        self._send_raw(self._clients_sock, self._client_codec, ident, msg)

    def _send_worker(self, name: str, msg: Any) -> None:
        w = self.registry.workers.get(name)
        if w is not None:
            self._send_raw(self._workers_sock, self._worker_codec, w.ident, msg)

    def _send_worker_ident(self, ident: bytes, msg: Any) -> None:
        self._send_raw(self._workers_sock, self._worker_codec, ident, msg)

    def _send_raw(self, sock: zmq.Socket[Any], codec: Codec, ident: bytes, msg: Any) -> None:
        try:
            frames = codec.encode(msg)
        except MessageTooLarge as exc:
            log.error("could not send %s: %s", type(msg).__name__, exc)
            return
        self.counters["bytes_out"] += sum(memoryview(f).nbytes for f in frames)
        try:
            send_frames(sock, [ident, *frames])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is gone (ROUTER_MANDATORY)
            self.counters["unroutable"] += 1
            log.debug("peer %r unreachable for %s: %s", ident, type(msg).__name__, exc)
