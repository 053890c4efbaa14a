"""The one sync facade: ``Client`` and ``Job``, over the async client on one IO thread.

The Python API (``pilot.connect()``) and the notebook magic both use these classes; there is
no second implementation of submit, wait or display. The IO thread owns its own event loop and
the ``AsyncClient``; user threads hand it work with ``call_soon_threadsafe`` (submits are
batched: many ``submit`` calls in a row leave in one message) and block on ``concurrent``
futures or a job's ``threading.Event``. A job's events (outputs, finished tasks, its end) are
queued for the user's thread, which is where display happens in a notebook.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.client._client import AsyncClient
from gateway.client._iothread import IOThread
from gateway.client._job import Job
from gateway.client._render import submit_render
from gateway.protocol import (
    DEFAULT_POLICY,
    ConnectionInfo,
    FileRef,
    InputReply,
    InterruptTask,
    JobData,
    JobInfo,
    JobKind,
    JobSpec,
    Output,
    Payload,
    PilotTimeout,
    RenderSpec,
    Resources,
    RunCell,
    SchedulingPolicy,
    SerializationError,
    ShippedFile,
    StatusReply,
    Timeouts,
    TrainSpec,
    build_job_data,
    digest_of,
    dumps,
    dumps_function,
    files_to_ship,
    task_keys,
)

__all__ = ["Client", "Job"]

_FN_CACHE = 256  # functions whose pickles this client keeps, by identity


class Client:
    """A connection to a gateway for synchronous code. Thread-safe; close it when done."""

    def __init__(
        self,
        connection: ConnectionInfo,
        *,
        name: str = "",
        timeouts: Timeouts | None = None,
        policy: SchedulingPolicy = DEFAULT_POLICY,
    ) -> None:
        self.connection = connection
        self.timeouts = timeouts or Timeouts()
        self.policy = policy
        self._io = IOThread("pilot-client-io")
        self._async = AsyncClient(
            connection, name=name or f"client-{os.getpid()}", timeouts=self.timeouts
        )
        try:
            self._io.run(self._async.start(), self.timeouts.request_s + 5)
        except BaseException:
            self._io.stop()
            raise
        self._prefix = f"{os.urandom(4).hex()}-"
        self._counter = itertools.count(1)
        self._fns: dict[int, tuple[Callable[..., Any], str, Payload]] = {}
        self._pending: list[tuple[JobSpec, tuple[Payload, ...], Payload | None, Job]] = []
        self._pending_lock = threading.Lock()
        self._shipped: set[str] = set()  # blob digests already uploaded through this client
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._io.run(self._async.close(), 10)
        self._io.stop()

    # -- submitting -------------------------------------------------------------------------

    def _function(self, fn: Callable[..., Any]) -> tuple[str, Payload]:
        cached = self._fns.get(id(fn))
        if cached is not None and cached[0] is fn:
            return cached[1], cached[2]
        payload = dumps_function(fn)
        key = digest_of(payload)
        if len(self._fns) >= _FN_CACHE:
            self._fns.pop(next(iter(self._fns)))
        self._fns[id(fn)] = (fn, key, payload)  # holding fn keeps its id from being reused
        return key, payload

    def new_job_id(self) -> str:
        return f"{self._prefix}{next(self._counter)}"

    def submit_job(
        self,
        fn: Callable[..., Any] | None,
        args: Sequence[Payload],
        *,
        kind: JobKind = JobKind.CALL,
        name: str = "",
        resources: Resources | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        retry_errors: bool = False,
        items: Sequence[Any] | None = None,
        chunk: int = 1,
        data: JobData | None = None,
        data_keys: Sequence[str] = (),
        lease: bool = False,
        meta: dict[str, Any] | None = None,
        train: TrainSpec | None = None,
        render: RenderSpec | None = None,
    ) -> Job:
        """The one way jobs are submitted (``map``, ``submit``, ``train``, ``render``, the
        magic and the kernel use it). Returns at once; the job leaves with the others
        submitted in this IO turn. ``fn`` is None for a job that runs no function of the
        user's (a render)."""
        digest, payload = self._function(fn) if fn is not None else ("", None)
        job_id = self.new_job_id()
        spec = JobSpec(
            job_id,
            name or getattr(fn, "__name__", "job"),
            kind,
            digest,
            len(args),
            resources or Resources(),
            float(timeout or 0.0),
            -1 if retries is None else retries,
            retry_errors,
            chunk,
            data,
            tuple(data_keys),
            lease,
            dict(meta or {}),
            train,
            render,
        )
        job = Job(self, spec, items=items)
        with self._pending_lock:
            first = not self._pending
            self._pending.append((spec, tuple(args), payload, job))
        if first:
            self._io.loop.call_soon_threadsafe(self._hand_over)
        return job

    def _hand_over(self) -> None:
        """On the IO thread: everything submitted since the last turn, in one message."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        for spec, args, payload, job in batch:
            self._async.submit_nowait(job, spec, args, payload)
        self._async._flush()  # now, not in the next loop iteration: one wake-up less a submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:
        """Run ``fn(*args, **kwargs)`` on a worker. Returns at once; ``job.result()`` waits.
        Raises ``SerializationError`` naming an argument that cannot be pickled."""
        payload = _dumps_args(args, kwargs)
        return self.submit_job(fn, [payload])

    def train(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        ranks: int = 2,
        cpus: int = 1,
        gpus: int = 0,
        tags: Sequence[str] = (),
        restarts: int = 0,
        min_ranks: int = 0,
        checkpoint: str = "",
        backend: str = "auto",
        init_timeout: float = 60.0,
        timeout: float | None = None,
        name: str = "",
        **kwargs: Any,
    ) -> Job:
        """Data-parallel training: ``fn(*args, **kwargs)`` on ``ranks`` ranks at once, each a
        fresh process with torchrun's environment and ``torch.distributed`` initialised
        (gloo on CPU, nccl when every rank has a GPU; ``backend`` overrides). Any rank's
        failure stops the group, which restarts (up to ``restarts`` times) from the latest
        ``pilot.train.checkpoint`` (kept at ``checkpoint``, any fsspec URL, or by the gateway),
        on fewer ranks down to ``min_ranks`` if it must. Returns at once; ``job.results`` holds
        each rank's value in rank order, ``job.metrics`` what the ranks reported. Raises
        ``Unschedulable`` (when waited on) if the pool can never hold the ranks."""
        if ranks < 1:
            raise ValueError(f"ranks must be at least 1 (got {ranks}).")
        if not 0 <= min_ranks <= ranks:
            raise ValueError(f"min_ranks must be between 0 and ranks (got {min_ranks}).")
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl (got {backend!r}).")
        payload = _dumps_args(args, kwargs)
        spec = TrainSpec(restarts, min_ranks, backend, checkpoint, float(init_timeout))
        return self.submit_job(
            fn,
            [payload] * ranks,
            kind=JobKind.DDP,
            name=name,
            resources=Resources(cpus, gpus, tuple(tags)),
            timeout=timeout,
            train=spec,
        )

    def render(self, scene: str | Path, frames: Any, **options: Any) -> Job:
        """Render ``frames`` (``"1-240"``, ``"1-240x2"``, ``"1,5,10-20"``, a range) of a
        Blender ``scene`` on the workers that have Blender, one Blender process per chunk of
        frames. Options: ``chunk``, ``video`` (an MP4 path: ``job.video``), ``fps``,
        ``engine``, ``samples``, ``resolution`` ((w, h)), ``file_format`` (PNG, JPEG,
        OPEN_EXR), ``body`` (Python run in Blender first, ``bpy`` and ``scene`` bound),
        ``ship`` (textures and caches the scene refers to), ``results`` (an fsspec URL for the
        frames), ``cpus``, ``gpus``, ``tags``, ``timeout``, ``retries``, ``name``. Returns at
        once; ``job.frames`` are the frames as local files in frame order, live in
        ``job.render.done``."""
        return submit_render(self, scene, frames, **options)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        chunk: int | None = None,
        cpus: int = 1,
        gpus: int = 0,
        tags: Sequence[str] = (),
        timeout: float | None = None,
        retries: int | None = None,
        retry_errors: bool = False,
        name: str = "",
        meta: dict[str, Any] | None = None,
        data: Mapping[str, str] | None = None,
        data_mode: str = "local",
        storage_options: Mapping[str, Any] | None = None,
        ship: Sequence[str | Path] = (),
        results: str = "",
        shard_data: bool = True,
    ) -> Job:
        """``fn(item)`` for every item, ``chunk`` items per task. Returns at once.

        ``data`` maps names to fsspec URLs (a glob or a prefix lists files): they are listed
        now (``DataError`` if that fails) and each item gets its shard of the files as the
        keyword argument of that name (local cached paths, or ``OpenFile``s with
        ``data_mode="open"``). ``ship`` uploads local files once; tasks find them under the
        same relative path in their working directory. Files a task writes under
        ``pilot.output_dir()`` come back to the gateway, or to ``results`` (a URL).
        """
        items = list(items)
        if chunk is None:
            chunk = self.policy.auto_chunk(len(items))
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 (got {chunk}).")
        job_data = self.job_data(
            data,
            n_items=len(items),
            shard=shard_data,
            mode=data_mode,
            storage_options=storage_options,
            ship=ship,
            results=results,
        )
        args = []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            args.append(dumps((part, start), what=f"items {start}..{start + len(part) - 1}"))
        return self.submit_job(
            fn,
            args,
            kind=JobKind.MAP,
            name=name,
            resources=Resources(cpus, gpus, tuple(tags)),
            timeout=timeout,
            retries=retries,
            retry_errors=retry_errors,
            items=items,
            chunk=chunk,
            data=job_data,
            data_keys=task_keys(job_data, len(items), chunk),
            meta=meta,
        )

    def job_data(
        self,
        data: Mapping[str, str] | None,
        *,
        n_items: int,
        shard: bool = True,
        mode: str = "local",
        storage_options: Mapping[str, Any] | None = None,
        ship: Sequence[str | Path] = (),
        results: str = "",
    ) -> JobData | None:
        """A job's ``JobData``: datasets listed now (``DataError`` if that fails), files shipped
        now (once per content), where result files go. None when there is nothing."""
        shipped = self.ship(ship) if ship else []
        return build_job_data(
            data,
            n_items=n_items,
            shard=shard,
            mode=mode,
            storage_options=storage_options,
            ship=shipped,
            results_url=results,
            secure=self.connection.secure,  # secrets travel only encrypted
        )

    def ship(self, paths: Sequence[str | Path]) -> list[ShippedFile]:
        """Upload files (or directories) to the gateway's blob store, each once per content;
        returns what a job's ``ship`` refers to."""
        out = []
        for f, path in files_to_ship(paths):
            if f.digest not in self._shipped:
                data = Payload(path.read_bytes())
                self._io.run(self._async.put_blob(f.digest, data), None)
                self._shipped.add(f.digest)
            out.append(f)
        return out

    def fetch_file(self, ref: FileRef, dest_dir: str | Path) -> Path:
        """A result file as a local path under ``dest_dir`` (downloaded once)."""
        dest = Path(dest_dir) / ref.name
        if dest.exists() and dest.stat().st_size == ref.size:
            return dest
        payload = self._io.run(self._async.get_blob(ref.digest), None)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as fh:
            fh.write(payload.data)
            for buf in payload.buffers:
                fh.write(buf)
        return dest

    # -- the rest ---------------------------------------------------------------------------

    def attach(self, job_id: str) -> Job:
        job = Job(self, None, job_id=job_id)
        self._io.run(self._async.attach(job), self.timeouts.request_s + 5)
        return job

    def status(self, wait_workers: int = 0, timeout: float = 0.0) -> StatusReply:
        reply: StatusReply = self._io.run(
            self._async.status(wait_workers, timeout), timeout + self.timeouts.request_s + 5
        )
        return reply

    def wait_for_workers(self, n: int, timeout: float = 30.0) -> StatusReply:
        """Block until ``n`` workers are connected. Raises ``PilotTimeout``."""
        reply = self.status(wait_workers=n, timeout=timeout)
        if len(reply.workers) < n:
            raise PilotTimeout(f"{len(reply.workers)} of {n} workers connected after {timeout}s.")
        return reply

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        return list(self._io.run(self._async.list_jobs(limit)).jobs)

    def logs(self, job_id: str, index: int = -1) -> list[Output]:
        return list(self._io.run(self._async.logs(job_id, index)).outputs)

    def cancel(self, job_id: str) -> None:
        self._io.run(self._async.cancel(job_id), self.timeouts.request_s)

    def send(self, msg: RunCell | InputReply | InterruptTask) -> None:
        """Send a message to a running task (a remote session's cell, an ``input()`` reply,
        an interrupt); returns at once."""
        self._io.loop.call_soon_threadsafe(self._async.send, msg)


def _dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Payload:
    try:
        return dumps((args, kwargs))
    except SerializationError as whole:
        # Name the culprit: pickle each argument alone, which raises for the first bad one.
        for i, a in enumerate(args):
            dumps(a, what=f"argument {i}")
        for k, v in kwargs.items():
            dumps(v, what=f"argument {k!r}")
        raise whole
