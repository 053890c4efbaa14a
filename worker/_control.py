"""A page of memory shared by the worker and one task process: what it runs, what to cancel.

A task process runs the tasks it is handed in batches, so the worker cannot know by itself which
of them is running at a given moment. This page tells it, without a message per task:

- ``running``: the sequence number of the task the process is running (0: none). The process
  writes it before it loads a task and clears it after the result is made; after a crash it
  names the one task to blame (the others of the batch go back to the queue).
- one cancel flag per sequence number (modulo ``RING``): the worker sets it, then sends SIGINT.
  The process skips a flagged task that has not started, and its SIGINT handler interrupts the
  running task only if that task is flagged, so a signal can never hit the wrong task.

Sequence numbers count the tasks sent to one process, from 1, on both sides. ``RING`` is larger
than any batch: a flag is cleared when its number is handed out and never reused while that task
is out. The file lives in the worker's private (0700) directory; both sides map it.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

__all__ = ["RING", "Control"]

RING = 256
_RUNNING = struct.Struct("<q")
_FLAGS = _RUNNING.size
SIZE = _FLAGS + RING


class Control:
    """One side's mapping of the page. ``create`` makes the file (the worker does, before it
    starts the process). ``close()`` unmaps it (and the creator removes the file)."""

    def __init__(self, path: Path | str, *, create: bool = False) -> None:
        self.path = Path(path)
        self._owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, SIZE)
            self._mm = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    @property
    def running(self) -> int:
        return int(_RUNNING.unpack_from(self._mm, 0)[0])

    @running.setter
    def running(self, seq: int) -> None:
        _RUNNING.pack_into(self._mm, 0, seq)

    def cancel(self, seq: int) -> None:
        self._mm[_FLAGS + seq % RING] = 1

    def clear(self, seq: int) -> None:
        self._mm[_FLAGS + seq % RING] = 0

    def cancelled(self, seq: int) -> bool:
        return self._mm[_FLAGS + seq % RING] != 0

    def close(self) -> None:
        if not self._mm.closed:
            self._mm.close()
        if self._owner:
            self.path.unlink(missing_ok=True)
