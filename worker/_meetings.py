"""Where the ranks of a training group meet: one rendezvous point per (job, restart).

``Meetings`` is the worker's side of the rendezvous (``worker._ranks`` asks it for each rank):

- on the worker that runs rank 0 (``RankInfo.hosts_rendezvous``), the group's first rank to
  get here opens the listening socket (``open_rendezvous_socket``): on 127.0.0.1 when every
  rank of the group is on this worker, else on the address that routes to the gateway, which
  the other workers reach too. It says where with ``RendezvousReady`` (through ``forward``);
  ``take_listener`` hands the socket to whoever spawns rank 0, and ``close_listener`` frees the
  port of a rank 0 that never ran;
- on the group's other workers, a rank waits for the gateway's ``Rendezvous`` (``arrived``),
  which may come before its assignment (it is kept), up to a deadline.

A restart is another group, with a socket of its own: a rank never meets an older group. The
newest ``MEETINGS_KEPT`` meeting points are remembered. Owned by the worker's event loop.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.protocol import RankInfo, RendezvousReady
from worker._ddp import local_address_towards, open_rendezvous_socket

__all__ = ["MEETINGS_KEPT", "Meetings"]

MEETINGS_KEPT = 64  # (job, restart) meeting points remembered, for a Rendezvous that came early

Group = tuple[str, int]  # (job_id, restart)


@dataclass(slots=True, eq=False)
class _Meeting:
    where: asyncio.Future[tuple[str, int]]
    listener: socket.socket | None = None  # rank 0's, until it is spawned

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


class Meetings:
    """See the module docstring. ``gateway_host`` is the gateway's address as this worker
    reaches it; ``forward(msg)`` sends to the gateway."""

    def __init__(self, gateway_host: str, forward: Callable[[Any], None]) -> None:
        self.gateway_host = gateway_host
        self._forward = forward
        self._kept: OrderedDict[Group, _Meeting] = OrderedDict()

    def arrived(self, job_id: str, restart: int, host: str, port: int) -> None:
        """The gateway said where the group meets (``Rendezvous``)."""
        m = self._meeting((job_id, restart))
        if not m.where.done():
            m.where.set_result((host, port))

    async def meet(self, job_id: str, info: RankInfo, wait_s: float) -> tuple[str, int]:
        """Where the rank ``info`` of ``job_id`` meets its group: opened here on rank 0's
        worker, else awaited. Raises ``TimeoutError`` past ``wait_s``, ``OSError`` when the
        socket cannot be opened."""
        m = self._meeting((job_id, info.restart))
        if info.hosts_rendezvous and not m.where.done():
            if info.local_world_size == info.world_size:
                addr = "127.0.0.1"  # every rank is here
            else:
                addr = local_address_towards(self.gateway_host)
            m.listener = open_rendezvous_socket(addr)
            port = m.listener.getsockname()[1]
            m.where.set_result((addr, port))
            self._forward(RendezvousReady(job_id, info.restart, addr, port))
        if not m.where.done():
            await asyncio.wait_for(asyncio.shield(m.where), wait_s)
        return m.where.result()

    def take_listener(self, job_id: str, restart: int) -> socket.socket | None:
        """Rank 0's listening socket, for ``spawn_rank``: the caller closes it once spawned."""
        m = self._kept.get((job_id, restart))
        if m is None:
            return None
        listener, m.listener = m.listener, None
        return listener

    def close_listener(self, job_id: str, restart: int) -> None:
        """Rank 0 of the group ended here: its port, if it still holds it, is freed."""
        m = self._kept.get((job_id, restart))
        if m is not None:
            m.close()

    def close(self) -> None:
        for m in self._kept.values():
            m.close()

    def _meeting(self, group: Group) -> _Meeting:
        m = self._kept.get(group)
        if m is None:
            m = self._kept[group] = _Meeting(asyncio.get_running_loop().create_future())
            while len(self._kept) > MEETINGS_KEPT:
                self._kept.popitem(last=False)[1].close()
        return m
