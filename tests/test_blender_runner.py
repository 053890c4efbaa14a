"""Rendering's building blocks: frame specs, chunking, the Blender runner (with the real Blender),
failure classification, cancel, and the video and filmstrip made from frames.

The Blender tests use the ``blender`` on PATH (Debian's package in CI) and a scene that Blender's
own Python makes once per session (``tests/blender_scenes.py``); they are skipped, saying why,
only when there is no ``blender``. Waits are on events and deadlines, never on sleeps: where a
test needs Blender to be mid-chunk, the render body holds a frame until the test opens a gate.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from blender_scenes import SCENE_SIZE_PX, make_animated_scene
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from gateway.client._frames import MAX_FRAME, auto_chunk, chunk_frames, parse_frames
from gateway.client._video import VideoError, count_frames, filmstrip, make_video
from tests_support import wait_until
from worker._blender import (
    BlenderError,
    BlenderInfo,
    ChunkProcess,
    FailureKind,
    FrameSaved,
    RenderOptions,
    classify,
    find_blender,
    frame_path,
    probe_blender,
)
from worker._blender_failures import SCRIPT_ERROR_EXIT_CODE
from worker._blender_spare import SpareBlender

BLENDER = shutil.which("blender")
needs_blender = pytest.mark.skipif(
    BLENDER is None, reason="no `blender` on PATH: apt-get install blender to run these tests"
)
RUN_TIMEOUT_S = 90.0  # one chunk of the tiny test scene, on a loaded 2-core machine
HOLD_DEADLINE_S = 30.0  # a held frame waits at most this for its gate inside Blender


def held_body(frame: int, gate: Path, extra: str = "") -> str:
    """A render body that holds ``frame`` until ``gate`` exists (or ``HOLD_DEADLINE_S``)."""
    return f"""
import os, time
{extra}
def hold(scene, *args):
    if scene.frame_current == {frame}:
        deadline = time.monotonic() + {HOLD_DEADLINE_S}
        while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
bpy.app.handlers.frame_change_pre.append(hold)
"""


def run_in_thread(chunk: ChunkProcess, **kwargs):
    """Start ``chunk.run`` on a thread; returns the thread and a one-slot box for the result."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(chunk.run(**kwargs)), daemon=True)
    thread.start()
    return thread, box


