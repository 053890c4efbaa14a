"""%%distribute --ddp N and --render FILE in a real stock IPython kernel.

Option errors need no gateway (a kernel with the extension loaded and nothing to connect to);
the training and render cells run on a real LocalCluster of two workers (real
torch.distributed with gloo, a real Blender) and are checked on the kernel's IOPub messages:
the labelled lines, the displays and their in-place updates, and the gathered values. The
metrics table and plot are also drawn directly (``MetricsBoard`` is pure).
"""

from __future__ import annotations

import ast
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from blender_scenes import make_animated_scene

import pilot
from gateway.client import Job
from gateway.client._render import RenderOutput
from gateway.protocol import FileRef, FrameDone, JobUpdate, Output, OutputKind, Status
from pilot_magics._frames_view import RenderRun
from pilot_magics._metrics import PLOT_POINTS, MetricsBoard
from pilot_magics._train_view import TrainRun
from tests_support import TEST_TIMEOUTS, Execution, KernelDriver, wait_until

BLENDER = shutil.which("blender")
RUN_TIMEOUT_S = 240.0  # a cell on a loaded 2-core machine: two ranks importing torch, Blender


# -- the metrics board, drawn directly -----------------------------------------------------------


def test_the_table_holds_each_ranks_latest_report_step_first() -> None:
    board = MetricsBoard()
    for step in range(3):
        for rank in (1, 0):
            board.add({"rank": rank, "time": 0.0, "loss": 1.0 / (step + 1), "acc": "ok"})
            board.add({"rank": rank, "time": 0.0, "step": step})
    assert board.columns == ["step", "loss", "acc"]
    rows = board.table_text().splitlines()
    assert rows[0].split() == ["rank", "step", "loss", "acc", "reports"]
    assert rows[1].split() == ["0", "2", "6"], "a report without loss leaves those cells empty"
    assert rows[2].split() == ["1", "2", "6"]
    board.add({"rank": 0, "time": 0.0, "step": 3, "loss": 0.25, "acc": "<b>"})
    assert board.table_text().splitlines()[1].split() == ["0", "3", "0.25", "<b>", "7"]
    assert "&lt;b&gt;" in board.table_html() and "<b>" not in board.table_html()


def test_the_plot_draws_loss_by_step_per_rank_and_marks_restarts() -> None:
    board = MetricsBoard()
    assert board.plot_svg() == "", "no plot before a step and a loss"
    for step in range(1000):
        for rank in range(2):
            board.add({"rank": rank, "time": 0.0, "step": step, "loss": 2.0 / (step + 1) + rank})
    board.restarted()
    board.add({"rank": 0, "time": 0.0, "step": 900, "loss": 0.5})  # resumed from step 900
    svg = ET.fromstring(board.plot_svg())
    ns = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f"{ns}polyline")
    assert [line.find(f"{ns}title").text for line in lines] == ["rank 0", "rank 1"]
    assert all(len(line.get("points").split()) == PLOT_POINTS for line in lines)
    assert len(board.losses[0]) == 1000, "a step reported again replaces its point"
    assert len(svg.findall(f"{ns}line")) == 1 and board.restarts == 1
    assert board.restart_steps == [900.0]


# -- the views, fed a job's events in this process ---------------------------------------------


def fed_job(job_id: str, events: list) -> Job:
    """A ``Job`` seen from the user's thread, its events put in as its client's IO thread
    would (``on_event``), ending with the job's end."""
    job = Job(None, None, job_id=job_id)  # type: ignore[arg-type]  # no client: nothing sent
    if job_id.startswith("render"):
        job.render = RenderOutput(
            tuple(sorted(e.item for e in events if e.kind == OutputKind.FRAME))
        )
    for ev in [*events, JobUpdate(job_id, Status.DONE)]:
        job.on_event(ev)
    return job


def test_a_training_view_counts_restarts_and_shows_only_the_rank_asked(capsys) -> None:
    note = b"[pilot] rank 1 ended (lost): the group stopped and restarts from its latest "
    events = [
        Output("train", 0, -1, OutputKind.STDOUT, b"[rank 0] zero\n"),
        Output("train", 1, -1, OutputKind.STDOUT, b"[rank 1] one\n"),
        Output("train", -1, -1, OutputKind.STDERR, note + b"checkpoint (restart 1)\n"),
        Output("train", 1, -1, OutputKind.METRICS, {"rank": 1, "time": 0.0, "step": 3}),
    ]
    run = TrainRun(fed_job("train", events), ranks=2, rank_output=1, rich=False)
    run.follow()
    out, err = capsys.readouterr()
    assert "[rank 1] one" in out and "zero" not in out, "rank 1's lines only, labelled once"
    assert "(restart 1)" in err and run.board.restarts == 1
    assert "1 restart" in run.summary() and "1 reports" in run.summary()


