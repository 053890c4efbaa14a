"""``IPython.display.display()`` inside a task: the MIME bundle goes back to the notebook.

A task process holds a minimal IPython shell (no history, no prompt) whose display publisher
records each published bundle as an ``Output`` of kind ``DISPLAY`` under the current label, in
order with the task's printed text. ``display_id`` updates travel too.
"""

from __future__ import annotations

from typing import Any

from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from gateway.protocol import OutputKind
from worker._capture import Capture

__all__ = ["install_display"]


class _TaskDisplayPublisher(DisplayPublisher):
    capture: Capture | None = None

    def publish(  # type: ignore[override]
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: Any = None,
        *,
        transient: dict[str, Any] | None = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        if self.capture is None:
            return
        extra = {"metadata": metadata or {}, "transient": transient or {}, "update": update}
        self.capture.add(OutputKind.DISPLAY, _plain(data), extra)

    def clear_output(self, wait: bool = False) -> None:
        if self.capture is not None:
            self.capture.add(OutputKind.CLEAR_OUTPUT, b"", {"wait": wait})


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    # MIME bundles hold str, bytes or JSON-able values: all of them travel in msgpack.
    return {k: v for k, v in data.items() if isinstance(v, str | bytes | dict | list | int | float)}


def install_display(capture: Capture) -> InteractiveShell:
    """Create the process's shell with our publisher; returns it."""
    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    _TaskDisplayPublisher.capture = capture
    shell = InteractiveShell.instance(config=config, display_pub_class=_TaskDisplayPublisher)
    return shell
