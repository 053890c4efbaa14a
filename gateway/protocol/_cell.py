"""A notebook cell as a function a worker can call: ``CellFunction``.

Built by the magic in the notebook, pickled with the job, called once per item on a worker. It
carries the cell's source (compiled on the worker under the cell's own filename, registered in
``linecache`` so tracebacks show the cell's lines), the notebook values the cell reads, and the
modules it uses by name (imported again on the worker, never pickled). The last expression of
the cell is the item's result, as in IPython.

Each item runs in a fresh copy of the cell's namespace, so items never see each other's names:
one ``exec`` an item. A cell that is a single expression and cannot tell (it assigns no name
and reads no namespace: no ``:=``, ``globals()``, ``eval``...) runs instead as a function of
the item whose globals are the namespace: the same result, about a tenth of the cost an item
(``_compiled``). ``bench/magic.py``'s ``--over`` cell of 10,000 trivial items ran at 0.76x
of ``client.map``'s rate with an ``exec`` an item, and 0.87x this way (docs/decisions.md).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import linecache
from dataclasses import dataclass, field
from types import CodeType, FunctionType
from typing import Any, Literal

__all__ = ["CellFunction"]

_RESULT = "__pilot_cell_result__"  # the name the cell's last expression's value is kept under
_ITEM = "__pilot_cell_item__"  # the item's parameter, for a cell that binds no name to it
# What a one-expression cell must not use to run as a function of its item: names whose
# meaning depends on the namespace they run in, and what would make the function something else.
_NAMESPACE_READERS = frozenset({"eval", "exec", "globals", "locals", "vars", "dir", "breakpoint"})
_NOT_IN_A_FUNCTION = (ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await)


def _cannot_tell(tree: ast.AST) -> bool:
    """Whether the cell uses nothing that tells a function of its item from a namespace."""
    return not any(
        isinstance(node, _NOT_IN_A_FUNCTION)
        or (isinstance(node, ast.Name) and node.id in _NAMESPACE_READERS)
        for node in ast.walk(tree)
    )


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
    _code: tuple[CodeType, bool, CodeType | None] | None = field(default=None, repr=False)
    _base: dict[str, Any] | None = field(default=None, repr=False)
    # the one-expression cell as a function of the item, with the namespace as its globals
    # (``_compiled``); False: it cannot be; None: not built yet (with the namespace)
    _fast: FunctionType | Literal[False] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_code"] = None  # code objects are compiled where they run
        state["_base"] = None  # and the namespace is built there, once
        state["_fast"] = None
        return state

    def _compiled(self) -> tuple[CodeType, bool, CodeType | None]:
        """The cell, parsed once, as: one code object, its last expression's value assigned to
        ``_RESULT`` (one ``exec`` an item, not an ``exec`` and an ``eval``; line numbers the
        expression's own); whether it ends in an expression; and, for a cell of one expression
        that cannot tell the two ways apart (see the module docstring), the code of ``lambda
        ITEM: EXPRESSION``, named ``<module>`` as the cell's is, so tracebacks read the same."""
        if self._code is None:
            linecache.cache[self.filename] = (
                len(self.source),
                None,
                self.source.splitlines(True),
                self.filename,
            )
            tree = ast.parse(self.source, self.filename)
            last = tree.body[-1] if tree.body else None
            expression = None
            if isinstance(last, ast.Expr):
                if len(tree.body) == 1 and _cannot_tell(tree):
                    expression = self._as_function(last.value)
                result = ast.Assign([ast.Name(_RESULT, ast.Store())], last.value)
                tree.body[-1] = ast.fix_missing_locations(ast.copy_location(result, last))
            code = compile(tree, self.filename, "exec")
            self._code = (code, isinstance(last, ast.Expr), expression)
        return self._code

    def _as_function(self, expr: ast.expr) -> CodeType:
        """The code of ``lambda ITEM: expr`` (its globals are given where it is made)."""
        param = ast.arguments(
            [], [ast.arg(self.bind[0] if self.bind else _ITEM)], None, [], [], None, []
        )
        fn = ast.fix_missing_locations(ast.copy_location(ast.Lambda(param, expr), expr))
        outer = compile(ast.Expression(fn), self.filename, "eval")
        inner = next(c for c in outer.co_consts if isinstance(c, CodeType))
        return inner.replace(co_name="<module>", co_qualname="<module>")

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
        code, ends_in_expression, expression = self._code or self._compiled()
        if self._base is None:
            self._base = self.namespace()
            self._fast = FunctionType(expression, self._base) if expression else False
        if self._fast and not data:
            return self._fast(item)
        ns = self._base.copy()
        if data:
            ns.update(data)
        if self.bind:
            ns[self.bind[0]] = item
        exec(code, ns)
        return ns[_RESULT] if ends_in_expression else None
