"""Parallel Pilot's IPython extension: ``%load_ext pilot_magics``.

Gives any IPython kernel (the stock one that VS Code and PyCharm start, too) the ``%pilot``
line magic and the ``%%distribute`` cell magic. Imports only ``gateway`` of ours.
"""

from __future__ import annotations

from typing import Any

from pilot_magics._magics import PilotMagics
from pilot_magics._options import DistributeOptions, RenderOptions, TrainOptions, parse_options
from pilot_magics._render import RemoteCellError

__all__ = [
    "DistributeOptions",
    "PilotMagics",
    "RemoteCellError",
    "RenderOptions",
    "TrainOptions",
    "load_ipython_extension",
    "parse_options",
    "unload_ipython_extension",
]

_loaded: dict[int, PilotMagics] = {}


def load_ipython_extension(ip: Any) -> None:
    magics = PilotMagics(ip)
    ip.register_magics(magics)
    _loaded[id(ip)] = magics


def unload_ipython_extension(ip: Any) -> None:
    magics = _loaded.pop(id(ip), None)
    if magics is not None:
        magics.close()
