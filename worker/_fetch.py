"""Blobs a worker gets from the gateway's store, and the tasks that wait for them.

``BlobFetcher`` asks the gateway for a blob (``GetBlob``) once, however many wait for it, and
calls each waiter with the ``BlobReply`` once it is here: a function's blob is put in the
worker's ``BlobCache``, a shipped file is written to disk (``worker._shipped``). Every fetch has
a deadline, ``BLOB_FETCH_BASE_S`` plus the time a shipped file's size takes at
``BLOB_FETCH_MIN_BYTES_PER_S``; past it the waiters get a failed reply. A gateway that
restarted never saw the requests: after a reconnect the worker calls ``resend()``.

``TaskHolds`` keeps an assigned task until its function, its arguments' big buffers and its
shipped files are on this worker, then releases it to the queue, or fails it with the reason.
A task process that lacks a function or a buffer asks too (``function``): the cache answers at
once, or the gateway once it has.

Both are owned by the worker's event loop; waiters are called on it, from ``arrived`` or from
a deadline's timer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.protocol import Assignment, BlobReply, GetBlob, ShippedFile, TaskStatus
from worker._blobcache import BlobCache
from worker._shipped import missing, store

__all__ = ["BLOB_FETCH_BASE_S", "BlobFetcher", "TaskHolds"]

log = logging.getLogger("pilot.worker")

BLOB_FETCH_BASE_S = 60.0  # over the gateway's blob_wait_s (30 s): this is for one lost
BLOB_FETCH_MIN_BYTES_PER_S = 10 * 2**20  # a large shipped file gets this much longer

Waiter = Callable[[BlobReply], None]
Key = tuple[str, int, int]  # (job_id, index, attempt)


@dataclass(slots=True, eq=False)
class _Fetch:
    digest: str
    timeout_s: float
    waiters: list[Waiter] = field(default_factory=list)
    to_cache: bool = False  # a function's blob: into the BlobCache
    to_disk: bool = False  # a shipped file: into the cache directory
    timer: asyncio.TimerHandle | None = None


class BlobFetcher:
    """See the module docstring. ``send(msg)`` reaches the gateway."""

    def __init__(self, send: Callable[[Any], None], cache: BlobCache, files_dir: Path) -> None:
        self._send = send
        self.cache = cache
        self._files_dir = files_dir
        self._fetches: dict[str, _Fetch] = {}

    def has_function(self, digest: str) -> bool:
        return digest in self.cache

    def function(self, digest: str, then: Waiter) -> None:
        """Call ``then`` with a function's blob (or an argument's buffer): at once when
        cached, else once fetched."""
        payload = self.cache.get(digest)
        if payload is not None:
            then(BlobReply("", digest, True, payload))
            return
        self._fetch(digest, then, size=0).to_cache = True

    def file(self, shipped: ShippedFile, then: Waiter) -> None:
        """Fetch a shipped file to disk; ``then`` gets the reply (its ``data`` is on disk)."""
        self._fetch(shipped.digest, then, size=shipped.size).to_disk = True

    def _fetch(self, digest: str, then: Waiter, size: int) -> _Fetch:
        f = self._fetches.get(digest)
        if f is None:
            timeout = BLOB_FETCH_BASE_S + size / BLOB_FETCH_MIN_BYTES_PER_S
            f = self._fetches[digest] = _Fetch(digest, timeout)
            self._ask(f)
        f.waiters.append(then)
        return f

    def _ask(self, f: _Fetch) -> None:
        if f.timer is not None:
            f.timer.cancel()
        f.timer = asyncio.get_running_loop().call_later(f.timeout_s, self._expire, f.digest)
        self._send(GetBlob(f.digest))

    def arrived(self, reply: BlobReply) -> None:
        """The gateway's answer: store the blob, then call its waiters. A reply nobody waits
        for any more (answered twice after a resend, or past its deadline) is dropped."""
        f = self._fetches.pop(reply.digest, None)
        if f is None:
            return
        if f.timer is not None:
            f.timer.cancel()
        if reply.ok and reply.data is not None:
            if f.to_cache:
                self.cache.put(reply.digest, reply.data)
            if f.to_disk:
                try:
                    store(self._files_dir, reply.digest, reply.data)
                except OSError as exc:
                    log.exception("could not store blob %s", reply.digest[:12])
                    error = f"this worker could not write it to {self._files_dir}: {exc}"
                    reply = dataclasses.replace(reply, ok=False, data=None, error=error)
        elif reply.ok:  # ok without data: the codec would not let this through; be explicit
            reply = dataclasses.replace(reply, ok=False, error="the reply held no data")
        for then in f.waiters:
            then(reply)

    def _expire(self, digest: str) -> None:
        f = self._fetches.get(digest)
        if f is not None:
            f.timer = None
            log.warning("no answer from the gateway for blob %s", digest[:12])
            error = f"the gateway did not send it within {f.timeout_s:.0f}s"
            self.arrived(BlobReply("", digest, False, None, error))

    def resend(self) -> None:
        """Ask again for every blob still awaited (after a reconnect); deadlines restart."""
        for f in list(self._fetches.values()):
            self._ask(f)

    def close(self) -> None:
        for f in self._fetches.values():
            if f.timer is not None:
                f.timer.cancel()
        self._fetches.clear()


class TaskHolds:
    """See the module docstring. ``release(task)`` hands on a task whose blobs are here;
    ``fail(task, status, text)`` one whose blob could not be had."""

    def __init__(
        self,
        fetcher: BlobFetcher,
        files_dir: Path,
        *,
        release: Callable[[Assignment], None],
        fail: Callable[[Assignment, TaskStatus, str], None],
    ) -> None:
        self._fetcher = fetcher
        self._files_dir = files_dir
        self._release = release
        self._fail = fail
        self._waiting: dict[Key, tuple[Assignment, set[str]]] = {}

    def admit(self, task: Assignment) -> bool:
        """True if ``task`` can run now; else it is held, and released or failed later."""
        # A render task runs no function of the user's: its digest is "".
        # Its arguments' big buffers (``Payload.refs``) are blobs too, held like a function.
        wanted = [task.fn_digest, *(key for _, key in task.args.refs)]
        blobs = {d for d in wanted if d and not self._fetcher.has_function(d)}
        files = missing(task.data, self._files_dir)
        if not blobs and not files:
            return True
        key = (task.job_id, task.index, task.attempt)
        need = {f.digest for f in files} | blobs
        self._waiting[key] = (task, need)
        for digest in blobs:
            self._fetcher.function(digest, lambda reply: self._got(key, reply, True))
        for f in files:
            self._fetcher.file(f, lambda reply: self._got(key, reply, False))
        return False

    def _got(self, key: Key, reply: BlobReply, function: bool) -> None:
        entry = self._waiting.get(key)
        if entry is None:  # dropped meanwhile, or failed by another of its blobs
            return
        task, need = entry
        if not reply.ok:
            del self._waiting[key]
            if function:  # the task cannot be loaded here, and a retry would not help
                what = "function" if reply.digest == task.fn_digest else "argument's buffer"
                text = (
                    f"The task's {what} (blob {reply.digest[:12]}) could not be had from the "
                    f"gateway: {reply.error}"
                )
                self._fail(task, TaskStatus.UNPICKLABLE, text)
            else:
                text = f"A shipped file ({reply.digest[:12]}) is not in the gateway: {reply.error}"
                self._fail(task, TaskStatus.ERROR, text)
            return
        need.discard(reply.digest)
        if not need:
            del self._waiting[key]
            self._release(task)

    def drop(self, wanted: set[Key] | None = None) -> list[Assignment]:
        """Stop holding the tasks of ``wanted`` (cancelled), or every task (handed back);
        returns those that were held. Their blobs still arrive, for the next tasks."""
        keys = list(self._waiting) if wanted is None else wanted & self._waiting.keys()
        return [self._waiting.pop(k)[0] for k in keys]
