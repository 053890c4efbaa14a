"""``docs/protocol.md`` against the code, so the page cannot drift from it.

The page is read as the person writing another client would read it, table by table:

- "Who handles what": every message of ``MESSAGE_TYPES`` has a row; the rows into the gateway
  are exactly what its codecs accept (``FROM_CLIENT``, ``FROM_WORKER``); every function a row
  names lives on the receiving side, imports, and names the message's class in a ``case``, an
  ``isinstance`` or a parameter's type (read from its source with ``ast``, so a comment or a
  docstring does not count);
- the record codes are the positions in ``RECORD_TYPES``;
- every field table lists the dataclass's fields in declaration (wire) order;
- every enum table lists the ``IntEnum``'s values and names, in order, and the ``ErrorCode``
  table the exception ``ERRORS`` maps each code to;
- every source file the page names exists.

Nothing here starts a process or opens a socket.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from gateway.protocol import (
    ERRORS,
    FROM_CLIENT,
    FROM_WORKER,
    MESSAGE_TYPES,
    RECORD_TYPES,
    ErrorCode,
    JobKind,
    OutputKind,
    Status,
    TaskStatus,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"
TEXT = DOC.read_text()

# Which modules hold each side's handlers; the worker's own modules exclude those of the
# task and session processes, which are sides of their own.
TASK_PROCESS = ("worker._child", "worker._loader")
SIDES: dict[str, Callable[[str], bool]] = {
    "client": lambda m: m.startswith("gateway.client."),
    "gateway": lambda m: m.startswith("gateway.server."),
    "worker": lambda m: m.startswith("worker.") and m not in (*TASK_PROCESS, "worker._session"),
    "task process": lambda m: m in TASK_PROCESS,
    "session process": lambda m: m == "worker._session",
}
ENUMS: tuple[type[enum.IntEnum], ...] = (Status, TaskStatus, JobKind, OutputKind, ErrorCode)
CLASSES = {cls.__name__: cls for cls in (*RECORD_TYPES, *MESSAGE_TYPES)}


# -- reading the page ---------------------------------------------------------------------


def section(heading: str, text: str = TEXT) -> str:
    """The text under the ``##``/``###`` heading ``heading``, up to the next heading of the
    same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert match, f"docs/protocol.md has no section {heading!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def tables(text: str) -> Iterator[list[list[str]]]:
    """Each markdown table in ``text``: its rows (the header first, the ``---`` row left out),
    each a list of cells with ``\\|`` unescaped."""
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            yield rows
            rows = []


def spans(cell: str) -> list[str]:
    """The inline code spans of a cell."""
    return re.findall(r"`([^`]+)`", cell)


def table_after(lead: str, text: str = TEXT) -> list[list[str]]:
    """The first table after the paragraph that starts with ``lead``."""
    match = re.search(rf"^\s*{re.escape(lead)}", text, re.M)
    assert match, f"docs/protocol.md has no paragraph starting with {lead}"
    return next(tables(text[match.end() :]))


class Row(NamedTuple):
    message: str
    sender: str
    receiver: str
    handlers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.message}: {self.sender} -> {self.receiver}"


def handler_rows() -> list[Row]:
    found = [
        t
        for t in tables(section("Who handles what"))
        if t[0] == ["message", "from → to", "handled by"]
    ]
    assert len(found) == 1, "'Who handles what' must hold one table: message | from → to | ..."
    rows = []
    for message, direction, handled_by in found[0][1:]:
        (name,) = spans(message)
        sender, receiver = (side.strip() for side in direction.split("→"))
        rows.append(Row(name, sender, receiver, tuple(spans(handled_by))))
    return rows


ROWS = handler_rows()


def field_rows() -> list[tuple[str, list[str]]]:
    """(class name, field names) of every row of a ``record | fields`` or ``message | fields``
    table."""
    out = []
    for table in tables(TEXT):
        if table[0][:2] not in (["record", "fields"], ["message", "fields"]):
            continue
        for row in table[1:]:
            (name,) = spans(row[0])
            names = []
            for span in spans(row[1]):
                match = re.fullmatch(r"([a-z_][a-z0-9_]*)\s*(?::.*|=.*)?", span)
                assert match, f"{name}: {span!r} is not a field (`name: type = default`)"
                names.append(match.group(1))
            out.append((name, names))
    return out


FIELD_ROWS = field_rows()


# -- reading the code ---------------------------------------------------------------------


def resolve(dotted: str) -> tuple[str, Any]:
    """(module name, object) for a dotted name: the longest importable prefix, then
    attributes."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # no module by that name: the rest are attributes
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return module_name, obj
    raise LookupError(f"{dotted}: no module of ours")


def types_handled(source: str) -> set[str]:
    """Class names a function's ``source`` dispatches on: ``case`` patterns, ``isinstance``
    checks (one type, a tuple or a union) and its parameters' types."""
    tree = ast.parse(textwrap.dedent(source))
    found: set[str] = set()

    def names(node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                found.add(sub.id)
            elif isinstance(sub, ast.Attribute):
                found.add(sub.attr)
            elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                names(ast.parse(sub.value, mode="eval"))  # a quoted annotation

    for node in ast.walk(tree):
        if isinstance(node, ast.MatchClass):
            names(node.cls)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "isinstance"
            and len(node.args) == 2
        ):
            names(node.args[1])
        elif isinstance(node, ast.arg) and node.annotation is not None:
            names(node.annotation)
    return found


