"""Packaging a cell: find the notebook names it reads, and ship them.

The cell is parsed (after IPython's own transforms) and every name it loads, at any depth
(inside its functions and comprehensions too), is looked up in the notebook's namespace:
modules travel by name and are imported again on the worker; functions and classes defined in
the notebook travel by value (cloudpickle); other values are pickled. A value that cannot be
pickled fails here, before anything is sent, naming the variable; one over the size limit warns
and suggests ``--data``.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import warnings
from types import ModuleType
from typing import Any

from IPython.core.error import UsageError

from gateway.protocol import CellFunction, SerializationError, dumps

__all__ = ["LARGE_VALUE_BYTES", "build_cell_function", "names_read"]

LARGE_VALUE_BYTES = 100 * 10**6


def names_read(source: str) -> set[str]:
    """Every name the code loads (a superset of what it needs from outside: cheap and safe)."""
    tree = ast.parse(source)
    return {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }


def cell_filename(source: str) -> str:
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"<cell-{digest}>"


def build_cell_function(
    source: str,
    user_ns: dict[str, Any],
    *,
    bind: tuple[str, ...] = (),
    constants: dict[str, Any] | None = None,
    provided: tuple[str, ...] = (),
    large_bytes: int = LARGE_VALUE_BYTES,
) -> CellFunction:
    """The cell as a ``CellFunction``, with the notebook values it reads (except ``provided``
    names, which the worker binds: datasets).

    Raises ``UsageError`` for a syntax error, ``SerializationError`` naming a variable that
    cannot be pickled.
    """
    try:
        wanted = names_read(source)
    except SyntaxError as exc:
        raise UsageError(f"The cell has a syntax error (line {exc.lineno}): {exc.msg}") from None
    skip = set(bind) | set(constants or {}) | set(provided) | set(dir(builtins))
    values: dict[str, Any] = {}
    modules: dict[str, str] = {}
    for name in sorted(wanted - skip):
        if name not in user_ns or name.startswith("_"):
            continue
        value = user_ns[name]
        if isinstance(value, ModuleType):
            modules[name] = value.__name__
            continue
        try:
            size = dumps(value, what=f"the notebook variable {name!r}").nbytes
        except SerializationError:
            raise
        if size > large_bytes:
            warnings.warn(
                f"The notebook variable {name!r} is {size / 1e6:.0f} MB and is sent with every "
                "job. Put it in storage and pass it with --data NAME=URL instead.",
                stacklevel=2,
            )
        values[name] = value
    return CellFunction(
        source,
        cell_filename(source),
        values,
        modules,
        bind,
        dict(constants or {}),
    )
