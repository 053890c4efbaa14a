"""A job's settled tasks replayed to a client that attaches, a slice of indices per turn.

A client that re-attaches to a job of a million tasks after a gateway restart is owed every
task it missed. Read in one turn (half a million indices, then the rows it lacks), that took
the loop 0.2-0.3 s here, and a ``pilot jobs`` that came meanwhile waited as long. So the store
is read ``REPLAY_SLICE`` indices a turn, each slice's outcomes leave in one ``TaskEvents``, and
the loop answers other messages between slices. What must come after the whole replay (the
end of a finished job) is sent with the last slice. A task that settles while the replay runs
reaches the client live as well; the client keeps the first outcome of a task it gets.
Owned by the gateway loop.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from gateway.protocol import TaskEvents
from gateway.server._outbox import Outbox
from gateway.server._state import StateStore

__all__ = ["REPLAY_SLICE", "replay"]

REPLAY_SLICE = 50_000  # indices read per turn: about 25 ms here


def replay(
    store: StateStore,
    outbox: Outbox,
    later: Callable[[Callable[[], None], float], None],
    ident: bytes,
    job_id: str,
    known: bytes,
    n_tasks: int,
    last: Any = None,
    start: int = 0,
) -> None:
    """Send ``ident`` the settled tasks of ``job_id`` from index ``start`` on that ``known``
    does not mark (``AttachJob.known``), a slice this turn and the next slices in turns of
    their own (``later(fn, delay_s)``); then ``last``, if any."""
    end = min(n_tasks, start + REPLAY_SLICE)
    settled = store.settled_tasks(job_id, known, start, end)
    if settled:
        outbox.client(ident, TaskEvents(tuple(settled)))
    if end < n_tasks:
        later(partial(replay, store, outbox, later, ident, job_id, known, n_tasks, last, end), 0.0)
    elif last is not None:
        outbox.client(ident, last)
