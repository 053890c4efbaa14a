"""Rendered frames -> an H.264 MP4, and a filmstrip of thumbnails, on the client.

Called by the client at the end of a render job (``--video``, ``job.video``; the filmstrip for
the cell's summary). ffmpeg is the static binary of the ``imageio-ffmpeg`` wheel, so no system
package is needed; Pillow draws the filmstrip.

- ``make_video(frames, out, fps)``: the frame files (PNG or JPEG, in the order given: frame
  numbers and steps need not be consecutive) -> ``out`` (MP4, H.264, yuv420p, dimensions padded
  to even numbers as yuv420p requires); returns ``out``. Raises ``VideoError`` with the tail of
  ffmpeg's stderr when ffmpeg fails, ``ValueError`` for bad arguments. The frames stay the
  caller's; the temporary directory of links made for ffmpeg is removed before returning.
- ``count_frames(video)``: the number of video frames in a file (decoded by ffmpeg).
- ``filmstrip(paths, max_frames, thumb_height)``: PNG bytes of up to ``max_frames`` thumbnails,
  evenly chosen from ``paths``, side by side.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gateway.protocol import VideoError

__all__ = ["VideoError", "count_frames", "filmstrip", "make_video"]

VIDEO_TIMEOUT_S = 600.0  # ffmpeg encodes 1,000 1080p frames well within this on one core
STDERR_TAIL_CHARS = 2000  # of ffmpeg's stderr, quoted in a VideoError
FILMSTRIP_GAP_PX = 2
VIDEO_SUFFIXES = (".png", ".jpg", ".jpeg")


def _ffmpeg() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise VideoError(
            "Making a video needs ffmpeg from the imageio-ffmpeg wheel: pip install imageio-ffmpeg"
        ) from exc
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _run_ffmpeg(args: list[str], timeout_s: float, what: str) -> subprocess.CompletedProcess[str]:
    command = [_ffmpeg(), "-nostdin", "-hide_banner", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise VideoError(f"ffmpeg ran past {timeout_s} s {what}") from exc
    if done.returncode != 0:
        tail = done.stderr[-STDERR_TAIL_CHARS:].strip()
        raise VideoError(f"ffmpeg failed {what} (exit status {done.returncode}):\n{tail}")
    return done


def make_video(
    frames: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    fps: float = 24.0,
    *,
    timeout_s: float = VIDEO_TIMEOUT_S,
) -> Path:
    """Encode ``frames`` (in this order) at ``fps`` into the MP4 ``out``; returns its path."""
    paths = [Path(f) for f in frames]
    if not paths:
        raise ValueError("make_video: no frames to make a video of")
    if fps <= 0:
        raise ValueError(f"make_video: fps {fps}: it must be positive")
    suffixes = {p.suffix.lower().replace(".jpeg", ".jpg") for p in paths}
    if len(suffixes) != 1 or not suffixes <= set(VIDEO_SUFFIXES):
        raise ValueError(
            f"make_video: frames must all be PNG or all JPEG, not {sorted(suffixes)}: "
            "render with --format PNG or JPEG for a video"
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"make_video: {len(missing)} frame file(s) missing, e.g. {missing[0]}")
    (suffix,) = suffixes
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pilot-video-") as tmp:
        # ffmpeg's image2 reader wants consecutive numbers: link the frames in as 0, 1, 2...
        for i, path in enumerate(paths):
            link = Path(tmp) / f"{i:06d}{suffix}"
            try:
                link.symlink_to(path.resolve())
            except OSError:  # no symlinks here (some Windows setups): copy instead
                shutil.copyfile(path, link)
        # -xerror: a frame ffmpeg cannot decode fails the video instead of vanishing from it.
        args = ["-y", "-loglevel", "error", "-xerror", "-framerate", str(fps), "-i"]
        args += [str(Path(tmp) / f"%06d{suffix}")]
        # yuv420p halves the chroma resolution, so both dimensions must be even: pad by 1 px.
        args += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p"]
        args += ["-movflags", "+faststart", str(out)]
        _run_ffmpeg(args, timeout_s, f"making {out} from {len(paths)} frames")
    return out


def count_frames(video: str | os.PathLike[str], *, timeout_s: float = VIDEO_TIMEOUT_S) -> int:
    """The number of frames of the first video stream of ``video``, by decoding it."""
    args = ["-i", str(video), "-map", "0:v:0", "-f", "null", "-progress", "pipe:1", "-nostats"]
    done = _run_ffmpeg([*args, "-"], timeout_s, f"reading {video}")
    counts = [
        line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("frame=")
    ]
    if not counts:
        raise VideoError(f"ffmpeg reported no frame count for {video}")
    return int(counts[-1])


def filmstrip(
    paths: Sequence[str | os.PathLike[str]], max_frames: int = 12, thumb_height: int = 64
) -> bytes:
    """PNG bytes: thumbnails ``thumb_height`` px high of up to ``max_frames`` of ``paths``
    (the first, the last and evenly between), left to right with a small gap."""
    if not paths:
        raise ValueError("filmstrip: no frames")
    if max_frames < 1 or thumb_height < 1:
        raise ValueError(f"filmstrip: max_frames {max_frames} and thumb_height {thumb_height}")
    from PIL import Image  # only the filmstrip needs Pillow: import it when drawn

    n = len(paths)
    count = min(n, max_frames)
    chosen = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})
    thumbs = []
    for index in chosen:
        with Image.open(paths[index]) as image:
            image.load()
            width = max(1, round(image.width * thumb_height / image.height))
            thumb = image.convert("RGBA").resize((width, thumb_height), Image.Resampling.LANCZOS)
        thumbs.append(thumb)
    total = sum(t.width for t in thumbs) + FILMSTRIP_GAP_PX * (len(thumbs) - 1)
    strip = Image.new("RGB", (total, thumb_height), (0, 0, 0))
    x = 0
    for thumb in thumbs:
        strip.paste(thumb, (x, 0), thumb)  # the alpha as mask: transparent shows black
        x += thumb.width + FILMSTRIP_GAP_PX
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()