def pixels(path: Path) -> np.ndarray:
    """An image's pixels as signed ints, so that differences do not wrap around."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes in process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue  # gone while we looked
    return found


@pytest.fixture(scope="session")
def blender() -> BlenderInfo:
    if BLENDER is None:
        pytest.skip("no `blender` on PATH")
    return find_blender()


@pytest.fixture(scope="session")
def scene(blender: BlenderInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_animated_scene(tmp_path_factory.mktemp("scene") / "scene.blend", blender.path)


# -- frame specs and chunks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "frames"),
    [
        ("1-5", (1, 2, 3, 4, 5)),
        ("1-10x3", (1, 4, 7, 10)),
        ("1,5,10-12", (1, 5, 10, 11, 12)),
        (" 7 , 3-4, 3 ", (3, 4, 7)),
        ("0-6 x 2", (0, 2, 4, 6)),
        (range(1, 241, 60), (1, 61, 121, 181)),
        ([9, 3, 3, 1], (1, 3, 9)),
        (42, (42,)),
    ],
)
def test_frame_specs_become_sorted_unique_frames(spec, frames) -> None:
    assert parse_frames(spec) == frames


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("5-1", "frame spec '5-1': the end must not be before the start"),
        ("1-9x0", "the step must be at least 1"),
        ("", "it names no frames"),
        ("1-a", "cannot read '1-a'"),
        ("1,,2", "cannot read ''"),
        ("-3", "cannot read '-3'"),
        (f"1-{MAX_FRAME + 1}", f"frames go up to {MAX_FRAME}"),
        ([1, 2.5], "2.5 is not a frame number"),
        ([True], "is not a frame number"),
        (range(5, 1), "it names no frames"),
        ([-1], "frame -1 is outside"),
    ],
)
def test_bad_frame_specs_say_what_is_wrong(spec, message) -> None:
    with pytest.raises(ValueError, match="frame spec") as raised:
        parse_frames(spec)
    assert message in str(raised.value)


def test_frames_are_cut_into_consecutive_chunks_the_last_shorter() -> None:
    assert chunk_frames((1, 3, 5, 7, 9), 2) == [(1, 3), (5, 7), (9,)]
    assert chunk_frames((), 10) == []
    with pytest.raises(ValueError, match="at least 1"):
        chunk_frames((1, 2), 0)


def test_auto_chunk_keeps_start_up_under_a_tenth_of_a_chunk_when_slots_stay_busy() -> None:
    # 1 s start-up, 0.1 s frames: 90 frames make start-up exactly a tenth of 10 s.
    assert auto_chunk(n_frames=10_000, n_slots=4, startup_s=1.0, frame_s=0.1) == 90
    # 240 frames on 30 slots: 8 per chunk keeps every slot busy, overhead notwithstanding.
    assert auto_chunk(n_frames=240, n_slots=30, startup_s=1.0, frame_s=0.1) == 8
    # Fewer frames than slots: one frame per chunk.
    assert auto_chunk(n_frames=5, n_slots=8, startup_s=1.0, frame_s=0.1) == 1
    # Slow frames amortise start-up at once.
    assert auto_chunk(n_frames=100, n_slots=2, startup_s=1.0, frame_s=60.0) == 1


@given(
    n_frames=st.integers(1, 5000),
    n_slots=st.integers(1, 64),
    startup_s=st.floats(0.0, 30.0),
    frame_s=st.floats(0.001, 600.0),
)
def test_auto_chunk_either_amortises_start_up_or_keeps_every_slot_busy(
    n_frames: int, n_slots: int, startup_s: float, frame_s: float
) -> None:
    chunk = auto_chunk(n_frames, n_slots, startup_s, frame_s)
    assert 1 <= chunk <= n_frames
    chunks = len(chunk_frames(range(n_frames), chunk))
    assert chunks >= min(n_slots, n_frames), "a slot is left idle although frames allow"
    amortised = startup_s <= 0.1 * (startup_s + chunk * frame_s) + 1e-9
    bigger_would_idle_a_slot = len(chunk_frames(range(n_frames), chunk + 1)) < n_slots
    assert chunk == 1 or chunks >= n_slots
    assert amortised or bigger_would_idle_a_slot or chunk == n_frames


def test_auto_chunk_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="frame time must be positive"):
        auto_chunk(10, 2, startup_s=1.0, frame_s=0.0)
    with pytest.raises(ValueError, match="at least 1"):
        auto_chunk(0, 2, startup_s=1.0, frame_s=1.0)


# -- classifying failures from Blender's output (captured text) ---------------------------------

DENOISER_OUTPUT = """\
Read blend: /tmp/scene.blend
Build without OpenImageDenoiser
No device available to denoise on
Error: Build without OpenImageDenoiser
PILOT_RENDER_ERROR
while rendering frame 1:
Traceback (most recent call last):
RuntimeError: Error: Build without OpenImageDenoiser
PILOT_RENDER_ERROR_END""".splitlines()


def test_a_missing_denoiser_is_code_side_and_says_how_to_turn_denoising_off() -> None:
    failure = classify(66, DENOISER_OUTPUT, [1], [], scene="s.blend", version="3.4.1")
    assert failure is not None and failure.kind is FailureKind.DENOISER_MISSING
    assert not failure.kind.machine_side
    assert "OpenImageDenoise" in failure.message and "use_denoising" in failure.message
    assert "Build without OpenImageDenoiser" in failure.traceback


@pytest.mark.parametrize(
    ("returncode", "saved", "kind"),
    [
        (-signal.SIGKILL, [], FailureKind.KILLED_OR_OOM),
        (128 + signal.SIGKILL, [], FailureKind.KILLED_OR_OOM),
        (-signal.SIGTERM, [1], FailureKind.KILLED_OR_OOM),
        (-signal.SIGSEGV, [], FailureKind.CRASHED),
        (1, [1, 2], FailureKind.CRASHED),
        (0, [1], FailureKind.NO_FRAME_WRITTEN),
        (SCRIPT_ERROR_EXIT_CODE, [], FailureKind.SCRIPT_ERROR),
    ],
)
def test_exit_statuses_are_classified(returncode: int, saved: list[int], kind) -> None:
    failure = classify(returncode, ["Blender 3.4.1", "Blender quit"], [1, 2], saved)
    assert failure is not None and failure.kind is kind
    assert failure.kind.machine_side == (kind is not FailureKind.SCRIPT_ERROR)
    assert failure.output_tail.endswith("Blender quit")


def test_a_chunk_that_saved_all_its_frames_and_exited_zero_did_not_fail() -> None:
    assert classify(0, ["Blender quit"], [1, 2], [2, 1]) is None


def test_a_failure_becomes_a_blender_error_with_its_traceback() -> None:
    output = ["Blender 3.4.1", "PILOT_SCRIPT_ERROR", "Boom", "PILOT_SCRIPT_ERROR_END"]
    failure = classify(SCRIPT_ERROR_EXIT_CODE, output, [1], [])
    assert failure is not None
    error = failure.error()
    assert isinstance(error, BlenderError) and error.kind is FailureKind.SCRIPT_ERROR
    assert str(error).endswith("Boom")


# -- finding Blender ----------------------------------------------------------------------------


def test_a_blender_path_that_does_not_exist_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(BlenderError, match="--blender") as raised:
        find_blender(tmp_path / "no-blender")
    assert raised.value.kind is FailureKind.BLENDER_NOT_FOUND
    with pytest.raises(BlenderError, match=r"\$PILOT_BLENDER"):
        find_blender(env_value=str(tmp_path / "no-blender"))


def test_no_blender_on_path_says_how_to_install_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(BlenderError, match="apt-get install blender"):
        find_blender()


def test_an_executable_that_is_not_blender_is_not_accepted() -> None:
    with pytest.raises(BlenderError, match="does not run") as raised:
        probe_blender(shutil.which("true") or "/bin/true")
    assert raised.value.kind is FailureKind.BLENDER_NOT_FOUND


@needs_blender
def test_blender_is_found_with_its_version(blender: BlenderInfo) -> None:
    assert os.path.isabs(blender.path)
    assert blender.version.count(".") >= 1 and blender.version[0].isdigit()
    assert find_blender(blender.path) == blender
    assert find_blender(env_value=blender.path) == blender


# -- the runner with the real Blender -----------------------------------------------------------


@needs_blender
def test_runner_frames_equal_a_plain_blender_run_pixel_for_pixel(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    frames = [1, 17, 48]
    plain = [blender.path, "-b", str(scene), "-o", str(tmp_path / "plain" / "f_######")]
    for frame in frames:
        plain += ["-f", str(frame)]
    done = subprocess.run(plain, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:]

    result = ChunkProcess(blender, scene, frames, tmp_path / "chunk").run()

    assert result.ok, result.failure
    assert [event.frame for event in result.frames] == frames
    for event in result.frames:
        assert event.path == frame_path(tmp_path / "chunk", event.frame)
        ours = pixels(event.path)
        theirs = pixels(tmp_path / "plain" / f"f_{event.frame:06d}.png")
        assert ours.shape == (SCENE_SIZE_PX, SCENE_SIZE_PX, 4)
        assert np.abs(ours - theirs).max() <= 1, f"frame {event.frame} differs"
    first, last = (pixels(e.path) for e in (result.frames[0], result.frames[-1]))
    assert not np.array_equal(first, last), "the scene should move between frames"


@needs_blender
def test_each_frame_event_arrives_while_blender_is_still_running(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    # Blender holds frame 3 until the gate opens; the gate opens on the first event. Were events
    # delivered only at exit, frame 1's would come after the hold's deadline, Blender gone.
    gate = tmp_path / "gate"
    options = RenderOptions(samples=4, threads=1, body=held_body(3, gate))
    chunk = ChunkProcess(blender, scene, [1, 2, 3], tmp_path / "out", options)
    seen: list[tuple[FrameSaved, bool]] = []

    def on_frame(event: FrameSaved) -> None:
        assert chunk.pid is not None
        running = psutil.Process(chunk.pid).status() != psutil.STATUS_ZOMBIE
        seen.append((event, running))
        gate.touch()

    result = chunk.run(on_frame=on_frame)

    assert result.ok, result.failure
    assert [event.frame for event, _ in seen] == [1, 2, 3]
    assert seen[0][1], "frame 1 arrived only after Blender exited"
    assert seen[0][0].elapsed_s < result.elapsed_s


@needs_blender
def test_a_python_error_in_the_body_is_a_script_error_with_the_bodys_traceback(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    body = "scene.cycles.samples = 4\nx = 1\nundefined_name + x\n"
    output: list[str] = []
    chunk = ChunkProcess(blender, scene, [1, 2], tmp_path, RenderOptions(body=body))

    result = chunk.run(on_output=output.append)

    failure = result.failure
    assert failure is not None and failure.kind is FailureKind.SCRIPT_ERROR, result
    assert not failure.kind.machine_side
    assert result.returncode == SCRIPT_ERROR_EXIT_CODE and result.frames == ()
    assert 'File "<render body>", line 3, in <module>' in failure.traceback
    assert "undefined_name + x" in failure.traceback  # the line itself is quoted
    assert "NameError: name 'undefined_name' is not defined" in failure.traceback
    assert "_blender_driver" not in failure.traceback, "the driver's frames are noise"
    assert any("NameError" in line for line in output), "the traceback is shown live too"


@needs_blender
def test_a_missing_scene_is_scene_missing_before_blender_starts(
    blender: BlenderInfo, tmp_path: Path
) -> None:
    result = ChunkProcess(blender, tmp_path / "nowhere.blend", [1], tmp_path).run()
    assert result.failure is not None and result.failure.kind is FailureKind.SCENE_MISSING
    assert result.returncode is None, "Blender should not have been started"
    assert "does not exist" in result.failure.message


@needs_blender
def test_an_unreadable_scene_is_scene_missing_from_blenders_own_words(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.blend"
    broken.write_bytes(scene.read_bytes()[:5000])  # the header is right, the rest is gone

    result = ChunkProcess(blender, broken, [1], tmp_path / "out").run()

    assert result.failure is not None and result.failure.kind is FailureKind.SCENE_MISSING
    assert result.returncode not in (None, 0)
    assert "broken.blend" in result.failure.message


@needs_blender
def test_frames_already_stored_are_skipped(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    chunk = ChunkProcess(blender, scene, [4, 5, 6], tmp_path, RenderOptions(samples=4), stored=[5])

    result = chunk.run()

    assert result.ok, result.failure
    assert [event.frame for event in result.frames] == [4, 6]
    assert result.skipped == (5,)
    assert not frame_path(tmp_path, 5).exists()


@needs_blender
def test_a_chunk_whose_frames_are_all_stored_starts_no_blender(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    result = ChunkProcess(blender, scene, [1, 2], tmp_path, stored=[1, 2]).run()
    assert result.ok and result.returncode is None and result.skipped == (1, 2)


@needs_blender
def test_cancel_kills_blenders_whole_process_group_within_two_seconds(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    # The body starts a child (in Blender's process group) and holds frame 2 forever.
    spawn = "import subprocess\nchild = subprocess.Popen(['sleep', '600'])\n"
    spawn += "print('CHILD', child.pid, flush=True)"
    body = held_body(2, tmp_path / "never", extra=spawn)
    chunk = ChunkProcess(blender, scene, [1, 2, 3], tmp_path / "out", RenderOptions(body=body))
    first_frame = threading.Event()
    children: list[int] = []

    def on_output(line: str) -> None:
        if line.startswith("CHILD "):
            children.append(int(line.split()[1]))

    thread, box = run_in_thread(chunk, on_frame=lambda _: first_frame.set(), on_output=on_output)
    assert first_frame.wait(RUN_TIMEOUT_S), "Blender saved no frame"
    assert chunk.pid is not None and children
    assert {p.pid for p in group_members(chunk.pid)} >= {chunk.pid, children[0]}

    started = time.monotonic()
    chunk.cancel()
    took_s = time.monotonic() - started

    assert took_s < 2.0, f"cancel took {took_s:.2f} s"
    thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive()
    (result,) = box
    assert result.cancelled and result.failure is None
    assert [event.frame for event in result.frames] == [1]
    wait_until(lambda: not group_members(chunk.pid), timeout=5.0, what="Blender's group to go")


@needs_blender
def test_blender_killed_mid_chunk_is_a_machine_side_failure(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    chunk = ChunkProcess(
        blender, scene, [1, 2], tmp_path, RenderOptions(body=held_body(2, tmp_path / "never"))
    )
    first_frame = threading.Event()
    thread, box = run_in_thread(chunk, on_frame=lambda _: first_frame.set())
    assert first_frame.wait(RUN_TIMEOUT_S), "Blender saved no frame"
    assert chunk.pid is not None

    os.killpg(chunk.pid, signal.SIGKILL)  # what the OOM killer does (to one process)

    thread.join(RUN_TIMEOUT_S)
    (result,) = box
    assert result.failure is not None and result.failure.kind is FailureKind.KILLED_OR_OOM
    assert result.failure.kind.machine_side and "SIGKILL" in result.failure.message
    assert [event.frame for event in result.frames] == [1]


@needs_blender
def test_a_scene_blender_refuses_to_render_is_a_render_error(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    options = RenderOptions(body="scene.camera = None")
    result = ChunkProcess(blender, scene, [1], tmp_path, options).run()
    assert result.failure is not None and result.failure.kind is FailureKind.RENDER_ERROR
    assert not result.failure.kind.machine_side
    assert "camera" in result.failure.message.lower()


@needs_blender
def test_denoising_on_a_blender_without_openimagedenoise_is_denoiser_missing(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    body = "scene.cycles.use_denoising = True\n"
    body += "for layer in scene.view_layers:\n    layer.cycles.use_denoising = True\n"
    result = ChunkProcess(blender, scene, [1], tmp_path, RenderOptions(body=body)).run()
    if result.ok:
        pytest.skip(f"Blender {blender.version} here has OpenImageDenoise")
    assert result.failure is not None and result.failure.kind is FailureKind.DENOISER_MISSING
    assert "use_denoising" in result.failure.message


@needs_blender
def test_options_set_resolution_format_and_fall_back_to_the_cpu_without_gpus(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    options = RenderOptions(samples=2, resolution=(33, 21), file_format="JPEG", threads=1, gpus=1)

    result = ChunkProcess(blender, scene, [7], tmp_path, options).run()

    assert result.ok, result.failure
    (event,) = result.frames
    assert event.path == frame_path(tmp_path, 7, "JPEG")
    assert pixels(event.path).shape[:2] == (21, 33)
    assert any("rendering on" in w for w in result.warnings), "no word on the GPU it used"


# -- video and filmstrip ------------------------------------------------------------------------


def write_frames(directory: Path, count: int, size=(33, 21), first: int = 1, step: int = 1):
    """``count`` PNGs of odd size with frame numbers ``first``, ``first+step``...; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        frame = first + i * step
        image = Image.new("RGB", size, (i * 10 % 256, 128, 255 - i * 10 % 256))
        paths.append(directory / f"frame_{frame:06d}.png")
        image.save(paths[-1])
    return paths


