"""The state database's write-ahead log, checkpointed off the gateway's loop: ``Checkpointer``;
and the state directory held by one gateway at a time: ``hold_state``.

In WAL mode a commit appends to the log; a checkpoint copies the logged pages back into the
database file and syncs both files to disk. SQLite runs one by default inside the commit that
takes the log past 1,000 pages, on the thread that commits: the gateway's loop. With the
database of a million-task job one such commit held the loop for about 0.4 s on the
development VM, and every client waited meanwhile. So the loop's connection
never checkpoints (``PRAGMA wal_autocheckpoint=0``), and a thread with a connection of its own
runs a passive checkpoint every ``CHECKPOINT_S``, after commits: a passive checkpoint never
blocks the writer, and the writer does not sync in ``synchronous=NORMAL``. Durability is
unchanged: a commit is in the log before it returns, as before.

A second connection needs the database in normal locking mode, so the lock that kept a second
gateway off the same state directory (SQLite's exclusive mode) is now ``hold_state``: an
exclusive ``flock`` of ``STATE/gateway.lock``, held as long as the gateway runs and released by
the kernel if it dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from pathlib import Path

from gateway.protocol import ConfigError

__all__ = ["CHECKPOINT_S", "Checkpointer", "hold_state"]

log = logging.getLogger("pilot.gateway")

CHECKPOINT_S = 0.5  # a checkpoint at most this often, when something was committed
LOCK_NAME = "gateway.lock"


def hold_state(state_dir: Path) -> int:
    """Lock ``state_dir`` for this gateway: the descriptor to close when it stops. Another
    gateway holding it is a ``ConfigError`` that says what to do."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"The state in {state_dir} is in use by another gateway. Stop that gateway, or "
            "give this one another --state directory."
        ) from None
    return fd


class Checkpointer:
    """A thread that checkpoints the database at ``path`` (in WAL mode) while ``poke()`` says
    something was committed; ``close()`` stops it after a last checkpoint."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._committed = threading.Event()
        self._stopping = threading.Event()
        self.checkpoints = 0  # how many ran (for tests and the curious)
        self._thread = threading.Thread(target=self._run, name="pilot-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Something was committed: checkpoint within ``CHECKPOINT_S``."""
        self._committed.set()

    def _run(self) -> None:
        while True:
            self._committed.wait()
            if self._stopping.is_set():
                return
            self._committed.clear()
            self._checkpoint()
            self._stopping.wait(CHECKPOINT_S)  # at most this often; close() cuts it short

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.checkpoints += 1
        except sqlite3.Error:  # a full disk, say: the log keeps the commits; try again later
            log.exception("could not checkpoint the gateway's state (its log keeps growing)")

    def close(self) -> None:
        self._stopping.set()
        self._committed.set()
        self._thread.join()
        self._checkpoint()
        self._db.close()