def test_a_render_view_flags_frames_from_different_blender_versions(capsys) -> None:
    events = [
        Output("render", 0, f, OutputKind.FRAME, FrameDone(f, FileRef(f"{f}.png", 1), b"", v))
        for f, v in ((1, "3.4.1"), (2, "3.4.1"), (3, "4.2.0"))
    ]
    run = RenderRun(fed_job("render", events), (1, 2, 3), rich=False)
    run.follow()
    run.finish(video=False)
    err = capsys.readouterr().err
    assert "3/3 frames" in err
    assert "different Blender versions (3.4.1: 2 frames; 4.2.0: 1 frame)" in err


# -- option errors: no gateway needed ------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelDriver]:
    home = tmp_path_factory.mktemp("no-gateway")
    k = KernelDriver(env={"PILOT_HOME": str(home), "IPYTHONDIR": str(home / "ipython")})
    try:
        assert k.run("%load_ext pilot_magics").status == "ok"
        yield k
    finally:
        k.shutdown()


def usage_error(ex: Execution) -> str:
    assert ex.status == "error"
    reply = ex.reply["content"]  # IPython prints usage errors: no traceback message
    assert reply["ename"] == "UsageError", reply
    assert reply["evalue"] in ex.stderr
    return reply["evalue"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("--ddp 2 --over x=range(3)", "--over makes no sense with --ddp"),
        ("--ddp 2 --partitions 2", "--partitions makes no sense with --ddp"),
        ("--ddp 2 --chunk 4", "--chunk makes no sense with --ddp"),
        ("--ddp 0", "--ddp must be at least 1"),
        ("--ddp two", "--ddp needs a whole number"),
        ("--restarts 2", "--restarts is an option of --ddp N cells"),
        ("--ddp 2 --rank-output 2", "--rank-output 2: ranks go from 0 to 1"),
        ("--ddp 2 --backend mpi", "--backend is one of auto, gloo, nccl"),
        ("--ddp 2 --restarts 1 --min-ranks 3", "--min-ranks 3 is more than the --ddp 2 ranks"),
        ("--ddp 2 --min-ranks 1", "give --restarts R"),
        ("--ddp 2 --init-timeout 0", "--init-timeout must be more than 0 seconds"),
        ("--ddp 2 --gather a --async b", "pick one"),
        ("--ddp 2 --render a.blend --frames 1", "--ddp or --render, not both"),
    ],
)
def test_bad_ddp_options_are_usage_errors(
    bare_kernel: KernelDriver, line: str, expected: str
) -> None:
    assert expected in usage_error(bare_kernel.run(f"%%distribute {line}\n1"))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("--render a.blend", "--render needs --frames"),
        ("--render a.blend --frames 1-x", "write frames as N, START-END or START-ENDxSTEP"),
        ("--render a.blend --frames 1 --over f=range(2)", "--over makes no sense with --render"),
        ("--render a.blend --frames 1 --until result", "--until makes no sense with --render"),
        ("--frames 1-10", "--frames is an option of --render FILE cells"),
        ("--missing-only", "--missing-only is an option of --render FILE cells"),
        ("--render a.blend --frames 1 --format TIFF", "--format is PNG, JPEG or OPEN_EXR"),
        ("--render a.blend --frames 1 --format EXR --video a.mp4", "--video needs PNG or JPEG"),
        ("--render a.blend --frames 1 --resolution 64", "--resolution needs WIDTHxHEIGHT"),
        ("--render a.blend --frames 1 --samples 0", "--samples must be at least 1"),
        ("--render a.blend --frames 1 --fps -1", "--fps must be more than 0"),
        ("--render a.blend --frames 1 --missing-only", "drop --frames"),
        ("--render nowhere.blend --frames 1", "--render nowhere.blend: no such .blend file"),
    ],
)
def test_bad_render_options_are_usage_errors(
    bare_kernel: KernelDriver, line: str, expected: str, tmp_path: Path
) -> None:
    (tmp_path / "a.blend").write_bytes(b"not read before the options are checked")
    bare_kernel.run(f"import os\nos.chdir({str(tmp_path)!r})")
    assert expected in usage_error(bare_kernel.run(f"%distribute {line}"))


