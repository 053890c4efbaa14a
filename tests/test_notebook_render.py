"""notebooks/render.ipynb runs top to bottom under nbclient against a real `pilot up`.

The workers of `pilot up` find Debian's `blender` on PATH; the notebook makes its scene with
Blender's own Python, renders 24 frames through ``%%distribute --render`` with a live preview,
shows the video, then renders two deleted frames again with ``--missing-only``. The notebook
runs from a copy in a temporary folder, so the scene and the MP4 it writes stay out of the
repository. The checks read what the kernel sent: the live preview, the filmstrip, the video
and the frame count of the MP4 on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.client._video import count_frames
from tests_support import outputs_of, run_notebook_on_pilot_up

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "render.ipynb"
CELL_TIMEOUT_S = 300  # a render cell on a loaded 2-core machine: Blender starts, 24 frames

pytestmark = [
    pytest.mark.system,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("blender") is None, reason="no `blender` on PATH"),
]


def test_render_notebook_previews_frames_shows_the_video_and_renders_missing_frames(
    tmp_path: Path,
) -> None:
    nb = run_notebook_on_pilot_up(NOTEBOOK, tmp_path, CELL_TIMEOUT_S)
    work = tmp_path / "notebook"  # where it ran (its video is there)

    render = outputs_of(nb, "%%distribute --render")
    data = [o.get("data", {}) for o in render if o.output_type == "display_data"]
    assert any("image/png" in d and d["text/plain"].startswith("frame ") for d in data), "preview"
    assert any(d.get("text/plain", "").startswith("filmstrip of") for d in data)
    assert any("data:video/mp4;base64," in d.get("text/html", "") for d in data)
    text = "".join(o.get("text", "") for o in render if o.output_type == "stream")
    assert "24 frames in 4 chunks" in text
    assert count_frames(work / "anim.mp4") == 24

    again = outputs_of(nb, "for f in frames")
    shown = [o.get("data", {}).get("text/plain", "") for o in again if "data" in o]
    assert any(s.startswith("2/2 frames") for s in shown), "only the two deleted frames"
