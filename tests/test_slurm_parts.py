"""Slurm workers without Slurm: the batch script, the adaptive policy (``decide``), and the
errors that need no cluster. The real cluster is ``test_slurm.py``'s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pilot
from gateway.protocol import ConnectionInfo, JobInfo, Resources, Status, WorkerInfo
from pilot._adapt import REGISTER_WARN_S, Memory, Policy, decide
from pilot._slurm import SlurmJob


@pytest.fixture
def connection(tmp_path: Path) -> Path:
    info = ConnectionInfo("tcp://10.1.2.3:5000", "tcp://10.1.2.3:5001", "ab" * 32)
    return info.save(tmp_path / "connection.json")


def test_the_script_asks_slurm_for_what_was_given(connection: Path, tmp_path: Path) -> None:
    workers = pilot.SlurmWorkers(
        partition="gpu",
        cpus=8,
        gpus=1,
        mem="32G",
        time="4:00:00",
        account="lab",
        qos="high",
        constraint="a100",
        sbatch_args=("--exclusive",),
        tags=("big",),
        connection=connection,
        log_dir=tmp_path / "logs",
    )
    script = workers.script()
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in (
        "--partition=gpu",
        "--cpus-per-task=8",
        "--gres=gpu:1",
        "--mem=32G",
        "--time=4:00:00",
        "--account=lab",
        "--qos=high",
        "--constraint=a100",
        "--exclusive",
        "--signal=B:TERM@120",
        "--job-name=pilot-worker",
        f"--output={tmp_path / 'logs' / 'pilot-worker-%j.out'}",
    ):
        assert f"#SBATCH {directive}" in lines, directive
    assert 'export PILOT_SLURM_JOB_ID="$SLURM_JOB_ID"' in lines
    exec_line = next(line for line in lines if line.startswith("exec "))
    assert f"-m pilot worker --connect {connection} --slots 8 --tags big" in exec_line
    assert "--stop-grace 100" in exec_line, "the warning less the margin to leave"
    assert "ab" * 32 not in script, "the key stays in the connection file"


def test_a_gateway_on_every_interface_is_reached_by_this_hosts_name(tmp_path: Path) -> None:
    info = ConnectionInfo("tcp://0.0.0.0:5000", "tcp://0.0.0.0:5001", "ab" * 32)
    path = info.save(tmp_path / "connection.json")
    workers = pilot.SlurmWorkers(connection=path, log_dir=tmp_path / "logs", gateway_host="login1")
    moved, written = workers._worker_connection()
    assert moved == tmp_path / "logs" / "connection.json"
    assert written is not None
    assert written.worker_url == "tcp://login1:5001"
    assert written.client_url == "tcp://login1:5000"
    assert f"--connect {moved}" in workers.script()


def test_the_cli_dry_run_prints_the_script_and_submits_nothing(connection: Path) -> None:
    options = ["--connect", str(connection), "--sbatch-arg=--exclusive", "--time", "1:00:00"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pilot",
            "scale",
            "slurm",
            "3",
            "--dry-run",
            "--cpus",
            "4",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": "/nonexistent"},  # no Slurm needed for a dry run
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --cpus-per-task=4" in out.stdout
    assert "#SBATCH --time=1:00:00" in out.stdout
    assert "#SBATCH --exclusive" in out.stdout
    assert "3x" in out.stdout.splitlines()[0]


def test_no_sbatch_is_a_config_error_that_says_so(connection: Path, tmp_path: Path) -> None:
    workers = pilot.SlurmWorkers(connection=connection, env={**os.environ, "PATH": str(tmp_path)})
    with pytest.raises(pilot.ConfigError, match="`sbatch` was not found on PATH"):
        workers.submit(1)
    with pytest.raises(pilot.ConfigError, match="`squeue` was not found on PATH"):
        workers.jobs()


def test_options_that_make_no_sense_are_refused_before_slurm(connection: Path) -> None:
    with pytest.raises(pilot.ConfigError, match="at least 1 CPU"):
        pilot.SlurmWorkers(cpus=0)
    with pytest.raises(pilot.ConfigError, match="as Slurm spells it"):
        pilot.SlurmWorkers(sbatch_args=("exclusive",))
    with pytest.raises(pilot.ConfigError, match="connection file"):
        pilot.SlurmWorkers(connection="tcp://10.0.0.1:5001")
    with pytest.raises(pilot.NoGateway, match="Start the gateway first"):
        pilot.SlurmWorkers(connection=connection.parent / "missing.json").submit(1)
    with pytest.raises(pilot.ConfigError, match="min <= max"):
        Policy(3, 2, 60.0, 1, lambda r: True)


# -- the adaptive policy ------------------------------------------------------------------


def policy(minimum: int = 0, maximum: int = 4, grace: float = 10.0, slots: int = 1) -> Policy:
    return Policy(minimum, maximum, grace, slots, lambda r: r.gpus == 0)


def job(queued: int, gpus: int = 0, cpus: int = 1) -> JobInfo:
    return JobInfo("j", "f", Status.RUNNING, 100, 0, 0, 0.0, queued=queued,
                   resources=Resources(cpus=cpus, gpus=gpus))  # fmt: skip


def worker(job_id: str, running: int = 0, slots: int = 1) -> WorkerInfo:
    return WorkerInfo(f"slurm-{job_id}", slots, 1, 0, (), (), running, 1.0, 0, job_id)


def test_no_work_no_workers() -> None:
    d = decide([], [], [], policy(), Memory(), 0.0)
    assert d.submit == 0 and not d.drain


def test_waiting_tasks_ask_for_workers_up_to_max() -> None:
    assert decide([], [], [job(3)], policy(), Memory(), 0.0).submit == 3
    assert decide([], [], [job(50)], policy(maximum=4), Memory(), 0.0).submit == 4
    assert decide([], [], [job(5)], policy(slots=2), Memory(), 0.0).submit == 3
    assert decide([], [], [job(4, cpus=2)], policy(slots=4), Memory(), 0.0).submit == 2


def test_jobs_pending_in_slurm_count_so_nothing_is_asked_twice() -> None:
    pending = [SlurmJob("1", "PENDING"), SlurmJob("2", "PENDING")]
    assert decide(pending, [], [job(2)], policy(), Memory(), 0.0).submit == 0
    assert decide(pending, [], [job(3)], policy(), Memory(), 0.0).submit == 1
    running = [*pending, SlurmJob("3", "RUNNING"), SlurmJob("4", "RUNNING")]
    busy = [worker("3", running=1), worker("4", running=1)]
    assert decide(running, busy, [job(10)], policy(maximum=4), Memory(), 0.0).submit == 0


def test_tasks_no_worker_of_ours_can_run_ask_for_nothing() -> None:
    assert decide([], [], [job(5, gpus=1)], policy(), Memory(), 0.0).submit == 0


def test_minimum_is_kept_without_work() -> None:
    assert decide([], [], [], policy(minimum=2), Memory(), 0.0).submit == 2


def test_idle_workers_drain_after_the_grace_never_a_busy_one() -> None:
    jobs = [SlurmJob("1", "RUNNING"), SlurmJob("2", "RUNNING")]
    workers = [worker("1", running=0), worker("2", running=1)]
    memory = Memory()
    assert not decide(jobs, workers, [], policy(grace=10), memory, 0.0).drain
    assert not decide(jobs, workers, [], policy(grace=10), memory, 9.0).drain
    d = decide(jobs, workers, [], policy(grace=10), memory, 10.0)
    assert [j.job_id for j in d.drain] == ["1"]
    assert memory.stopping == {"1"}
    again = decide(jobs, workers, [], policy(grace=10), memory, 30.0)
    assert not again.drain, "a draining job is not drained twice, the busy one never"


def test_a_worker_that_works_again_restarts_its_idle_clock() -> None:
    jobs = [SlurmJob("1", "RUNNING")]
    memory = Memory()
    decide(jobs, [worker("1")], [], policy(grace=10), memory, 0.0)
    decide(jobs, [worker("1", running=1)], [], policy(grace=10), memory, 5.0)
    assert not decide(jobs, [worker("1")], [], policy(grace=10), memory, 12.0).drain
    assert decide(jobs, [worker("1")], [], policy(grace=10), memory, 22.0).drain


def test_idle_workers_are_kept_down_to_minimum() -> None:
    jobs = [SlurmJob(str(i), "RUNNING") for i in range(3)]
    workers = [worker(str(i)) for i in range(3)]
    memory = Memory()
    decide(jobs, workers, [], policy(minimum=2, grace=1), memory, 0.0)
    d = decide(jobs, workers, [], policy(minimum=2, grace=1), memory, 5.0)
    assert len(d.drain) == 1


def test_pending_jobs_no_work_needs_are_cancelled_after_the_grace() -> None:
    jobs = [SlurmJob("1", "PENDING"), SlurmJob("2", "PENDING")]
    memory = Memory()
    assert not decide(jobs, [], [job(1)], policy(grace=5), memory, 0.0).drain
    d = decide(jobs, [], [job(1)], policy(grace=5), memory, 5.0)
    assert [j.job_id for j in d.drain] == ["2"], "the newest pending one; one is still needed"


def test_draining_jobs_are_no_supply_and_forgotten_once_gone() -> None:
    memory = Memory(stopping={"1"})
    jobs = [SlurmJob("1", "RUNNING")]
    assert decide(jobs, [worker("1")], [job(1)], policy(), memory, 0.0).submit == 1
    decide([], [], [], policy(), memory, 1.0)
    assert memory.stopping == set()


def test_workers_of_other_jobs_are_never_touched() -> None:
    others = [worker("99"), WorkerInfo("laptop", 1, 1, 0, (), (), 0, 1.0)]
    d = decide([], others, [], policy(grace=0), Memory(), 100.0)
    assert not d.drain and d.submit == 0


def test_a_job_whose_worker_never_connects_is_reported_and_still_counts() -> None:
    jobs = [SlurmJob("1", "RUNNING")]
    memory = Memory()
    assert decide(jobs, [], [job(1)], policy(), memory, 0.0).lost == ()
    d = decide(jobs, [], [job(5)], policy(maximum=1), memory, REGISTER_WARN_S)
    assert d.lost == ("1",) and d.submit == 0
    assert decide(jobs, [worker("1", running=1)], [], policy(), memory, 1000.0).lost == ()
