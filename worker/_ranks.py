"""Training ranks on a worker: ``RankHost`` runs the ranks of DDP jobs assigned here.

An assignment of kind ``JobKind.DDP`` does not go to the task pool: the runner hands it to
``start`` (its slots taken, as a session's are) and gets it back through ``ended(task,
result)``. Each rank is a fresh process (``worker._ddp.spawn_rank``, never forked from the
worker) with torchrun's environment. For each rank the host:

1. fetches the job's latest checkpoint kept by the gateway (``Assignment.checkpoint``) into the
   worker's blob directory, for ``pilot.train.restore`` (``PILOT_RESTORE_PATH``);
2. meets its group (``worker._meetings``): rank 0's worker opens the rendezvous socket and
   says where; the other workers hold their ranks until the gateway tells them;
3. spawns the rank: its GPUs are the first free ones here, ``OMP_NUM_THREADS`` the worker's
   cores (``--cores``, else all it may run on) over its ranks of the group, the backend the
   job's (``auto``: nccl when the ranks have GPUs, decided the same way on every worker). Rank
   0 gets the listening socket, and the host closes its own copy at once: the port lives as
   long as rank 0 does;
4. streams its output and reports, and stores each checkpoint it writes in the gateway's blob
   store (``worker._rank_io``);
5. when it exits, reports its ``TaskResult`` from the outcome file (``worker._rank_files``):
   OK with its value, ERROR with the rank and its traceback, CRASHED when it died without an
   outcome, CANCELLED when cancelled; ``progressed`` once it reported metrics or a checkpoint.

``cancel`` kills a rank's whole process tree (DataLoader workers too) within
``KILL_DEADLINE_S``; ``close`` (the worker stops) kills every rank. A rank also dies with its
worker: it asks for ``PR_SET_PDEATHSIG``, and is spawned from the loop's thread, which lives as
long as the worker. Owned by the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.protocol import (
    Assignment,
    BlobReply,
    Output,
    Payload,
    RankInfo,
    Rendezvous,
    ShippedFile,
    TaskResult,
    TaskStatus,
    TrainSpec,
    WorkerSettings,
)
from worker._ddp import (
    RankPlacement,
    choose_backend,
    interface_for,
    kill_and_reap,
    kill_process_tree,
    omp_threads_for,
    spawn_rank,
    wait_exit,
)
from worker._devices import cpu_count
from worker._fetch import BLOB_FETCH_BASE_S, BLOB_FETCH_MIN_BYTES_PER_S, BlobFetcher
from worker._meetings import Meetings
from worker._rank_files import read_raw_outcome, write_call
from worker._rank_io import RankPipes
from worker._shipped import blob_path

__all__ = ["RankHost"]

log = logging.getLogger("pilot.worker")

Key = tuple[str, int, int]  # (job_id, index, attempt)
OUTPUT_FLUSH_S = 0.05  # rank output waits this long to travel with what follows it


class _StartFailed(Exception):
    """The rank could not be started: the result to report instead."""

    def __init__(self, status: TaskStatus, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(slots=True, eq=False)
class _Rank:
    task: Assignment
    directory: Path
    runner: asyncio.Task[None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    pipes: RankPipes | None = None
    gpus: tuple[int, ...] = ()
    cancelled: bool = False

    @property
    def number(self) -> int:
        assert self.task.rank is not None
        return self.task.rank.rank


class RankHost:
    """See the module docstring. ``outputs(list)`` reports outputs; ``forward(msg)`` sends to
    the gateway; ``ended(task, result)`` hands a finished rank back to the runner; ``wake()``
    ends a turn (the reports are flushed)."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        env: dict[str, str],
        work_dir: Path,
        gpus: Sequence[int],
        outputs: Callable[[list[Output]], None],
        fetcher: BlobFetcher,
        forward: Callable[[Any], None],
        ended: Callable[[Assignment, TaskResult], None],
        wake: Callable[[], None],
    ) -> None:
        self._meetings = Meetings(_host(settings), forward)
        self._cores = settings.cores or cpu_count()  # shared among a group's ranks here
        self._env = env
        self._blobs_dir = work_dir
        self._dir = work_dir / "ranks"
        self._free_gpus = sorted(gpus)
        self._outputs = outputs
        self._fetcher = fetcher
        self._forward = forward
        self._ended = ended
        self._wake = wake
        self._ranks: dict[Key, _Rank] = {}
        self._kills: set[asyncio.Task[None]] = set()
        self._flush: asyncio.TimerHandle | None = None

    # -- what the worker calls ------------------------------------------------------------

    def start(self, task: Assignment) -> None:
        """Run the rank ``task`` (its slots are taken); ``ended`` is called when it ends."""
        key = (task.job_id, task.index, task.attempt)
        r = _Rank(task, self._dir / f"{task.job_id}-{task.index}-{task.attempt}")
        self._ranks[key] = r
        r.runner = asyncio.get_running_loop().create_task(self._run(r))

    def use(self, settings: WorkerSettings) -> None:
        """Settings with the gateway's connection, known only now (before any rank)."""
        self._meetings.gateway_host = _host(settings)

    def rendezvous(self, msg: Rendezvous) -> None:
        """Where a group meets, from the gateway: its ranks here (now or later) start."""
        self._meetings.arrived(msg.job_id, msg.restart, msg.host, msg.port)

    def cancel(self, wanted: set[Key]) -> None:
        """Stop the ranks of ``wanted``: kill their processes, or keep them from starting."""
        for key in wanted & self._ranks.keys():
            r = self._ranks[key]
            if r.cancelled:
                continue
            r.cancelled = True
            if r.proc is None:
                assert r.runner is not None
                r.runner.cancel()  # it waits for a blob or its group: it never spawns
            elif r.proc.returncode is None:  # not reaped yet: the pid is still its own
                self._kill(r.proc)

    async def close(self) -> None:
        """Kill every rank and wait for it (the worker stops)."""
        for r in self._ranks.values():
            r.cancelled = True
        kills = [
            asyncio.to_thread(kill_and_reap, r.proc)
            for r in self._ranks.values()
            if r.proc is not None and r.proc.returncode is None
        ]
        await asyncio.gather(*kills, *self._kills, return_exceptions=True)
        runners = [r.runner for r in self._ranks.values() if r.runner is not None]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        self._meetings.close()
        if self._flush is not None:
            self._flush.cancel()

    # -- one rank, from assignment to result ----------------------------------------------

    async def _run(self, r: _Rank) -> None:
        t = r.task
        started = time.monotonic()
        try:
            result = await self._attempt(r)
        except asyncio.CancelledError:
            if not r.cancelled:
                raise  # the host is closing
            result = self._result(r, TaskStatus.CANCELLED, "Cancelled.", started)
        except _StartFailed as exc:
            result = self._result(r, exc.status, f"rank {r.number}: {exc.text}", started)
        except Exception as exc:
            log.exception("rank %d of job %s could not be started", r.number, t.job_id)
            text = f"rank {r.number}: the worker could not start it: {exc!r}"
            result = self._result(r, TaskStatus.ERROR, text, started)
        finally:
            self._release(r)
        self._ended(t, result)

    async def _attempt(self, r: _Rank) -> TaskResult:
        t = r.task
        info = t.rank
        if info is None:
            raise _StartFailed(TaskStatus.ERROR, "a DDP assignment without its rank")
        train = t.train or TrainSpec()
        restore = await self._restore_file(t, train)
        fn = await self._function(t.fn_digest)
        host, port = await self._meet(t, info, train)  # last: rank 0 spawns right after
        r.directory.mkdir(parents=True, exist_ok=True)
        call, outcome = r.directory / "call.pkl", r.directory / "outcome.pkl"
        write_call(call, fn, t.args)
        r.gpus = self._take_gpus(t.gpus)
        placement = RankPlacement(
            job_id=t.job_id,
            rank=info.rank,
            world_size=info.world_size,
            local_rank=info.local_rank,
            local_world_size=info.local_world_size,
            group_rank=info.group_rank,
            master_addr=host,
            master_port=port,
            restart_count=info.restart,
            max_restarts=train.restarts,
            run_id=info.run_id,
            gpu_indices=r.gpus,
            omp_threads=omp_threads_for(self._cores, info.local_world_size),
            backend=choose_backend(train.backend, [t.gpus] * info.world_size),
            init_timeout_s=train.init_timeout_s,
        )
        try:
            ifname = interface_for(host)
        except OSError as exc:
            text = f"no network route to rank 0 at {host}: {exc}"
            raise _StartFailed(TaskStatus.ERROR, text) from exc
        env = {
            **self._env,
            "PILOT_CHECKPOINT_DIR": str(r.directory / "checkpoints"),  # for RankPipes
            "PILOT_CHECKPOINT_SEQ": str(t.checkpoint.item + 1 if t.checkpoint else 0),
            "PILOT_RESTORE_PATH": restore,
        }
        r.pipes = pipes = RankPipes(
            t, r.directory / "checkpoints", outputs=self._report, forward=self._forward
        )
        listener = self._meetings.take_listener(t.job_id, info.restart) if info.rank == 0 else None
        try:
            r.proc = spawn_rank(
                placement,
                call_path=call,
                result_path=outcome,
                listener=listener,
                metrics_fd=pipes.metrics_fd,
                checkpoint_url=train.checkpoint_url or None,
                base_env=env,
                ifname=ifname,
                stdin=subprocess.DEVNULL,
                stdout=pipes.stdout_fd,
                stderr=pipes.stderr_fd,
            )
        finally:
            if listener is not None:
                listener.close()  # rank 0 holds the port from here on
        pipes.watch()
        spawned = time.monotonic()
        code = await wait_exit(r.proc)
        pipes.close()
        await pipes.stored()  # its checkpoints are reported before its result
        return self._outcome(r, code, outcome, spawned)

    async def _restore_file(self, t: Assignment, train: TrainSpec) -> str:
        """The local path of the checkpoint to restore ("" when none, or when the job keeps
        its checkpoints at a URL, where ``restore`` reads them)."""
        ref = t.checkpoint
        if ref is None or not ref.digest or train.checkpoint_url:
            return ""
        path = blob_path(self._blobs_dir, ref.digest)
        if not path.exists():
            reply = await self._fetch(
                lambda then: self._fetcher.file(ShippedFile(ref.name, ref.digest, ref.size), then)
            )
            if not reply.ok:
                text = f"the job's checkpoint {ref.item} could not be had: {reply.error}"
                raise _StartFailed(TaskStatus.CRASHED, text)
        return str(path)

    async def _function(self, digest: str) -> Payload:
        reply = await self._fetch(lambda then: self._fetcher.function(digest, then))
        if not reply.ok or reply.data is None:
            text = f"its function (blob {digest[:12]}) could not be had: {reply.error}"
            raise _StartFailed(TaskStatus.UNPICKLABLE, text)
        return reply.data

    @staticmethod
    async def _fetch(ask: Callable[[Callable[[BlobReply], None]], None]) -> BlobReply:
        got: asyncio.Future[BlobReply] = asyncio.get_running_loop().create_future()
        ask(lambda reply: None if got.done() else got.set_result(reply))
        return await got

    async def _meet(self, t: Assignment, info: RankInfo, train: TrainSpec) -> tuple[str, int]:
        # Rank 0's worker may fetch the checkpoint first: the others give it that long too.
        size = t.checkpoint.size if t.checkpoint is not None else 0
        wait_s = train.init_timeout_s + BLOB_FETCH_BASE_S + size / BLOB_FETCH_MIN_BYTES_PER_S
        try:
            return await self._meetings.meet(t.job_id, info, wait_s)
        except TimeoutError:
            text = (
                f"rank 0 never joined: its worker did not open the rendezvous within "
                f"{wait_s:.0f} s (it did not start it, or the gateway's message was lost)"
            )
            raise _StartFailed(TaskStatus.ERROR, text) from None

    def _take_gpus(self, n: int) -> tuple[int, ...]:
        if n > len(self._free_gpus):
            raise _StartFailed(
                TaskStatus.CRASHED,
                f"it needs {n} GPUs and this worker has {len(self._free_gpus)} free",
            )
        taken, self._free_gpus = self._free_gpus[:n], self._free_gpus[n:]
        return tuple(taken)

    def _release(self, r: _Rank) -> None:
        t = r.task
        self._ranks.pop((t.job_id, t.index, t.attempt), None)
        if r.pipes is not None:
            r.pipes.close()
        if r.gpus:
            self._free_gpus = sorted(self._free_gpus + list(r.gpus))
            r.gpus = ()
        if t.rank is not None and t.rank.rank == 0:  # a rank 0 that never ran frees its port
            self._meetings.close_listener(t.job_id, t.rank.restart)
        shutil.rmtree(r.directory, ignore_errors=True)

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        async def kill() -> None:
            try:
                await asyncio.to_thread(kill_process_tree, proc.pid)
            except TimeoutError as exc:
                log.error("a rank outlived its kill: %s", exc)

        task = asyncio.get_running_loop().create_task(kill())
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    # -- reports --------------------------------------------------------------------------

    def _report(self, outputs: list[Output]) -> None:
        """Outputs of a rank: they travel with the next turn's flush, at most
        ``OUTPUT_FLUSH_S`` from now."""
        self._outputs(outputs)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(OUTPUT_FLUSH_S, self._flushed)

    def _flushed(self) -> None:
        self._flush = None
        self._wake()

    def _outcome(self, r: _Rank, code: int, path: Path, since: float) -> TaskResult:
        n = r.number
        if r.cancelled:
            return self._result(r, TaskStatus.CANCELLED, "Cancelled.", since)
        try:
            raw = read_raw_outcome(path)
        except FileNotFoundError:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            text = (
                f"rank {n}: the rank process died ({how}) before it finished. A segfault, "
                "os._exit, running out of memory or a kill does this."
            )
            return self._result(r, TaskStatus.CRASHED, text, since)
        if not raw.ok:
            text = f"rank {n}: {raw.traceback or raw.error_text}"
            return self._result(r, TaskStatus.ERROR, text, since)
        value = Payload(raw.value, raw.buffers)
        return self._result(r, TaskStatus.OK, "", since, value)

    def _result(
        self, r: _Rank, status: TaskStatus, text: str, since: float, value: Payload | None = None
    ) -> TaskResult:
        t = r.task
        progressed = r.pipes is not None and r.pipes.progressed
        duration = time.monotonic() - since
        return TaskResult(
            t.job_id, t.index, t.attempt, status, value, text, duration, progressed=progressed
        )


def _host(settings: WorkerSettings) -> str:
    """The gateway's address as this worker reaches it."""
    return urlsplit(settings.connection.worker_url).hostname or "127.0.0.1"
