"""Scenes for the render tests, made by Blender's own Python (no binary .blend is committed).

``make_animated_scene(path)`` writes a small animated scene and returns ``path``: 64x64 pixels,
Cycles on the CPU with 8 samples and denoising off, frames 1-48 in which a cube slides and turns
in front of a camera under a sun. Renders of it are deterministic, so frames from two runs can
be compared pixel for pixel. It takes Blender a second or two; test modules cache it with a
session-scoped fixture. Raises ``RuntimeError`` with Blender's output if Blender fails.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["SCENE_FRAMES", "SCENE_SIZE_PX", "make_animated_scene"]

SCENE_FRAMES = range(1, 49)
SCENE_SIZE_PX = 64
SCENE_TIMEOUT_S = 120.0  # one Blender start and a save, on a loaded 2-core machine

# Runs inside Blender: ``blender -b --factory-startup --python-expr SCRIPT -- OUT.blend``.
_SCRIPT = """
import math, sys
import bpy

out = sys.argv[sys.argv.index("--") + 1]
bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = 8
scene.cycles.use_denoising = False
for layer in scene.view_layers:
    layer.cycles.use_denoising = False
scene.render.resolution_x = scene.render.resolution_y = {size}
scene.render.resolution_percentage = 100
scene.render.image_settings.file_format = "PNG"
scene.frame_start, scene.frame_end = {first}, {last}

bpy.ops.mesh.primitive_cube_add(size=1.5, location=(-1.5, 0, 0))
cube = bpy.context.active_object
for frame, location, turn in (({first}, (-1.5, 0, 0), 0), ({last}, (1.5, 0, 0.5), math.pi)):
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


def make_animated_scene(path: str | os.PathLike[str], blender: str = "blender") -> Path:
    """Write the test scene to ``path`` with ``blender``; returns ``path``."""
    path = Path(path)
    script = _SCRIPT.format(size=SCENE_SIZE_PX, first=SCENE_FRAMES[0], last=SCENE_FRAMES[-1])
    command = [blender, "-b", "--factory-startup", "--python-exit-code", "1"]
    command += ["--python-expr", script, "--", str(path)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=SCENE_TIMEOUT_S, check=False
    )
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"Blender could not make the test scene (exit {done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return path
