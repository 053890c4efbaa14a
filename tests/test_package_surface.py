"""The shape of the code: curated front doors, one-way dependencies, modules of a readable size.

The dependency arrows of DESIGN.md::

    pilot ─► pilot_kernel ─► pilot_magics ─► gateway
      └───► worker ──────────────────────► gateway

are checked on the source (every ``.py`` file of every package, parsed with ``ast``: ``import
x``, ``from x import y``, relative imports and imports inside functions or ``TYPE_CHECKING``
blocks, plus ``importlib.import_module("x")``), so a lazy import cannot hide an arrow. Nothing
here imports the packages except the ``__all__`` check, which must resolve every name.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "worker", "pilot", "pilot_magics", "pilot_kernel")
# The gateway's roles: each a subpackage with a front door of its own (DESIGN.md).
GATEWAY_ROLES = ("gateway.protocol", "gateway.server", "gateway.client")
FRONT_DOORS = (*GATEWAY_ROLES, "worker", "pilot", "pilot_magics", "pilot_kernel")
# Which roles each gateway role may import (through its front door).
ROLE_ALLOWED: dict[str, frozenset[str]] = {
    "gateway.protocol": frozenset(),
    "gateway.server": frozenset({"gateway.protocol"}),
    "gateway.client": frozenset({"gateway.protocol"}),
}

# Which of our packages each package may import (its own is always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "gateway": frozenset(),
    "worker": frozenset({"gateway"}),
    "pilot_magics": frozenset({"gateway"}),
    "pilot_kernel": frozenset({"pilot_magics", "gateway"}),
    "pilot": frozenset({"pilot_kernel", "pilot_magics", "worker", "gateway"}),
}

MAX_MODULE_LINES = 400
# A longer module justifies itself at its top (DESIGN.md: "a module past ~400 lines must
# justify itself"), in its docstring's first lines: "(Longer than 400 lines because ...)".
JUSTIFIED = "Longer than 400 lines because"
HARD_MAX_MODULE_LINES = 800  # no reason justifies more


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """Every module ``path`` imports, as (absolute dotted name, line), relative imports
    resolved against the file's own package."""
    rel = path.relative_to(ROOT) if path.is_absolute() else path
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = list(rel.parent.parts)  # the package the file belongs to (an __init__'s too)
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                found.append((node.module, node.lineno))
                continue
            base = package[: len(package) - (node.level - 1)]
            if not base:
                raise AssertionError(f"{rel}:{node.lineno}: relative import beyond the top")
            names = [node.module] if node.module else [a.name for a in node.names]
            found.extend((".".join([*base, n]), node.lineno) for n in names)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            name = _string_literal(node.args[0]) if node.args else None
            if name and not name.startswith("."):
                found.append((name, node.lineno))
    return found