def test_render_body_syntax_and_missing_only_without_a_render_are_usage_errors(
    bare_kernel: KernelDriver, tmp_path: Path
) -> None:
    (tmp_path / "a.blend").write_bytes(b"x")
    bare_kernel.run(f"import os\nos.chdir({str(tmp_path)!r})")
    ex = bare_kernel.run("%%distribute --render a.blend --frames 1-3\nscene.cycles.samples = = 2")
    assert "The cell (Blender Python) has a syntax error (line 1)" in usage_error(ex)
    ex = bare_kernel.run("%distribute --render a.blend --missing-only")
    assert "there is none: run the cell without --missing-only" in usage_error(ex)
    ex = bare_kernel.run("%distribute --ddp 2")
    assert "%distribute without a cell runs nothing" in usage_error(ex)


# -- real jobs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[pilot.LocalCluster]:
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS, blender=BLENDER) as c:
        yield c


@pytest.fixture(scope="module")
def kernel(cluster: pilot.LocalCluster, tmp_path_factory) -> Iterator[KernelDriver]:
    ipydir = tmp_path_factory.mktemp("ipython")
    k = KernelDriver(env={"PILOT_HOME": str(cluster.home), "IPYTHONDIR": str(ipydir)})
    try:
        assert k.run("%load_ext pilot_magics").status == "ok"
        yield k
    finally:
        k.shutdown()


def value(kernel: KernelDriver, expression: str) -> object:
    ex = kernel.run(expression)
    assert ex.status == "ok", ex.messages
    return ast.literal_eval(ex.of("execute_result")[0]["content"]["data"]["text/plain"])


def displays(ex: Execution) -> dict[str, list[dict]]:
    """Each display_id's bundles, the first shown and then its updates, in order."""
    out: dict[str, list[dict]] = {}
    for m in ex.of("display_data", "update_display_data"):
        display_id = (m["content"].get("transient") or {}).get("display_id")
        if display_id:
            out.setdefault(display_id, []).append(m["content"]["data"])
    return out


TRAIN_CELL = """\
import torch, torch.distributed as dist
import pilot.train as pt
rank = dist.get_rank()
for step in range(5):
    t = torch.tensor([float(rank + step)])
    dist.all_reduce(t)
    print("step", step, "sum", t.item())
    pt.report(step=step, loss=1.0 / (step + 1) + rank)
(rank, dist.get_world_size(), t.item())
"""


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_cell_labels_ranks_shows_metrics_and_gathers_in_rank_order(
    kernel: KernelDriver,
) -> None:
    ex = kernel.run(f"%%distribute --ddp 2 --gather final\n{TRAIN_CELL}", RUN_TIMEOUT_S)
    assert ex.status == "ok", ex.stderr
    for rank in range(2):
        for step in range(5):
            assert f"[rank {rank}] step {step} sum {2.0 * step + 1}" in ex.stdout.splitlines()
    assert "2 ranks on" in ex.stdout and "10 reports" in ex.stdout
    (board,) = [b for b in displays(ex).values() if "text/html" in b[0]]
    last = board[-1]
    assert len(board) > 1, "the table is one display updated in place"
    assert "<table" in last["text/html"] and "<svg" in last["text/html"]
    rows = [line.split() for line in last["text/plain"].splitlines()[1:]]
    assert rows[0] == ["rank", "step", "loss", "reports"]
    assert rows[1] == ["0", "4", "0.2", "5"] and rows[2] == ["1", "4", "1.2", "5"]
    assert value(kernel, "final") == [(0, 2, 9.0), (1, 2, 9.0)]
    kernel.run("from pilot_magics import _loaded\nmagics = next(iter(_loaded.values()))")
    metrics = value(kernel, "[(m['rank'], m['step']) for m in magics.last_job.metrics]")
    assert sorted(metrics) == [(r, s) for r in range(2) for s in range(5)]


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_rank_output_shows_only_that_ranks_lines(kernel: KernelDriver) -> None:
    ex = kernel.run(f"%%distribute --ddp 2 --rank-output 1\n{TRAIN_CELL}", RUN_TIMEOUT_S)
    assert ex.status == "ok", ex.stderr
    assert "[rank 1] step 4 sum 9.0" in ex.stdout and "[rank 0]" not in ex.stdout


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if BLENDER is None:
        pytest.skip("no `blender` on PATH")
    return make_animated_scene(tmp_path_factory.mktemp("scene") / "scene.blend", BLENDER)


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_render_cell_shows_frames_a_live_preview_filmstrip_and_video(
    kernel: KernelDriver, scene: Path, tmp_path: Path
) -> None:
    video = tmp_path / "anim.mp4"
    line = f"--render {scene} --frames 1-6 --chunk 3 --samples 2 --video {video} --gather frames"
    ex = kernel.run(f"%%distribute {line}\nscene.cycles.samples = 2", RUN_TIMEOUT_S)
    assert ex.status == "ok", ex.stderr
    shown = displays(ex)
    (progress,) = [b for b in shown.values() if "frames" in b[0]["text/plain"]]
    assert progress[0]["text/plain"].startswith("0/6 frames")
    assert progress[-1]["text/plain"].startswith("6/6 frames")
    (preview,) = [b for b in shown.values() if b[0]["text/plain"].startswith("preview")]
    assert len(preview) > 1 and all("image/png" in b for b in preview[1:])
    assert preview[-1]["text/plain"].startswith("frame ")
    ends = [m["content"]["data"] for m in ex.of("display_data")]
    assert any(d["text/plain"].startswith("filmstrip of 6") and "image/png" in d for d in ends)
    videos = [d["text/html"] for d in ends if "<video" in d.get("text/html", "")]
    assert videos and "data:video/mp4;base64," in videos[0] and video.is_file()
    assert "6 frames in 2 chunks" in ex.stdout
    frames = value(kernel, "frames")
    assert isinstance(frames, list) and len(frames) == 6
    assert all(os.path.isfile(f) for f in frames) and frames == sorted(frames)

    # --missing-only renders exactly the frames whose files are gone, then the whole set
    for gone in (frames[1], frames[4]):
        os.remove(gone)
    line = line.replace("--frames 1-6", "--missing-only").replace("frames", "again")
    ex = kernel.run(f"%%distribute {line}\nscene.cycles.samples = 2", RUN_TIMEOUT_S)
    assert ex.status == "ok", ex.stderr
    (progress,) = [b for b in displays(ex).values() if "frames" in b[0]["text/plain"]]
    assert progress[-1]["text/plain"].startswith("2/2 frames")
    again = value(kernel, "again")
    assert isinstance(again, list) and len(again) == 6 and all(os.path.isfile(f) for f in again)


