"""Showing a running ``%%distribute --render FILE`` cell: frames, a live preview, the end.

Runs on the kernel's main thread, fed by ``RenderRun.follow()`` until the job ends:

- one progress line counted in frames (not chunks), with the time so far and, from the second
  frame on, an ETA: the frames left at the rate the frames came since the first one (the wait
  for the scene to travel and the first Blenders to start is not a rate), updated in place at
  most 5 times a second;
- under it, the latest frame's thumbnail as a live preview (image/png), updated in place;
- Blender's lines labelled by their chunk (``[frames 11-20] ``; none with ``quiet``), the
  gateway's notes as they come, and a failed chunk's error, labelled; the cell then ends in
  ``RemoteCellError`` for the first failed chunk (see ``error``). Kernel → Interrupt cancels
  the job and re-raises ``KeyboardInterrupt``.

``finish()`` shows the end of a render that succeeded: a line when the frames were rendered by
different Blender versions, a filmstrip of the thumbnails, and the video inline (``--video``).
``carry_frames`` makes a ``--missing-only`` rerun the scene's whole render (see there).
"""

from __future__ import annotations

import base64
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from IPython.display import display

from gateway.client import Job, filmstrip
from gateway.protocol import FrameDone, JobUpdate, Output, OutputKind, TaskDone, TaskStatus
from pilot_magics._live import LabelledStreams, LiveDisplay, follow_events, show_display
from pilot_magics._render import RemoteCellError

__all__ = ["RenderRun", "carry_frames"]

TICK_S = 0.1
CLOCK_EVERY_S = 1.0
FILMSTRIP_FRAMES = 12
VIDEO_EMBED_MAX_BYTES = 50 * 10**6  # a bigger MP4 is named, not put into the notebook


def carry_frames(job: Job, previous: Job) -> None:
    """Make the ``--missing-only`` rerun ``job`` stand for the scene's whole render: the
    frames of ``previous`` that it does not render again are added to its ``render`` record
    (its ``frames``, ``video``, ``missing_frames()`` and the filmstrip then cover the whole
    animation). Called right after submitting; the frames added are never ones the rerun
    renders, so the IO thread's live updates of the same record cannot collide with them."""
    new, old = job.render, previous.render
    assert new is not None and old is not None
    again = set(new.frames_asked)
    new.done.update({f: d for f, d in old.done.items() if f not in again})
    new.frames_asked = tuple(sorted(again | set(old.frames_asked)))


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _span(frames: tuple[int, ...]) -> str:
    return f"{frames[0]}-{frames[-1]}" if len(frames) > 1 else str(frames[0])


