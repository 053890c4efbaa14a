"""A task's files, in its task process: datasets in, shipped files beside it, result files out.

``TaskFiles`` is created once per task process (it holds the process's handle on the worker's
disk cache, shared by all of the worker's processes). For a task whose job has any of them:

- ``datasets(data, item)``: the keyword arguments an item gets, ``{NAME: [local paths]}`` (or
  fsspec ``OpenFile``s in ``open`` mode), its shard of each ``--data`` list (``JobData.refs``
  and ``shard_over``), fetched through the cache (a second task wanting the same object waits
  for the first download);
- ``task(job_id, index, data)``: a context for the task: the working directory is the job's
  directory, where shipped files appear under their relative paths (links to the blobs the
  worker fetched into its cache), and ``pilot.output_dir()`` is an empty directory of its own;
  on the way out the files written there become ``FileRef``s: stored in the gateway (``put``
  sends each blob ahead of the result) or written to the job's ``results_url``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.protocol import DataError, FileRef, JobData, Payload
from worker._cache import DiskCache
from worker._datasets import filesystem, materialize
from worker._shipped import blob_path

__all__ = ["TaskFiles"]


class TaskFiles:
    """See the module docstring. ``put(digest, payload)`` sends a result blob to the gateway
    (through the worker) before the task's result."""

    def __init__(
        self, cache_dir: Path, cache_bytes: int, put: Callable[[str, Payload], None]
    ) -> None:
        self.cache_dir = cache_dir
        self.cache = DiskCache(cache_dir / "data", cache_bytes)
        self._put = put

    def datasets(self, data: JobData, item: int) -> dict[str, list[Any]]:
        """Item ``item``'s keyword arguments: its shard of each dataset, by name."""
        shards = data.shard_over
        return {
            ref.name: materialize(ref.sharded(item, shards) if shards else ref, self.cache)
            for ref in data.refs
        }

    @contextlib.contextmanager
    def task(self, job_id: str, index: int, data: JobData | None) -> Iterator[list[FileRef]]:
        """Enter the task's context; the yielded list is filled with its result files when
        the context exits normally. Cheap for a task that reads and writes no files: one
        environment variable and one ``stat``; the output directory exists only if the task
        asks for it (``pilot.output_dir()`` creates it)."""
        out = self.cache_dir / "outputs" / f"{job_id}-{index}-{os.getpid()}"
        os.environ["PILOT_OUTPUT_DIR"] = str(out)  # read by pilot.output_dir() in the task
        old_cwd = None
        if data is not None and data.ship:
            work = self.cache_dir / "jobs" / job_id
            work.mkdir(parents=True, exist_ok=True)
            for f in data.ship:
                self._link(work, f.path, f.digest)
            old_cwd = os.getcwd()
            os.chdir(work)
        files: list[FileRef] = []
        try:
            yield files
            if out.exists():
                files.extend(self._collect(out, job_id, data.results_url if data else ""))
        finally:
            os.environ.pop("PILOT_OUTPUT_DIR", None)
            if old_cwd is not None:
                os.chdir(old_cwd)
            if out.exists():
                shutil.rmtree(out, ignore_errors=True)
            if data is not None and data.refs:
                self.cache.release()

    def _link(self, work: Path, rel: str, digest: str) -> None:
        target = work / rel
        source = blob_path(self.cache_dir, digest)
        if not source.exists():
            raise DataError(f"Shipped file {rel} ({digest[:12]}) is not on this worker.")
        if target.is_symlink() and os.readlink(target) == str(source):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(source)
        os.replace(tmp, target)

    def _collect(self, out: Path, job_id: str, results: str) -> list[FileRef]:
        if not out.exists():
            return []
        refs = []
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            rel = path.relative_to(out).as_posix()
            data = path.read_bytes()
            if results:
                url = f"{results.rstrip('/')}/{job_id}/{rel}"
                fs, target = filesystem(url, {})
                fs.pipe(target, data)
                refs.append(FileRef(rel, len(data), url=url))
            else:
                digest = hashlib.sha256(data).hexdigest()
                self._put(digest, Payload(data))
                refs.append(FileRef(rel, len(data), digest=digest))
        return refs
