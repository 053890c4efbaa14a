"""Task and session processes die with their worker.

They run in their own process session (a Ctrl-C at the worker's terminal is the worker's to
handle), so nothing would stop them if the worker were killed. On Linux the kernel does it:
``PR_SET_PDEATHSIG`` sends SIGKILL when the parent dies. Elsewhere, ``parent_gone()`` lets a
loop notice.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent", "parent_gone"]

_PR_SET_PDEATHSIG = 1
_parent = os.getppid()


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != _parent:  # the parent died before we asked
        os._exit(1)


def parent_gone() -> bool:
    return os.getppid() != _parent
