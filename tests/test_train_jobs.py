"""Training jobs end to end: a real gateway and real workers (``LocalCluster``), real rank
processes with torch.distributed (gloo on CPU), driven through ``client.train``.

Rank functions live in this module and travel by value. Models are tiny: what is tested is the
machinery (gang placement, rendezvous, restarts from checkpoints, cancel, results, metrics),
not the learning. Waits follow the job's own events (``job.stream()``, ``job.wait``) or
deadlines, never sleeps.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import cloudpickle
import psutil
import pytest

import pilot
from gateway.protocol import OutputKind, Status, TaskStatus
from tests_support import TEST_TIMEOUTS

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.system
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 180.0  # a rank imports torch: seconds each on a shared 2-core machine
GONE_DEADLINE_S = 2.0 + 3.0  # KILL_DEADLINE_S, plus the cancel's way through the gateway
STEPS = 6
GLOBAL_BATCH = 16
BIG = 100_000  # floats: a tensor large enough to travel out-of-band
ENV_KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


# -- what the ranks run (pickled by value) ---------------------------------------------------


def _make_model() -> Any:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _global_batch(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def _state_hash(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _shard(world: int, rank: int) -> slice:
    per = GLOBAL_BATCH // world
    return slice(rank * per, (rank + 1) * per)


def train_ddp(steps: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pilot.train as pt

    model = DDP(_make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = _shard(dist.get_world_size(), dist.get_rank())
    for step in range(steps):
        x, y = _global_batch(step)
        loss = torch.nn.functional.mse_loss(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
        pt.report(step=step, loss=loss.item())
    print(f"trained {steps} steps")
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return {
        "hash": _state_hash(state),
        "state": state,
        "big": torch.arange(BIG, dtype=torch.float32) * (dist.get_rank() + 1),
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
    }


def trains_with_checkpoints(steps: int, every: int, step_s: float) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pilot.train as pt

    model = DDP(_make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    state = pt.restore()
    start = 0
    if state is not None:
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"] + 1
    shard = _shard(dist.get_world_size(), dist.get_rank())
    for step in range(start, steps):
        x, y = _global_batch(step)
        loss = torch.nn.functional.mse_loss(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
        pt.report(step=step, loss=loss.item(), pid=os.getpid(), restart=restart)
        if step % every == 0:
            state = {"step": step, "model": model.module.state_dict(), "opt": opt.state_dict()}
            pt.checkpoint(state)
        time.sleep(step_s)  # the work a real step does: the test kills a worker meanwhile
    return {"start": start, "restart": restart, "world": dist.get_world_size()}


def checkpoints_to_its_url() -> int | None:
    import torch.distributed as dist

    import pilot.train as pt

    pt.checkpoint({"step": 7})  # rank 0 writes; the others wait for it at the barrier
    dist.barrier()
    state = pt.restore()
    return None if state is None else state["step"]


def trains_until_cancelled() -> None:
    import torch.distributed as dist

    import pilot.train as pt

    # A DataLoader worker process: cancel must stop it too.
    loader = torch.utils.data.DataLoader(
        _PidDataset(), batch_size=None, num_workers=1, persistent_workers=True
    )
    batches = iter(loader)
    loader_pid = next(batches)
    t = torch.ones(1)
    step = 0
    while True:
        dist.all_reduce(t)
        pt.report(step=step, pid=os.getpid(), loader_pid=loader_pid)
        step += 1
        time.sleep(0.05)  # a step's work; the test cancels the job meanwhile


class _PidDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, i: int) -> int:
        return os.getpid()


def all_reduce_once(tag: int) -> tuple[int, int, float, str]:
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return tag, dist.get_rank(), t.item(), os.environ["MASTER_PORT"]


def imports_what_is_missing() -> None:
    import pilot_no_such_module  # noqa: F401


def predicts_with_cached_model(item: int, key: str) -> tuple[int, int, int]:
    import pilot

    def build() -> Any:
        builds = sys.__dict__.setdefault("_pilot_test_builds", {})  # this process's count
        builds[key] = builds.get(key, 0) + 1
        return _make_model()

    model = pilot.cached(key, build)
    with torch.no_grad():
        model(torch.full((1, 8), float(item)))
    return os.getpid(), sys.__dict__["_pilot_test_builds"][key], id(model)


# -- helpers ---------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: it holds nothing, and reaping it is its parent's job)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: set[int], deadline_s: float) -> set[int]:
    """Wait for every pid to exit, up to ``deadline_s``; return those still running."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=deadline_s)
    return {pid for pid in pids if not _gone(pid)}


