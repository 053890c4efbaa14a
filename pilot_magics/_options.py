"""``%%distribute`` options: parsed from the magic's line into a frozen ``DistributeOptions``.

Users type expressions with spaces and no quotes (``--over frame=range(1, 1201)``), so a value
runs until the next known ``--option``, not until the next space. Bad values raise IPython's
``UsageError`` saying what is allowed.
"""

from __future__ import annotations

import ast
import keyword
from dataclasses import dataclass, field

from IPython.core.error import UsageError

__all__ = ["DistributeOptions", "parse_options"]

FLAGS = {"quiet", "retry-errors"}
VALUED = {
    "over",
    "chunk",
    "partitions",
    "gather",
    "async",
    "data",
    "data-mode",
    "ship",
    "results",
    "cpus",
    "gpus",
    "tags",
    "timeout",
    "retries",
    "until",
    "where",
}
REPEATABLE = {"data", "ship"}


@dataclass(frozen=True)
class DistributeOptions:
    over: tuple[str, str] | None = None  # (name, expression)
    chunk: int | None = None
    partitions: int | None = None
    gather: str | None = None
    async_var: str | None = None
    data: tuple[tuple[str, str], ...] = ()
    data_mode: str = "local"
    ship: tuple[str, ...] = ()
    results: str | None = None
    cpus: int = 1
    gpus: int = 0
    tags: tuple[str, ...] = ()
    timeout: float | None = None
    retries: int | None = None
    retry_errors: bool = False  # retry tasks whose code raised too, not only machine faults
    until: str | None = None
    where: str | None = None
    quiet: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _tokens(line: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current: str | None = None
    for word in line.split():
        name = word[2:] if word.startswith("--") else None
        if name is not None and "=" in name and name.split("=", 1)[0] in VALUED | FLAGS:
            name, first = name.split("=", 1)  # --chunk=40
        else:
            first = None
        if name is not None and (name in VALUED or name in FLAGS):
            if name in found and name not in REPEATABLE:
                raise UsageError(f"--{name} is given twice.")
            found.setdefault(name, []).append("" if first is None else first)
            current = name
            continue
        if name is not None:
            known = ", ".join(f"--{o}" for o in sorted(VALUED | FLAGS))
            raise UsageError(f"Unknown option --{name}. %%distribute takes: {known}.")
        if current is None:
            raise UsageError(f"Unexpected {word!r}: options start with --.")
        found[current][-1] = (found[current][-1] + " " + word).strip()
    return found


def _identifier(option: str, text: str) -> str:
    if not text.isidentifier() or keyword.iskeyword(text):
        raise UsageError(f"--{option} needs a Python variable name (got {text!r}).")
    return text


def _int(option: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--{option} needs a whole number (got {text!r}).") from None
    if value < minimum:
        raise UsageError(f"--{option} must be at least {minimum} (got {value}).")
    return value


def _expression(option: str, text: str) -> str:
    if not text:
        raise UsageError(f"--{option} needs an expression.")
    try:
        ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise UsageError(f"--{option} {text!r} is not a Python expression: {exc.msg}.") from None
    return text


def _assignment(option: str, text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not value.strip():
        raise UsageError(f"--{option} needs NAME={what} (got {text!r}).")
    return _identifier(option, name.strip()), value.strip()


def parse_options(line: str) -> DistributeOptions:
    """Parse the text after ``%%distribute``. Raises ``UsageError``."""
    t = _tokens(line)

    def one(name: str) -> str | None:
        values = t.get(name)
        return values[0] if values else None

    opts: dict[str, object] = {}
    if (v := one("over")) is not None:
        name, expr = _assignment("over", v, "EXPR")
        opts["over"] = (name, _expression("over", expr))
    if (v := one("chunk")) is not None:
        opts["chunk"] = _int("chunk", v, 1)
    if (v := one("partitions")) is not None:
        opts["partitions"] = _int("partitions", v, 1)
    if "over" in opts and "partitions" in opts:
        raise UsageError("Use --over or --partitions, not both.")
    if "chunk" in opts and "over" not in opts:
        raise UsageError("--chunk groups the items of --over; give --over NAME=EXPR too.")
    for key, option in (("gather", "gather"), ("async_var", "async")):
        if (v := one(option)) is not None:
            opts[key] = _identifier(option, v)
    if "gather" in opts and "async_var" in opts:
        raise UsageError("--async binds the job; --gather waits for it: pick one.")
    opts["data"] = tuple(_assignment("data", v, "URL") for v in t.get("data", []))
    if (v := one("data-mode")) is not None:
        if v not in ("local", "open"):
            raise UsageError(f"--data-mode is 'local' or 'open' (got {v!r}).")
        opts["data_mode"] = v
    opts["ship"] = tuple(v for v in t.get("ship", []) if v)
    if (v := one("results")) is not None:
        opts["results"] = v
    if (v := one("cpus")) is not None:
        opts["cpus"] = _int("cpus", v, 1)
    if (v := one("gpus")) is not None:
        opts["gpus"] = _int("gpus", v, 0)
    if (v := one("tags")) is not None:
        opts["tags"] = tuple(x.strip() for x in v.split(",") if x.strip())
    if (v := one("timeout")) is not None:
        try:
            timeout = float(v)
        except ValueError:
            raise UsageError(f"--timeout needs seconds (got {v!r}).") from None
        if timeout <= 0:
            raise UsageError("--timeout must be more than 0 seconds.")
        opts["timeout"] = timeout
    if (v := one("retries")) is not None:
        opts["retries"] = _int("retries", v, 0)
    for option in ("until", "where"):
        if (v := one(option)) is not None:
            if "over" not in opts and "partitions" not in opts:
                raise UsageError(f"--{option} filters the results of --over or --partitions.")
            opts[option] = _expression(option, v)
    opts["quiet"] = "quiet" in t
    opts["retry_errors"] = "retry-errors" in t
    return DistributeOptions(**opts)  # type: ignore[arg-type]
