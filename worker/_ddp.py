"""Data-parallel training, worker side: where a rank runs, its environment, its rendezvous.

The worker that hosts a rank builds a ``RankPlacement`` (from what the gateway assigned) and
spawns the rank as a fresh process (``spawn_rank``; never a fork: the worker may hold CUDA or
threads) running ``python -m worker._ddp_rank``, with torchrun's environment
(``rank_environment``) set before anything in it imports torch.

Rendezvous without races or fixed ports: the worker that hosts rank 0 calls
``open_rendezvous_socket(addr)`` on the address the other ranks reach it by
(``local_address_towards(gateway_host, gateway_port)``), so the kernel picks the port and the
socket is listening before anyone learns the port. The socket's fd is handed to rank 0
(``spawn_rank(..., listener=sock)`` passes it with ``pass_fds``), whose ``TCPStore`` serves on it
(``master_listen_fd``). The caller owns the socket and should close its own copy as soon as
``spawn_rank`` returns: from then on the port lives exactly as long as rank 0 does, and a rank
that connects after rank 0 died gets "connection refused" rather than a socket nobody serves.

``kill_process_tree`` stops a rank and everything it started (DataLoader workers included)
within ``KILL_DEADLINE_S``. Nothing here imports torch or the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from worker._orphan import parent

__all__ = [
    "DEFAULT_INIT_TIMEOUT_S",
    "KILL_DEADLINE_S",
    "RankPlacement",
    "choose_backend",
    "interface_for",
    "kill_and_reap",
    "kill_process_tree",
    "local_address_towards",
    "omp_threads_for",
    "open_rendezvous_socket",
    "rank_argv",
    "rank_environment",
    "spawn_rank",
    "wait_exit",
]

DEFAULT_INIT_TIMEOUT_S = 60.0
KILL_TERM_GRACE_S = 0.5  # SIGTERM first: a rank may flush its logs; then SIGKILL
KILL_DEADLINE_S = 2.0  # the whole tree is gone within this, or kill_process_tree raises
RENDEZVOUS_BACKLOG = 128  # TCPStore clients (a few per rank) queue here until rank 0 serves
_NO_PIDFD_POLL_MS = 10
REAP_TIMEOUT_S = 5.0  # after a kill, a rank's exit status is collected within this
_PROBE_PORT = 9  # discard; a UDP connect() sends nothing, it only asks the kernel for a route

BACKENDS = ("gloo", "nccl", "auto")


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank of a DDP job runs and how it finds the others (one per rank).

    ``group_rank`` is the index of the rank's worker (node) in the gang; ``local_rank`` and
    ``local_world_size`` count the ranks on that worker. ``gpu_indices`` are the physical GPU
    indices the rank was given (empty: CPU). ``omp_threads`` is the worker's cores divided among
    its local ranks (``omp_threads_for``). ``backend`` is ``"gloo"``, ``"nccl"`` or ``"auto"``
    (resolve it for the whole gang with ``choose_backend`` before placing ranks).
    """

    job_id: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    group_rank: int
    master_addr: str
    master_port: int
    restart_count: int = 0
    max_restarts: int = 0
    run_id: str = ""
    gpu_indices: tuple[int, ...] = ()
    omp_threads: int = 1
    backend: str = "auto"
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} is outside {self.local_world_size} local ranks"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.init_timeout_s <= 0:
            raise ValueError(f"init_timeout_s must be positive, not {self.init_timeout_s}")


