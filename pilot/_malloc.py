"""Big messages into memory already faulted in: glibc's allocator told to keep what it frees.

A gateway or worker process receives an argument's 100 MB buffer into memory that libzmq
allocates with ``malloc``. glibc serves an allocation that big with a fresh ``mmap`` and hands
it back with ``munmap`` when freed, so every big message lands on new pages, each faulted in
on first touch: on this project's VM a 100 MB message took 67-90 ms to receive that way, and
22-32 ms into memory kept from the one before (``docs/decisions.md``, "Functions and values").

``keep_freed_memory`` (the ``pilot gateway`` and ``pilot worker`` processes call it first
thing, before any thread) sets, through ``mallopt``: one arena (libzmq's I/O thread allocates
where the loop frees), no ``mmap`` for big blocks (they come from the heap), and a trim
threshold of ``KEEP_BYTES`` (free memory at the top of the heap is handed back on a ``free``
only past that much; free memory below the top never is, by ``free``). So a process may hold
its peak until the next trim: a thread calls ``malloc_trim`` every ``TRIM_EVERY_S``, which
hands back free pages anywhere in the heap (in a steady stream of big messages, one every
``TRIM_EVERY_S`` lands on new pages again; the trim holds the one arena's lock meanwhile).
``PILOT_KEEP_FREED_MB=0`` turns it off; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from typing import Any

from gateway.protocol import ConfigError

__all__ = ["KEEP_BYTES", "TRIM_EVERY_S", "keep_freed_memory"]

KEEP_BYTES = 512 << 20  # the trim threshold (``PILOT_KEEP_FREED_MB``, up to 2047)
TRIM_EVERY_S = 10.0  # what is kept is handed back this often

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2**31 - 1

log = logging.getLogger("pilot")


def keep_freed_memory(environ: Any = os.environ) -> bool:
    """See the module docstring. True if the allocator was told; False (nothing changed) off
    glibc, or when ``PILOT_KEEP_FREED_MB`` is 0."""
    raw = environ.get("PILOT_KEEP_FREED_MB", str(KEEP_BYTES >> 20))
    try:
        keep = min(int(raw) << 20, _INT_MAX)  # mallopt takes an int
    except ValueError:
        raise ConfigError(
            f"PILOT_KEEP_FREED_MB={raw!r}: give the MB of freed memory a gateway or worker keeps "
            "for the next big message (a whole number; 0 turns it off)."
        ) from None
    libc = _glibc()
    if keep <= 0 or libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, keep))
    if not all(libc.mallopt(option, value) == 1 for option, value in settings):
        log.debug("mallopt refused a setting: big messages land on new pages")
        return False
    threading.Thread(target=_trim_every, args=(libc,), name="pilot-trim", daemon=True).start()
    return True


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallinfo2.restype = _MallInfo2  # glibc 2.33 and later (musl has none of these)
    except (OSError, AttributeError):
        return None
    return libc


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _trim_every(libc: Any) -> None:  # its own thread, for the process's life
    """Every ``TRIM_EVERY_S`` (a clock, not a measure of idleness), hand free heap pages back."""
    while True:
        time.sleep(TRIM_EVERY_S)
        if libc.mallinfo2().fordblks >= 1 << 20:  # a MiB or more free in the heap
            libc.malloc_trim(0)  # hands back free pages anywhere in the heap, not only its top