def _string_literal(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("import_module", "__import__")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def test_every_package_is_there() -> None:
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_the_import_scanner_sees_hidden_imports() -> None:
    """The scanner itself: nested, relative, TYPE_CHECKING and importlib imports are found."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from worker import Worker\n"
        "def f():\n"
        "    import pilot.x as y\n"
        "    from . import sibling\n"
        "    from ._private import thing\n"
        "    importlib.import_module('pilot_magics')\n"
        "class C:\n"
        "    def g(self):\n"
        "        from pilot_kernel.kernel import PilotKernel\n"
    )
    found = {name for name, _ in imported_modules(Path("gateway/_fake.py"), source)}
    assert {
        "worker",
        "pilot.x",
        "gateway.sibling",
        "gateway._private",
        "pilot_magics",
        "pilot_kernel.kernel",
    } <= found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_arrows(package: str) -> None:
    ours = set(PACKAGES)
    allowed = ALLOWED[package] | {package}
    files = package_files(package)
    assert files, f"{package} has no Python files"
    wrong = []
    for path in files:
        for name, line in imported_modules(path):
            top = name.split(".")[0]
            if top in ours and top not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, (
        f"{package} may import only {sorted(ALLOWED[package]) or 'none'} of ours "
        "(DESIGN.md, 'Packages and their one-way dependencies'):\n" + "\n".join(wrong)
    )


def _declared_all(path: Path) -> list[str] | None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            value = node.value
            assert isinstance(value, ast.List | ast.Tuple), f"{path}: __all__ must be a literal"
            names = []
            for element in value.elts:
                assert isinstance(element, ast.Constant) and isinstance(element.value, str)
                names.append(element.value)
            return names
    return None


def _unit_of(path: Path) -> str:
    """The package or gateway role a source file belongs to ("gateway.server", "worker")."""
    parts = path.relative_to(ROOT).parts
    if parts[0] == "gateway" and len(parts) > 2:
        return f"gateway.{parts[1]}"
    return parts[0]


def _private_target(name: str) -> str | None:
    """The unit whose private module ``name`` is ("gateway.protocol" for
    ``gateway.protocol._wire``), or None when ``name`` names no private module of ours."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            owner = parts[:i]
            if not owner or owner[0] not in PACKAGES:
                return None
            if owner[0] == "gateway" and len(owner) >= 2:
                return f"gateway.{owner[1]}"
            return owner[0]
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_a_private_module_of_another(package: str) -> None:
    """Front doors only: ``worker`` may import ``gateway.protocol`` but not
    ``gateway.protocol._wire``; within the gateway, a role reaches another only through its
    front door, and the roles' arrows hold (protocol imports neither server nor client)."""
    wrong = []
    for path in package_files(package):
        unit = _unit_of(path)
        for name, line in imported_modules(path):
            target = _private_target(name)
            if target is not None and target != unit:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports private {name}")
            if unit in ROLE_ALLOWED and name.startswith("gateway."):
                role = ".".join(name.split(".")[:2])
                if role in ROLE_ALLOWED and role != unit and role not in ROLE_ALLOWED[unit]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {unit} imports {role}")
    assert not wrong, "Import another package's names through its front door:\n" + "\n".join(wrong)


def test_the_private_import_check_sees_a_bypass() -> None:
    assert _private_target("gateway.protocol._wire") == "gateway.protocol"
    assert _private_target("worker._child") == "worker"
    assert _private_target("gateway.server") is None
    assert _private_target("zmq._future") is None


@pytest.mark.parametrize("package", FRONT_DOORS)
def test_front_door_exports_exist(package: str) -> None:
    init = ROOT / package.replace(".", "/") / "__init__.py"
    names = _declared_all(init)
    assert names is not None, f"{package}/__init__.py has no __all__: its front door is not curated"
    assert names, f"{package}.__all__ is empty"
    assert len(names) == len(set(names)), f"{package}.__all__ repeats a name"
    assert not [n for n in names if n.startswith("_")], f"{package}.__all__ exports a private name"
    module = importlib.import_module(package)
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{package}.__all__ names what {package} does not have: {missing}"


def test_no_module_is_too_long() -> None:
    sizes = sorted(
        (
            (len(path.read_text().splitlines()), str(path.relative_to(ROOT)))
            for package in (*PACKAGES, "bench")
            for path in package_files(package)
        ),
        reverse=True,
    )
    largest = ", ".join(f"{name} ({n})" for n, name in sizes[:5])
    too_long = [
        f"{name}: {n} lines"
        for n, name in sizes
        if n > HARD_MAX_MODULE_LINES
        or (n > MAX_MODULE_LINES and JUSTIFIED not in "".join((ROOT / name).read_text()[:600]))
    ]
    assert not too_long, (
        f"Modules over {MAX_MODULE_LINES} lines (STYLE.md: one concept per module, under ~400); "
        f"split them by concept:\n" + "\n".join(too_long) + f"\nThe largest: {largest}"
    )


def test_no_script_shadows_a_standard_module() -> None:
    """A script run as ``python bench/x.py`` puts its folder first on ``sys.path``: a
    ``bench/profile.py`` made ``import profile`` (torch imports ``cProfile``) find it, and
    torchrun's ranks in ``bench/train.py`` failed."""
    import sys

    scripts = [*ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("examples/*.py")]
    shadowing = [str(p.relative_to(ROOT)) for p in scripts if p.stem in sys.stdlib_module_names]
    assert not shadowing, f"rename these, they hide a standard module: {shadowing}"
