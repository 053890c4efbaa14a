"""Shipped files on a worker: blobs of the gateway's store, kept on disk, one file per digest.

A job that ships files (``--ship``) lists them in ``JobData.ship``. The worker fetches each
missing blob once (``worker._fetch``) and ``store``s it under ``blob_path`` in its cache
directory; the task processes link them into a task's working directory (``worker._taskdata``).
Plain functions over a directory: no state, no I/O beyond the files themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.protocol import JobData, Payload, ShippedFile

__all__ = ["blob_path", "missing", "store"]


def blob_path(cache_dir: Path, digest: str) -> Path:
    """Where the worker keeps a blob fetched from the gateway (a shipped file)."""
    return cache_dir / "blobs" / digest[:2] / digest


def missing(data: JobData | None, cache_dir: Path) -> list[ShippedFile]:
    """The shipped files of a job that are not on this worker yet."""
    if data is None:
        return []
    return [f for f in data.ship if not blob_path(cache_dir, f.digest).exists()]


def store(cache_dir: Path, digest: str, payload: Payload) -> None:
    """Write a blob under its digest, atomically (a task process never sees half a file).
    Raises ``OSError`` (a full disk...)."""
    path = blob_path(cache_dir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{digest}.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload.data)
        for buf in payload.buffers:
            fh.write(buf)
    os.replace(tmp, path)
