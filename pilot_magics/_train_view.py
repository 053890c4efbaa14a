"""Showing a running ``%%distribute --ddp N`` cell: its ranks' lines and live metrics.

Runs on the kernel's main thread, fed by ``TrainRun.follow()`` until the job ends:

- every line a rank prints is labelled ``[rank r] `` (``rank_output``: only that rank's lines
  and displays; ``quiet``: none); rank r's outputs come as task r's (``Output.index``). The
  gateway's notes (waiting for free rank slots, a rank lost and the group restarting) are
  shown always, as they come; each restart is counted.
- one display at the top of the cell, updated in place (at most 5 times a second, and once a
  second for the clock): a status line (ranks, state, time, reports, restarts, checkpoints),
  the ``MetricsBoard`` table of each rank's latest ``pt.report(...)`` and, once reports carry
  ``step`` and ``loss``, the loss plot beside it. A terminal IPython gets the status line
  rewritten in place and the table at the end.
- a rank that failed is named with its error's last line (the rank printed its traceback);
  the cell then ends in ``RemoteCellError`` for the first failed rank (see ``error``).
  Kernel → Interrupt cancels the job (every rank stops) and re-raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import html
import re
import sys
import time
from typing import Any

from gateway.client import Job
from gateway.protocol import JobUpdate, Output, OutputKind, TaskDone, TaskStatus
from pilot_magics._live import LabelledStreams, LiveDisplay, follow_events, show_display
from pilot_magics._metrics import MetricsBoard
from pilot_magics._render import RemoteCellError

__all__ = ["TrainRun"]

TICK_S = 0.1  # how long the loop waits for an event before it looks at the clock
CLOCK_EVERY_S = 1.0  # the status line's clock moves at least this often
# The gateway's note when a rank ended and the group restarts (gateway/server/_instructions.py).
RESTART_NOTE = re.compile(r"the group stopped and restarts .*\(restart \d+\)")


class TrainRun:
    """Follow the training ``job`` of ``ranks`` ranks and show it in the cell."""

    def __init__(
        self,
        job: Job,
        *,
        ranks: int,
        rank_output: int | None = None,
        quiet: bool = False,
        rich: bool = True,
    ) -> None:
        self.job = job
        self.ranks = ranks
        self.rank_output = rank_output
        self.quiet = quiet
        self.rich = rich
        self.board = MetricsBoard()
        self.checkpoints = 0
        # The worker labels the lines it streams (for ``pilot logs`` too): not twice here.
        self._streams = LabelledStreams(lambda rank: f"[rank {rank}] ", keep_labels=True)
        self._display = LiveDisplay(rich)
        self._dirty = True
        self._failed = 0
        self._running = False  # a rank has sent something
        self._start = time.monotonic()

    # -- the loop -----------------------------------------------------------------------------

    def follow(self) -> None:
        """Show events until the job ends. KeyboardInterrupt cancels the job and is re-raised."""
        self._draw(force=True)
        follow_events(self.job, self._on_event, self._draw, self._streams.flush, TICK_S)
        if not self.rich and self.board.latest:
            print("\n" + self.board.table_text())

    def _on_event(self, ev: Any) -> bool:
        if isinstance(ev, Output) and ev.index >= 0:
            self._running = True
        match ev:
            case Output(kind=OutputKind.METRICS):
                self.board.add(ev.data)
                self._dirty = True
            case Output(kind=OutputKind.CHECKPOINT):
                self.checkpoints += 1
                self._dirty = True
            case Output(kind=OutputKind.STDOUT | OutputKind.STDERR) if ev.index < 0:
                self._note(ev.data.decode("utf-8", "replace"))
            case Output() if self._shown(ev.index):
                if ev.kind in (OutputKind.STDOUT, OutputKind.STDERR):
                    self._streams.write(ev.index, ev.kind, ev.data.decode("utf-8", "replace"))
                else:
                    show_display(ev)
            case TaskDone() if ev.status not in (TaskStatus.OK, TaskStatus.CANCELLED):
                # The headline only: the rank printed its traceback (shown unless filtered
                # out), and the cell's error shows the first failed rank's.
                self._streams.flush()
                self._failed += 1
                lines = ev.error.strip().splitlines()
                headline = lines[-1] if lines else ev.status.name.lower()
                where = f"[rank {ev.index}] failed on {ev.worker or 'a worker'}"
                sys.stderr.write(f"{where}: {headline}\n")
            case JobUpdate() if self.job.done():
                return True
        return False

    def _shown(self, rank: int) -> bool:
        return not self.quiet and self.rank_output in (None, rank)

    def _note(self, text: str) -> None:
        """A line from the gateway (``[pilot] ...``): shown as it is, restarts counted."""
        if RESTART_NOTE.search(text):
            self.board.restarted()
            self._dirty = True
        self._streams.flush()  # a rank's unfinished line ends before the note
        sys.stderr.write(text if text.endswith("\n") else text + "\n")

    # -- the display --------------------------------------------------------------------------

    def status(self, note: str = "") -> str:
        """One line: ranks, state, time, restarts, checkpoints (and ``note``)."""
        state = self.job.state
        # A job's state arrives when it ends; a rank's output says it runs before that.
        word = "running" if self._running and not state.finished else state.name.lower()
        parts = [f"{self.ranks} ranks", word, f"{time.monotonic() - self._start:.1f}s"]
        if self.board.reports:
            parts.append(f"{self.board.reports} reports")
        if self.board.restarts:
            parts.append(f"restarts {self.board.restarts}")
        if self.checkpoints:
            parts.append(f"checkpoints {self.checkpoints}")
        if note:
            parts.append(note)
        return " · ".join(parts)

    def _draw(self, force: bool = False, note: str = "") -> None:
        if force or self._display.due(self._dirty, clock_s=CLOCK_EVERY_S):
            self._dirty = False
            self._display.show(self.bundle(self.status(note)))

    def bundle(self, status: str) -> dict[str, str]:
        """The display's MIME bundle: the status, the table and the plot."""
        table = self.board.table_html() or (
            "<i>no metrics yet: <code>pilot.train.report(step=..., loss=...)</code> "
            "shows them here</i>"
        )
        plot = self.board.plot_svg() if self.rich else ""
        html_text = (
            '<div style="font-family:monospace">'
            f"<div>{html.escape(status)}</div>"
            '<div style="display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap">'
            f"<div>{table}</div>{f'<div>{plot}</div>' if plot else ''}</div></div>"
        )
        text = "\n".join(x for x in (status, self.board.table_text()) if x)  # status first
        return {"text/plain": text, "text/html": html_text}

    # -- the end ------------------------------------------------------------------------------

    def error(self) -> RemoteCellError | None:
        """The error the cell ends in if a rank failed: the first failed rank's."""
        failed = self.job.failures() if self._failed else []
        if not failed:
            return None
        first = failed[0]
        lines = first.remote_traceback.strip().splitlines()
        headline = lines[-1] if lines else "failed"
        more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        return RemoteCellError(
            f"Rank {first.index} of job {first.job_id} failed on {first.worker or 'a worker'}"
            f"{more}: {headline}",
            job_id=first.job_id,
            index=first.index,
            item=first.item,
            remote_traceback=first.remote_traceback,
            worker=first.worker,
        )

    def summary(self) -> str:
        done = [d for d in self.job.tasks.values() if d.status == TaskStatus.OK]
        workers = {d.worker for d in self.job.tasks.values() if d.worker}
        wall = (self.job.finished_at or time.monotonic()) - self._start
        ranks = f"{len(done) or self.ranks} ranks"
        if self._failed:
            ranks += f" ({self._failed} failed)"
        text = f"{ranks} on {len(workers)} workers in {wall:.2f}s"
        text += f" · {self.board.reports} reports"
        if self.board.restarts:
            n = self.board.restarts
            text += f" · {n} restart{'s' if n > 1 else ''}"
        return text
