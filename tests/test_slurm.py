"""Workers as Slurm jobs on a real single-node Slurm (``tests/slurm.py``): ``pilot scale slurm``,
a cancelled worker job, a worker at its time limit, adaptive scaling, and Slurm's refusals.

The gateway is a ``LocalCluster(workers=0)`` on 127.0.0.1 (the node is this machine); every
worker comes from ``sbatch``. Waits have deadlines; nothing sleeps to wait for a start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm import SlurmCluster
from slurm import slurm_fixture as slurm_fixture  # the `slurm` fixture

import pilot
from gateway.protocol import OutputKind, TaskDone, WorkerInfo
from tests_support import TEST_TIMEOUTS, wait_until

pytestmark = [pytest.mark.system, pytest.mark.slow]

START_S = 180.0  # a worker job from sbatch to registered (pending, Python start-up; a loaded
# machine delays slurmd and the job's start)


@pytest.fixture(scope="module")
def gateway(slurm: SlurmCluster) -> Iterator[pilot.LocalCluster]:
    with pilot.LocalCluster(workers=0, timeouts=TEST_TIMEOUTS) as cluster:
        yield cluster


@pytest.fixture
def client(gateway: pilot.LocalCluster) -> pilot.Client:
    return gateway.client()


@pytest.fixture
def workers(
    slurm: SlurmCluster, gateway: pilot.LocalCluster, client: pilot.Client
) -> Iterator[pilot.SlurmWorkers]:
    """Worker jobs of one CPU for this test; all gone (from Slurm and the gateway) after it."""
    yield pilot.SlurmWorkers(
        partition=slurm.partition, connection=gateway.connection_file, log_dir=slurm.dir / "logs"
    )
    slurm.cancel_all()
    wait_until(lambda: not client.status().workers, 30, "the workers gone from the gateway")


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    import time

    time.sleep(0.2)
    return x * x


def marked_square(marks: Path):
    """``x -> x * x``, slowly, leaving one file per run in ``marks`` (so a test counts the runs
    of each item). Nested, so it travels by value."""
    where = str(marks)

    def run(x: int) -> int:
        import os
        import time
        import uuid

        time.sleep(0.3)
        open(os.path.join(where, f"{x}-{uuid.uuid4().hex}"), "w").close()
        return x * x

    return run


def runs(marks: Path) -> Counter[int]:
    return Counter(int(p.name.split("-")[0]) for p in marks.iterdir())


def first_done(job: pilot.Job) -> None:
    next(ev for ev in job.events() if isinstance(ev, TaskDone))


def wait_workers(client: pilot.Client, n: int) -> list[str]:
    """The Slurm job ids of the ``n`` workers registered, once they are."""
    wait_until(lambda: len(client.status().workers) >= n, START_S, f"{n} Slurm workers")
    return sorted(w.slurm_job_id for w in client.status().workers)


def busy_worker(client: pilot.Client) -> WorkerInfo:
    wait_until(lambda: any(w.running for w in client.status().workers), 30, "a busy worker")
    return next(w for w in client.status().workers if w.running)


def pilot_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pilot", *args], capture_output=True, text=True, timeout=120
    )


def test_scale_slurm_2_gives_two_workers_that_run_a_1000_item_job(
    slurm: SlurmCluster,
    gateway: pilot.LocalCluster,
    client: pilot.Client,
    workers: pilot.SlurmWorkers,
) -> None:
    out = pilot_cli(
        "scale", "slurm", "2", "--partition", slurm.partition, "--connect",
        str(gateway.connection_file),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    submitted = sorted(j.job_id for j in workers.jobs())
    assert len(submitted) == 2 and f"{', '.join(submitted)}" in out.stdout
    assert wait_workers(client, 2) == submitted, "each worker registers its Slurm job id"
    status = subprocess.run(
        [sys.executable, "-m", "pilot", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PILOT_CONNECT": str(gateway.connection_file)},
    )
    assert all(f"Slurm job {i}" in status.stdout for i in submitted), status.stdout

    job = client.map(square, range(1000), chunk=10)
    job.wait(120)
    assert job.results == [x * x for x in range(1000)]
    assert {d.worker for d in job.tasks.values()} <= {f"slurm-{i}" for i in submitted}

    again = pilot_cli("scale", "slurm", "2", "--connect", str(gateway.connection_file))
    assert again.returncode == 0 and len(workers.jobs()) == 2, "scale is a target: no more jobs"


def test_scancel_of_a_worker_job_mid_task_requeues_and_every_result_comes_once(
    slurm: SlurmCluster, client: pilot.Client, workers: pilot.SlurmWorkers
) -> None:
    workers.scale(2)
    wait_workers(client, 2)
    job = client.map(slow_square, range(40), chunk=1)
    first_done(job)
    victim = busy_worker(client)
    slurm.run("scancel", victim.slurm_job_id)  # Slurm's SIGTERM to every process of the job
    job.wait(120)
    assert job.results == [x * x for x in range(40)]
    assert len(job.tasks) == 40, "one outcome per task"
    wait_until(lambda: slurm.job_state(victim.slurm_job_id) == "", 60, "the job gone")
    assert victim.name not in {w.name for w in client.status().workers}


def test_a_drained_worker_finishes_its_tasks_and_nothing_is_lost_or_run_twice(
    slurm: SlurmCluster, client: pilot.Client, workers: pilot.SlurmWorkers, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    workers.scale(2)
    wait_workers(client, 2)
    job = client.map(marked_square(marks), range(30), chunk=1)
    first_done(job)
    victim = busy_worker(client)
    # SIGTERM to the batch shell (the exec-ed worker) only: what `#SBATCH --signal=B:TERM@N`
    # makes Slurm do before the time limit, and how scale-down ends a worker.
    workers.drain([j for j in workers.jobs() if j.job_id == victim.slurm_job_id])
    wait_until(lambda: slurm.job_state(victim.slurm_job_id) == "", 60, "the drained job ended")
    job.wait(120)
    assert job.results == [x * x for x in range(30)]
    assert all(d.status == 0 and not d.error for d in job.tasks.values())
    assert runs(marks) == Counter(range(30)), "every item ran exactly once"
    assert sum(d.worker == victim.name for d in job.tasks.values()) >= 1, "it worked first"


@pytest.mark.timeout(240)  # Slurm's periodic check sends the warning: up to a minute or so
def test_slurm_warns_a_worker_before_its_time_limit_and_it_leaves_without_loss(
    slurm: SlurmCluster, client: pilot.Client, workers: pilot.SlurmWorkers, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    workers.scale(1)
    # A 2-minute limit, the warning due 115 s before it: Slurm sends it on its next periodic
    # check (every 30 s or so), long before the limit.
    limited = pilot.SlurmWorkers(
        partition=slurm.partition,
        connection=workers.connection,
        log_dir=workers.log_dir,
        time="2",
        warning_s=115,
    )
    (short,) = limited.submit(1)
    wait_workers(client, 2)
    waves: list[pilot.Job] = []  # back-to-back jobs, so the warning finds the worker busy
    deadline = time.monotonic() + 90
    while any(w.slurm_job_id == short for w in client.status().workers):
        assert time.monotonic() < deadline, "Slurm's warning never ended the worker"
        first = 10 * len(waves)
        waves.append(client.map(marked_square(marks), range(first, first + 10), chunk=1))
        waves[-1].wait(60)
    wait_until(lambda: slurm.job_state(short) == "", 30, "the warned job ended")
    for job in waves:
        job.wait(120)
        assert all(d.status == 0 and not d.error for d in job.tasks.values())
    assert runs(marks) == Counter(range(10 * len(waves))), "every item ran exactly once"
    assert any(d.worker == f"slurm-{short}" for job in waves for d in job.tasks.values())


def test_adapt_starts_workers_for_waiting_tasks_and_drains_them_when_idle(
    slurm: SlurmCluster, client: pilot.Client, workers: pilot.SlurmWorkers
) -> None:
    seen_jobs: list[int] = []
    with workers.adapt(min=0, max=2, idle_grace_s=3.0, interval_s=0.5) as controller:
        wait_until(lambda: controller.rounds >= 2, 30, "two rounds of the controller")
        assert workers.jobs() == [] and controller.submitted == [], "no work, no workers"

        job = client.map(slow_square, range(40), chunk=1)
        while not job.done():  # sample Slurm's queue while the job runs
            seen_jobs.append(sum(j.active for j in workers.jobs()))
            with contextlib.suppress(pilot.PilotTimeout):
                job.wait(0.5)
        assert job.results == [x * x for x in range(40)]
        assert 1 <= len(controller.submitted) <= 2 and max(seen_jobs) <= 2, "never past max"
        assert {d.worker for d in job.tasks.values()} <= {
            f"slurm-{i}" for i in controller.submitted
        }
        wait_until(lambda: not workers.jobs(), 60, "idle workers drained after the grace")
        assert sorted(controller.drained) == sorted(controller.submitted)
    wait_until(lambda: not client.status().workers, 30, "the drained workers said goodbye")


def test_adapt_cli_runs_until_ctrl_c(gateway: pilot.LocalCluster, slurm: SlurmCluster) -> None:
    where = ["--partition", slurm.partition, "--connect", str(gateway.connection_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot", "scale", "slurm", "--adapt", "--max", "2", *where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "adaptive scaling: 0 to 2" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Worker jobs left: none" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_slurms_refusals_are_config_errors_with_slurms_message(
    slurm: SlurmCluster, gateway: pilot.LocalCluster
) -> None:
    bad = pilot.SlurmWorkers(partition="nosuch", connection=gateway.connection_file)
    with pytest.raises(pilot.ConfigError, match="Invalid partition name"):
        bad.submit(1)
    rejected = pilot.SlurmWorkers(time="soon", connection=gateway.connection_file)
    with pytest.raises(pilot.ConfigError, match=r"Slurm refused `sbatch`: .*time"):
        rejected.submit(1)
    out = pilot_cli(
        "scale", "slurm", "1", "--partition", "nosuch", "--connect", str(gateway.connection_file)
    )
    assert out.returncode == 1 and "Invalid partition name" in out.stderr
    assert slurm.job_ids() == []


def test_no_sbatch_on_path_is_a_config_error(
    gateway: pilot.LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pilot.ConfigError, match="`sbatch` was not found"):
        pilot.SlurmWorkers(connection=gateway.connection_file).submit(1)


# -- a training rank on a worker that Slurm ends ----------------------------------------------


def trains_with_checkpoints(steps: int, every: int, step_s: float) -> dict[str, int]:
    """A small DDP training loop that checkpoints every ``every`` steps and resumes from the
    latest checkpoint (``pilot.train``)."""
    import os
    import time

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pilot.train as pt

    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    state = pt.restore()
    start = 0 if state is None else state["step"] + 1
    if state is not None:
        model.module.load_state_dict(state["model"])
    for step in range(start, steps):
        loss = model(torch.ones(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pt.report(step=step, restart=restart)
        if step % every == 0:
            pt.checkpoint({"step": step, "model": model.module.state_dict()})
        time.sleep(step_s)
    return {"start": start, "restart": restart, "world": dist.get_world_size()}


@pytest.mark.timeout(600)  # two worker jobs start, then ranks that import torch
def test_a_training_rank_on_a_drained_worker_restarts_from_its_checkpoint(
    slurm: SlurmCluster, client: pilot.Client, workers: pilot.SlurmWorkers
) -> None:
    pytest.importorskip("torch")
    # A 1 s stop grace (its default is the warning less a margin): a training rank cannot
    # finish in it, so the drained worker stops it and the group restarts without it.
    graceful = pilot.SlurmWorkers(
        partition=slurm.partition,
        connection=workers.connection,
        log_dir=workers.log_dir,
        worker_args=("--stop-grace", "1"),
    )
    graceful.scale(2)
    wait_workers(client, 2)
    job = client.train(trains_with_checkpoints, 60, 5, 0.2, ranks=2, restarts=2, min_ranks=1)
    for out in job.stream():
        if out.kind == OutputKind.CHECKPOINT and out.item >= 2:  # steps 0, 5 and 10 saved
            break
    victim = next(j for j in graceful.jobs())
    graceful.drain([victim])  # Slurm's SIGTERM, as at the time limit or on preemption
    wait_until(lambda: slurm.job_state(victim.job_id) == "", 60, "the drained job ended")
    job.wait(300)
    [result] = job.results  # the group shrank to the worker left
    assert result["world"] == 1 and result["restart"] == 1
    assert 10 < result["start"] < 60, "it resumed after the checkpoint of step 10 at least"
    assert next(m["step"] for m in job.metrics if m["restart"] == 1) == result["start"]
