"""The one sync facade: ``Client`` and ``Job``, over the async client on one IO thread.

The Python API (``pilot.connect()``) and the notebook magic both use these classes; there is
no second implementation of submit, wait or display. The IO thread owns its own event loop and
the ``AsyncClient``; user threads hand it work with ``call_soon_threadsafe`` (submits are
batched: many ``submit`` calls in a row leave in one message) and block on ``concurrent``
futures or a job's ``threading.Event``. A job's events (outputs, finished tasks, its end) are
queued for the user's thread, which is where display happens in a notebook.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway._client import AsyncClient, JobState
from gateway._errors import PilotTimeout, SerializationError
from gateway._job import Job
from gateway._jobdata import JobData, ShippedFile, files_to_ship
from gateway._messages import (
    FileRef,
    JobInfo,
    JobSpec,
    Output,
    Payload,
    Resources,
    StatusReply,
)
from gateway._serialize import digest_of, dumps, dumps_function
from gateway._settings import ConnectionInfo, Timeouts

__all__ = ["Client", "Job"]

AUTO_CHUNK_TASKS = 512  # map(chunk=None) splits items into about this many tasks
_FN_CACHE = 256


class _IOThread:
    """A daemon thread running one event loop; owned by a ``Client``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            if fut.done():
                raise  # the coroutine's own PilotTimeout, with its own message
            fut.cancel()
            raise PilotTimeout("The operation did not finish in time.") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class Client:
    """A connection to a gateway for synchronous code. Thread-safe; close it when done."""

    def __init__(
        self,
        connection: ConnectionInfo,
        *,
        name: str = "",
        timeouts: Timeouts | None = None,
    ) -> None:
        self.connection = connection
        self.timeouts = timeouts or Timeouts()
        self._io = _IOThread("pilot-client-io")
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
        self._pending: list[tuple[JobSpec, tuple[Payload, ...], Job]] = []
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
        fn: Callable[..., Any],
        args: Sequence[Payload],
        *,
        mode: str = "call",
        name: str = "",
        resources: Resources | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        meta: dict[str, Any] | None = None,
        items: Sequence[Any] | None = None,
        chunk: int = 1,
    ) -> Job:
        """The one way jobs are submitted (``map``, ``submit`` and the magic use it)."""
        key, payload = self._function(fn)
        job_id = self.new_job_id()
        spec = JobSpec(
            job_id,
            name or getattr(fn, "__name__", "job"),
            key,
            payload,
            len(args),
            resources or Resources(),
            float(timeout or 0.0),
            -1 if retries is None else retries,
            {**(meta or {}), "mode": mode, "chunk": chunk},
        )
        job = Job(self, job_id, items=items, chunk=chunk, n_tasks=len(args), kind=mode)
        with self._pending_lock:
            first = not self._pending
            self._pending.append((spec, tuple(args), job))
        if first:
            self._io.loop.call_soon_threadsafe(self._hand_over)
        return job

    def _hand_over(self) -> None:
        """On the IO thread: everything submitted since the last turn, in one message."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        for spec, args, job in batch:
            state = self._async.submit_nowait(spec, args)
            state.listener = job._on_event
        self._async._flush()  # now, not in the next loop iteration: one wake-up less a submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:
        """Run ``fn(*args, **kwargs)`` on a worker. Returns at once; ``job.result()`` waits.
        Raises ``SerializationError`` naming an argument that cannot be pickled."""
        payload = _dumps_args(args, kwargs)
        return self.submit_job(fn, [payload])

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
            chunk = max(1, math.ceil(len(items) / AUTO_CHUNK_TASKS))
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 (got {chunk}).")
        extra = self._job_data(
            data, len(items), chunk, shard_data, data_mode, storage_options, ship, results
        )
        args = []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            args.append(dumps((part, start), what=f"items {start}..{start + len(part) - 1}"))
        return self.submit_job(
            fn,
            args,
            mode="map",
            name=name,
            resources=Resources(cpus, gpus, tuple(tags)),
            timeout=timeout,
            retries=retries,
            meta={**(meta or {}), **extra},
            items=items,
            chunk=chunk,
        )

    def _job_data(
        self,
        data: Mapping[str, str] | None,
        n_items: int,
        chunk: int,
        shard: bool,
        mode: str,
        storage_options: Mapping[str, Any] | None,
        ship: Sequence[str | Path],
        results: str,
    ) -> dict[str, Any]:
        shipped = self.ship(ship) if ship else []
        job_data = JobData.build(
            data,
            n_items=n_items,
            shard=shard,
            mode=mode,
            storage_options=storage_options,
            ship=shipped,
            results=results,
        )
        return job_data.meta(n_items, chunk)

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
        job = Job(self, job_id)

        async def go() -> JobState:
            return await self._async.attach(job_id, listener=job._on_event)

        state = self._io.run(go(), self.timeouts.request_s + 5)
        if state.spec is not None:
            job._adopt_spec(state.spec)
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
            raise PilotTimeout(
                f"Only {len(reply.workers)} of {n} workers connected after {timeout}s."
            )
        return reply

    def jobs(self, limit: int = 50) -> list[JobInfo]:
        return list(self._io.run(self._async.list_jobs(limit)).jobs)

    def logs(self, job_id: str, index: int = -1) -> list[Output]:
        return list(self._io.run(self._async.logs(job_id, index)).outputs)

    def cancel(self, job_id: str) -> None:
        self._io.run(self._async.cancel(job_id), self.timeouts.request_s)

    def send_input(self, job_id: str, index: int, kind: str, data: Any = None) -> None:
        """Send something to a running task; returns at once (see ``AsyncClient``)."""
        self._io.loop.call_soon_threadsafe(self._async.send_input, job_id, index, kind, data)


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
