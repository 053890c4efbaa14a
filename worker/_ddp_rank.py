"""Data-parallel training, rank side: the entry point of one rank process.

Run as ``python -m worker._ddp_rank --call CALL --result RESULT [--store-fd FD]`` by
``worker._ddp.spawn_rank``, in a fresh process whose environment already holds torchrun's
variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``...) and
``PILOT_DDP_BACKEND`` / ``PILOT_DDP_INIT_TIMEOUT_S``. ``run_rank``:

1. checks that numpy imports (torch's object collectives need it) and raises ``ImportError``
   saying so if not;
2. builds the rendezvous store: rank 0 serves it on the inherited listening socket
   (``TCPStore(..., is_master=True, master_listen_fd=FD)``), the others connect to
   ``MASTER_ADDR:MASTER_PORT``;
3. sets ``joined/<rank>`` in the store and waits for every rank's key: after
   ``PILOT_DDP_INIT_TIMEOUT_S`` it raises ``RendezvousTimeout`` naming the ranks that never
   joined;
4. ``init_process_group`` (gloo, or nccl when every rank has a GPU; ``"auto"`` decides from
   this rank's GPUs, which the scheduler keeps the same on every rank);
5. calls ``fn(*args, **kwargs)`` from the call file, destroys the process group, and writes
   the outcome to RESULT: written to a temporary name and renamed, so RESULT is either absent
   or complete (both files' formats: ``worker._rank_files``).

Exit status: 0 when ``fn`` returned, 1 when anything raised (the outcome holds the error and
its traceback, and the traceback goes to stderr too), ``EXIT_RENDEZVOUS_TIMEOUT`` when a
rendezvous step hung past its deadline inside torch (where no Python exception can reach it:
a ``TCPStore`` client blocks forever on a listening socket nobody serves) and the watchdog ended
the process after writing the outcome.

torch facts this relies on (torch 2.13): ``master_listen_fd`` works with the default libuv
server and with ``use_libuv=False``; the store takes the fd over, so it must never be closed by
Python (no ``socket.socket(fileno=...)`` wrapper: closing it under the store aborts the
process). ``wait_for_workers=False`` lets rank 0 return at once and do the waiting itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker._rank_files import RankOutcome, load_call, read_outcome, write_outcome

__all__ = [
    "EXIT_RENDEZVOUS_TIMEOUT",
    "RankOutcome",
    "RendezvousTimeout",
    "main",
    "read_outcome",
    "run_rank",
]

EXIT_ERROR = 1
EXIT_RENDEZVOUS_TIMEOUT = 3
WATCHDOG_GRACE_S = 2.0  # past the deadline: torch's own timeouts get to speak first
# Per-collective timeout of the process group. Not the init timeout: a step may legitimately
# keep the other ranks waiting at a collective for minutes (rank 0 evaluating, say).
COLLECTIVE_TIMEOUT_S = 1800.0


class RendezvousTimeout(TimeoutError):
    """The ranks did not all meet within the init timeout. ``missing_ranks`` are the ranks that
    never joined (or ``(0,)`` when rank 0's store never answered)."""

    def __init__(self, message: str, missing_ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.missing_ranks = missing_ranks

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.missing_ranks))


@dataclass(frozen=True)
class _RankSettings:
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    backend: str
    init_timeout_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> _RankSettings:
        try:
            return cls(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                master_addr=env["MASTER_ADDR"],
                master_port=int(env["MASTER_PORT"]),
                backend=env.get("PILOT_DDP_BACKEND", "auto"),
                init_timeout_s=float(env.get("PILOT_DDP_INIT_TIMEOUT_S", "60")),
            )
        except KeyError as exc:
            raise RuntimeError(
                f"{exc.args[0]} is not set: a rank process is started by the worker "
                "(worker._ddp.spawn_rank), which sets torchrun's environment"
            ) from None


def _require_numpy() -> None:
    try:
        import numpy  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "numpy is not importable in this rank's Python "
            f"({sys.executable}): torch.distributed's object collectives "
            "(all_gather_object, broadcast_object_list) need it. Install numpy in the "
            "worker's environment."
        ) from exc