def _single_process_state(steps: int) -> dict[str, Any]:
    model = _make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = _global_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


# -- a trained job, shared by the tests that read it -----------------------------------------


@pytest.fixture(scope="module")
def trained(client: pilot.Client) -> pilot.Job:
    job = client.train(train_ddp, STEPS, ranks=2)
    job.wait(JOB_TIMEOUT_S)
    return job


def test_parameters_are_bit_identical_on_every_rank(trained: pilot.Job) -> None:
    first, second = trained.results
    assert first["hash"] == second["hash"]
    for key in first["state"]:
        assert torch.equal(first["state"][key], second["state"][key]), key


def test_ddp_matches_one_process_on_the_same_global_batches(trained: pilot.Job) -> None:
    expected = _single_process_state(STEPS)
    got = trained.results[0]["state"]
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["0.weight"], _make_model().state_dict()["0.weight"])  # it trained


def test_ranks_get_torchruns_environment_and_tensors_come_back_whole(
    client: pilot.Client, trained: pilot.Job
) -> None:
    cores = {w.name: w.cpus for w in client.status().workers}  # each worker's share
    for rank, value in enumerate(trained.results):
        env = value["env"]
        assert env["RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "2"
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU job
        local = int(env["LOCAL_WORLD_SIZE"])
        worker = trained.tasks[rank].worker
        assert env["OMP_NUM_THREADS"] == str(max(1, cores[worker] // local))
        assert torch.equal(value["big"], torch.arange(BIG, dtype=torch.float32) * (rank + 1))
    ports = {v["env"]["MASTER_PORT"] for v in trained.results}
    assert len(ports) == 1


def test_metrics_reach_job_metrics_and_the_logs(client: pilot.Client, trained: pilot.Job) -> None:
    for rank in (0, 1):
        steps = [m["step"] for m in trained.metrics if m["rank"] == rank]
        assert steps == list(range(STEPS))
    assert all(isinstance(m["loss"], float) and "time" in m for m in trained.metrics)
    logs = client.logs(trained.id)
    logged = [o.data for o in logs if o.kind == OutputKind.METRICS]
    assert len(logged) == 2 * STEPS
    text = b"".join(o.data for o in logs if o.kind == OutputKind.STDOUT).decode()
    assert f"[rank 0] trained {STEPS} steps\n" in text
    assert f"[rank 1] trained {STEPS} steps\n" in text
    labelled = {o.index for o in logs if o.kind == OutputKind.STDOUT}
    assert labelled == {0, 1}


def test_checkpoints_go_to_the_jobs_url_when_it_has_one(client: pilot.Client, tmp_path) -> None:
    url = (tmp_path / "run").as_uri()
    job = client.train(checkpoints_to_its_url, ranks=2, checkpoint=url)
    assert job.wait(JOB_TIMEOUT_S).results == [7, 7]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["LATEST", "ckpt-00000000.pt"]
    [saved] = [o for o in client.logs(job.id) if o.kind == OutputKind.CHECKPOINT]
    assert saved.item == 0 and saved.data.url.endswith("/run/ckpt-00000000.pt")
    assert not saved.data.digest  # the job's URL holds it, not the gateway


# -- failures --------------------------------------------------------------------------------


def test_an_import_error_fails_at_once_with_the_rank_and_no_restart(client: pilot.Client) -> None:
    job = client.train(imports_what_is_missing, ranks=2, restarts=2)
    with pytest.raises(pilot.TaskError) as info:
        job.wait(JOB_TIMEOUT_S)
    text = info.value.remote_traceback
    assert text.startswith("rank ")
    assert "ModuleNotFoundError: No module named 'pilot_no_such_module'" in text
    assert "imports_what_is_missing" in text  # the traceback reaches the user's code
    assert job.state == Status.FAILED
    assert {d.attempts for d in job.tasks.values()} == {1}
    assert TaskStatus.ERROR in {d.status for d in job.tasks.values()}


def test_more_ranks_than_the_pool_holds_fails_at_submit(client: pilot.Client) -> None:
    job = client.train(train_ddp, 1, ranks=3)
    with pytest.raises(pilot.PilotError, match="can never hold this job's 3 ranks"):
        job.wait(JOB_TIMEOUT_S)
    assert job.state == Status.FAILED
    assert not job.metrics  # nothing ran


def test_cancel_stops_every_rank_and_its_children(client: pilot.Client) -> None:
    job = client.train(trains_until_cancelled, ranks=2)
    pids: dict[int, set[int]] = {}
    for out in job.stream():
        if out.kind == OutputKind.METRICS:
            pids[out.data["rank"]] = {out.data["pid"], out.data["loader_pid"]}
            if len(pids) == 2:
                break
    job.cancel()
    every = set().union(*pids.values())
    assert len(every) == 4
    assert not _wait_gone(every, GONE_DEADLINE_S)
    with pytest.raises(pilot.JobCancelled):
        job.wait(JOB_TIMEOUT_S)
    after = client.train(all_reduce_once, 7, ranks=2).wait(JOB_TIMEOUT_S)
    assert [r[:3] for r in after.results] == [(7, 0, 2.0), (7, 1, 2.0)]


# -- a worker killed mid-training ------------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[pilot.LocalCluster]:
    # A SIGTERM'd worker waits 1 s for its running tasks (30 s by default): a training rank
    # that cannot finish in that time is stopped.
    grace = ("--stop-grace", "1")
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS, worker_args=grace) as c:
        yield c


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_lost_worker_restarts_the_group_from_its_last_checkpoint(
    own_cluster: pilot.LocalCluster, how: str
) -> None:
    """SIGKILL: the worker dies. SIGTERM: it drains, as Slurm ends a worker at its time limit
    or on preemption (``--signal=B:TERM``) and as ``pilot scale`` scales down: a training rank
    cannot finish in the grace period, so it stops, and its group restarts without it."""
    client = own_cluster.client()
    job = client.train(trains_with_checkpoints, 40, 5, 0.1, ranks=2, restarts=2, min_ranks=1)
    first: set[int] = set()
    for out in job.stream():
        if out.kind == OutputKind.METRICS and out.data["restart"] == 0:
            first.add(out.data["pid"])
        if out.kind == OutputKind.CHECKPOINT and out.item >= 2:  # steps 0, 5 and 10 saved
            break
    victim = own_cluster.workers[1]
    victim.send_signal(getattr(signal, how))
    victim.wait(JOB_TIMEOUT_S)
    job.wait(JOB_TIMEOUT_S)
    [result] = job.results  # the group shrank to the one worker left
    assert result["world"] == 1
    assert result["restart"] == 1
    assert 10 < result["start"] < 40  # resumed after the checkpoint of step 10 at least
    restarted = [m for m in job.metrics if m["restart"] == 1]
    assert restarted[0]["step"] == result["start"]
    assert len(first) == 2
    assert not _wait_gone(first, GONE_DEADLINE_S)  # the first group is gone, survivor too


# -- many jobs on the same workers -----------------------------------------------------------


@pytest.fixture(scope="module")
def roomy_client() -> Iterator[pilot.Client]:
    with pilot.LocalCluster(workers=2, slots=2, timeouts=TEST_TIMEOUTS) as c:
        yield c.client()


@pytest.mark.timeout(900)  # each job starts two processes that import torch: seconds
def test_twenty_back_to_back_jobs_on_the_same_workers(roomy_client: pilot.Client) -> None:
    for i in range(20):
        job = roomy_client.train(all_reduce_once, i, ranks=2).wait(JOB_TIMEOUT_S)
        assert [r[:3] for r in job.results] == [(i, 0, 2.0), (i, 1, 2.0)], i


def test_two_concurrent_jobs_meet_at_two_ports(roomy_client: pilot.Client) -> None:
    jobs = [roomy_client.train(all_reduce_once, 100 + i, ranks=2) for i in range(2)]
    results = [job.wait(JOB_TIMEOUT_S).results for job in jobs]
    for i, values in enumerate(results):
        assert [r[:3] for r in values] == [(100 + i, 0, 2.0), (100 + i, 1, 2.0)]
    assert results[0][0][3] != results[1][0][3]  # two groups at once: two rendezvous ports


# -- inference: pilot.cached -----------------------------------------------------------------


def test_cached_builds_the_model_once_per_task_process(client: pilot.Client) -> None:
    key = f"model-{uuid.uuid4().hex}"
    job = client.map(lambda i: predicts_with_cached_model(i, key), range(100), chunk=5)
    values = job.wait(JOB_TIMEOUT_S).results
    assert len(values) == 100
    by_pid: dict[int, set[tuple[int, int]]] = {}
    for pid, builds, model_id in values:
        by_pid.setdefault(pid, set()).add((builds, model_id))
    assert len({job.tasks[i].worker for i in job.tasks}) == 2  # both workers took items
    for pid, seen in by_pid.items():
        assert seen == {(1, next(iter(seen))[1])}, f"process {pid} built it {seen}"
