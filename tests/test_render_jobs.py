"""Render jobs end to end: a real gateway, real workers, the real Blender (Debian's package).

Each test submits with ``Client.render`` to a ``LocalCluster`` whose workers found ``blender`` on
PATH, and checks what the user sees: the frames (pixel for pixel against one plain ``blender -b``
run), the video, the live FRAME outputs, the errors, and that no Blender is left running after
a cancel, a killed task process or a killed worker. The scene is made by Blender's own Python
(``tests/blender_scenes.py``: 64x64, Cycles, 8 samples). Where a test needs a chunk to be
mid-render, the render body holds a frame until the test creates a gate file; every wait is on
an event or polls under a deadline.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from blender_scenes import make_animated_scene
from PIL import Image

import pilot
from gateway.client._video import count_frames
from gateway.protocol import (
    DataError,
    JobCancelled,
    JobError,
    Output,
    OutputKind,
    Status,
    TaskError,
    TaskStatus,
)
from tests_support import TEST_TIMEOUTS, wait_until
from worker._render_task import BLENDER_TAG, THUMBNAIL_PX

BLENDER = shutil.which("blender")
pytestmark = [
    pytest.mark.system,
    pytest.mark.slow,
    pytest.mark.skipif(BLENDER is None, reason="no `blender` on PATH: apt-get install blender"),
]

RENDER_TIMEOUT_S = 90.0  # a few chunks of the tiny scene on a loaded 2-core machine
HOLD_DEADLINE_S = 60.0  # a held frame waits at most this long for its gate, inside Blender
GONE_TIMEOUT_S = 10.0  # a cancel or a death reaching Blender through gateway and worker


def held_body(frame: int, gate: Path) -> str:
    """A render body that holds ``frame`` until ``gate`` exists (or ``HOLD_DEADLINE_S``)."""
    return f"""
import os, time
def hold(scene, *args):
    if scene.frame_current == {frame}:
        deadline = time.monotonic() + {HOLD_DEADLINE_S}
        while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
bpy.app.handlers.frame_change_pre.append(hold)
"""


def blenders(home: Path) -> list[psutil.Process]:
    """The Blender processes rendering for the cluster whose files are under ``home``: a cold
    one names its scene there; a spare (``worker._blender_spare``) waits in ``/`` and moves
    into its chunk's directory there once it has a chunk."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if not cmd or os.path.basename(cmd[0]) != "blender":
            continue
        with contextlib.suppress(psutil.Error):
            if any(str(home) in a for a in cmd) or proc.cwd().startswith(str(home)):
                found.append(proc)
    return found


def spares(cluster: pilot.LocalCluster) -> list[psutil.Process]:
    """The idle spare Blenders of the cluster's task processes."""
    found = []
    for worker in cluster.workers:
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(worker.pid).children(recursive=True):
                if proc.name() == "blender" and proc.cwd() == "/":
                    found.append(proc)
    return found


def gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def frame_outputs(job: pilot.Job) -> list[Output]:
    """Every FRAME output of ``job``, in arrival order, once it has ended."""
    frames = [
        ev
        for ev in job.events(timeout=RENDER_TIMEOUT_S)
        if isinstance(ev, Output) and ev.kind == OutputKind.FRAME
    ]
    assert job.done(), f"job {job.id} did not end"
    return frames


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)  # signed: differences must not wrap


def assert_same_as_plain(files: list[str], plain: Path) -> None:
    for path in files:
        name = Path(path).name  # frame_000007.png
        theirs = pixels(plain / name)
        assert np.abs(pixels(path) - theirs).max() <= 1, f"{name} differs from a plain render"


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_animated_scene(tmp_path_factory.mktemp("scene") / "scene.blend")


