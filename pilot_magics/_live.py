"""The live pieces of a running cell's display, shared by its three views.

Used on the kernel's main thread by ``CellRun`` (a map, ``_render.py``), ``TrainRun``
(``--ddp``, ``_train_view.py``) and ``RenderRun`` (``--render``, ``_frames_view.py``):

- ``follow_events``: the loop each view runs until its job ends: events in, draws between,
  Kernel → Interrupt cancelling the job.
- ``LabelledStreams``: remote stdout/stderr cut into whole lines, each prefixed with its label
  (``[frame 17] ``, ``[rank 1] ``) and written to the cell's own stdout/stderr. A partial line
  waits for its end, or for ``flush()``.
- ``show_display(out)``: a remote ``display()``, ``update_display()`` or ``clear_output()``,
  shown in this cell.
- ``LiveDisplay``: one display updated in place by its ``display_id``. A view draws when it
  is ``due()`` (something changed and the last draw is ``REDRAW_EVERY_S`` old, so at most 5
  draws a second; or a clock in it has moved) and always at the end. A terminal IPython, which
  does not render display updates, gets the first text line rewritten in place instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from IPython.display import DisplayHandle, clear_output, display, publish_display_data
from IPython.display import update_display as update_remote_display

from gateway.protocol import Output, OutputKind

__all__ = ["LabelledStreams", "LiveDisplay", "follow_events", "show_display"]

REDRAW_EVERY_S = 0.2  # a live display changes at most 5 times a second


def follow_events(
    job: Any,
    on_event: Callable[[Any], bool],
    draw: Callable[..., None],
    flush: Callable[[], None],
    tick_s: float,
) -> None:
    """Hand ``job``'s events to ``on_event`` until it returns True (the job is over, or the
    view stops it), calling ``draw()`` after each and every ``tick_s`` when none comes (the
    view decides whether a draw is due); then ``flush()`` its streams and ``draw(force=True)``
    once more. KeyboardInterrupt (Kernel → Interrupt) cancels the job, draws it ``cancelled``
    and is re-raised."""
    try:
        while True:
            ev = job.next_event(tick_s)
            if ev is not None and on_event(ev):
                break
            draw()
    except KeyboardInterrupt:
        job.cancel()
        flush()
        draw(force=True, note="cancelled")
        raise
    flush()
    draw(force=True)


class LabelledStreams:
    """Lines of remote streams, labelled by ``label(key)`` (key: an item, a rank, a chunk).
    With ``keep_labels``, a line that starts with its label already (a worker that labels
    what it streams, as training ranks' are for ``pilot logs``) is not labelled twice; with
    ``skip_blank``, blank lines are left out (Blender's, between its frames)."""

    def __init__(
        self, label: Callable[[int], str], *, keep_labels: bool = False, skip_blank: bool = False
    ) -> None:
        self.label = label
        self.keep_labels = keep_labels
        self.skip_blank = skip_blank
        self._partial: dict[tuple[int, OutputKind], str] = {}

    def write(self, key: int, kind: OutputKind, text: str) -> None:
        """Write the whole lines of ``text`` (after what ``key`` left unfinished before)."""
        text = self._partial.pop((key, kind), "") + text
        lines = text.split("\n")
        self._partial[(key, kind)] = lines.pop()
        if lines:
            label = self.label(key)
            _stream(kind).write("".join(self._labelled(label, line) for line in lines))

    def flush(self) -> None:
        """End every unfinished line (the job ended or failed)."""
        for (key, kind), rest in self._partial.items():
            if rest:
                _stream(kind).write(self._labelled(self.label(key), rest))
        self._partial.clear()

    def _labelled(self, label: str, line: str) -> str:
        if self.skip_blank and not line.strip():
            return ""
        if self.keep_labels and line.startswith(label):
            return f"{line}\n"
        return f"{label}{line}\n"


def _stream(kind: OutputKind) -> Any:
    return sys.stdout if kind == OutputKind.STDOUT else sys.stderr


def show_display(out: Output) -> None:
    """Show a DISPLAY or CLEAR_OUTPUT output of remote code in this cell."""
    match out.kind:
        case OutputKind.DISPLAY:
            extra = out.extra or {}
            data, metadata = out.data, extra.get("metadata") or {}
            transient = extra.get("transient") or {}
            if extra.get("update") and transient.get("display_id"):
                update_remote_display(data, raw=True, display_id=transient["display_id"])
            else:
                publish_display_data(data, metadata, transient=transient)
        case OutputKind.CLEAR_OUTPUT:
            clear_output(wait=bool((out.extra or {}).get("wait")))


class LiveDisplay:
    """One display in the cell, shown by the first ``show`` and updated in place after. In a
    terminal IPython (``rich=False``), the first line of the bundle's text/plain, rewritten in
    place on stderr (a carriage return)."""

    def __init__(self, rich: bool = True) -> None:
        self.rich = rich
        self._handle: DisplayHandle | None = None
        self._shown_at = -float("inf")

    def age_s(self) -> float:
        """Seconds since the last ``show``."""
        return time.monotonic() - self._shown_at

    def due(self, dirty: bool, *, clock_s: float = float("inf")) -> bool:
        """Whether to draw now: something changed and the last draw is ``REDRAW_EVERY_S``
        old, or the last draw is ``clock_s`` old (a clock in it has moved)."""
        age = self.age_s()
        return (dirty and age >= REDRAW_EVERY_S) or age >= clock_s

    def show(self, bundle: dict[str, Any]) -> None:
        """Show ``bundle`` (a MIME bundle) now: the first time as a new display, then as an
        update of it."""
        self._shown_at = time.monotonic()
        if not self.rich:
            sys.stderr.write("\r" + bundle["text/plain"].split("\n", 1)[0])
            sys.stderr.flush()
        elif self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
