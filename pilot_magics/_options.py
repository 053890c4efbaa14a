"""``%%distribute`` options: parsed from the magic's line into a frozen ``DistributeOptions``.

Users type expressions with spaces and no quotes (``--over frame=range(1, 1201)``), so a value
runs until the next known ``--option``, not until the next space. Bad values raise IPython's
``UsageError`` saying what is allowed.

A cell is one of three kinds: a map (``--over``, ``--partitions``, or neither: the cell runs
once), training (``--ddp N``: its options in ``DistributeOptions.train``) or rendering
(``--render FILE``: ``DistributeOptions.render``). Each kind takes the options listed in
``KIND_OPTIONS``; any other option, or a kind's own option without the kind, is a
``UsageError`` that names what the kind takes.
"""

from __future__ import annotations

import ast
import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError

__all__ = ["DistributeOptions", "RenderOptions", "TrainOptions", "parse_options"]

FLAGS = {"quiet", "retry-errors", "missing-only"}
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
    # training (--ddp N)
    "ddp",
    "restarts",
    "min-ranks",
    "checkpoint",
    "backend",
    "init-timeout",
    "rank-output",
    # rendering (--render FILE)
    "render",
    "frames",
    "video",
    "fps",
    "engine",
    "samples",
    "resolution",
    "format",
}
REPEATABLE = {"data", "ship"}

COMMON = {"gather", "async", "cpus", "gpus", "tags", "timeout", "quiet"}
TRAIN_ONLY = {"restarts", "min-ranks", "checkpoint", "backend", "init-timeout", "rank-output"}
RENDER_ONLY = {"frames", "video", "fps", "engine", "samples", "resolution", "format"}
RENDER_ONLY |= {"missing-only"}
# The options each kind of cell takes (the key option itself included).
KIND_OPTIONS = {
    "ddp": COMMON | TRAIN_ONLY | {"ddp"},
    "render": COMMON | RENDER_ONLY | {"render", "chunk", "ship", "results", "retries"},
}
WHY = {"ddp": "every rank runs the whole cell", "render": "Blender renders the frames"}
BACKENDS = ("auto", "gloo", "nccl")
ENGINES = {"cycles": "CYCLES", "eevee": "BLENDER_EEVEE", "workbench": "BLENDER_WORKBENCH"}
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "JPG": "JPEG", "OPEN_EXR": "OPEN_EXR", "EXR": "OPEN_EXR"}
_FRAME_ITEM = re.compile(r"^\d+(?:-\d+(?:x\d+)?)?$")  # N, START-END, START-ENDxSTEP


@dataclass(frozen=True)
class TrainOptions:
    """``--ddp N`` and its options: what ``Client.train`` takes, and which rank's lines show."""

    ranks: int
    restarts: int = 0
    min_ranks: int = 0  # 0: a restart never shrinks the world
    checkpoint: str = ""  # "": the gateway keeps the checkpoints
    backend: str = "auto"
    init_timeout: float = 60.0
    rank_output: int | None = None  # None: every rank's stdout/stderr


@dataclass(frozen=True)
class RenderOptions:
    """``--render FILE`` and its options: what ``Client.render`` takes. ``frames`` is the spec
    as typed (``1-240x2``); the client reads it. Empty with ``missing_only``: the frames are
    those missing from the last render of the scene."""

    scene: str
    frames: str = ""
    video: str = ""
    fps: float = 24.0
    engine: str = ""
    samples: int = 0  # 0: the scene's
    resolution: tuple[int, int] | None = None
    file_format: str = "PNG"
    missing_only: bool = False


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
    train: TrainOptions | None = None  # a --ddp N cell
    render: RenderOptions | None = None  # a --render FILE cell
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