# -- who handles what ---------------------------------------------------------------------


def test_every_message_type_has_a_row_in_the_handler_table() -> None:
    missing = {cls.__name__ for cls in MESSAGE_TYPES} - {r.message for r in ROWS}
    assert not missing, f"messages without a row in 'Who handles what': {sorted(missing)}"


def test_the_handler_table_names_only_protocol_messages_and_known_sides() -> None:
    names = {cls.__name__ for cls in MESSAGE_TYPES}
    for row in ROWS:
        assert row.message in names, f"{row}: not in MESSAGE_TYPES"
        assert row.sender in SIDES and row.receiver in SIDES, f"{row}: sides are {list(SIDES)}"
    rows = [(r.message, r.sender, r.receiver) for r in ROWS]
    assert len(rows) == len(set(rows)), "a message and direction has two rows"


@pytest.mark.parametrize(
    ("sender", "accepted"),
    [("client", FROM_CLIENT), ("worker", FROM_WORKER)],
    ids=["FROM_CLIENT", "FROM_WORKER"],
)
def test_the_rows_into_the_gateway_are_exactly_what_its_codecs_accept(
    sender: str, accepted: tuple[type, ...]
) -> None:
    documented = {r.message for r in ROWS if (r.sender, r.receiver) == (sender, "gateway")}
    assert documented == {cls.__name__ for cls in accepted}


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_each_message_is_handled_on_its_receiving_side_by_the_functions_named(row: Row) -> None:
    assert row.handlers, (
        f"the {row.receiver} has no handler for {row.message} (the page says none): one it "
        "receives is dropped. Handle it there, then name the handler on the page."
    )
    for dotted in row.handlers:
        module, fn = resolve(dotted)
        assert SIDES[row.receiver](module), f"{dotted} is not on the {row.receiver}'s side"
        assert inspect.isfunction(fn), f"{dotted} is not a function or method"
        found = types_handled(inspect.getsource(fn))
        assert row.message in found, (
            f"{dotted} names no {row.message} in a case, an isinstance or a parameter's type "
            f"(it names {sorted(found)})"
        )


def test_the_type_reader_sees_cases_isinstance_and_parameters_only() -> None:
    """The checker itself: a docstring, a comment or a call does not count as handling."""
    source = """
    def sample(self, msg: Alpha | Beta, other: "Kappa") -> None:
        \"\"\"Gamma is only mentioned here.\"\"\"
        match msg:
            case Delta() | Epsilon(x=1):  # Lambda
                pass
        if isinstance(msg, Zeta | Eta) or isinstance(msg, (Theta, module.Mu)):
            Iota(msg)
    """
    found = types_handled(source)
    assert {"Alpha", "Beta", "Kappa", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Mu"} <= found
    assert not {"Gamma", "Iota", "Lambda"} & found


# -- records, fields, enums ---------------------------------------------------------------


def test_the_record_codes_are_the_positions_in_record_types() -> None:
    table = table_after("Record codes are positions in `RECORD_TYPES`")
    assert table[0] == ["code", "record", "code", "record"]
    codes = []
    for row in table[1:]:
        for code, name in zip(row[::2], row[1::2], strict=True):
            if code:
                codes.append((int(code), spans(name)[0]))
    assert sorted(codes) == [(i, cls.__name__) for i, cls in enumerate(RECORD_TYPES)]


def test_every_message_and_record_has_its_fields_written_down() -> None:
    missing = set(CLASSES) - {name for name, _ in FIELD_ROWS}
    assert not missing, f"no field table row for {sorted(missing)}"


@pytest.mark.parametrize(("name", "fields"), FIELD_ROWS, ids=[n for n, _ in FIELD_ROWS])
def test_each_field_list_is_the_dataclass_in_wire_order(name: str, fields: list[str]) -> None:
    assert name in CLASSES, f"{name} is neither a message nor a record"
    assert fields == [f.name for f in dataclasses.fields(CLASSES[name])]


@pytest.mark.parametrize("enum_cls", ENUMS, ids=lambda e: e.__name__)
def test_each_enum_table_lists_the_values_and_names_in_order(
    enum_cls: type[enum.IntEnum],
) -> None:
    table = table_after(f"`{enum_cls.__name__}` (", section("Records"))
    assert table[0][:2] == ["value", "name"]
    documented = [(int(row[0]), spans(row[1])[0]) for row in table[1:]]
    assert documented == [(m.value, m.name) for m in enum_cls]


def test_the_error_code_table_names_the_exception_each_code_becomes() -> None:
    table = table_after("`ErrorCode` (", section("Records"))
    assert table[0][:3] == ["value", "name", "exception"]
    documented = {spans(row[1])[0]: spans(row[2])[0] for row in table[1:]}
    assert documented == {code.name: cls.__name__ for code, cls in ERRORS.items()}


def test_every_source_file_the_page_names_exists() -> None:
    named = set(re.findall(r"`((?:gateway|worker|pilot\w*|tests|docs)/[\w/]+\.(?:py|md))`", TEXT))
    assert named, "the page names no source file: the pattern is wrong"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"docs/protocol.md names files that are not there: {missing}"