def interrupt_when(kernel: KernelDriver, code: str, seen) -> Execution:
    """Run ``code``, interrupt the kernel at the first IOPub message ``seen(msg)`` accepts,
    and return the execution."""
    msg_id = kernel.kc.execute(code)
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=RUN_TIMEOUT_S)
        if msg["parent_header"].get("msg_id") == msg_id and seen(msg):
            break
    kernel.km.interrupt_kernel()
    return kernel.collect(msg_id, timeout=30)


def last_job_state(cluster: pilot.LocalCluster) -> Status:
    client = cluster.client()
    wait_until(lambda: client.jobs(1)[0].state.finished, timeout=10, what="the job ended")
    return client.jobs(1)[0].state


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupt_cancels_a_render(
    kernel: KernelDriver, cluster: pilot.LocalCluster, scene: Path
) -> None:
    def a_frame_arrived(msg: dict) -> bool:
        return msg["msg_type"] == "update_display_data" and "image/png" in msg["content"]["data"]

    slow = "import time\nbpy.app.handlers.frame_change_pre.append(lambda *_: time.sleep(0.5))"
    line = f"--render {scene} --frames 1-48 --chunk 24"  # 12 s a chunk: interrupted sooner
    ex = interrupt_when(kernel, f"%%distribute {line}\n{slow}", a_frame_arrived)
    assert ex.status == "error" and ex.reply["content"]["ename"] == "KeyboardInterrupt"
    assert last_job_state(cluster) == Status.CANCELLED
    after = kernel.run("1 + 1")
    assert after.status == "ok", ("the kernel is usable again", after.reply["content"])


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupt_cancels_a_training(kernel: KernelDriver, cluster: pilot.LocalCluster) -> None:
    def a_rank_printed(msg: dict) -> bool:
        return msg["msg_type"] == "stream" and "[rank " in msg["content"]["text"]

    cell = "%%distribute --ddp 2\nimport time\nprint('training', flush=True)\ntime.sleep(600)"
    ex = interrupt_when(kernel, cell, a_rank_printed)
    assert ex.status == "error" and ex.reply["content"]["ename"] == "KeyboardInterrupt"
    assert last_job_state(cluster) == Status.CANCELLED
    after = kernel.run("1 + 1")
    assert after.status == "ok", ("the kernel is usable again", after.reply["content"])


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_python_error_in_the_render_body_ends_the_cell_with_its_traceback(
    kernel: KernelDriver, scene: Path
) -> None:
    cell = f"%%distribute --render {scene} --frames 1-2 --chunk 2\nraise ValueError('bad body')"
    ex = kernel.run(cell)
    assert ex.status == "error" and ex.error["ename"] == "RemoteCellError"
    assert "ValueError: bad body" in "\n".join(ex.error["traceback"])
    assert "[frames 1-2] failed on" in ex.stderr and "--missing-only" in ex.error["evalue"]