class _Watchdog:
    """Ends the process when a rendezvous step hangs inside torch past its deadline: writes
    the outcome (a ``RendezvousTimeout``), prints it, then ``os._exit``. ``arm`` sets the
    phase's deadline and message; ``disarm`` stops it."""

    def __init__(self, rank: int, result_path: str | Path) -> None:
        self._rank = rank
        self._result_path = result_path
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float, message: str, missing: tuple[int, ...]) -> None:
        self.disarm()
        timer = threading.Timer(max(0.0, seconds), self._expire, args=(message, missing))
        timer.daemon = True
        with self._lock:
            self._timer = timer
        timer.start()

    def disarm(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _expire(self, message: str, missing: tuple[int, ...]) -> None:
        with self._lock:
            if self._timer is None or self._timer is not threading.current_thread():
                return  # disarmed (or re-armed) while this timer was about to fire
            error = RendezvousTimeout(message, missing)
            write_outcome(self._result_path, rank=self._rank, error=error, error_text=message)
            print(f"RendezvousTimeout: {message}", file=sys.stderr, flush=True)
            os._exit(EXIT_RENDEZVOUS_TIMEOUT)


def _resolve_backend(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    has_gpu = bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip())
    return "nccl" if has_gpu and torch.cuda.is_available() else "gloo"


def _build_store(s: _RankSettings, store_fd: int | None, watchdog: _Watchdog, deadline: float):
    import torch.distributed as dist

    where = f"{s.master_addr}:{s.master_port}"
    timeout = datetime.timedelta(seconds=s.init_timeout_s)
    if s.rank == 0:
        if store_fd is None:
            raise RuntimeError("rank 0 needs the rendezvous socket (--store-fd) from its worker")
        return dist.TCPStore(
            s.master_addr,
            s.master_port,
            s.world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,  # we wait ourselves, to name the ranks that never came
            master_listen_fd=store_fd,
        )
    message = (
        f"rank {s.rank} could not reach the rendezvous store at {where} within "
        f"{s.init_timeout_s:g} s: rank 0 never served it (it did not start, or died first)"
    )
    watchdog.arm(deadline - time.monotonic(), message, (0,))
    try:
        return dist.TCPStore(s.master_addr, s.master_port, s.world_size, False, timeout)
    except (dist.DistNetworkError, dist.DistStoreError) as exc:
        raise RendezvousTimeout(f"{message}: {exc}", (0,)) from exc
    finally:
        watchdog.disarm()


def _wait_for_everyone(store: Any, s: _RankSettings, deadline: float) -> None:
    import torch.distributed as dist

    store.set(f"joined/{s.rank}", "1")
    keys = [f"joined/{r}" for r in range(s.world_size)]
    left_s = max(0.001, deadline - time.monotonic())
    try:
        store.wait(keys, datetime.timedelta(seconds=left_s))
    except dist.DistStoreError as exc:
        missing = tuple(r for r, key in enumerate(keys) if not store.check([key]))
        if not missing:  # they all came just as the wait ran out
            return
        names = ", ".join(str(r) for r in missing)
        noun = "rank" if len(missing) == 1 else "ranks"
        raise RendezvousTimeout(
            f"{noun} {names} of {s.world_size} never joined the rendezvous at "
            f"{s.master_addr}:{s.master_port} within {s.init_timeout_s:g} s "
            "(not started, crashed while starting, or unable to reach that address)",
            missing,
        ) from exc


@contextlib.contextmanager
def _process_group(
    s: _RankSettings, store_fd: int | None, result_path: str | Path
) -> Iterator[str]:
    """Initialise the default process group for this rank; destroy it on the way out."""
    import torch
    import torch.distributed as dist

    deadline = time.monotonic() + s.init_timeout_s
    watchdog = _Watchdog(s.rank, result_path)
    store = _build_store(s, store_fd, watchdog, deadline + WATCHDOG_GRACE_S)
    _wait_for_everyone(store, s, deadline)
    backend = _resolve_backend(s.backend)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(0)  # CUDA_VISIBLE_DEVICES leaves this rank its own GPUs only
        kwargs["device_id"] = torch.device("cuda", 0)
    watchdog.arm(
        s.init_timeout_s,
        f"init_process_group({backend!r}) on rank {s.rank} did not complete within "
        f"{s.init_timeout_s:g} s although every rank joined the rendezvous",
        (),
    )
    try:
        dist.init_process_group(
            backend,
            store=store,
            rank=s.rank,
            world_size=s.world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            **kwargs,
        )
    finally:
        watchdog.disarm()
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def run_rank(call_path: str | Path, result_path: str | Path, *, store_fd: int | None = None) -> int:
    """Run one rank in this (fresh) process, as the module docstring says; return the exit
    status. Writes the outcome to ``result_path`` in every case but a kill."""
    rank = int(os.environ.get("RANK", "-1"))
    try:
        settings = _RankSettings.from_env(os.environ)
        _require_numpy()
        fn, args, kwargs = load_call(call_path)
        with _process_group(settings, store_fd, result_path):
            value = fn(*args, **kwargs)
    except BaseException as exc:
        text = _user_traceback(exc)
        print(text, file=sys.stderr, end="", flush=True)
        write_outcome(result_path, rank=rank, error=exc, error_text=str(exc), traceback_text=text)
        return EXIT_ERROR
    write_outcome(result_path, rank=rank, value=value)
    return 0


def _user_traceback(exc: BaseException) -> str:
    """The traceback without ``run_rank``'s own frame: the user sees their code first."""
    te = traceback.TracebackException.from_exception(exc)
    here = os.path.abspath(__file__)
    stack = list(te.stack)
    if stack and os.path.abspath(stack[0].filename) == here and stack[0].name == "run_rank":
        te.stack = traceback.StackSummary.from_list(stack[1:])
    return "".join(te.format())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m worker._ddp_rank``)."""
    parser = argparse.ArgumentParser(prog="python -m worker._ddp_rank")
    parser.add_argument("--call", required=True, help="the call file (worker._rank_files)")
    parser.add_argument("--result", required=True, help="where the outcome goes")
    parser.add_argument("--store-fd", type=int, default=None, help="rank 0: listening socket")
    ns = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a pipe to the worker: each line as it comes
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    from worker._orphan import die_with_parent

    die_with_parent()  # a rank never outlives the worker that started it
    return run_rank(ns.call, ns.result, store_fd=ns.store_fd)


if __name__ == "__main__":
    # Run the copy imported under its own name, not this ``__main__`` one: the RankOutcome and
    # errors it pickles must be ``worker._ddp_rank``'s classes, or readers get look-alikes.
    from worker._ddp_rank import main as _main

    sys.exit(_main())
