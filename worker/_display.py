"""``IPython.display.display()`` inside a task: the MIME bundle goes back to the notebook.

A task process holds a minimal IPython shell (no history, no prompt) whose display publisher
records each published bundle as an ``Output`` of kind ``DISPLAY`` under the current label, in
order with the task's printed text. ``display_id`` updates travel too.

A task process makes that shell only once a task imports IPython (``install_display_on_import``):
most tasks never display anything, and importing IPython costs a task process a third of its
start-up. A remote session makes it at once (``install_display``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gateway.protocol import OutputKind
from worker._capture import Capture

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__all__ = ["install_display", "install_display_on_import"]


def install_display(capture: Capture) -> InteractiveShell:
    """Create the process's shell with our publisher; returns it."""
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    class TaskDisplayPublisher(DisplayPublisher):
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
            extra = {"metadata": metadata or {}, "transient": transient or {}, "update": update}
            capture.add(OutputKind.DISPLAY, _plain(data), extra)

        def clear_output(self, wait: bool = False) -> None:
            capture.add(OutputKind.CLEAR_OUTPUT, b"", {"wait": wait})

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    return InteractiveShell.instance(config=config, display_pub_class=TaskDisplayPublisher)


def install_display_on_import(capture: Capture) -> None:
    """``install_display(capture)`` right after something imports IPython (at once if it is
    imported already)."""
    if "IPython" in sys.modules:
        install_display(capture)
    else:
        sys.meta_path.insert(0, _AfterImport("IPython", lambda: install_display(capture)))


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    # MIME bundles hold str, bytes or JSON-able values: all of them travel in msgpack.
    return {k: v for k, v in data.items() if isinstance(v, str | bytes | dict | list | int | float)}


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds nothing itself: when ``name`` is first imported, the other finders find it, and
    ``then()`` runs once its module has run (this finder then leaves ``sys.meta_path``)."""

    def __init__(self, name: str, then: Callable[[], object]) -> None:
        self._name = name
        self._then = then
        self._loader: importlib.abc.Loader | None = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._name or self._loader is not None:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        assert self._loader is not None
        module.__spec__.loader = module.__loader__ = self._loader  # type: ignore[union-attr]
        self._loader.exec_module(module)
        self._then()
