"""``CellFunction``: a cell run once per item, in a fresh namespace each, or, for a cell of one
expression that cannot tell, as a function of the item (``_compiled``). Both ways give the
same results and the same tracebacks."""

from __future__ import annotations

import pickle
import traceback

import pytest

from gateway.protocol import CellFunction


def cell(source: str, **kw) -> CellFunction:
    return CellFunction(source, "<cell-7>", **kw)


@pytest.mark.parametrize(
    "source",
    [
        "x * 2 + offset",
        "[x + i for i in range(3)]",
        "(lambda: x)() + math.floor(2.5)",
        "{'item': x, 'name': __name__}",
    ],
)
def test_a_one_expression_cell_runs_as_a_function_of_its_item(source: str) -> None:
    import math

    f = cell(source, values={"offset": 10}, modules={"math": "math"}, bind=("x",))
    env = {"x": 5, "offset": 10, "math": math, "__name__": "__pilot_cell__"}
    assert f(5) == eval(source, env)
    assert callable(f._fast), "the fast way was not taken"
    assert [f(i) for i in range(3)] == [eval(source, {**env, "x": i}) for i in range(3)]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("(y := x * 2) + y", 12),  # := would bind in the function, not the namespace
        ("sorted(globals()).count('x')", 1),  # reads the namespace the item runs in
        ("eval('x + 1')", 4),
        ("'x' in dir()", True),
        ("y = x + 1\ny * 2", 8),  # two statements
        ("y = x", None),  # no expression at the end: no result
    ],
)
def test_a_cell_that_could_tell_runs_in_a_namespace_of_its_own(source, expected) -> None:
    f = cell(source, bind=("x",))
    assert f(3) == expected
    assert f._fast is False
    assert f(3) == expected  # and again: nothing left over from the first item


def test_items_never_see_each_others_names() -> None:
    f = cell("seen = globals().get('mine')\nmine = x\nseen", bind=("x",))
    assert [f(i) for i in range(3)] == [None, None, None]


def test_datasets_bound_per_item_take_the_namespace_way() -> None:
    f = cell("x + len(files)", bind=("x",))
    assert f(1, files=["a", "b"]) == 3
    assert f(2, files=["a"]) == 3


def test_a_cell_without_a_bound_name_gets_its_item_unseen() -> None:
    f = cell("partitions * 2", constants={"partitions": 4})
    assert f(0) == 8 and callable(f._fast)


@pytest.mark.parametrize("source", ["1 + x / 0", "y = 1\n1 + x / 0"])
def test_a_failing_cell_shows_its_own_line_either_way(source: str) -> None:
    f = cell(source, bind=("x",))
    with pytest.raises(ZeroDivisionError) as info:
        f(1)
    frame = traceback.extract_tb(info.tb)[-1]
    assert (frame.filename, frame.name) == ("<cell-7>", "<module>")
    assert frame.lineno == source.count("\n") + 1
    assert frame.line == "1 + x / 0"


def test_the_fast_way_is_made_again_where_the_cell_is_unpickled() -> None:
    f = cell("x + 1", bind=("x",))
    assert f(1) == 2 and callable(f._fast)
    g = pickle.loads(pickle.dumps(f))
    assert g._fast is None and g._base is None
    assert g(2) == 3 and callable(g._fast)
