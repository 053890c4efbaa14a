"""The rendering demo: `pilot up`, a Blender animation rendered on its 2 workers, the MP4.

Run it with ``./scripts/demo render`` (which makes the venv and installs Blender from Debian when
it is missing), or ``python examples/render.py``. The scene is made here, at run time, by
Blender's own Python (no .blend file is committed): a cube that slides and turns for 48 frames,
96x96 pixels, Cycles on the CPU. It is rendered in 2 chunks of 24 frames, one Blender process on
each worker (so each pays Blender's start-up once), each frame announced as the worker saves
it; the scene and the video are written under ``$PILOT_HOME/render-demo/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pilot
from gateway.protocol import OutputKind

FRAMES = "1-48"
CHUNK = 24  # one chunk per worker
SCENE_TIMEOUT_S = 120.0
RENDER_TIMEOUT_S = 600.0

# Runs inside Blender: ``blender -b --factory-startup --python-expr SCRIPT -- OUT.blend``.
SCENE_SCRIPT = """
import math, sys, bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = 16
scene.cycles.use_denoising = False  # Debian's Blender has no OpenImageDenoise
for layer in scene.view_layers:
    layer.cycles.use_denoising = False
scene.render.resolution_x = scene.render.resolution_y = 96
scene.render.resolution_percentage = 100
scene.frame_start, scene.frame_end = 1, 48
bpy.ops.mesh.primitive_cube_add(size=1.5)
cube = bpy.context.active_object
for frame, x, turn in ((1, -1.5, 0), (48, 1.5, math.pi)):
    cube.location = (x, 0, 0)
    cube.rotation_euler = (0, 0, turn)
    cube.keyframe_insert("location", frame=frame)
    cube.keyframe_insert("rotation_euler", frame=frame)
bpy.ops.object.camera_add(location=(0, -7, 3), rotation=(math.radians(70), 0, 0))
scene.camera = bpy.context.active_object
bpy.ops.object.light_add(type="SUN", location=(2, -2, 5))
scene.world = bpy.data.worlds.new("World")
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1])
"""


def make_scene(path: Path, blender: str) -> Path:
    """Write the demo scene to ``path`` (absolute) with ``blender``'s Python."""
    command = [blender, "-b", "--factory-startup", "--python-exit-code", "1"]
    done = subprocess.run(
        [*command, "--python-expr", SCENE_SCRIPT, "--", str(path)],
        capture_output=True,
        text=True,
        timeout=SCENE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0 or not path.is_file():
        raise SystemExit(f"Blender could not make the scene:\n{done.stdout[-3000:]}")
    return path


def main() -> int:
    blender = os.environ.get("PILOT_BLENDER") or shutil.which("blender")
    if not blender:
        print(
            "No Blender here: run ./scripts/demo render (it installs Debian's), or set "
            "$PILOT_BLENDER to a Blender binary.",
            file=sys.stderr,
        )
        return 1
    home = Path(os.environ.setdefault("PILOT_HOME", os.path.expanduser("~/.pilot")))
    out = home / "render-demo"
    out.mkdir(parents=True, exist_ok=True)
    scene = make_scene(out / "scene.blend", blender)
    print(f"scene made by Blender's Python: {scene}")

    print(f"$ pilot up --workers 2 --blender {blender}        (PILOT_HOME={home})")
    quiet = {**os.environ, "PILOT_LOG_LEVEL": os.environ.get("PILOT_LOG_LEVEL", "WARNING")}
    command = [sys.executable, "-m", "pilot", "up", "--workers", "2", "--blender", blender]
    up = subprocess.Popen(command, env=quiet)
    try:
        client = _connect_when_ready(deadline=time.monotonic() + 60)
        status = client.wait_for_workers(2, timeout=60)
        names = ", ".join(w.name for w in status.workers)
        print(f"2 workers ready: {names}\n")

        t0 = time.perf_counter()
        job = client.render(scene, frames=FRAMES, chunk=CHUNK, video=out / "anim.mp4")
        print(f"job {job.id}: frames {FRAMES} in {job.n_tasks} chunks of {CHUNK}; frames as saved:")
        for ev in job.stream():
            if ev.kind == OutputKind.FRAME:
                done = ev.data  # a FrameDone: the stored file and a PNG thumbnail
                at = time.perf_counter() - t0
                print(
                    f"  {at:5.1f}s  frame {done.frame:2d} (chunk {ev.index + 1})  "
                    f"{done.file.name}  preview {len(done.thumbnail):,} B"
                )
        job.wait(RENDER_TIMEOUT_S)
        took = time.perf_counter() - t0
        workers = sorted({d.worker for d in job.tasks.values()})
        versions = ", ".join(sorted(job.render.blender_versions())) if job.render else "?"
        files = job.frames
        print(
            f"\n{len(files)} frames rendered in {took:.1f}s by {', '.join(workers)} "
            f"(Blender {versions}); frames in {Path(files[0]).parent}"
        )
        video = job.video
        print(f"video: {video} ({video.stat().st_size:,} bytes, 24 fps)")
        print(f"look again later: pilot jobs; pilot logs {job.id}")
        client.close()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(30)
    print(f"pilot up stopped cleanly (exit code {code}).")
    return 0 if code == 0 else 1


def _connect_when_ready(deadline: float) -> pilot.Client:
    """`pilot up` writes the connection file once its gateway listens."""
    while True:
        try:
            return pilot.connect()
        except pilot.NoGateway:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
