"""DDP building blocks with real torch.distributed (gloo on CPU) and real rank processes.

No gateway: each test plays the worker itself. It opens the rendezvous socket
(``open_rendezvous_socket``), spawns the rank processes (``spawn_rank``, which runs
``python -m worker._ddp_rank``), closes its copy of the socket, and reads each rank's
``RankOutcome``. Rank functions live in this module and travel by value (cloudpickle).
Checkpoints, metrics and ``cached`` are exercised in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest

from pilot import ConfigError
from pilot._cached import cached
from worker._ddp import (
    RankPlacement,
    choose_backend,
    interface_for,
    kill_process_tree,
    local_address_towards,
    omp_threads_for,
    open_rendezvous_socket,
    rank_environment,
    spawn_rank,
)
from worker._ddp_rank import EXIT_RENDEZVOUS_TIMEOUT, RankOutcome, RendezvousTimeout, read_outcome

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pilot.train")

pytestmark = pytest.mark.system
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RANK_EXIT_TIMEOUT_S = 90.0  # a rank imports torch (seconds on a shared 2-core machine), then runs
SHORT_INIT_TIMEOUT_S = 5.0
STEPS = 5
GLOBAL_BATCH = 16
ENV_KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
)


# -- the worker's role ----------------------------------------------------------------------


class Gang:
    """Rank processes of one job on this machine, started the way a worker starts them."""

    def __init__(
        self,
        tmp: Path,
        fn: Callable[..., Any],
        *args: Any,
        world_size: int,
        start: tuple[int, ...] | None = None,
        init_timeout_s: float = 60.0,
        keep_listener: bool = False,
        base_env: dict[str, str] | None = None,
        metrics_fd: int | None = None,
    ) -> None:
        self.tmp = tmp
        self.call = tmp / "call.pkl"
        self.call.write_bytes(cloudpickle.dumps((fn, args, {})))
        self.listener = open_rendezvous_socket("127.0.0.1")
        port = self.listener.getsockname()[1]
        self.procs: dict[int, subprocess.Popen] = {}
        threads = omp_threads_for(len(os.sched_getaffinity(0)), world_size)
        for rank in range(world_size) if start is None else start:
            p = RankPlacement(
                job_id="job-test",
                rank=rank,
                world_size=world_size,
                local_rank=rank,
                local_world_size=world_size,
                group_rank=0,
                master_addr="127.0.0.1",
                master_port=port,
                restart_count=1,
                max_restarts=2,
                run_id="run-7",
                omp_threads=threads,
                backend="gloo",
                init_timeout_s=init_timeout_s,
            )
            log = open(tmp / f"rank{rank}.log", "wb")  # noqa: SIM115 (closed in stop())
            self.procs[rank] = spawn_rank(
                p,
                call_path=self.call,
                result_path=self.result_path(rank),
                listener=self.listener if rank == 0 else None,
                metrics_fd=metrics_fd,
                base_env=base_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()  # the child has its own copy
        if not keep_listener:
            self.listener.close()  # rank 0 holds the port from here on

    def result_path(self, rank: int) -> Path:
        return self.tmp / f"result{rank}.pkl"

    def log(self, rank: int) -> str:
        return (self.tmp / f"rank{rank}.log").read_text(errors="replace")

    def wait(self) -> dict[int, RankOutcome]:
        outcomes = {}
        for rank, proc in self.procs.items():
            proc.wait(timeout=RANK_EXIT_TIMEOUT_S)
            assert self.result_path(rank).exists(), f"rank {rank} wrote nothing:\n{self.log(rank)}"
            outcomes[rank] = read_outcome(self.result_path(rank))
        return outcomes

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_process_tree(proc.pid)
                proc.wait(timeout=RANK_EXIT_TIMEOUT_S)
        self.listener.close()


def _ok(gang: Gang, outcomes: dict[int, RankOutcome]) -> list[Any]:
    for rank, outcome in outcomes.items():
        assert outcome.ok, f"rank {rank} failed: {outcome.traceback}\n{gang.log(rank)}"
    return [outcomes[r].value for r in sorted(outcomes)]


# -- what the ranks run (pickled by value) ---------------------------------------------------


def _make_model() -> Any:
    import torch

    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _global_batch(step: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def _state_hash(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train_steps(model: Any, shard: slice) -> None:
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = _global_batch(step)
        loss = torch.nn.functional.mse_loss(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _rank_trains_with_ddp() -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pilot.train as pt

    rank, world = dist.get_rank(), dist.get_world_size()
    summed = torch.tensor([float(rank + 1)])
    dist.all_reduce(summed)
    model = DDP(_make_model())
    per_rank = GLOBAL_BATCH // world
    _train_steps(model, slice(rank * per_rank, (rank + 1) * per_rank))
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return {
        "all_reduce": summed.item(),
        "hash": _state_hash(state),
        "state": state,
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
        "torch_threads": torch.get_num_threads(),
        "backend": dist.get_backend(),
        "pt": (pt.rank(), pt.world_size(), str(pt.device())),
    }


def _rank_starts_children_then_blocks() -> None:
    import pilot.train as pt

    sleeper = [sys.executable, "-c", "import threading; threading.Event().wait()"]
    same_group = subprocess.Popen(sleeper)
    own_session = subprocess.Popen(sleeper, start_new_session=True)  # out of killpg's reach
    pt.report(rank_pid=os.getpid(), child=same_group.pid, detached=own_session.pid)
    threading.Event().wait()


def _rank_returns_one() -> int:
    return 1


# -- rank processes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    gang = Gang(tmp_path_factory.mktemp("ddp"), _rank_trains_with_ddp, world_size=2)
    try:
        yield _ok(gang, gang.wait())
    finally:
        gang.stop()


def test_two_ranks_all_reduce_over_gloo(two_ranks: list[dict[str, Any]]) -> None:
    assert [r["all_reduce"] for r in two_ranks] == [3.0, 3.0]
    assert [r["backend"] for r in two_ranks] == ["gloo", "gloo"]


def test_ddp_parameters_are_bit_identical_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    assert two_ranks[0]["hash"] == two_ranks[1]["hash"]


def test_ddp_parameters_match_one_process_on_the_same_global_batches(
    two_ranks: list[dict[str, Any]],
) -> None:
    model = _make_model()
    _train_steps(model, slice(0, GLOBAL_BATCH))
    expected = model.state_dict()
    got = two_ranks[0]["state"]
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert _state_hash(got) != _state_hash(_make_model().state_dict())  # it did train


def test_each_rank_sees_torchruns_environment(two_ranks: list[dict[str, Any]]) -> None:
    threads = str(omp_threads_for(len(os.sched_getaffinity(0)), 2))
    for rank, result in enumerate(two_ranks):
        env = result["env"]
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == "0"
        assert env["ROLE_NAME"] == "default"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert int(env["MASTER_PORT"]) > 0
        assert env["TORCHELASTIC_RESTART_COUNT"] == "1"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "2"
        assert env["TORCHELASTIC_RUN_ID"] == "run-7"
        assert env["OMP_NUM_THREADS"] == threads
        assert result["torch_threads"] == int(threads)
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == interface_for("127.0.0.1")
        assert result["pt"] == (rank, 2, "cpu")


def test_an_init_timeout_names_the_rank_that_never_started(tmp_path: Path) -> None:
    gang = Gang(
        tmp_path,
        _rank_returns_one,
        world_size=2,
        start=(0,),
        init_timeout_s=SHORT_INIT_TIMEOUT_S,
    )
    try:
        outcome = gang.wait()[0]
    finally:
        gang.stop()
    assert gang.procs[0].returncode == 1
    assert not outcome.ok
    assert isinstance(outcome.error, RendezvousTimeout)
    assert outcome.error.missing_ranks == (1,)
    assert "rank 1 of 2 never joined" in outcome.error_text
    assert "RendezvousTimeout" in gang.log(0)


def test_a_rank_whose_rank_0_never_serves_the_store_gives_up_naming_rank_0(
    tmp_path: Path,
) -> None:
    # The listening socket stays open but nobody serves it: torch's TCPStore client would wait
    # there forever; the rank's watchdog ends it.
    gang = Gang(
        tmp_path,
        _rank_returns_one,
        world_size=2,
        start=(1,),
        init_timeout_s=SHORT_INIT_TIMEOUT_S,
        keep_listener=True,
    )
    try:
        outcome = gang.wait()[1]
    finally:
        gang.stop()
    assert gang.procs[1].returncode == EXIT_RENDEZVOUS_TIMEOUT
    assert isinstance(outcome.error, RendezvousTimeout)
    assert outcome.error.missing_ranks == (0,)
    assert "rank 0 never served it" in outcome.error_text


def test_a_rank_without_numpy_fails_saying_numpy_is_missing(tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "numpy"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('numpy hidden by this test')\n")
    env = dict(os.environ, PYTHONPATH=str(shim.parent))
    gang = Gang(tmp_path, _rank_returns_one, world_size=1, base_env=env)
    try:
        outcome = gang.wait()[0]
    finally:
        gang.stop()
    assert gang.procs[0].returncode == 1
    assert isinstance(outcome.error, ImportError)
    assert "numpy is not importable" in outcome.error_text
    assert "object collectives" in outcome.error_text


def _read_line(fd: int, deadline_s: float) -> str:
    deadline = time.monotonic() + deadline_s
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no metrics line within {deadline_s} s (got {data!r})"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, "the metrics pipe closed before a line came"
            data += chunk
    return data.decode()


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killing_a_rank_leaves_none_of_its_processes(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    try:
        gang = Gang(tmp_path, _rank_starts_children_then_blocks, world_size=1, metrics_fd=write_fd)
    finally:
        os.close(write_fd)
    try:
        line = json.loads(_read_line(read_fd, RANK_EXIT_TIMEOUT_S))
        procs = [psutil.Process(line[k]) for k in ("rank_pid", "child", "detached")]
        assert line["rank"] == 0 and line["rank_pid"] == gang.procs[0].pid
        assert all(_running(p) for p in procs)
        kill_process_tree(gang.procs[0].pid)  # raises if anything outlives its 2 s deadline
        assert not any(_running(p) for p in procs)
        assert gang.procs[0].wait(timeout=RANK_EXIT_TIMEOUT_S) < 0  # killed by a signal
    finally:
        os.close(read_fd)
        gang.stop()


# -- placement and rendezvous, no processes --------------------------------------------------


def _placement(**changes: Any) -> RankPlacement:
    fields: dict[str, Any] = dict(
        job_id="j1",
        rank=1,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        group_rank=0,
        master_addr="10.0.0.5",
        master_port=29500,
    )
    fields.update(changes)
    return RankPlacement(**fields)


def test_rank_environment_is_torchruns_for_the_placement() -> None:
    env = rank_environment(_placement(gpu_indices=(2, 3), omp_threads=8), ifname="eth7")
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "10.0.0.5" and env["MASTER_PORT"] == "29500"
    assert env["TORCHELASTIC_RUN_ID"] == "j1"  # no run id: the job's id
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["OMP_NUM_THREADS"] == "8"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth7"
    assert set(env) == set(ENV_KEYS)


def test_omp_threads_share_the_cores_among_local_ranks_and_are_never_zero() -> None:
    assert omp_threads_for(16, 4) == 4
    assert omp_threads_for(2, 2) == 1
    assert omp_threads_for(2, 8) == 1


def test_a_placement_outside_its_world_is_refused() -> None:
    with pytest.raises(ValueError, match="outside a world of 4"):
        _placement(rank=4)
    with pytest.raises(ValueError, match="backend"):
        _placement(backend="mpi")


def test_auto_backend_is_nccl_only_when_every_rank_has_a_gpu() -> None:
    assert choose_backend("auto", [1, 1]) == "nccl"
    assert choose_backend("auto", [1, 0]) == "gloo"
    assert choose_backend("auto", []) == "gloo"
    assert choose_backend("gloo", [1, 1]) == "gloo"


def test_loopback_routes_through_the_loopback_interface() -> None:
    assert local_address_towards("localhost", 1) == "127.0.0.1"
    name = interface_for("127.0.0.1")
    addrs = {a.address for a in psutil.net_if_addrs()[name]}
    assert "127.0.0.1" in addrs


def test_the_address_towards_a_remote_host_is_one_of_ours() -> None:
    try:
        addr = local_address_towards("192.0.2.1", 9)  # TEST-NET-1: routed, never answered
    except OSError:
        pytest.skip("this machine has no route off loopback")
    ours = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    assert addr in ours
    assert interface_for("192.0.2.1") in psutil.net_if_addrs()


def test_rendezvous_sockets_listen_on_kernel_chosen_ports() -> None:
    with open_rendezvous_socket("127.0.0.1") as a, open_rendezvous_socket("127.0.0.1") as b:
        ports = {a.getsockname()[1], b.getsockname()[1]}
        assert len(ports) == 2 and 0 not in ports
        with socket.create_connection(("127.0.0.1", a.getsockname()[1]), timeout=5):
            pass  # listening already: a connection waits in the backlog until rank 0 serves it


def test_only_rank_0_is_handed_the_rendezvous_socket(tmp_path: Path) -> None:
    with open_rendezvous_socket("127.0.0.1") as sock, pytest.raises(ValueError, match="rank 0"):
        spawn_rank(
            _placement(), call_path=tmp_path / "c", result_path=tmp_path / "r", listener=sock
        )


# -- metrics ---------------------------------------------------------------------------------


def test_report_appends_json_lines_to_the_metrics_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    monkeypatch.delenv("PILOT_METRICS_FD", raising=False)
    monkeypatch.setenv("PILOT_METRICS_PATH", str(path))
    monkeypatch.setenv("RANK", "3")
    import numpy as np

    pt.report(step=1, loss=torch.tensor([0.5]), note="warm-up")
    pt.report(step=2, loss=np.float32(0.25))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["rank"], x["step"], x["loss"]) for x in lines] == [(3, 1, 0.5), (3, 2, 0.25)]
    assert lines[0]["note"] == "warm-up" and isinstance(lines[0]["time"], float)


def test_report_prints_a_metrics_line_without_a_side_channel(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("PILOT_METRICS_FD", "PILOT_METRICS_PATH", "RANK"):
        monkeypatch.delenv(var, raising=False)
    pt.report(step=7)
    out = capsys.readouterr().out
    assert out.startswith("[metrics] ")
    assert json.loads(out.removeprefix("[metrics] "))["step"] == 7


def test_report_refuses_values_that_are_not_scalars() -> None:
    with pytest.raises(TypeError, match=r"pt.report\(weights=...\): a Tensor is not a metric"):
        pt.report(weights=torch.zeros(3))
    with pytest.raises(TypeError, match="a list is not a metric"):
        pt.report(losses=[1.0])
    with pytest.raises(ValueError, match="rank"):
        pt.report(rank=1)


# -- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def checkpoint_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if request.param == "local":
        url = str(tmp_path / "ckpt")
    else:
        url = f"memory://ckpt-{uuid.uuid4().hex}"
    monkeypatch.setenv("PILOT_CHECKPOINT_URL", url)
    monkeypatch.setenv("RANK", "0")
    yield url
    if request.param == "memory":
        import fsspec

        fsspec.filesystem("memory").rm(url, recursive=True)


def _files(url: str) -> list[str]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url)
    return sorted(p.rpartition("/")[2] for p in fs.ls(root, detail=False))


def test_checkpoint_and_restore_round_trip(checkpoint_url: str) -> None:
    assert pt.restore() is None
    model = _make_model()
    written = pt.checkpoint({"step": 4, "model": model.state_dict()})
    assert written is not None and written.endswith("ckpt-00000000.pt")
    state = pt.restore()
    assert state["step"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value)
    assert state["model"]["0.weight"].device == pt.device()


def test_only_the_newest_checkpoints_are_kept_and_latest_names_the_newest(
    checkpoint_url: str,
) -> None:
    for step in range(0, 50, 10):
        pt.checkpoint({"step": step}, step=step)
    assert _files(checkpoint_url) == [
        "LATEST",
        "ckpt-00000020.pt",
        "ckpt-00000030.pt",
        "ckpt-00000040.pt",
    ]
    assert pt.restore() == {"step": 40}
    pt.checkpoint({"step": 41})  # no step: one past the newest
    assert pt.restore() == {"step": 41}
    assert _files(checkpoint_url)[-1] == "ckpt-00000041.pt"


def test_a_checkpoint_that_fails_to_save_leaves_the_last_good_one_latest(
    checkpoint_url: str,
) -> None:
    pt.checkpoint({"step": 1}, step=1)
    with pytest.raises(Exception, match="pickle"):
        pt.checkpoint({"step": 2, "bad": lambda: None}, step=2)
    assert _files(checkpoint_url) == ["LATEST", "ckpt-00000001.pt"]
    assert pt.restore() == {"step": 1}


def test_a_reader_never_sees_half_a_checkpoint(checkpoint_url: str) -> None:
    writes = 30
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for step in range(writes):
                big = torch.full((20_000,), float(step))  # 80 kB: a write takes a while
                pt.checkpoint({"step": step, "data": big}, step=step)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set() or not seen:
        state = pt.restore()
        if state is not None:
            assert torch.equal(state["data"], torch.full((20_000,), float(state["step"])))
            seen.append(state["step"])
    thread.join()
    assert not errors, errors
    assert seen == sorted(seen) and seen[-1] <= writes - 1
    assert pt.restore()["step"] == writes - 1
    assert not [name for name in _files(checkpoint_url) if name.startswith(".")]


def test_ranks_other_than_0_do_not_write_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PILOT_CHECKPOINT_URL", str(tmp_path / "ckpt"))
    monkeypatch.setenv("RANK", "1")
    assert pt.checkpoint({"step": 1}) is None
    assert not (tmp_path / "ckpt").exists()


def test_a_job_without_a_checkpoint_url_is_told_how_to_set_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PILOT_CHECKPOINT_URL", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="--checkpoint URL"):
        pt.checkpoint({"step": 1})
    with pytest.raises(ConfigError, match="PILOT_CHECKPOINT_URL"):
        pt.restore()


# -- cached ----------------------------------------------------------------------------------


def test_cached_builds_once_per_process_and_returns_the_same_object() -> None:
    key = f"model-{uuid.uuid4().hex}"
    calls: list[int] = []

    def factory() -> object:
        calls.append(1)
        return object()

    first = cached(key, factory)
    assert cached(key, factory) is first
    assert cached(key, lambda: "another factory") is first
    assert len(calls) == 1


def test_cached_builds_once_when_threads_ask_together() -> None:
    key = f"model-{uuid.uuid4().hex}"
    threads_n = 8
    start = threading.Barrier(threads_n)
    calls: list[int] = []
    got: list[object] = []

    def factory() -> object:
        calls.append(1)
        return object()

    def ask() -> None:
        start.wait(timeout=10)
        got.append(cached(key, factory))

    threads = [threading.Thread(target=ask) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(calls) == 1
    assert len(got) == threads_n and all(x is got[0] for x in got)


def test_cached_keeps_nothing_when_the_factory_raises() -> None:
    key = f"model-{uuid.uuid4().hex}"

    def broken() -> object:
        raise OSError("weights not found")

    with pytest.raises(OSError, match="weights not found"):
        cached(key, broken)
    assert cached(key, lambda: 42) == 42
    with pytest.raises(RuntimeError, match="its own key"):
        cached(f"loop-{key}", lambda: cached(f"loop-{key}", object))
