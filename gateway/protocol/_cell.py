"""A notebook cell as a function a worker can call: ``CellFunction``.

Built by the magic in the notebook, pickled with the job, called once per item on a worker. It
carries the cell's source (compiled on the worker under the cell's own filename, registered in
``linecache`` so tracebacks show the cell's lines), the notebook values the cell reads, and the
modules it uses by name (imported again on the worker, never pickled). The last expression of
the cell is the item's result, as in IPython.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import linecache
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

__all__ = ["CellFunction"]


@dataclass
class CellFunction:
    """``fn(item)`` runs the cell with ``bind`` names set from ``item``.

    ``bind`` is ``("frame",)`` for ``--over frame=...`` (item is the value), or
    ``("partition", "partitions")`` for ``--partitions N`` (item is the partition number;
    ``partitions`` is ``constants["partitions"]``). With ``bind == ()`` the cell runs once.
    """

    source: str
    filename: str
    values: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)  # name in the cell -> module
    bind: tuple[str, ...] = ()
    constants: dict[str, Any] = field(default_factory=dict)
    _code: tuple[CodeType, CodeType | None] | None = field(default=None, repr=False)
    _base: dict[str, Any] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_code"] = None  # code objects are compiled where they run
        state["_base"] = None  # and the namespace is built there, once
        return state

    def _compiled(self) -> tuple[CodeType, CodeType | None]:
        if self._code is None:
            linecache.cache[self.filename] = (
                len(self.source),
                None,
                self.source.splitlines(True),
                self.filename,
            )
            tree = ast.parse(self.source, self.filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                expr = ast.Expression(tree.body.pop().value)
                last = compile(expr, self.filename, "eval")
            self._code = (compile(tree, self.filename, "exec"), last)
        return self._code

    def namespace(self) -> dict[str, Any]:
        ns: dict[str, Any] = {"__name__": "__pilot_cell__", "__builtins__": builtins}
        for name, module in self.modules.items():
            ns[name] = importlib.import_module(module)
        ns.update(self.values)
        ns.update(self.constants)
        return ns

    def __call__(self, item: Any = None, **data: Any) -> Any:
        """Run the cell for ``item``; ``data`` are the datasets (``--data NAME=URL``) the
        worker bound for this item, by name. Each item gets a fresh copy of the namespace
        (built once per process: modules imported, values unpickled), so items never see
        each other's names."""
        body, last = self._compiled()
        if self._base is None:
            self._base = self.namespace()
        ns = dict(self._base)
        ns.update(data)
        if self.bind:
            ns[self.bind[0]] = item
        exec(body, ns)
        return eval(last, ns) if last is not None else None
