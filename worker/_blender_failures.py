"""Why a Blender chunk failed, and what the message says: ``FailureKind``, ``ChunkFailure`` and
``classify`` (pure: Blender's exit status and output lines in, a classified failure out).

Split from ``worker._blender`` (which runs the process) so the rules read on their own. The
exit codes are the driver's (``worker/_blender_driver.py``): keep them in step.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.protocol import RenderError

__all__ = [
    "OUTPUT_TAIL_LINES",
    "RENDER_ERROR_EXIT_CODE",
    "SCRIPT_ERROR_EXIT_CODE",
    "BlenderError",
    "ChunkFailure",
    "FailureKind",
    "classify",
    "scene_problem",
]

OUTPUT_TAIL_LINES = 40  # lines of Blender's output quoted in a failure message
SCRIPT_ERROR_EXIT_CODE = 65
RENDER_ERROR_EXIT_CODE = 66
_BLEND_MAGICS = (b"BLENDER", b"\x1f\x8b", b"\x28\xb5\x2f\xfd")
_SCENE_UNREADABLE = ("Cannot read file", "Unable to open", "Failed to read blend file",
                     "File format is not supported")  # fmt: skip
_NO_DENOISER = ("Build without OpenImageDenoise", "OpenImageDenoiser is not supported",
                'enum "OPENIMAGEDENOISE" not found')  # fmt: skip
# Signals that mean Blender broke, as opposed to being killed from outside (OOM killer, kill).
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


class FailureKind(enum.Enum):
    BLENDER_NOT_FOUND = "blender-not-found"
    SCENE_MISSING = "scene-missing"
    SCRIPT_ERROR = "script-error"
    DENOISER_MISSING = "denoiser-missing"
    RENDER_ERROR = "render-error"
    KILLED_OR_OOM = "killed-or-oom"
    NO_FRAME_WRITTEN = "no-frame-written"
    CRASHED = "crashed"

    @property
    def machine_side(self) -> bool:
        """True when another worker may well succeed: retry the chunk elsewhere."""
        return self.name in ("BLENDER_NOT_FOUND", "KILLED_OR_OOM", "NO_FRAME_WRITTEN", "CRASHED")


BlenderError = RenderError  # its ``kind`` is a ``FailureKind``: kind.machine_side says retry


@dataclasses.dataclass(frozen=True)
class ChunkFailure:
    kind: FailureKind
    message: str  # what happened and how to fix it
    returncode: int | None
    traceback: str = ""  # SCRIPT_ERROR / RENDER_ERROR: the Python traceback Blender printed
    output_tail: str = ""  # the last lines Blender printed

    def error(self) -> BlenderError:
        text = self.message
        if self.traceback:
            text += "\n\n" + self.traceback
        elif self.output_tail:
            text += "\n\nBlender's last output:\n" + self.output_tail
        return BlenderError(self.kind, text)


def scene_problem(scene: Path) -> ChunkFailure | None:
    """Why Blender could not read ``scene``, found before starting it; None if it looks fine."""
    try:
        with scene.open("rb") as f:
            head = f.read(len(_BLEND_MAGICS[0]))
    except FileNotFoundError:
        reason = "does not exist"
    except IsADirectoryError:
        reason = "is a directory"
    except OSError as exc:
        reason = f"cannot be read ({exc.strerror})"
    else:
        if head.startswith(_BLEND_MAGICS):
            return None
        reason = "is not a .blend file"
    message = (
        f"The scene {scene} {reason}: check the path given to --render, and that the file "
        "was shipped with the job (it travels by content hash)"
    )
    return ChunkFailure(FailureKind.SCENE_MISSING, message, None)


# -- classifying failures -----------------------------------------------------------------------


_HOW = {  # what each failure says: what happened, then how to fix it
    FailureKind.DENOISER_MISSING: "{blender} was built without OpenImageDenoise (Debian's "
    "package is), so it cannot denoise: leave denoising off (remove `scene.cycles.use_denoising"
    " = True` and any `denoiser = 'OPENIMAGEDENOISE'` from the cell body), or give the worker a"
    " Blender from blender.org with --blender PATH",
    FailureKind.SCENE_MISSING: "{blender} cannot read {scene} ({detail}): check that the file "
    "is a complete .blend saved by this Blender version or an older one",
    FailureKind.SCRIPT_ERROR: "The cell body raised an error in Blender's Python: fix it and "
    "run again (a script error is not retried)",
    FailureKind.RENDER_ERROR: "Blender refused to render {scene} ({detail}): fix the scene or "
    "the cell body (a camera, an engine this Blender has...)",
    FailureKind.CRASHED: "Blender crashed ({detail}) rendering {scene}: the chunk is retried "
    "on another worker",
    FailureKind.KILLED_OR_OOM: "Blender was killed by {detail} rendering {scene} (out of "
    "memory? the kernel's OOM killer sends SIGKILL): the chunk is retried on another worker; "
    "if it keeps happening, lower the resolution or samples, or use workers with more memory",
    FailureKind.NO_FRAME_WRITTEN: "Blender exited normally without saving frame(s) {detail} "
    "of {scene}: the chunk is retried on another worker; check that the output directory is "
    "writable and that the cell body does not change the output path",
}


def classify(
    returncode: int,
    output: Sequence[str],
    expected: Iterable[int],
    saved: Iterable[int],
    *,
    scene: str = "the scene",
    version: str = "",
) -> ChunkFailure | None:
    """What went wrong in a chunk, from Blender's exit status and output lines; None if all of
    ``expected`` were saved and Blender exited with 0. Pure: tests feed it captured text.

    The first rule that matches wins: a denoiser message, an unreadable scene, the script exit
    code (body's traceback), the render-error exit code, a signal (a crash signal: CRASHED,
    any other: KILLED_OR_OOM), exit 0 with frames missing (NO_FRAME_WRITTEN), else CRASHED.
    """
    missing = sorted(set(expected) - set(saved))
    if returncode == 0 and not missing:
        return None
    text = "\n".join(output)
    detail, traceback = f"exit status {returncode}", ""
    unreadable = [ln.strip() for ln in output if any(m in ln for m in _SCENE_UNREADABLE)]
    number = -returncode if returncode < 0 else returncode - 128  # 128+N: a shell's "killed"
    if any(marker in text for marker in _NO_DENOISER):
        kind = FailureKind.DENOISER_MISSING
        traceback = _between(output, "PILOT_RENDER_ERROR") or _between(output, "PILOT_SCRIPT_ERROR")
    elif unreadable:
        kind, detail = FailureKind.SCENE_MISSING, unreadable[0]
    elif returncode == SCRIPT_ERROR_EXIT_CODE:
        kind = FailureKind.SCRIPT_ERROR
        traceback = _between(output, "PILOT_SCRIPT_ERROR") or _last_traceback(output)
    elif returncode == RENDER_ERROR_EXIT_CODE:
        kind, traceback = FailureKind.RENDER_ERROR, _between(output, "PILOT_RENDER_ERROR")
        detail = traceback.splitlines()[-1] if traceback else "no reason given"
    elif returncode < 0 or number == signal.SIGKILL:
        detail = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        kind = FailureKind.CRASHED if number in _CRASH_SIGNALS else FailureKind.KILLED_OR_OOM
    elif returncode == 0:
        kind = FailureKind.NO_FRAME_WRITTEN
        detail = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
    else:
        kind = FailureKind.CRASHED
    blender = f"Blender {version}" if version else "This Blender"
    message = _HOW[kind].format(blender=blender, scene=scene, detail=detail)
    tail = "\n".join(output[-OUTPUT_TAIL_LINES:])
    return ChunkFailure(kind, message, returncode, traceback, tail)


def _between(output: Sequence[str], marker: str) -> str:
    """The lines between the driver's ``marker`` line and ``marker_END`` (or the end)."""
    if marker not in output:
        return ""
    start = output.index(marker) + 1
    end = next((i for i in range(start, len(output)) if output[i] == marker + "_END"), None)
    return "\n".join(output[start:end])


def _last_traceback(output: Sequence[str]) -> str:
    """From the last line mentioning a traceback to the end (an error outside the body)."""
    starts = [i for i, ln in enumerate(output) if "Traceback (most recent call last)" in ln]
    return "\n".join(output[starts[-1] :]) if starts else ""