@pytest.fixture(scope="module")
def plain(scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frames 1-24 from one plain ``blender -b`` run, named as the workers name theirs."""
    out = tmp_path_factory.mktemp("plain")
    command = [BLENDER, "-b", str(scene), "-o", str(out / "frame_######"), "-s", "1", "-e", "24"]
    done = subprocess.run(
        [*command, "-a"], capture_output=True, text=True, timeout=RENDER_TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-2000:]
    return out


# -- rendering -----------------------------------------------------------------------------------


def test_a_24_frame_job_on_two_workers_equals_a_plain_run_and_makes_a_24_frame_video(
    client: pilot.Client, scene: Path, plain: Path, tmp_path: Path
) -> None:
    workers = client.status().workers
    assert len(workers) == 2 and all(BLENDER_TAG in w.tags for w in workers)

    job = client.render(scene, frames="1-24", chunk=6, video=tmp_path / "anim.mp4")
    outputs = frame_outputs(job)

    assert job.state == Status.DONE, job.error
    assert sorted(o.item for o in outputs) == list(range(1, 25)), "one FRAME output per frame"
    assert len({d.worker for d in job.tasks.values()}) == 2, "both workers rendered"
    assert [job.value(i) for i in range(4)] == [tuple(range(s, s + 6)) for s in (1, 7, 13, 19)]
    files = job.frames
    assert [Path(f).name for f in files] == [f"frame_{n:06d}.png" for n in range(1, 25)]
    assert_same_as_plain(files, plain)
    version = subprocess.run([BLENDER, "-v"], capture_output=True, text=True).stdout
    for out in outputs:
        assert out.data.frame == out.item and out.data.file.item == out.item
        assert out.data.blender and out.data.blender in version
        with Image.open(io.BytesIO(out.data.thumbnail)) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= THUMBNAIL_PX
    assert count_frames(job.video) == 24


def test_a_frame_range_with_a_step_renders_only_those_frames(
    client: pilot.Client, scene: Path, plain: Path
) -> None:
    job = client.render(scene, frames="1-12x3", chunk=2)
    outputs = frame_outputs(job)

    assert job.state == Status.DONE, job.error
    assert sorted(o.item for o in outputs) == [1, 4, 7, 10]
    assert [job.value(0), job.value(1)] == [(1, 4), (7, 10)]
    assert_same_as_plain(job.frames, plain)


def test_frames_go_to_a_results_url_as_they_are_saved(
    client: pilot.Client, scene: Path, plain: Path, tmp_path: Path
) -> None:
    url = f"file://{tmp_path / 'bucket' / 'shot'}"
    job = client.render(scene, frames="3-6", chunk=2, results=url)
    outputs = frame_outputs(job)

    assert job.state == Status.DONE, job.error
    refs = {o.item: o.data.file for o in outputs}
    assert {f: ref.url for f, ref in refs.items()} == {
        f: f"{url}/frame_{f:06d}.png" for f in (3, 4, 5, 6)
    }
    assert not any(ref.digest for ref in refs.values()), "not kept by the gateway too"
    assert sorted(p.name for p in (tmp_path / "bucket" / "shot").iterdir()) == [
        f"frame_{f:06d}.png" for f in (3, 4, 5, 6)
    ]
    assert_same_as_plain(job.frames, plain)


def test_rerun_missing_renders_exactly_the_three_deleted_frames(
    client: pilot.Client, scene: Path, plain: Path
) -> None:
    job = client.render(scene, frames="1-8", chunk=4)
    frame_outputs(job)
    files = job.frames
    for frame in (2, 5, 7):
        Path(files[frame - 1]).unlink()

    assert job.missing_frames() == [2, 5, 7]
    again = job.rerun(missing=True)
    outputs = frame_outputs(again)

    assert again.state == Status.DONE, again.error
    assert sorted(o.item for o in outputs) == [2, 5, 7]
    assert sorted(again.render.done) == [2, 5, 7]
    assert_same_as_plain(again.frames, plain)


# -- failures ------------------------------------------------------------------------------------


def test_a_python_error_in_the_body_fails_at_once_with_its_traceback(
    client: pilot.Client, scene: Path
) -> None:
    body = "scene.cycles.samples = 4\nx = 1\nundefined_name + x\n"
    job = client.render(scene, frames="1-2", chunk=2, body=body, retries=3)
    assert not frame_outputs(job)

    with pytest.raises(TaskError) as caught:
        job.wait(0)
    (done,) = job.tasks.values()
    assert done.status == TaskStatus.ERROR and done.attempts == 1, "a script error is not retried"
    trace = caught.value.remote_traceback
    assert 'File "<render body>", line 3' in trace and "undefined_name + x" in trace
    assert "NameError" in str(caught.value)


def test_a_missing_scene_is_refused_at_submit(client: pilot.Client, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such \.blend file"):
        client.render(tmp_path / "nowhere.blend", frames="1-3")


def test_without_a_worker_that_has_blender_the_job_fails_saying_how_to_add_one(
    scene: Path, tmp_path: Path
) -> None:
    with pilot.LocalCluster(1, worker_args=("--no-blender",), timeouts=TEST_TIMEOUTS) as c:
        client = c.client()
        assert BLENDER_TAG not in client.status().workers[0].tags
        job = client.render(scene, frames="1-2", chunk=2)
        with pytest.raises(JobError) as caught:
            job.wait(RENDER_TIMEOUT_S)
        message = str(caught.value)
        assert "No connected worker has Blender" in message and "--blender" in message

        # A Blender named with --blender that does not work stops the worker at start.
        bad = tmp_path / "blender-not-here"
        command = [sys.executable, "-m", "pilot", "worker", "--connect", str(c.connection_file)]
        done = subprocess.run(
            [*command, "--blender", str(bad)],
            capture_output=True,
            text=True,
            timeout=RENDER_TIMEOUT_S,
            env=c.env,
        )
        assert done.returncode == 1
        assert f"Blender not found at {str(bad)!r} (from --blender)" in done.stderr


def test_a_task_process_that_rendered_keeps_a_blender_ready_for_its_next_chunk(
    cluster: pilot.LocalCluster, client: pilot.Client, scene: Path
) -> None:
    first = client.render(scene, frames="1-2", chunk=1)
    assert first.wait(RENDER_TIMEOUT_S).state == Status.DONE, first.error
    wait_until(lambda: spares(cluster), RENDER_TIMEOUT_S, "a spare Blender")
    ready = {p.pid for p in spares(cluster)}

    second = client.render(scene, frames="5-6", chunk=1)
    assert second.wait(RENDER_TIMEOUT_S).state == Status.DONE, second.error
    assert sorted(second.render.done) == [5, 6]
    # A spare renders one chunk and ends with it; the idle ones stay until they time out.
    wait_until(lambda: not ready <= {p.pid for p in spares(cluster)}, 30, "a spare to be used")
    assert spares(cluster), "the task process that used it started the next"


# -- cancel and deaths: no Blender left behind ------------------------------------------------


def test_cancel_mid_render_leaves_no_blender_running(
    cluster: pilot.LocalCluster, client: pilot.Client, scene: Path, tmp_path: Path
) -> None:
    job = client.render(scene, frames="1-4", chunk=4, body=held_body(3, tmp_path / "never"))
    # Frames 1 and 2 reach the client while Blender holds frame 3: they come live, not at the
    # end of the chunk.
    wait_until(lambda: {1, 2} <= job.render.done.keys(), RENDER_TIMEOUT_S, "frames 1 and 2")
    (blender,) = blenders(cluster.home)
    task_process = blender.parent()

    job.cancel()

    wait_until(lambda: gone([blender]), GONE_TIMEOUT_S, "Blender to be killed by the cancel")
    with pytest.raises(JobCancelled):
        job.wait(RENDER_TIMEOUT_S)
    assert not blenders(cluster.home)
    # The task process itself stopped the chunk on SIGINT: the worker, which SIGKILLs a task
    # process still running a cancelled task after the grace period, did not have to.
    with pytest.raises(psutil.TimeoutExpired):
        task_process.wait(TEST_TIMEOUTS.cancel_grace_s + 1.0)


def test_a_killed_task_process_takes_its_blender_and_the_chunk_reruns_skipping_stored_frames(
    cluster: pilot.LocalCluster, client: pilot.Client, scene: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    job = client.render(scene, frames="1-3", chunk=3, body=held_body(2, gate))
    wait_until(lambda: 1 in job.render.done, RENDER_TIMEOUT_S, "frame 1")
    (blender,) = blenders(cluster.home)
    task_process = blender.parent()
    assert task_process is not None and "worker._child" in " ".join(task_process.cmdline())

    task_process.send_signal(signal.SIGKILL)

    wait_until(lambda: gone([blender]), GONE_TIMEOUT_S, "Blender to die with its task process")
    gate.touch()
    outputs = frame_outputs(job)
    assert job.state == Status.DONE, job.error
    assert Counter(o.item for o in outputs) == {1: 1, 2: 1, 3: 1}, "frame 1 not rendered again"
    assert job.tasks[0].attempts == 2 and job.value(0) == (1, 2, 3)


def test_a_chunk_whose_worker_is_killed_reruns_elsewhere_without_its_stored_frames(
    scene: Path, plain: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with pilot.LocalCluster(2, timeouts=TEST_TIMEOUTS) as c:
        client = c.client()
        job = client.render(scene, frames="1-6", chunk=6, body=held_body(4, gate))
        wait_until(lambda: {1, 2, 3} <= job.render.done.keys(), RENDER_TIMEOUT_S, "frames 1-3")
        (blender,) = blenders(c.home)
        worker = blender.parent().parent()
        (victim,) = [p for p in c.workers if p.pid == worker.pid]
        victim_name = f"local-{c.workers.index(victim)}"

        victim.send_signal(signal.SIGKILL)
        victim.wait(GONE_TIMEOUT_S)

        wait_until(lambda: gone([blender]), GONE_TIMEOUT_S, "Blender to die with its worker")
        gate.touch()
        outputs = frame_outputs(job)
        assert job.state == Status.DONE, job.error
        assert Counter(o.item for o in outputs) == dict.fromkeys(range(1, 7), 1), (
            "each frame stored once: the rerun skipped frames 1-3"
        )
        (done,) = job.tasks.values()
        assert done.attempts == 2 and done.worker != victim_name
        assert job.value(0) == (1, 2, 3, 4, 5, 6)
        assert_same_as_plain(job.frames, plain)
        assert not blenders(c.home)
