"""A render task in its task process: one Blender process for the task's chunk of frames, each
frame stored and announced the moment Blender saves it.

Called by the task process (``worker._child``) for an ``Assignment`` of kind ``JobKind.RENDER``,
inside the task's files context (the working directory holds the shipped scene under
``RenderSpec.scene``). ``render_task(a, blender, capture=..., put=...)`` returns the task's
``TaskResult``; the render's own failures come back in it, never raised:

- the chunk's frames are ``loads(a.args)``, less ``a.skip`` (stored by an earlier attempt).
  Blender (``worker._blender.ChunkProcess``) renders them with the task's cpus as threads, its
  GPUs for Cycles and the job's ``RenderSpec`` (zero values keep the scene's settings), into a
  directory of the task's own under the working directory, removed at the end;
- each frame saved is stored at once, in the gateway's blob store (``put``: a ``PutBlob`` the
  worker forwards at once) or at ``{results_url}/frame_000001.png`` (any fsspec URL), then
  announced by an ``Output`` of kind FRAME carrying a ``FrameDone`` (its ``FileRef``, a PNG
  thumbnail for the live preview, the Blender version), sent at once (``Capture.send``), not at
  the next flush nor at the end of the chunk;
- Blender's other lines are the task's STDOUT, except the per-step ``Fra:`` progress lines:
  only each frame's ``Finished`` line is kept;
- the value is the tuple of the chunk's frames now stored (rendered or skipped), in order.

Failures: a code-side ``FailureKind`` (script error, scene missing, denoiser missing, render
error) is ``TaskStatus.ERROR`` with the message and Blender's traceback (the gateway retries by
cause: never this); a machine-side one (killed or out of memory, crashed, no frame written, no
Blender) is ``CRASHED``, retried on another worker, which skips the frames stored.

A task process's first chunk starts Blender; each later one takes the spare Blender started
when the one before ended (``worker._blender_spare``), and so does not wait for its start-up.

Cancel: the worker sets the task's flag and sends SIGINT, which raises ``KeyboardInterrupt`` in
the task process's main thread. That thread only waits here while a helper thread runs the
chunk and stores its frames (so an interrupt never cuts a message to the worker in half); on
the interrupt it cancels the chunk (Blender's process group is gone within
``CANCEL_DEADLINE_S``) and re-raises, and the task process reports CANCELLED. Blender dies with
the helper thread (``worker._orphan.kill_with_this_thread``), so a task process SIGKILLed
mid-chunk leaves no Blender behind either.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.protocol import (
    Assignment,
    FileRef,
    FrameDone,
    Output,
    OutputKind,
    Payload,
    TaskResult,
    TaskStatus,
    dumps,
    loads,
)
from worker import _blender_spare as spares
from worker._blender import (
    CANCEL_DEADLINE_S,
    BlenderInfo,
    ChunkFailure,
    ChunkProcess,
    ChunkResult,
    FailureKind,
    FrameSaved,
    RenderOptions,
)
from worker._blender_spare import SpareBlender
from worker._capture import Capture
from worker._datasets import filesystem

__all__ = ["BLENDER_TAG", "FRAMES_DIR", "THUMBNAIL_PX", "render_task", "thumbnail"]

BLENDER_TAG = "blender"  # the tag a worker with Blender advertises; render jobs ask for it
FRAMES_DIR = ".pilot-frames"  # under the task's working directory: one folder per attempt
THUMBNAIL_PX = 128  # the live preview's longest side
# After cancel(): the helper thread ends once Blender's output closes, well within this.
HELPER_JOIN_S = CANCEL_DEADLINE_S + 5.0


class _StoreFailed(Exception):
    """A saved frame could not be stored (results URL unwritable...): the task fails."""


def render_task(
    a: Assignment,
    blender: BlenderInfo | None,
    *,
    capture: Capture,
    put: Callable[[str, Payload], None],
) -> TaskResult:
    """Render task ``a``'s frames; see the module docstring. Raises ``KeyboardInterrupt``
    when the task is cancelled (Blender is gone by then)."""
    t0 = time.perf_counter()
    spec = a.render
    if spec is None:
        return _result(a, TaskStatus.ERROR, t0, "A render task came without its render settings.")
    if blender is None:
        how = (
            "This worker has no Blender, yet it was given a render task: the chunk is retried "
            "on another worker (start this one with --blender PATH to render here)"
        )
        return _failed(a, ChunkFailure(FailureKind.BLENDER_NOT_FOUND, how, None), t0)
    frames = tuple(int(f) for f in loads(a.args))
    try:
        options = RenderOptions(
            engine=spec.engine or None,
            samples=spec.samples or None,
            resolution=(spec.resolution[0], spec.resolution[1]) if spec.resolution else None,
            file_format=spec.file_format or "PNG",
            threads=max(1, a.cpus),
            gpus=a.gpus,
            body=spec.body or None,
        )
    except ValueError as exc:
        return _result(a, TaskStatus.ERROR, t0, f"Bad render settings: {exc}")
    outdir = Path.cwd() / FRAMES_DIR / f"{a.index}-{a.attempt}-{os.getpid()}"
    chunk = ChunkProcess(blender, spec.scene, frames, outdir, options, stored=a.skip)
    results_url = a.data.results_url if a.data is not None else ""
    sink = _FrameSink(a, blender.version, capture, put, results_url)
    try:
        result = _run(chunk, sink, spares.take())
    except (_StoreFailed, ValueError) as exc:  # ValueError: a body too long for Blender's argv
        spares.keep_warm(blender.path)
        return _result(a, TaskStatus.ERROR, t0, str(exc))
    finally:
        shutil.rmtree(outdir, ignore_errors=True)  # the frames are stored; only copies go
    if result.cancelled:  # cancelled without the interrupt reaching this thread
        raise KeyboardInterrupt
    spares.keep_warm(blender.path)  # for this process's next chunk; none after a cancel
    if result.failure is not None:
        return _failed(a, result.failure, t0)
    stored = set(sink.stored) | set(result.skipped)
    value = tuple(f for f in frames if f in stored)
    return _result(a, TaskStatus.OK, t0, value=value)


def _run(chunk: ChunkProcess, sink: _FrameSink, spare: SpareBlender | None) -> ChunkResult:
    """Run ``chunk`` (on ``spare`` if given) on a helper thread and wait for it here,
    cancelling it on an interrupt."""
    done = threading.Event()
    box: list[ChunkResult] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            box.append(chunk.run(sink.frame, sink.line, spare=spare))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            errors.append(exc)
        finally:
            done.set()

    helper = threading.Thread(target=work, name="pilot-render", daemon=True)
    try:
        helper.start()
        done.wait()
    except KeyboardInterrupt:
        chunk.cancel()  # kills Blender's group; run() then returns on the helper thread
        done.wait(HELPER_JOIN_S)
        raise
    if errors:
        raise errors[0]
    return box[0]


class _FrameSink:
    """What the chunk's callbacks do, on the helper thread: store each frame and announce it;
    pass Blender's lines on as the task's STDOUT."""

    def __init__(
        self,
        a: Assignment,
        version: str,
        capture: Capture,
        put: Callable[[str, Payload], None],
        results_url: str,
    ) -> None:
        self._a = a
        self._version = version
        self._capture = capture
        self._put = put
        self._results = results_url.rstrip("/")
        self._made_dir = False
        self.stored: list[int] = []

    def frame(self, event: FrameSaved) -> None:
        data = event.path.read_bytes()
        name = event.path.name
        try:
            ref = self._store(name, data, event.frame)
        except Exception as exc:
            where = self._results or "the gateway"
            raise _StoreFailed(
                f"Frame {event.frame} was rendered but could not be stored at {where}: {exc}. "
                "Check the results URL (--results) and its credentials."
            ) from exc
        small = b"" if name.endswith(".exr") else thumbnail(data)  # Pillow reads no EXR
        done = FrameDone(event.frame, ref, small, self._version)
        a = self._a
        self._capture.send(Output(a.job_id, a.index, event.frame, OutputKind.FRAME, done))
        self.stored.append(event.frame)

    def _store(self, name: str, data: bytes, frame: int) -> FileRef:
        if not self._results:
            digest = hashlib.sha256(data).hexdigest()
            self._put(digest, Payload(data))  # leaves before the frame's Output
            return FileRef(name, len(data), digest=digest, item=frame)
        url = f"{self._results}/{name}"
        fs, target = filesystem(url, {})
        if not self._made_dir:  # a local or in-memory folder must exist; buckets need not
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self._made_dir = True
        fs.pipe(target, data)
        return FileRef(name, len(data), url=url, item=frame)

    def line(self, line: str) -> None:
        if line.startswith("Fra:") and not line.endswith("| Finished"):
            return  # Cycles prints one per step of every frame: noise in a notebook
        self._capture.add(OutputKind.STDOUT, (line + "\n").encode("utf-8", "replace"))


def thumbnail(data: bytes, max_px: int = THUMBNAIL_PX) -> bytes:
    """PNG bytes of the image ``data`` (PNG, JPEG...) shrunk to at most ``max_px`` a side."""
    from PIL import Image  # imported by the first frame of a task process, not at start-up

    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((max_px, max_px))
        small = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGBA")
        out = io.BytesIO()
        small.save(out, format="PNG")
    return out.getvalue()


def _failed(a: Assignment, failure: ChunkFailure, t0: float) -> TaskResult:
    status = TaskStatus.CRASHED if failure.kind.machine_side else TaskStatus.ERROR
    return _result(a, status, t0, str(failure.error()))


def _result(
    a: Assignment, status: TaskStatus, t0: float, error: str = "", value: object = None
) -> TaskResult:
    payload = dumps(value, what="the frames rendered") if status == TaskStatus.OK else None
    duration = time.perf_counter() - t0
    return TaskResult(a.job_id, a.index, a.attempt, status, payload, error, duration)
