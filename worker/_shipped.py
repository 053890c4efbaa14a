"""Shipped files on a worker: fetched once from the gateway's blob store, kept on disk.

A task whose job ships files (``--ship``) waits in ``BlobFetcher`` until every blob it needs
is in the worker's cache directory; each missing blob is asked for once (``GetBlob``), however
many tasks wait for it. The task processes then link them into the task's working directory
(``worker._taskdata``). Owned by the worker's event loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway._messages import Assignment, BlobReply, GetBlob
from worker._taskdata import blob_path

__all__ = ["BlobFetcher"]


class BlobFetcher:
    """``hold(task)`` keeps a task until its blobs are here (returns False if they already
    are); ``arrived(reply)`` stores a blob and calls ``release(ready, failed)``."""

    def __init__(
        self,
        cache_dir: Path,
        send: Callable[[Any], None],
        release: Callable[[list[Assignment], list[tuple[Assignment, str]]], None],
    ) -> None:
        self._dir = cache_dir
        self._send = send
        self._release = release
        self._waiting: dict[tuple[str, int, int], tuple[Assignment, set[str]]] = {}
        self._asked: set[str] = set()

    def hold(self, task: Assignment) -> bool:
        missing = {
            f["digest"]
            for f in task.meta.get("ship") or ()
            if not blob_path(self._dir, f["digest"]).exists()
        }
        if not missing:
            return False
        self._waiting[(task.job_id, task.index, task.attempt)] = (task, missing)
        for digest in missing - self._asked:
            self._asked.add(digest)
            self._send(GetBlob(digest))
        return True

    def arrived(self, reply: BlobReply) -> None:
        self._asked.discard(reply.digest)
        error = ""
        if reply.ok and reply.data is not None:
            self._store(reply.digest, reply.data)
        else:
            error = f"A shipped file ({reply.digest[:12]}) is not in the gateway: {reply.error}"
        ready, failed = [], []
        for key, (task, missing) in list(self._waiting.items()):
            if reply.digest not in missing:
                continue
            if error:
                failed.append((task, error))
                del self._waiting[key]
                continue
            missing.discard(reply.digest)
            if not missing:
                ready.append(task)
                del self._waiting[key]
        if ready or failed:
            self._release(ready, failed)

    def _store(self, digest: str, data: Any) -> None:
        path = blob_path(self._dir, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(data.data)
            for buf in data.buffers:
                fh.write(buf)
        os.replace(tmp, path)
