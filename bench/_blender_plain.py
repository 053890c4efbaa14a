"""The plain side of ``bench/render.py``: its scene, and one plain ``blender -b`` that
renders it.

``make_scene`` has Blender's own Python write the scene (a cube that slides and turns under a
sun; Cycles on the CPU, denoising off; size, samples and frames as parameters). ``plain_run``
renders every frame with one ``blender -b -t 1 -a`` and reads Blender's ``Time:`` for each
frame from its output. The render tests make their scene with ``make_scene`` too
(``tests/blender_scenes.py``, at 64x64 pixels and 8 samples).
"""

from __future__ import annotations

import re
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["make_scene", "plain_run"]

SCENE_TIMEOUT_S = 120.0  # one Blender start and a save, on a loaded 2-core machine
PLAIN_TIMEOUT_S = 600.0

# Runs inside Blender: ``blender -b --factory-startup --python-expr SCRIPT -- OUT.blend``.
# Also the render tests' scene (tests/blender_scenes.py, 64x64, 8 samples, 48 frames).
_SCENE_SCRIPT = """
import math, sys
import bpy

out = sys.argv[sys.argv.index("--") + 1]
bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = {samples}
scene.cycles.use_denoising = False
for layer in scene.view_layers:
    layer.cycles.use_denoising = False
scene.render.resolution_x = scene.render.resolution_y = {size}
scene.render.resolution_percentage = 100
scene.render.image_settings.file_format = "PNG"
scene.frame_start, scene.frame_end = 1, {frames}

bpy.ops.mesh.primitive_cube_add(size=1.5, location=(-1.5, 0, 0))
cube = bpy.context.active_object
for frame, location, turn in ((1, (-1.5, 0, 0), 0), ({frames}, (1.5, 0, 0.5), math.pi)):
    cube.location = location
    cube.rotation_euler = (0, 0, turn)
    cube.keyframe_insert("location", frame=frame)
    cube.keyframe_insert("rotation_euler", frame=frame)

bpy.ops.object.camera_add(location=(0, -7, 3), rotation=(math.radians(70), 0, 0))
scene.camera = bpy.context.active_object
bpy.ops.object.light_add(type="SUN", location=(2, -2, 5))
bpy.context.active_object.data.energy = 3.0
scene.world = bpy.data.worlds.new("World")
bpy.ops.wm.save_as_mainfile(filepath=out)
"""

_SAVED = re.compile(r"^Saved: '.*frame_(\d+)\.png'")
_TIME = re.compile(r"^\s*Time: ([\d:.]+)")


def make_scene(path: Path, blender: str, size: int, samples: int, frames: int) -> Path:
    script = _SCENE_SCRIPT.format(size=size, samples=samples, frames=frames)
    command = [blender, "-b", "--factory-startup", "--python-exit-code", "1"]
    done = subprocess.run(
        [*command, "--python-expr", script, "--", str(path)],
        capture_output=True,
        text=True,
        timeout=SCENE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"Blender could not make the scene (exit {done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return path


def _seconds(timecode: str) -> float:
    """Blender's ``MM:SS.ss`` or ``HH:MM:SS.ss`` as seconds."""
    total = 0.0
    for part in timecode.split(":"):
        total = total * 60 + float(part)
    return total


def plain_run(blender: str, scene: Path, outdir: Path, frames: int) -> dict[str, Any]:
    """One plain ``blender -b -t 1 -a``: its wall time and each frame's ``Time:``."""
    command = [blender, "-b", str(scene), "-t", "1", "-o", str(outdir / "frame_######"), "-a"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=PLAIN_TIMEOUT_S)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0:
        raise RuntimeError(f"plain blender failed ({done.returncode}):\n{done.stdout[-3000:]}")
    frame_s: dict[int, float] = {}
    saved: int | None = None
    for line in done.stdout.splitlines():
        if m := _SAVED.match(line):
            saved = int(m.group(1))
        elif saved is not None and (m := _TIME.match(line)):
            frame_s[saved] = _seconds(m.group(1))
            saved = None
    if sorted(frame_s) != list(range(1, frames + 1)):
        raise RuntimeError(f"plain blender reported times for {len(frame_s)} of {frames} frames")
    return {
        "wall_s": wall,
        "frame_s": frame_s,
        "fixed_s": wall - sum(frame_s.values()),
        "median_frame_ms": statistics.median(frame_s.values()) * 1000,
        "blender_cores": cpu / wall,
    }
