"""Scenes for the render tests, made by Blender's own Python (no binary .blend is committed).

``make_animated_scene(path)`` writes a small animated scene and returns ``path``: 64x64 pixels,
Cycles on the CPU with 8 samples and denoising off, frames 1-48 in which a cube slides and turns
in front of a camera under a sun. Renders of it are deterministic, so frames from two runs can
be compared pixel for pixel. It takes Blender a second or two; test modules cache it with a
session-scoped fixture. Raises ``RuntimeError`` with Blender's output if Blender fails.

The scene is ``bench/render.py``'s (``bench._blender_plain.make_scene``), at the tests' size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the bench's scene module, imported by its name
    sys.path.insert(0, str(ROOT))

from bench._blender_plain import make_scene  # noqa: E402

__all__ = ["SCENE_FRAMES", "SCENE_SIZE_PX", "make_animated_scene"]

SCENE_FRAMES = range(1, 49)
SCENE_SIZE_PX = 64
SCENE_SAMPLES = 8


def make_animated_scene(path: str | os.PathLike[str], blender: str = "blender") -> Path:
    """Write the test scene to ``path`` with ``blender``; returns ``path``."""
    return make_scene(Path(path), blender, SCENE_SIZE_PX, SCENE_SAMPLES, SCENE_FRAMES[-1])