def _seconds(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--{option} needs seconds (got {text!r}).") from None
    if value <= 0:
        raise UsageError(f"--{option} must be more than 0 seconds.")
    return value


def _check_kind(t: dict[str, list[str]]) -> str | None:
    """The cell's kind ("ddp", "render" or None for a map), after checking that every option
    given belongs to it."""
    kinds = [k for k in KIND_OPTIONS if k in t]
    if len(kinds) > 1:
        raise UsageError("Use --ddp or --render, not both: a cell trains or renders.")
    kind = kinds[0] if kinds else None
    if kind is None:
        for option, needs in ((TRAIN_ONLY, "--ddp N"), (RENDER_ONLY, "--render FILE")):
            if stray := sorted(option & t.keys()):
                raise UsageError(f"--{stray[0]} is an option of {needs} cells; add {needs}.")
        return None
    allowed = KIND_OPTIONS[kind]
    if stray := sorted(t.keys() - allowed):
        takes = ", ".join(f"--{o}" for o in sorted(allowed - {kind}))
        raise UsageError(
            f"--{stray[0]} makes no sense with --{kind} ({WHY[kind]}): --{kind} takes {takes}."
        )
    return kind


def parse_options(line: str) -> DistributeOptions:
    """Parse the text after ``%%distribute``. Raises ``UsageError``."""
    t = _tokens(line)
    kind = _check_kind(t)

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
    if "chunk" in opts and "over" not in opts and kind != "render":
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
        opts["timeout"] = _seconds("timeout", v)
    if (v := one("retries")) is not None:
        opts["retries"] = _int("retries", v, 0)
    for option in ("until", "where"):
        if (v := one(option)) is not None:
            if "over" not in opts and "partitions" not in opts:
                raise UsageError(f"--{option} filters the results of --over or --partitions.")
            opts[option] = _expression(option, v)
    opts["quiet"] = "quiet" in t
    opts["retry_errors"] = "retry-errors" in t
    if kind == "ddp":
        opts["train"] = _train_options(one)
    elif kind == "render":
        opts["render"] = _render_options(one, missing_only="missing-only" in t)
    return DistributeOptions(**opts)  # type: ignore[arg-type]


def _train_options(one: Callable[[str], str | None]) -> TrainOptions:
    ranks = _int("ddp", one("ddp") or "", 1)
    opts: dict[str, Any] = {"ranks": ranks}
    if (v := one("restarts")) is not None:
        opts["restarts"] = _int("restarts", v, 0)
    if (v := one("min-ranks")) is not None:
        opts["min_ranks"] = _int("min-ranks", v, 1)
        if opts["min_ranks"] > ranks:
            raise UsageError(f"--min-ranks {v} is more than the --ddp {ranks} ranks.")
        if not opts.get("restarts"):
            raise UsageError("--min-ranks sets how far a restart may shrink: give --restarts R.")
    if (v := one("checkpoint")) is not None:
        if not v or " " in v:
            raise UsageError(f"--checkpoint needs a URL or path (got {v!r}).")
        opts["checkpoint"] = v
    if (v := one("backend")) is not None:
        if v not in BACKENDS:
            raise UsageError(f"--backend is one of {', '.join(BACKENDS)} (got {v!r}).")
        opts["backend"] = v
    if (v := one("init-timeout")) is not None:
        opts["init_timeout"] = _seconds("init-timeout", v)
    if (v := one("rank-output")) is not None and v != "all":
        rank = _int("rank-output", v, 0)
        if rank >= ranks:
            raise UsageError(f"--rank-output {rank}: ranks go from 0 to {ranks - 1}.")
        opts["rank_output"] = rank
    return TrainOptions(**opts)


def _render_options(one: Callable[[str], str | None], *, missing_only: bool) -> RenderOptions:
    scene = one("render") or ""
    if not scene:
        raise UsageError("--render needs the .blend file to render.")
    opts: dict[str, Any] = {"scene": scene, "missing_only": missing_only}
    frames = (one("frames") or "").replace(" ", "")
    if missing_only and frames:
        raise UsageError(
            "--missing-only renders the frames missing from the last render of the scene: "
            "drop --frames."
        )
    if not missing_only:
        if not frames:
            raise UsageError("--render needs --frames, e.g. --frames 1-240 or 1-240x2 or 1,5,9.")
        if not all(_FRAME_ITEM.match(item) for item in frames.split(",")):
            raise UsageError(
                f"--frames {frames!r}: write frames as N, START-END or START-ENDxSTEP, "
                "separated by commas (e.g. 1,5,10-20,100-200x10)."
            )
    opts["frames"] = frames
    fmt = FORMATS.get((one("format") or "PNG").upper())
    if fmt is None:
        raise UsageError(f"--format is PNG, JPEG or OPEN_EXR (got {one('format')!r}).")
    opts["file_format"] = fmt
    if (v := one("video")) is not None:
        if not v:
            raise UsageError("--video needs the path of the MP4 to write.")
        if fmt == "OPEN_EXR":
            raise UsageError("--video needs PNG or JPEG frames: drop --format OPEN_EXR.")
        opts["video"] = v
    if (v := one("fps")) is not None:
        try:
            opts["fps"] = float(v)
        except ValueError:
            raise UsageError(f"--fps needs frames per second (got {v!r}).") from None
        if opts["fps"] <= 0:
            raise UsageError("--fps must be more than 0.")
    if (v := one("engine")) is not None:
        engine = ENGINES.get(v.lower(), v.upper())
        if not re.fullmatch(r"[A-Z][A-Z_]*", engine):
            raise UsageError(
                f"--engine is CYCLES, BLENDER_EEVEE, BLENDER_WORKBENCH... (got {v!r})."
            )
        opts["engine"] = engine
    if (v := one("samples")) is not None:
        opts["samples"] = _int("samples", v, 1)
    if (v := one("resolution")) is not None:
        found = re.fullmatch(r"(\d+)[xX](\d+)", v.replace(" ", ""))
        if found is None or 0 in (int(found[1]), int(found[2])):
            raise UsageError(
                f"--resolution needs WIDTHxHEIGHT in pixels, e.g. 1920x1080 (got {v!r})."
            )
        opts["resolution"] = (int(found[1]), int(found[2]))
    return RenderOptions(**opts)
