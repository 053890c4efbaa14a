"""The two files between a worker and one of its rank processes: the call in, the outcome out.

The worker writes the **call file** (``write_call``) from what the gateway sent, without
unpickling anything of the user's: the function's blob and the task's argument payload, each as
pickle data plus its out-of-band buffers, in a plain pickle of bytes. The rank loads it
(``load_call``) into ``(fn, args, kwargs)``. A call file holding ``cloudpickle.dumps((fn,
args, kwargs))`` loads too (what the building-block tests write by hand).

The rank writes the **outcome file** (``write_outcome``) once, when it ends: its value pickled
as a ``Payload`` would be (``gateway.protocol.dumps``: pickle protocol 5, large buffers
out-of-band, so tensors come back intact and are never copied into the stream), or its error
with the traceback. Written to a temporary name and renamed: the file is absent or complete.
Everything in it but the value and the exception object is plain data, so the worker reads it
(``read_raw_outcome``) without unpickling a user object: the worker never imports torch, and
never runs the user's classes. ``read_outcome`` loads all of it (tests, tools).
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "RankOutcome",
    "RawOutcome",
    "load_call",
    "read_outcome",
    "read_raw_outcome",
    "write_call",
    "write_outcome",
]

_PROTOCOL = 5


class _PayloadLike(Protocol):
    data: bytes | memoryview
    buffers: Sequence[Any]


@dataclass(frozen=True)
class RankOutcome:
    """What one rank left in its outcome file, loaded: ``value`` when ``ok``, else ``error``
    (the exception when it unpickles here, else ``None``) with ``error_text`` and
    ``traceback``."""

    rank: int
    ok: bool
    value: Any = None
    error: BaseException | None = None
    error_text: str = ""
    traceback: str = ""


@dataclass(frozen=True)
class RawOutcome:
    """An outcome file as the worker reads it: the value still pickled (``value`` and
    ``buffers``, a ``Payload``'s parts), the error as text only. ``missing_ranks``: a
    rendezvous timeout's ranks that never joined."""

    rank: int
    ok: bool
    value: bytes = b""
    buffers: tuple[bytes, ...] = ()
    error_text: str = ""
    traceback: str = ""
    missing_ranks: tuple[int, ...] = ()


def _parts(payload: _PayloadLike) -> tuple[bytes, list[bytes]]:
    return bytes(payload.data), [bytes(memoryview(b)) for b in payload.buffers]


def write_call(path: str | Path, fn: _PayloadLike, args: _PayloadLike) -> None:
    """Write a call file from the function's blob and the ``(args, kwargs)`` payload."""
    record = {"fn": _parts(fn), "args": _parts(args)}
    Path(path).write_bytes(pickle.dumps(record, protocol=_PROTOCOL))


def load_call(path: str | Path) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """``(fn, args, kwargs)`` from a call file (in the rank: this unpickles the user's code)."""
    import cloudpickle  # noqa: F401  (functions pickled by value need it importable)

    with open(path, "rb") as f:
        record = pickle.load(f)
    if isinstance(record, dict):
        data, buffers = record["fn"]
        fn = pickle.loads(data, buffers=buffers)
        data, buffers = record["args"]
        args, kwargs = pickle.loads(data, buffers=buffers)
    else:
        fn, args, kwargs = record
    return fn, tuple(args), dict(kwargs)


def write_outcome(
    path: str | Path,
    *,
    rank: int,
    value: Any = None,
    error: BaseException | None = None,
    error_text: str = "",
    traceback_text: str = "",
) -> None:
    """Write the rank's outcome: ``value`` when ``error`` is None, else the error. A value
    that cannot be pickled becomes an error that says so; so does an exception that cannot
    be pickled (its text and traceback still travel)."""
    import cloudpickle

    record: dict[str, Any] = {
        "rank": rank,
        "ok": error is None,
        "value": b"",
        "buffers": [],
        "error": b"",
        "error_text": error_text,
        "traceback": traceback_text,
        "missing_ranks": tuple(getattr(error, "missing_ranks", ())),
    }
    if error is None:
        from gateway.protocol import dumps

        try:
            record["value"], record["buffers"] = _parts(dumps(value, what=f"rank {rank}'s result"))
        except Exception as exc:
            record.update(ok=False, error_text=str(exc), traceback=traceback.format_exc())
    else:
        try:
            record["error"] = cloudpickle.dumps(error, protocol=_PROTOCOL)
        except Exception:  # the text and traceback are enough to read it
            record["error"] = b""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(pickle.dumps(record, protocol=_PROTOCOL))
    os.replace(tmp, path)


def _record(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)


def read_raw_outcome(path: str | Path) -> RawOutcome:
    """The outcome file at ``path``, the value left pickled (see the module docstring).
    Raises ``FileNotFoundError`` when the rank died before writing one (killed, crashed)."""
    r = _record(path)
    return RawOutcome(
        rank=r["rank"],
        ok=r["ok"],
        value=r["value"],
        buffers=tuple(r["buffers"]),
        error_text=r["error_text"],
        traceback=r["traceback"],
        missing_ranks=tuple(r["missing_ranks"]),
    )


def read_outcome(path: str | Path) -> RankOutcome:
    """The outcome file at ``path``, loaded (the value unpickled, the exception too when it
    can be). Raises ``FileNotFoundError`` when the rank died before writing one."""
    r = _record(path)
    value = pickle.loads(r["value"], buffers=r["buffers"]) if r["ok"] else None
    error = None
    if r["error"]:
        try:
            error = pickle.loads(r["error"])
        except Exception:  # a class that does not exist here: the text tells it
            error = None
    return RankOutcome(
        rank=r["rank"],
        ok=r["ok"],
        value=value,
        error=error,
        error_text=r["error_text"],
        traceback=r["traceback"],
    )
