"""A Blender started ahead of its chunk: the next chunk does not wait for Blender's start-up.

Starting Blender takes about 0.9 s here before it reads a scene (``blender -b --factory-startup``
and quit), which is a tenth of a 24-frame chunk of a small scene, paid by every chunk. A task
process that has rendered a chunk therefore starts one spare Blender for the next (``keep_warm``,
on its main thread, which the spare dies with): the driver inside it (``_blender_driver.py``
with ``-`` for its config) starts, then waits on its stdin. The next chunk hands it its config,
scene path included, and reads its output as a cold one's (``ChunkProcess.run(spare=...)``).

One spare serves one chunk and is gone with it, so a chunk never sees what an earlier one did
to Blender's state. A spare nobody takes within ``SPARE_IDLE_S`` exits by itself (an idle
Blender holds about 220 MB); one that died meanwhile is passed over for a cold start. The first
chunk of a task process is cold: a worker that never renders never starts a Blender.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from worker._blender_process import DRIVER_ARGS, start_blender

__all__ = ["SPARE_IDLE_S", "SpareBlender", "keep_warm", "take"]

SPARE_IDLE_S = 300.0

_spare: SpareBlender | None = None  # this process's, owned by its main thread


class SpareBlender:
    """One Blender running the driver, waiting on its stdin for a chunk's config."""

    def __init__(self, path: str, idle_s: float = SPARE_IDLE_S) -> None:
        command = [path, "-b", "--factory-startup", *DRIVER_ARGS, "--", "-", repr(float(idle_s))]
        # In "/", not the task's directory, which may go: the chunk's config names its own.
        # It dies with the thread that starts it: a task process's main thread.
        self.proc = start_blender(command, subprocess.PIPE, cwd="/")

    def waiting(self) -> bool:
        """Still waiting for a chunk: running, and not handed one."""
        assert self.proc.stdin is not None
        return self.proc.poll() is None and not self.proc.stdin.closed

    def hand(self, config: str) -> subprocess.Popen[str] | None:
        """Give the spare its chunk (one JSON line); its process, now the chunk's, or None if
        it has exited meanwhile (idle too long, or killed): start a cold one then."""
        assert self.proc.stdin is not None
        if self.proc.poll() is not None:
            self.dismiss()
            return None
        try:
            self.proc.stdin.write(config + "\n")
            self.proc.stdin.close()
        except OSError:  # a broken pipe: it exited meanwhile
            self.dismiss()
            return None
        return self.proc

    def dismiss(self) -> None:
        """End it, unused."""
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def take() -> SpareBlender | None:
    """This process's spare, if one waits. A chunk that does not hand it its config (it
    stopped before starting Blender) leaves it waiting for the next."""
    return _spare if _spare is not None and _spare.waiting() else None


def keep_warm(path: str) -> None:
    """Start a spare for the next chunk, unless one waits already. Call on the main thread."""
    global _spare
    if _spare is None or not _spare.waiting():
        try:
            _spare = SpareBlender(path)
        except OSError:  # the next chunk starts cold, and says why if it cannot either
            _spare = None