def test_24_frames_become_an_mp4_of_24_frames(tmp_path: Path) -> None:
    frames = write_frames(tmp_path / "frames", 24, first=1, step=5)  # 1, 6, 11...: a step

    video = make_video(frames, tmp_path / "out" / "anim.mp4", fps=12)

    assert video == tmp_path / "out" / "anim.mp4" and video.stat().st_size > 0
    assert count_frames(video) == 24
    assert not any(p.name.startswith("pilot-video-") for p in tmp_path.iterdir())


def test_a_frame_ffmpeg_cannot_read_is_a_video_error_quoting_ffmpeg(tmp_path: Path) -> None:
    frames = write_frames(tmp_path, 3)
    frames[1].write_bytes(b"not a png")
    with pytest.raises(VideoError, match="ffmpeg failed") as raised:
        make_video(frames, tmp_path / "anim.mp4")
    assert len(str(raised.value).splitlines()) > 1, "ffmpeg's own words are missing"


def test_make_video_rejects_mixed_formats_and_missing_frames(tmp_path: Path) -> None:
    frames = write_frames(tmp_path, 2)
    jpeg = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(jpeg)
    with pytest.raises(ValueError, match="must all be PNG or all JPEG"):
        make_video([*frames, jpeg], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="missing"):
        make_video([*frames, tmp_path / "gone.png"], tmp_path / "a.mp4")


