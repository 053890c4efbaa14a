"""Frame specs and chunks for render jobs: ``--frames 1-240x2`` -> frames -> chunks of frames.

Called by the client (``client.render``, ``%%distribute --render``) before it submits a job;
pure functions, no I/O.

- ``parse_frames(spec)``: ``"1-240"``, ``"1-240x2"`` (every second frame), ``"1,5,10-20"``, a
  ``range``, an int or any iterable of ints -> a sorted tuple of unique frame numbers; raises
  ``ValueError`` naming the spec and what is wrong with it.
- ``chunk_frames(frames, chunk)``: consecutive groups of at most ``chunk`` frames, in order.
- ``auto_chunk(n_frames, n_slots, startup_s, frame_s)``: frames per chunk when the user gives
  none. The rule: enough frames per chunk that Blender's start-up is under a tenth of the
  chunk's time (``startup_s <= 0.1 * (startup_s + chunk * frame_s)``, i.e.
  ``chunk >= 9 * startup_s / frame_s``), but never so many that fewer chunks than slots remain
  when there are at least as many frames as slots: a busy slot matters more than start-up
  overhead, since an idle one wastes a whole share of the job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

__all__ = ["MAX_FRAME", "auto_chunk", "chunk_frames", "parse_frames"]

MAX_FRAME = 1_048_574  # Blender's highest frame number (MAXFRAME)
STARTUP_SHARE = 0.1  # Blender's start-up may take at most this share of a chunk's time
_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?:x(\d+))?)?$")


def parse_frames(spec: str | int | Iterable[int]) -> tuple[int, ...]:
    """The frames ``spec`` names, sorted, each once; ``ValueError`` for a bad spec."""
    if isinstance(spec, bool):
        raise ValueError(f"frame spec {spec!r}: give frame numbers, e.g. '1-240'")
    if isinstance(spec, int):
        spec = (spec,)
    if isinstance(spec, str):
        frames = _parse_text(spec)
    else:
        frames = set()
        for frame in spec:
            if isinstance(frame, bool) or not isinstance(frame, int):
                raise ValueError(f"frame spec: {frame!r} is not a frame number (an int)")
            frames.add(frame)
        if not frames:
            raise ValueError(f"frame spec {spec!r}: it names no frames")
    wrong = sorted(f for f in frames if not 0 <= f <= MAX_FRAME)
    if wrong:
        raise ValueError(f"frame spec: frame {wrong[0]} is outside Blender's 0-{MAX_FRAME}")
    return tuple(sorted(frames))


def _parse_text(spec: str) -> set[int]:
    frames: set[int] = set()
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip():
        raise ValueError(f"frame spec {spec!r}: it names no frames; write e.g. '1-240'")
    for item in items:
        found = _ITEM.match(item.replace(" ", ""))
        if found is None:
            raise ValueError(
                f"frame spec {spec!r}: cannot read {item!r}; write frames as N, START-END or "
                "START-ENDxSTEP, separated by commas (e.g. '1,5,10-20,100-200x10')"
            )
        start = int(found.group(1))
        end = int(found.group(2)) if found.group(2) is not None else start
        step = int(found.group(3)) if found.group(3) is not None else 1
        if end < start:
            raise ValueError(f"frame spec '{item}': the end must not be before the start")
        if step < 1:
            raise ValueError(f"frame spec '{item}': the step must be at least 1")
        if end > MAX_FRAME:
            raise ValueError(f"frame spec '{item}': frames go up to {MAX_FRAME} in Blender")
        frames.update(range(start, end + 1, step))
    return frames


def chunk_frames(frames: Sequence[int], chunk: int) -> list[tuple[int, ...]]:
    """``frames`` cut into consecutive chunks of ``chunk`` (the last may be shorter)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk {chunk!r}: frames per chunk must be an int of at least 1")
    return [tuple(frames[i : i + chunk]) for i in range(0, len(frames), chunk)]


def auto_chunk(n_frames: int, n_slots: int, startup_s: float, frame_s: float) -> int:
    """Frames per chunk by the rule in the module docstring; at least 1.

    ``startup_s``: Blender's time from start to its first frame beginning (measured or a
    default); ``frame_s``: the time one frame takes; ``n_slots``: the render slots that can
    take chunks at once.
    """
    if n_frames < 1 or n_slots < 1:
        raise ValueError(f"auto_chunk: {n_frames} frames on {n_slots} slots: need at least 1 each")
    if startup_s < 0 or frame_s <= 0:
        raise ValueError(
            f"auto_chunk: start-up {startup_s} s and frame time {frame_s} s: the start-up "
            "must not be negative and the frame time must be positive"
        )
    # startup <= SHARE * (startup + chunk * frame) <=> chunk >= startup * (1-SHARE)/SHARE / frame;
    # the epsilon keeps float noise (90.00000000000001) from adding a frame.
    amortised = math.ceil(startup_s * (1 - STARTUP_SHARE) / STARTUP_SHARE / frame_s - 1e-9)
    # The most frames per chunk that still make at least n_slots chunks: ceil(n / c) >= s.
    busy = n_frames if n_slots == 1 else math.ceil(n_frames / (n_slots - 1)) - 1
    return max(1, min(amortised, busy, n_frames))
