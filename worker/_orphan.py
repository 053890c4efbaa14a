"""Task and session processes die with their worker.

They run in their own process session (a Ctrl-C at the worker's terminal is the worker's to
handle), so nothing would stop them if the worker were killed. On Linux the kernel does it:
``PR_SET_PDEATHSIG`` sends SIGKILL when the parent dies. Elsewhere, ``parent_gone()`` lets a
loop notice. ``kill_with_this_thread()`` does the same for a helper a task process starts
(Blender, for a render task), as the ``preexec_fn`` of its ``Popen``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["PARENT_PID_ENV", "die_with_parent", "kill_with_this_thread", "parent", "parent_gone"]

_PR_SET_PDEATHSIG = 1
# The spawner's pid, set in the child's environment (``parent``): a child whose worker died while
# it was still starting has been re-parented already, and its own ``getppid()`` would not say so.
PARENT_PID_ENV = "PILOT_PARENT_PID"
_parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())


def parent(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child this process starts, naming this process as its parent."""
    return {**env, PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux only); exit now if
    it has exited already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_gone():  # the parent died before we asked
        os._exit(1)


def parent_gone() -> bool:
    return os.getppid() != _parent


def kill_with_this_thread(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` (None off Linux): the child gets ``sig``
    (SIGKILL; ``pilot up`` asks SIGTERM for its gateway and workers, so they stop cleanly) when
    the thread that starts it exits, so it cannot outlive a parent that is SIGKILLed.
    The kernel follows the creating *thread*: start the child on a thread that outlives it.
    libc is loaded here, before the fork; the forked child only calls into it."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)  # cannot promise to die with the parent, or it is already gone

    return preexec
