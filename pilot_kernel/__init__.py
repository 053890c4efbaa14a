"""Parallel Pilot's Jupyter kernel: an IPython kernel with ``%%distribute`` and ``%pilot``.

Public names:

- `PilotKernel`: the kernel class that ``kernel.json`` names; `ipykernel` constructs it. It is
  imported lazily (on first attribute access), so ``import pilot_kernel`` does not import
  `ipykernel` and stays cheap for the ``pilot`` CLI.
- `install` / `uninstall`: write or remove the "Parallel Pilot" kernelspec; each returns the
  directory it touched (see `pilot_kernel._kernelspec`).

Everything else in the package is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._kernelspec import install, uninstall

if TYPE_CHECKING:
    from .kernel import PilotKernel

__all__ = ["PilotKernel", "install", "uninstall"]


def __getattr__(name: str) -> Any:
    # Module-level __getattr__ (PEP 562) defers the ipykernel import until someone needs it.
    if name == "PilotKernel":
        from .kernel import PilotKernel

        return PilotKernel
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