class RenderRun:
    """Follow the render ``job``, which renders ``frames`` (a ``--missing-only`` rerun's
    record holds more), and show it in the cell."""

    def __init__(
        self, job: Job, frames: tuple[int, ...], *, quiet: bool = False, rich: bool = True
    ) -> None:
        self.job = job
        self.frames = frames
        self.quiet = quiet
        self.rich = rich
        self._chunks = [frames[i : i + job.chunk] for i in range(0, len(frames), job.chunk)]
        self._streams = LabelledStreams(self._label, skip_blank=True)
        self._progress = LiveDisplay(rich)
        self._preview = LiveDisplay(rich)
        self._latest: FrameDone | None = None
        self._preview_dirty = False
        self._dirty = True
        self._failed = 0
        self._start = time.monotonic()
        self._first_at: float | None = None  # when the first frame was counted

    def _label(self, index: int) -> str:
        if 0 <= index < len(self._chunks) and self._chunks[index]:
            return f"[frames {_span(self._chunks[index])}] "
        return ""

    # -- the loop -----------------------------------------------------------------------------

    def follow(self) -> None:
        """Show events until the job ends. KeyboardInterrupt cancels the job and is re-raised."""
        self._draw(force=True)
        if self.rich:
            self._preview.show({"text/plain": "preview: waiting for the first frame"})
        follow_events(self.job, self._on_event, self._draw, self._streams.flush, TICK_S)
        if not self.rich:
            sys.stderr.write("\n")

    def _on_event(self, ev: Any) -> bool:
        match ev:
            case Output(kind=OutputKind.FRAME):
                if ev.data.thumbnail:
                    self._latest = ev.data
                    self._preview_dirty = True
                self._dirty = True
            case Output(kind=OutputKind.STDOUT | OutputKind.STDERR) if ev.index < 0:
                self._streams.flush()
                text = ev.data.decode("utf-8", "replace")
                sys.stderr.write(text if text.endswith("\n") else text + "\n")
            case Output() if not self.quiet:
                if ev.kind in (OutputKind.STDOUT, OutputKind.STDERR):
                    self._streams.write(ev.index, ev.kind, ev.data.decode("utf-8", "replace"))
                else:
                    show_display(ev)
            case TaskDone():
                if ev.status not in (TaskStatus.OK, TaskStatus.CANCELLED):
                    self._streams.flush()
                    self._failed += 1
                    where = self._label(ev.index).strip() or f"chunk {ev.index}"
                    sys.stderr.write(f"{where} failed on {ev.worker or 'a worker'}:\n{ev.error}\n")
                self._dirty = True
            case JobUpdate() if self.job.done():
                return True
        return False

    # -- the display --------------------------------------------------------------------------

    def done_frames(self) -> int:
        record = self.job.render
        done = record.done if record is not None else {}
        return sum(1 for f in self.frames if f in done)

    def progress(self, note: str = "") -> str:
        """One line: frames done of all, time so far, the ETA (and ``note``)."""
        done, total = self.done_frames(), len(self.frames)
        now = time.monotonic()
        if done and self._first_at is None:
            self._first_at = now
        parts = [f"{done}/{total} frames", _duration(now - self._start)]
        since_first = now - (self._first_at or now)
        if 1 < done < total and since_first > 0 and not self.job.done():
            parts.append(f"ETA {_duration(since_first / (done - 1) * (total - done))}")
        if self._failed:
            parts.append(f"{self._failed} chunks failed")
        if note:
            parts.append(note)
        return " · ".join(parts)

    def _draw(self, force: bool = False, note: str = "") -> None:
        if force or self._progress.due(self._dirty, clock_s=CLOCK_EVERY_S):
            self._dirty = False
            text = self.progress(note)
            bar = (
                f'<progress value="{self.done_frames()}" max="{len(self.frames)}" '
                'style="width:20em"></progress>'
            )
            html = f'<div style="font-family:monospace">{bar} {text}</div>'
            self._progress.show({"text/plain": text, "text/html": html})
        latest = self._latest
        if latest is None or not self._preview_dirty or not self.rich:
            return
        if force or self._preview.due(True):
            self._preview_dirty = False
            png = base64.b64encode(latest.thumbnail).decode("ascii")
            self._preview.show({"image/png": png, "text/plain": f"frame {latest.frame}"})

    # -- the end ------------------------------------------------------------------------------

    def error(self) -> RemoteCellError | None:
        """The error the cell ends in if a chunk failed: the first failed chunk's."""
        failed = self.job.failures() if self._failed else []
        if not failed:
            return None
        first = failed[0]
        lines = first.remote_traceback.strip().splitlines()
        more = f" (and {len(failed) - 1} more chunks)" if len(failed) > 1 else ""
        where = self._label(first.index).strip().strip("[]") or f"chunk {first.index}"
        return RemoteCellError(
            f"Rendering {where} of job {first.job_id} failed on {first.worker or 'a worker'}"
            f"{more}: {lines[-1] if lines else 'failed'}. Once it is fixed, add --missing-only "
            "to render only the frames still missing.",
            job_id=first.job_id,
            index=first.index,
            item=first.item,
            remote_traceback=first.remote_traceback,
            worker=first.worker,
        )

    def finish(self, *, video: bool) -> None:
        """After a render that succeeded: flag mixed Blender versions, show the filmstrip and
        (``video``) make the MP4 and show it."""
        record = self.job.render
        assert record is not None
        versions: dict[str, list[int]] = {}
        for frame, done in sorted(record.done.items()):
            versions.setdefault(done.blender or "unknown", []).append(frame)
        if len(record.blender_versions()) > 1:
            which = "; ".join(
                f"{v}: {len(fs)} frame{'s' if len(fs) > 1 else ''}"
                for v, fs in sorted(versions.items())
            )
            sys.stderr.write(
                f"Warning: the frames were rendered by different Blender versions ({which}); "
                "they may not match. Tag the workers of one version and pass --tags.\n"
            )
        if self.rich:
            self._filmstrip(record.done)
        if video:
            path = self.job.video
            size = path.stat().st_size
            print(f"video: {path} ({size / 1e6:.2f} MB)")
            if self.rich and size <= VIDEO_EMBED_MAX_BYTES:
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                tag = (
                    '<video controls loop style="max-width:100%" '
                    f'src="data:video/mp4;base64,{data}"></video>'
                )
                display({"text/html": tag, "text/plain": f"video {path}"}, raw=True)

    def _filmstrip(self, done: dict[int, FrameDone]) -> None:
        thumbs = [done[f].thumbnail for f in sorted(done) if done[f].thumbnail]
        if not thumbs:
            return
        n = len(thumbs)
        count = min(n, FILMSTRIP_FRAMES)
        chosen = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})
        with tempfile.TemporaryDirectory(prefix="pilot-filmstrip-") as tmp:
            paths = []
            for i in chosen:
                path = Path(tmp) / f"{i:06d}.png"
                path.write_bytes(thumbs[i])
                paths.append(path)
            strip = filmstrip(paths, max_frames=FILMSTRIP_FRAMES)
        png = base64.b64encode(strip).decode("ascii")
        display({"image/png": png, "text/plain": f"filmstrip of {n} frames"}, raw=True)

    def summary(self) -> str:
        done = [d for d in self.job.tasks.values() if d.status == TaskStatus.OK]
        workers = {d.worker for d in done if d.worker}
        wall = (self.job.finished_at or time.monotonic()) - self._start
        frames = self.done_frames()
        rate = f" · {frames / wall:.2f} frames/s" if wall > 0 and frames else ""
        return (
            f"{frames} frames in {len(self._chunks)} chunks on {len(workers)} workers "
            f"in {_duration(wall)}{rate}"
        )
