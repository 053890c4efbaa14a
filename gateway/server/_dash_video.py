"""A render job's video on the dashboard: its frames, stored by the gateway, as an MP4.

``GET /api/jobs/ID/video.mp4`` (behind the login, the viewer's own jobs) makes the video on
the first request once the job has ended, and keeps it in ``STATE/videos/ID.mp4``. The frames
are those the gateway stored (``FrameDone.file.digest``; a job that wrote its frames to a
``--results`` URL has none here, and gets 404), in frame order, PNG or JPEG; ffmpeg is the
static binary of the ``imageio-ffmpeg`` wheel, as on the client (``gateway.client._video``),
with the same encoding: H.264, yuv420p, dimensions padded to even numbers, ``FPS`` frames a
second. The database is read on the gateway's loop; reading the blobs and ffmpeg run in a
thread, so the gateway goes on serving meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from pathlib import Path

from gateway.protocol import FileRef, FrameDone, OutputKind
from gateway.server._blobs import BlobStore
from gateway.server._dash_api import JobHandler

__all__ = ["ROUTES", "stored_frames"]

FPS = 24
VIDEO_TIMEOUT_S = 600.0
SUFFIXES = (".png", ".jpg", ".jpeg")
_locks: dict[str, asyncio.Lock] = {}  # one build per job at a time


def stored_frames(outputs: list, limit: int = 100_000) -> list[FileRef]:
    """The frames of a job's kept outputs that the gateway stored, in frame order."""
    found: dict[int, FileRef] = {}
    for out in outputs:
        if out.kind == OutputKind.FRAME and isinstance(out.data, FrameDone):
            ref = out.data.file
            if ref.digest and ref.name.lower().endswith(SUFFIXES):
                found[out.data.frame] = ref
    return [found[f] for f in sorted(found)][:limit]


def _build(blobs: BlobStore, frames: list[FileRef], out: Path) -> None:
    import imageio_ffmpeg

    suffix = Path(frames[0].name).suffix.lower().replace(".jpeg", ".jpg")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pilot-video-") as tmp:
        for i, ref in enumerate(frames):  # ffmpeg's image2 reader wants 0, 1, 2...
            p = blobs.get(ref.digest)
            with open(Path(tmp) / f"{i:06d}{suffix}", "wb") as fh:
                fh.write(p.data)
                for b in p.buffers:
                    fh.write(b)
        part = out.with_suffix(f".part{os.getpid()}.mp4")
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error"]
        command += ["-framerate", str(FPS), "-i", str(Path(tmp) / f"%06d{suffix}")]
        command += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264"]
        command += ["-pix_fmt", "yuv420p", "-movflags", "+faststart", str(part)]
        subprocess.run(command, check=True, capture_output=True, timeout=VIDEO_TIMEOUT_S)
        os.replace(part, out)


class Video(JobHandler):
    api = False

    async def get(self, job_id: str) -> None:
        row = self.visible(job_id)
        if row is None:
            return
        if row["state"] not in ("done", "failed", "cancelled"):
            self.refuse(409, "The video is made once the job has ended.")
            return
        gw = self.ctx.gateway
        out = gw.settings.state_dir / "videos" / f"{job_id}.mp4"
        async with _locks.setdefault(job_id, asyncio.Lock()):
            if not out.exists():
                frames = stored_frames(gw.store.outputs(job_id))
                if not frames:
                    self.refuse(404, "This job has no frames stored in the gateway.")
                    return
                try:
                    await asyncio.to_thread(_build, gw.store.blobs, frames, out)
                except (OSError, subprocess.SubprocessError) as exc:
                    self.refuse(500, f"ffmpeg could not make the video: {exc}")
                    return
        _locks.pop(job_id, None)
        self.set_header("Content-Type", "video/mp4")
        self.set_header("Content-Disposition", f'inline; filename="{job_id}.mp4"')
        with open(out, "rb") as fh:
            while chunk := fh.read(1 << 20):
                self.write(chunk)
                await self.flush()
        self.finish()


ROUTES: list[tuple[str, type]] = [(r"/api/jobs/([^/]+)/video\.mp4", Video)]