def omp_threads_for(cores: int, local_world_size: int) -> int:
    """Threads per rank: the worker's ``cores`` shared among its local ranks, at least 1.
    (Unset, every rank starts one thread per core: two ranks on two cores run ~80x slower.)"""
    return max(1, cores // max(1, local_world_size))


def choose_backend(requested: str, gpus_per_rank: Iterable[int]) -> str:
    """The backend for a whole gang: ``requested`` unless it is ``"auto"``, in which case
    ``"nccl"`` when every rank has at least one GPU and ``"gloo"`` otherwise. Every rank must
    use the same backend, so the scheduler decides once, not each rank alone."""
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    counts = list(gpus_per_rank)
    return "nccl" if counts and all(n > 0 for n in counts) else "gloo"


def rank_environment(p: RankPlacement, *, ifname: str | None = None) -> dict[str, str]:
    """torchrun's environment for the rank ``p`` (only these variables; merge it over the
    worker's own). ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` name the interface that routes
    to ``master_addr``; pass ``ifname`` to skip the lookup (``interface_for``), which is the one
    part that asks the kernel. Raises ``OSError`` when no interface routes there."""
    if ifname is None:
        ifname = interface_for(p.master_addr)
    return {
        "RANK": str(p.rank),
        "LOCAL_RANK": str(p.local_rank),
        "WORLD_SIZE": str(p.world_size),
        "LOCAL_WORLD_SIZE": str(p.local_world_size),
        "GROUP_RANK": str(p.group_rank),
        "ROLE_RANK": str(p.rank),  # one role ("default"), so the role rank is the global rank
        "ROLE_NAME": "default",
        "MASTER_ADDR": p.master_addr,
        "MASTER_PORT": str(p.master_port),
        "TORCHELASTIC_RESTART_COUNT": str(p.restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(p.max_restarts),
        "TORCHELASTIC_RUN_ID": p.run_id or p.job_id,
        "OMP_NUM_THREADS": str(max(1, p.omp_threads)),
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in p.gpu_indices),
        "GLOO_SOCKET_IFNAME": ifname,
        "NCCL_SOCKET_IFNAME": ifname,
    }


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def local_address_towards(host: str, port: int = _PROBE_PORT) -> str:
    """The IP of this machine's interface that the kernel would use to reach ``host:port``
    (the gateway): the address other ranks can reach this worker by. ``127.0.0.1`` when
    ``host`` is loopback. Sends nothing (a UDP ``connect`` only chooses a route). Raises
    ``OSError`` when there is no route."""
    if _is_loopback(host):
        return "127.0.0.1"
    family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(sockaddr)
        return str(probe.getsockname()[0])


def interface_for(addr: str) -> str:
    """The name of the network interface (``"lo"``, ``"eth0"``) that holds the route to
    ``addr``, as the kernel chooses it. Raises ``OSError`` when no interface has the address
    the route leaves from."""
    local_ip = ipaddress.ip_address(local_address_towards(addr).split("%", 1)[0])
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(a.address.split("%", 1)[0]) == local_ip:
                    return name
    raise OSError(f"no network interface holds {local_ip}, the route to {addr}")


def open_rendezvous_socket(addr: str) -> socket.socket:
    """A TCP socket listening on ``(addr, 0)``: the kernel picks a free port (read it with
    ``getsockname()[1]``), and it is listening before anyone learns it, so there is neither a
    fixed port nor a race. The caller owns it: hand it to rank 0 with ``spawn_rank(...,
    listener=sock)``, then close it."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((addr, 0))
        sock.listen(RENDEZVOUS_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def rank_argv(
    call_path: str | Path, result_path: str | Path, *, store_fd: int | None = None
) -> list[str]:
    """The command line of a rank process: ``python -m worker._ddp_rank``; ``store_fd`` is the
    inherited listening socket (rank 0 only)."""
    argv = [sys.executable, "-m", "worker._ddp_rank", "--call", str(call_path)]
    argv += ["--result", str(result_path)]
    if store_fd is not None:
        argv += ["--store-fd", str(store_fd)]
    return argv


def spawn_rank(
    p: RankPlacement,
    *,
    call_path: str | Path,
    result_path: str | Path,
    listener: socket.socket | None = None,
    metrics_fd: int | None = None,
    checkpoint_url: str | None = None,
    base_env: Mapping[str, str] | None = None,
    ifname: str | None = None,
    **popen_kwargs: object,
) -> subprocess.Popen:
    """Start the rank ``p`` as a fresh process in its own session (so ``kill_process_tree`` can
    signal its whole process group) and return it; the caller waits on it and owns it.

    ``call_path`` holds ``cloudpickle.dumps((fn, args, kwargs))``; the rank writes its outcome
    to ``result_path`` (see ``worker._ddp_rank``). ``listener`` (rank 0 only) is the socket from
    ``open_rendezvous_socket``. ``metrics_fd`` is the write end of a pipe for ``pt.report``
    lines (``PILOT_METRICS_FD``); ``checkpoint_url`` becomes ``PILOT_CHECKPOINT_URL``.
    ``base_env`` (default: this process's) is what torchrun's variables are laid over.
    ``popen_kwargs`` go to ``subprocess.Popen`` (``stdout``, ``stderr``, ``cwd``...).
    """
    if (listener is not None) != (p.rank == 0):
        raise ValueError("the rendezvous socket goes to rank 0, and only to rank 0")
    env = dict(os.environ if base_env is None else base_env)
    env.update(rank_environment(p, ifname=ifname))
    env["PILOT_JOB_ID"] = p.job_id
    env["PILOT_DDP_BACKEND"] = p.backend
    env["PILOT_DDP_INIT_TIMEOUT_S"] = repr(float(p.init_timeout_s))
    pass_fds: list[int] = []
    store_fd = None
    if listener is not None:
        store_fd = listener.fileno()
        pass_fds.append(store_fd)
    if metrics_fd is not None:
        env["PILOT_METRICS_FD"] = str(metrics_fd)
        pass_fds.append(metrics_fd)
    if checkpoint_url is not None:
        env["PILOT_CHECKPOINT_URL"] = checkpoint_url
    return subprocess.Popen(  # type: ignore[call-overload]
        rank_argv(call_path, result_path, store_fd=store_fd),
        env=parent(env),
        pass_fds=tuple(pass_fds),
        start_new_session=True,
        close_fds=True,
        **popen_kwargs,
    )


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def _gone(proc: psutil.Process) -> bool:
    """Exited (a zombie counts: it holds no resources, and reaping it is its parent's job)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until every process in ``procs`` exited or ``deadline`` (monotonic) passed; return
    the ones still running. Waits on pidfds (readable at exit) without reaping anyone; where
    there are no pidfds (not Linux 5.3+), checks every ``_NO_PIDFD_POLL_MS``."""
    alive = [p for p in procs if not _gone(p)]
    fds: dict[int, psutil.Process] = {}
    polled: list[psutil.Process] = []
    poller = select.poll()
    try:
        for proc in alive:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                continue
            except (AttributeError, OSError):
                polled.append(proc)
                continue
            fds[fd] = proc
            poller.register(fd, select.POLLIN)
        while fds or any(not _gone(p) for p in polled):
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0:
                break
            for fd, _ in poller.poll(min(left_ms, _NO_PIDFD_POLL_MS) if polled else left_ms):
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)
    return [p for p in alive if not _gone(p)]


def kill_process_tree(pid: int, *, deadline_s: float = KILL_DEADLINE_S) -> None:
    """Stop process ``pid`` and all its descendants within ``deadline_s``: SIGTERM to the
    tree (and to its process group when ``pid`` leads one, as ``spawn_rank`` makes it),
    ``KILL_TERM_GRACE_S`` to exit, then SIGKILL to whatever is left. Does not reap ``pid``:
    its parent (the caller, usually) still ``wait()``s for its exit status. Raises
    ``TimeoutError`` naming the processes that outlived the deadline."""
    deadline = time.monotonic() + deadline_s
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = _tree(root)  # before any signal: once the root dies its children are reparented
    group = pid if _leads_group(pid) else None
    _signal_all(procs, signal.SIGTERM)
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM)
    survivors = _wait_gone(procs, min(deadline, time.monotonic() + KILL_TERM_GRACE_S))
    # A survivor may have started children since; catch them too.
    seen = {p.pid for p in procs}
    for proc in list(survivors):
        for child in _tree(proc)[1:]:
            if child.pid not in seen:
                seen.add(child.pid)
                survivors.append(child)
    _signal_all(survivors, signal.SIGKILL)
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    left = _wait_gone(survivors, deadline)
    if left:
        pids = ", ".join(str(p.pid) for p in left)
        raise TimeoutError(f"processes {pids} outlived SIGKILL for {deadline_s} s")


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid and os.getpgid(0) != pid
    except ProcessLookupError:
        return False


async def wait_exit(proc: subprocess.Popen) -> int:
    """Wait on the running event loop for ``proc`` to exit and reap it; return its status.
    Reads a pidfd where there is one (no thread), else waits in a thread."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return await asyncio.to_thread(proc.wait)
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: None if done.done() else done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()


def kill_and_reap(proc: subprocess.Popen) -> None:
    """``kill_process_tree`` then collect the exit status (blocking: call it in a thread).
    A tree that outlived the deadline is logged by the caller's next look, not raised."""
    with contextlib.suppress(TimeoutError):
        kill_process_tree(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(REAP_TIMEOUT_S)
