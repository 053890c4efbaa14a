"""Blender on a worker: find it, probe its version, run one render chunk, classify its failures.

Called by the worker (at start-up: ``find_blender``; per render task: ``ChunkProcess``); it knows
nothing of sockets or jobs. Everything here is synchronous: the worker runs ``ChunkProcess.run``
in a thread and may call ``ChunkProcess.cancel`` from any other thread.

- ``find_blender(path, env_value)`` -> ``BlenderInfo(path, version)``, or raises ``BlenderError``
  (kind ``BLENDER_NOT_FOUND``) saying how to fix it. Lookup order: the explicit path
  (``--blender``), the environment value the caller read (``$PILOT_BLENDER``), ``blender`` on
  ``PATH``.
- ``ChunkProcess(blender, scene, frames, outdir, options, stored=...)``: ONE Blender process for
  a chunk of frames. ``run(on_frame, on_output)`` starts it, calls ``on_frame(FrameSaved)`` as
  each frame is saved (not at the end), passes every other line of Blender's output to
  ``on_output``, and returns a ``ChunkResult`` (never raises for Blender's failures: they come
  back classified in ``ChunkResult.failure``). Frames in ``stored`` are not rendered again.
  The ``ChunkProcess`` owns the Blender process (its own process group) until ``run`` returns;
  ``cancel()`` kills the whole group (SIGTERM, then SIGKILL after ``CANCEL_GRACE_S``) and
  returns within ``CANCEL_DEADLINE_S``. On Linux Blender also dies (SIGKILL) when the thread
  that called ``run`` exits, so a task process killed mid-chunk leaves no Blender behind. The
  frame files belong to the caller.

Failures (``FailureKind``) are machine-side (retry on another worker: ``BLENDER_NOT_FOUND``,
``KILLED_OR_OOM``, ``NO_FRAME_WRITTEN``, ``CRASHED``) or code-side (rerunning cannot help:
``SCENE_MISSING``, ``SCRIPT_ERROR``, ``DENOISER_MISSING``, ``RENDER_ERROR``); see
``FailureKind.machine_side``. The driver script that runs inside Blender is
``worker/_blender_driver.py``; its stdout lines (``PILOT_FRAME <frame> <path>``...) are the
protocol between the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from worker._blender_failures import (
    OUTPUT_TAIL_LINES,
    BlenderError,
    ChunkFailure,
    FailureKind,
    classify,
    scene_problem,
)
from worker._blender_process import DRIVER_ARGS, start_blender

__all__ = [
    "BlenderError",
    "BlenderInfo",
    "ChunkFailure",
    "ChunkProcess",
    "ChunkResult",
    "FailureKind",
    "FrameSaved",
    "RenderOptions",
    "classify",
    "find_blender",
    "frame_path",
    "probe_blender",
]

PROBE_TIMEOUT_S = 30.0  # a cold start from a network disk can take seconds
PROBE_CACHE = Path.home() / ".cache" / "parallel-pilot" / "blender-versions.json"
CANCEL_GRACE_S = 1.0  # SIGTERM to SIGKILL
CANCEL_DEADLINE_S = 2.0  # cancel() returns within this
MAX_CONFIG_BYTES = 100_000  # the config travels in argv (Linux: 128 KiB per argument)
FILE_FORMATS = {"PNG": "png", "JPEG": "jpg", "OPEN_EXR": "exr"}
# What a .blend starts with: plain, gzip (Blender < 3.0) or zstd (Blender >= 3.0) compressed.
_VERSION = re.compile(r"^Blender (\d+\.\d+(?:\.\d+)?)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class BlenderInfo:
    path: str  # absolute path of the executable
    version: str  # "3.4.1"


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """How to render; ``None`` keeps what the scene says."""

    engine: str | None = None  # "CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH"
    samples: int | None = None
    resolution: tuple[int, int] | None = None  # (width, height) in pixels, at 100 %
    file_format: str = "PNG"  # a key of FILE_FORMATS
    threads: int | None = None  # render threads (the task's cpus); None: the scene's (auto)
    gpus: int = 0  # > 0: Cycles renders on that many GPUs when Blender finds them
    body: str | None = None  # Python source run in Blender before rendering (bpy, scene bound)

    def __post_init__(self) -> None:
        if self.file_format not in FILE_FORMATS:
            raise ValueError(f"file format {self.file_format!r}: use {', '.join(FILE_FORMATS)}")
        if self.resolution is not None and min(self.resolution) < 1:
            raise ValueError(f"resolution {self.resolution}: width and height must be >= 1")


@dataclasses.dataclass(frozen=True)
class FrameSaved:
    """One frame is on disk: the event ``run`` hands to ``on_frame`` as soon as it is saved."""

    frame: int
    path: Path
    elapsed_s: float  # since the chunk's Blender started


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    frames: tuple[FrameSaved, ...]  # rendered by this run, in the order saved
    skipped: tuple[int, ...]  # already stored: not rendered again
    failure: ChunkFailure | None
    cancelled: bool
    returncode: int | None  # None when Blender was not started
    elapsed_s: float  # wall time of Blender's process
    warnings: tuple[str, ...] = ()  # the driver's PILOT_WARNING lines
    warm: bool = False  # rendered by a spare Blender, started before the chunk

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.cancelled


def frame_path(outdir: str | os.PathLike[str], frame: int, file_format: str = "PNG") -> Path:
    """Where the driver saves ``frame``: ``OUTDIR/frame_000042.png``."""
    return Path(outdir) / f"frame_{frame:06d}.{FILE_FORMATS[file_format]}"


# -- finding Blender ------------------------------------------------------------------------------


def find_blender(
    path: str | os.PathLike[str] | None = None,
    env_value: str | None = None,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> BlenderInfo:
    """The Blender to use: ``path`` (``--blender``), else ``env_value`` (``$PILOT_BLENDER``,
    read by the caller), else ``blender`` on ``PATH``; probed. Raises ``BlenderError``."""
    if path is not None:
        given, where = os.fspath(path), "--blender"
    else:
        given, where = env_value or None, "$PILOT_BLENDER"
    exe = shutil.which(given or "blender")
    if exe is None and given:
        how = f"Blender not found at {given!r} (from {where}): give the path of an executable"
        raise BlenderError(FailureKind.BLENDER_NOT_FOUND, how + " `blender`")
    if exe is None:
        how = "Blender not found: install it (`apt-get install blender`, or from blender.org)"
        how += " and put `blender` on PATH, or give its path with --blender or $PILOT_BLENDER"
        raise BlenderError(FailureKind.BLENDER_NOT_FOUND, how)
    return probe_blender(exe, timeout_s=timeout_s)


def probe_blender(exe: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> BlenderInfo:
    """Run ``blender -b --factory-startup --version``; its version, or ``BlenderError``.

    A working probe is remembered (``PROBE_CACHE``, keyed by the executable's path, size and
    modification time): starting Blender takes a second or more, and a worker starts often."""
    exe = os.path.abspath(exe)
    key = _probe_key(exe)
    known = _probe_cache().get(key) if key else None
    if known:
        return BlenderInfo(path=exe, version=known)
    info = _probe(exe, timeout_s)
    if key:
        with contextlib.suppress(OSError):  # a cache that cannot be written costs a probe
            cache = {**_probe_cache(), key: info.version}
            PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = PROBE_CACHE.with_suffix(f".{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, PROBE_CACHE)
    return info


def _probe_key(exe: str) -> str:
    try:
        st = os.stat(exe)
    except OSError:
        return ""
    return f"{exe}:{st.st_size}:{st.st_mtime_ns}"


def _probe_cache() -> dict[str, str]:
    try:
        data = json.loads(PROBE_CACHE.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _probe(exe: str, timeout_s: float) -> BlenderInfo:
    found = None
    command = [exe, "-b", "--factory-startup", "--version"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    else:
        found = _VERSION.search(done.stdout) if done.returncode == 0 else None
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-OUTPUT_TAIL_LINES:])
        problem = f"it exited with {done.returncode} without naming a version:\n{tail}"
    if found is None:
        how = f"Blender at {exe} does not run: give a working one with --blender ({problem})"
        raise BlenderError(FailureKind.BLENDER_NOT_FOUND, how)
    return BlenderInfo(path=exe, version=found.group(1))


# -- one chunk ----------------------------------------------------------------------------------


class ChunkProcess:
    """One Blender process rendering a chunk of frames; see the module docstring.

    ``run`` may be called once; ``cancel`` any number of times from any thread, before, during
    or after ``run``. ``pid`` is the process (and process group) id once started.
    """

    def __init__(
        self,
        blender: BlenderInfo,
        scene: str | os.PathLike[str],
        frames: Iterable[int],
        outdir: str | os.PathLike[str],
        options: RenderOptions = RenderOptions(),  # frozen: safe to share
        *,
        stored: Iterable[int] = (),
    ) -> None:
        self.blender = blender
        self.scene = Path(scene)
        self.outdir = Path(outdir)
        self.options = options
        requested = tuple(frames)
        done = set(stored)
        self.frames = tuple(f for f in requested if f not in done)  # to render, in order
        self.skipped = tuple(f for f in requested if f in done)
        self.pid: int | None = None
        self._lock = threading.Lock()  # guards _proc and _cancelled against cancel()
        self._proc: subprocess.Popen[str] | None = None
        self._cancelled = False
        self._ran = False

    def config(self, scene: bool = False) -> str:
        """The driver's config (one JSON line); with the scene's path for a spare to open."""
        options = dataclasses.asdict(self.options)
        where = {"scene": os.path.abspath(self.scene), "cwd": os.getcwd()} if scene else {}
        config = json.dumps(
            {"frames": self.frames, "outdir": str(self.outdir.resolve()), **options, **where}
        )
        if len(config.encode()) > MAX_CONFIG_BYTES:
            raise ValueError(
                f"the render body is too long ({len(config.encode())} bytes with the config, "
                f"at most {MAX_CONFIG_BYTES}): put the code in a module shipped with the scene"
            )
        return config

    def command(self) -> list[str]:
        """Blender's command line; ``--factory-startup`` ignores the user's preferences and
        startup scripts (reproducible frames) but not the scene's own settings."""
        config = self.config()
        # Absolute (a name starting with "-" is not an option), but links not followed: a
        # shipped scene is a link into the blob cache, and its "//" paths mean its directory.
        scene = os.path.abspath(self.scene)
        return [self.blender.path, "-b", "--factory-startup", scene, *DRIVER_ARGS, "--", config]

    def run(
        self,
        on_frame: Callable[[FrameSaved], None] | None = None,
        on_output: Callable[[str], None] | None = None,
        *,
        env: dict[str, str] | None = None,
        spare: Any = None,
    ) -> ChunkResult:
        """Render the chunk; blocks until Blender exits or ``cancel()`` kills it.

        Callbacks run on this thread, in the order Blender printed; if one raises, Blender is
        killed and the exception propagates. ``env`` replaces the environment of Blender's
        process (e.g. to set ``CUDA_VISIBLE_DEVICES``). Raises ``ValueError`` (before starting
        anything) when the body is too long to pass on Blender's command line. The caller owns
        the deadline: call ``cancel()`` when the task's time is up. ``spare``: a Blender started
        ahead (``worker._blender_spare``) to render instead of a new one if still there.
        """
        if self._ran:
            raise RuntimeError("ChunkProcess.run may be called once")
        self._ran = True
        problem = None if not self.frames else scene_problem(self.scene)
        if not self.frames or problem is not None:
            return ChunkResult((), self.skipped, problem, self._cancelled, None, 0.0)
        command = self.command()
        self.outdir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._cancelled:
                return ChunkResult((), self.skipped, None, True, None, 0.0)
            started = time.monotonic()
            proc = spare.hand(self.config(scene=True)) if spare is not None else None
            try:
                proc = proc or start_blender(command, subprocess.DEVNULL, env=env)
            except OSError as exc:
                how = f"Blender at {self.blender.path} does not start ({exc}): check --blender"
                failure = ChunkFailure(FailureKind.BLENDER_NOT_FOUND, how, None)
                return ChunkResult((), self.skipped, failure, False, None, 0.0)
            self._proc = proc
            self.pid = proc.pid
        try:
            saved, lines, warnings = self._read(proc, started, on_frame, on_output)
        except BaseException:
            self.cancel()
            raise
        finally:
            assert proc.stdout is not None
            proc.stdout.close()
        returncode = proc.wait()
        _kill_group(proc.pid, signal.SIGKILL)  # what the body started and left behind, if any
        elapsed_s = time.monotonic() - started
        with self._lock:
            cancelled = self._cancelled
        failure = None
        if not cancelled:
            frames = [event.frame for event in saved]
            scene, version = str(self.scene), self.blender.version
            failure = classify(returncode, lines, self.frames, frames, scene=scene, version=version)
        warm = spare is not None and proc is spare.proc
        out = (tuple(saved), self.skipped, failure, cancelled, returncode, elapsed_s, warnings)
        return ChunkResult(*out, warm)

    def _read(
        self,
        proc: subprocess.Popen[str],
        started: float,
        on_frame: Callable[[FrameSaved], None] | None,
        on_output: Callable[[str], None] | None,
    ) -> tuple[list[FrameSaved], list[str], tuple[str, ...]]:
        """Blender's output line by line until it closes: frames, all lines, warnings."""
        assert proc.stdout is not None
        saved: list[FrameSaved] = []
        lines: list[str] = []
        warnings: list[str] = []
        for raw in proc.stdout:
            line = raw.rstrip("\r\n")
            if line.startswith("PILOT_FRAME "):
                _, number, path = line.split(" ", 2)
                event = FrameSaved(int(number), Path(path), time.monotonic() - started)
                saved.append(event)
                if on_frame is not None:
                    on_frame(event)
                continue
            if not line.startswith("Fra:"):  # per-sample progress: passed on, not kept
                lines.append(line)
            if line.startswith("PILOT_WARNING "):
                warnings.append(line.removeprefix("PILOT_WARNING "))
                line = "Warning: " + warnings[-1]
            if on_output is not None:
                on_output(line)
        return saved, lines, tuple(warnings)

    def cancel(self) -> None:
        """Kill Blender's process group: SIGTERM, SIGKILL after ``CANCEL_GRACE_S``; returns
        within ``CANCEL_DEADLINE_S``. ``run`` then returns a result with ``cancelled`` set."""
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is None:
            return
        deadline = time.monotonic() + CANCEL_DEADLINE_S
        _kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # it ignored SIGTERM: SIGKILL
            proc.wait(timeout=CANCEL_GRACE_S)
        # Even when Blender left on SIGTERM, what it started may still be in its group.
        _kill_group(proc.pid, signal.SIGKILL)
        # Past the deadline it is stuck in the kernel, unkillable: run() reaps it when it goes.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pgid, sig)
