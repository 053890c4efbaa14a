"""Showing a running map job (``--over``, ``--partitions``, the cell once) in its cell.

Runs on the kernel's main thread (display must), fed by ``CellRun.follow()``: each item's
stdout/stderr lines are labelled (``[frame 17] rendering 17``), display data is published
inline, one progress line is updated in place (a ``display_id`` update in a Jupyter frontend; a
carriage-return line on a terminal), and a summary closes it. Failed tasks print their remote
traceback, labelled; the cell then ends in ``RemoteCellError``, whose traceback is the remote
one, with the cell's own line numbers and source. Training cells are shown by
``_train_view.py``, render cells by ``_frames_view.py``; the pieces all three share are in
``_live.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from IPython.display import DisplayHandle, display

from gateway.client import Job
from gateway.protocol import JobKind, JobUpdate, Output, OutputKind, TaskDone, TaskError, TaskStatus
from pilot_magics._live import LabelledStreams, follow_events, show_display

__all__ = ["CellRun", "RemoteCellError"]

PROGRESS_EVERY_S = 0.1
LABEL_MAX = 40


class RemoteCellError(TaskError):
    """A task of the cell failed; IPython shows the remote traceback as the cell's error."""

    def _render_traceback_(self) -> list[str]:
        head = f"{self.args[0]}"
        return [head, "", *self.remote_traceback.rstrip().splitlines()]


def _label_maker(name: str | None, items: Sequence[Any] | None) -> Callable[[int], str]:
    if name is None or items is None:
        return lambda i: ""

    def label(i: int) -> str:
        if 0 <= i < len(items):
            text = str(items[i])
            text = text if len(text) <= LABEL_MAX else text[: LABEL_MAX - 1] + "…"
            return f"[{name} {text}] "
        return ""

    return label


class CellRun:
    """Follow ``job`` and show it. ``until`` is called with (item index, result) for each
    result as it arrives and returns True to stop the job early."""

    def __init__(
        self,
        job: Job,
        *,
        label_name: str | None,
        quiet: bool = False,
        until: Callable[[int, Any], bool] | None = None,
        rich: bool = True,
    ) -> None:
        self.job = job
        self.label = _label_maker(label_name, job.items)
        self.quiet = quiet
        self.until = until
        self.rich = rich
        self.found: tuple[int, Any] | None = None
        self._streams = LabelledStreams(self.label)
        self._handle: DisplayHandle | None = None
        self._last_progress = 0.0
        self._failed = 0
        self._start = time.monotonic()

    # -- the loop -----------------------------------------------------------------------------

    def follow(self) -> None:
        """Show events until the job ends (or ``until`` stops it). KeyboardInterrupt cancels
        the job and is re-raised."""
        self._progress(force=True)
        follow_events(
            self.job, self._on_event, self._progress, self._flush_partial, PROGRESS_EVERY_S
        )

    def _on_event(self, ev: Any) -> bool:
        match ev:
            case Output():
                if not self.quiet:
                    self._output(ev)
            case TaskDone():
                self._task_done(ev)
                if self.found is not None:
                    self.job.cancel()
                    return True
            case JobUpdate() if self.job.done():
                return True
        return False

    # -- outputs ------------------------------------------------------------------------------

    def _output(self, out: Output) -> None:
        match out.kind:
            case OutputKind.STDOUT | OutputKind.STDERR:
                self._streams.write(out.item, out.kind, out.data.decode("utf-8", "replace"))
            case OutputKind.DISPLAY | OutputKind.CLEAR_OUTPUT:
                show_display(out)

    def _flush_partial(self) -> None:
        self._streams.flush()

    # -- results ------------------------------------------------------------------------------

    def _task_done(self, d: TaskDone) -> None:
        if d.status == TaskStatus.OK:
            if self.until is not None:
                self._check_until(d)
            return
        if d.status == TaskStatus.CANCELLED:
            return
        self._flush_partial()
        self._failed += 1
        where = self.label(d.item).strip() or f"task {d.index}"
        sys.stderr.write(f"{where} failed on {d.worker or 'a worker'}:\n{d.error.rstrip()}\n")

    def _check_until(self, d: TaskDone) -> None:
        values = self.job.value(d.index)
        if self.job.kind == JobKind.MAP:
            first = d.index * self.job.chunk
            pairs = [(first + k, v) for k, v in enumerate(values)]
        else:
            pairs = [(d.index, values)]
        assert self.until is not None
        for index, value in pairs:
            if self.until(index, value):
                self.found = (index, value)
                return

    def error(self) -> RemoteCellError | None:
        """The error the cell should end in, if any task failed: the first failed item's."""
        failed = self.job.failures() if self._failed else []
        if not failed:
            return None
        first = failed[0]
        more = f" (and {len(failed) - 1} more failed tasks)" if len(failed) > 1 else ""
        return RemoteCellError(
            f"{first}{more}".split("\n\nRemote traceback:")[0],
            job_id=first.job_id,
            index=first.index,
            item=first.item,
            remote_traceback=first.remote_traceback,
            worker=first.worker,
        )

    # -- progress and summary -------------------------------------------------------------

    def _progress(self, force: bool = False, note: str = "") -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        done, total = self.job.progress
        text = f"{done}/{total} tasks · {now - self._start:.1f}s"
        if note:
            text += f" · {note}"
        if not self.rich:
            sys.stderr.write(f"\r{text}")
            sys.stderr.flush()
            return
        html = (
            f'<div style="font-family:monospace">'
            f'<progress value="{done}" max="{total}" style="width:20em"></progress> {text}</div>'
        )
        bundle = {"text/plain": text, "text/html": html}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)

    def summary(self) -> str:
        items = len(self.job.items) if self.job.items is not None else self.job.n_tasks
        done = [d for d in self.job.tasks.values() if d.status == TaskStatus.OK]
        workers = {d.worker for d in done if d.worker}
        wall = (self.job.finished_at or time.monotonic()) - self._start
        busy = sum(d.duration_s for d in done)
        speedup = busy / wall if wall > 0 else 0.0
        return (
            f"{items} items on {len(workers)} workers in {wall:.2f}s · "
            f"task time {busy:.2f}s · speed-up {speedup:.2f}x"
        )
