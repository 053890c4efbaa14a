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

from worker._blender import DRIVER
from worker._blender_failures import SCRIPT_ERROR_EXIT_CODE
from worker._orphan import kill_with_this_thread

__all__ = ["SPARE_IDLE_S", "SpareBlender", "keep_warm", "take"]

SPARE_IDLE_S = 300.0

_spare: SpareBlender | None = None  # this process's, owned by its main thread


class SpareBlender:
    """One Blender running the driver, waiting on its stdin for a chunk's config."""

    def __init__(self, path: str, idle_s: float = SPARE_IDLE_S) -> None:
        self.path = path
        script = ["--python-exit-code", str(SCRIPT_ERROR_EXIT_CODE), "--python", str(DRIVER)]
        self.proc = subprocess.Popen(
            [path, "-b", "--factory-startup", *script, "--", "-", repr(float(idle_s))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            cwd="/",  # not the task's directory, which may go: the chunk's config names its own
            start_new_session=True,  # its own process group, killed as one by a cancel
            # It dies with the thread that started it: a task process's main thread.
            preexec_fn=kill_with_this_thread(),
        )

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
        except (BrokenPipeError, OSError):
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


def take(path: str) -> SpareBlender | None:
    """This process's spare, if it runs the Blender at ``path``; it is the caller's now."""
    global _spare
    spare, _spare = _spare, None
    if spare is not None and spare.path != path:
        spare.dismiss()
        return None
    return spare


def keep_warm(path: str) -> None:
    """Start a spare for the next chunk, unless one waits already. Call on the main thread."""
    global _spare
    if _spare is None or _spare.proc.poll() is not None:
        try:
            _spare = SpareBlender(path)
        except OSError:  # the next chunk starts cold, and says why if it cannot either
            _spare = None