def test_a_filmstrip_is_a_png_of_evenly_chosen_thumbnails(tmp_path: Path) -> None:
    frames = write_frames(tmp_path, 30, size=(64, 32))

    with Image.open(io.BytesIO(filmstrip(frames, max_frames=5, thumb_height=16))) as strip:
        assert strip.format == "PNG" and strip.height == 16
        assert strip.width == 5 * 32 + 4 * 2  # five 32-px thumbnails, four 2-px gaps


# -- a spare Blender, started before its chunk ----------------------------------------------------


@needs_blender
def test_a_spare_blender_renders_the_frames_a_cold_one_does(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    frames = [1, 24]
    cold = ChunkProcess(blender, scene, frames, tmp_path / "cold").run()
    spare = SpareBlender(blender.path)
    warm = ChunkProcess(blender, scene, frames, tmp_path / "warm").run(spare=spare)

    assert cold.ok and warm.ok, (cold.failure, warm.failure)
    assert (cold.warm, warm.warm) == (False, True)
    assert spare.proc.poll() is not None, "a spare serves one chunk and is gone with it"
    for a, b in zip(cold.frames, warm.frames, strict=True):
        assert a.frame == b.frame
        assert np.abs(pixels(a.path) - pixels(b.path)).max() <= 1, f"frame {a.frame} differs"


@needs_blender
def test_a_spare_not_taken_in_time_exits_and_a_gone_one_is_passed_over(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    idle = SpareBlender(blender.path, idle_s=0.2)
    assert idle.proc.wait(timeout=RUN_TIMEOUT_S) == 0, "it exits by itself, quietly"

    result = ChunkProcess(blender, scene, [3], tmp_path / "out").run(spare=idle)
    assert result.ok and not result.warm, "a cold Blender rendered it instead"
    assert [e.frame for e in result.frames] == [3]


@needs_blender
def test_a_spare_given_an_unreadable_scene_says_scene_missing(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.blend"
    broken.write_bytes(scene.read_bytes()[:5000])

    result = ChunkProcess(blender, broken, [1], tmp_path / "out").run(
        spare=SpareBlender(blender.path)
    )

    assert result.warm and result.failure is not None
    assert result.failure.kind is FailureKind.SCENE_MISSING
    assert "broken.blend" in result.failure.message


@needs_blender
def test_cancel_kills_a_spare_blender_mid_chunk(
    blender: BlenderInfo, scene: Path, tmp_path: Path
) -> None:
    options = RenderOptions(body=held_body(2, tmp_path / "never"))
    chunk = ChunkProcess(blender, scene, [1, 2], tmp_path / "out", options)
    spare = SpareBlender(blender.path)
    first_frame = threading.Event()
    thread, box = run_in_thread(chunk, on_frame=lambda _: first_frame.set(), spare=spare)
    assert first_frame.wait(RUN_TIMEOUT_S), "the spare saved no frame"
    chunk.cancel()
    thread.join(RUN_TIMEOUT_S)
    assert box and box[0].cancelled and box[0].warm
    assert not group_members(spare.proc.pid), "nothing of the spare's group is left"
