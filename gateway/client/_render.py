"""Render jobs on the client: submitting them, and their frames and video afterwards.

``submit_render`` is what ``Client.render`` (and ``%%distribute --render``) calls: the scene
(and ``ship`` paths) travel once by content hash, the frames are split into chunks (one
Blender process each), and the job asks for workers that registered Blender. ``RenderOutput``
is what a render ``Job`` keeps of its frames as they arrive (``Output``s of kind FRAME):
``frames()`` fetches them as local files in frame order, ``video()`` assembles them, and
``missing()`` names the frames to render again.

Automatic chunking: a chunk holds enough frames that Blender's start-up (``BLENDER_START_S``,
measured at about 1 s on a small scene) is under a tenth of the chunk's time, at an assumed
``ASSUMED_FRAME_S`` per frame (real scenes take longer, which only makes start-up cheaper), but
never so many that a slot of the pool would be left without a chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.client._frames import auto_chunk, chunk_frames, parse_frames
from gateway.client._video import make_video
from gateway.protocol import (
    ConfigError,
    DataError,
    FrameDone,
    JobKind,
    RenderSpec,
    Resources,
    default_home,
    dumps,
)

if TYPE_CHECKING:
    from gateway.client._job import Job
    from gateway.client._sync import Client

__all__ = ["BLENDER_TAG", "RenderOutput", "submit_render"]

BLENDER_TAG = "blender"  # workers that registered Blender carry this tag
BLENDER_START_S = 1.0
ASSUMED_FRAME_S = 1.0
FORMATS = {"PNG": "png", "JPEG": "jpg", "OPEN_EXR": "exr"}


@dataclasses.dataclass
class RenderOutput:
    """A render job's frames as they arrive, and what to make of them (client side)."""

    frames_asked: tuple[int, ...]
    video_path: str = ""
    fps: float = 24.0
    done: dict[int, FrameDone] = dataclasses.field(default_factory=dict)
    again: dict[str, Any] = dataclasses.field(default_factory=dict)  # to submit it again

    def frames(self, job: Job, dest_dir: str | Path | None = None) -> list[str]:
        """Local files of the frames rendered so far, in frame order (fetched once into
        ``dest_dir``, by default ``$PILOT_HOME/results/JOB``; frames written to a results URL
        are downloaded there too)."""
        dest = Path(dest_dir) if dest_dir is not None else default_home() / "results" / job.id
        out = []
        for frame in sorted(self.done):
            ref = self.done[frame].file
            if ref.url:
                out.append(str(_download(ref.url, dest / ref.name)))
            else:
                out.append(str(job.client.fetch_file(ref, dest)))
        return out

    def video(self, job: Job, path: str | Path | None = None) -> Path:
        """The frames as an H.264 MP4 (at ``path``, by default the job's ``video`` option)."""
        target = Path(path or self.video_path or default_home() / "results" / f"{job.id}.mp4")
        return make_video(self.frames(job), target, fps=self.fps)

    def missing(self, job: Job, dest_dir: str | Path | None = None) -> list[int]:
        """Frames asked for that were not rendered (failed, cancelled), or whose file is gone:
        removed from the results URL, or (frames kept by the gateway) a local copy that
        ``frames()`` fetched and someone deleted since."""
        dest = Path(dest_dir) if dest_dir is not None else default_home() / "results" / job.id
        gone = []
        for frame in self.frames_asked:
            done = self.done.get(frame)
            if done is None:
                gone.append(frame)
            elif done.file.url:
                if not _exists(done.file.url):
                    gone.append(frame)
            elif dest.is_dir() and not (dest / done.file.name).exists():
                gone.append(frame)
        return gone

    def blender_versions(self) -> set[str]:
        return {d.blender for d in self.done.values() if d.blender}


def submit_render(
    client: Client,
    scene: str | Path,
    frames: str | Iterable[int],
    *,
    chunk: int | None = None,
    video: str | Path | None = None,
    fps: float = 24.0,
    engine: str = "",
    samples: int = 0,
    resolution: tuple[int, int] | None = None,
    file_format: str = "PNG",
    body: str = "",
    ship: Sequence[str | Path] = (),
    results: str = "",
    cpus: int = 1,
    gpus: int = 0,
    tags: Sequence[str] = (),
    timeout: float | None = None,
    retries: int | None = None,
    name: str = "",
) -> Job:
    """Render ``frames`` of ``scene`` on the workers that have Blender; returns the job at once
    (see ``Client.render``). Raises ``DataError`` for a scene that is not there, ``ValueError``
    for a bad frame spec, ``ConfigError`` for a bad option."""
    scene_path = Path(scene).expanduser()
    if not scene_path.is_file():
        raise DataError(f"--render {scene}: no such .blend file here.")
    fmt = file_format.upper()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {file_format}: use one of {', '.join(FORMATS)}.")
    wanted = parse_frames(frames)
    if not wanted:
        raise ValueError("There are no frames to render.")
    if chunk is None:
        slots = sum(w.slots for w in client.status().workers if BLENDER_TAG in w.tags) or 1
        chunk = auto_chunk(len(wanted), slots, BLENDER_START_S, ASSUMED_FRAME_S)
    chunks = chunk_frames(wanted, chunk)
    job_data = client.job_data(None, n_items=len(chunks), ship=[scene_path, *ship], results=results)
    spec = RenderSpec(
        scene=scene_path.name,
        engine=engine,
        samples=samples,
        resolution=tuple(resolution) if resolution else (),
        file_format=fmt,
        body=body,
    )
    args = [dumps(tuple(c), what=f"frames {c[0]}..{c[-1]}") for c in chunks]
    job = client.submit_job(
        None,
        args,
        kind=JobKind.RENDER,
        name=name or scene_path.stem,
        resources=Resources(cpus, gpus, (BLENDER_TAG, *tags)),
        timeout=timeout,
        retries=retries,
        chunk=chunk,
        data=job_data,
        render=spec,
    )
    again = dict(
        scene=scene, chunk=chunk, video=video, fps=fps, engine=engine, samples=samples,
        resolution=resolution, file_format=file_format, body=body, ship=ship, results=results,
        cpus=cpus, gpus=gpus, tags=tags, timeout=timeout, retries=retries, name=name,
    )  # fmt: skip
    job.render = RenderOutput(wanted, str(video or ""), fps, again=again)
    return job


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def _download(url: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    import fsspec

    dest.parent.mkdir(parents=True, exist_ok=True)
    with fsspec.open(url, "rb") as src, open(dest, "wb") as out:
        out.write(src.read())
    return dest
