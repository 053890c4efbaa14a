"""Starting a Blender process for a render chunk: the driver script and how it is started.

Shared by a chunk's own Blender (``worker._blender.ChunkProcess``) and a spare one started
before its chunk (``worker._blender_spare``), so both run the same driver the same way.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from worker._blender_failures import SCRIPT_ERROR_EXIT_CODE
from worker._orphan import kill_with_this_thread

__all__ = ["DRIVER", "DRIVER_ARGS", "start_blender"]

# Keep in step with worker/_blender_driver.py.
DRIVER = Path(__file__).with_name("_blender_driver.py")
# Blender's arguments that run the driver: a Python error in it exits with the script code.
DRIVER_ARGS = ("--python-exit-code", str(SCRIPT_ERROR_EXIT_CODE), "--python", str(DRIVER))


def start_blender(
    command: list[str], stdin: int, *, env: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.Popen[str]:
    """A Blender process whose output (stdout and stderr) is read line by line, in its own
    process group (killed as one by a cancel), dying with the thread that starts it (so with
    its task process, if that is killed). Raises ``OSError`` when it cannot start."""
    return subprocess.Popen(
        command,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
        env=env,
        cwd=cwd,
        preexec_fn=kill_with_this_thread(),
    )
