"""One rank process's pipes, read on the worker's event loop: its output and its reports.

``RankPipes`` makes three pipes for a rank before it is spawned: stdout and stderr (at the fd
level, so C extensions and subprocesses are caught too) and the metrics pipe
(``PILOT_METRICS_FD``: the JSON lines of ``pilot.train``). The rank gets the write ends
(``stdout_fd``, ``stderr_fd``, ``metrics_fd``); once it is spawned, ``watch()`` closes the
worker's copies and reads the read ends with the loop's readers (no thread). What it reads
becomes reports, through ``outputs(list)``:

- stdout and stderr: ``Output``s of the rank's task (``index`` is the task index, which is the
  rank; ``item`` -1), every line prefixed ``[rank N] ``, so a job's log reads as one stream;
- a metrics line ``{"rank": .., "time": .., ...}`` (``pt.report``): an ``Output`` of kind
  METRICS whose data is that dict;
- a checkpoint line ``{"checkpoint": PATH, "seq": N, "size": BYTES}`` (``pt.checkpoint``
  without a URL; PATH is in ``checkpoint_dir``): the file is read and deleted (in a thread: it
  may be large), sent to the gateway's blob store (``PutBlob`` through ``forward``), then
  reported as an ``Output`` of kind CHECKPOINT (``item``: N) whose ``FileRef`` names the blob;
  with ``"url": true`` (written to the job's checkpoint URL) just the ``Output``, whose
  ``FileRef`` holds that URL.

Either kind of line marks the rank ``progressed`` (the scheduler then restarts its group after
a failure instead of failing the job). A line that is not JSON goes to stderr as text.
``close()`` reads what is left once the rank exited, and closes the read ends; ``stored()``
waits for the checkpoints still being stored. Owned by the worker's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.protocol import Assignment, FileRef, Output, OutputKind, Payload, PutBlob

__all__ = ["RankPipes"]

log = logging.getLogger("pilot.worker")

READ_BYTES = 64 * 1024
MAX_METRICS_LINE_BYTES = 1 << 20  # a longer "line" is not pilot.train's: it is dropped
LAST_READS = 256  # chunks read per pipe once the rank exited (a child may write on)


class _Labeller:
    """Prefixes every line of a byte stream, across the chunks it arrives in."""

    def __init__(self, prefix: bytes) -> None:
        self._prefix = prefix
        self._at_line_start = True

    def __call__(self, data: bytes) -> bytes:
        if not data:
            return b""
        parts: list[bytes] = []
        lines = data.split(b"\n")
        for line in lines[:-1]:
            if self._at_line_start:
                parts.append(self._prefix)
            parts += (line, b"\n")
            self._at_line_start = True
        if lines[-1]:  # a line that goes on in the next chunk
            if self._at_line_start:
                parts.append(self._prefix)
            parts.append(lines[-1])
            self._at_line_start = False
        return b"".join(parts)


class RankPipes:
    """See the module docstring. ``task`` is the rank's assignment (its ``rank`` is set)."""

    def __init__(
        self,
        task: Assignment,
        checkpoint_dir: Path,
        *,
        outputs: Callable[[list[Output]], None],
        forward: Callable[[Any], None],
    ) -> None:
        assert task.rank is not None
        self._task = task
        self.rank = task.rank.rank
        self._checkpoint_dir = checkpoint_dir
        self._outputs = outputs
        self._forward = forward
        self._uploads: set[asyncio.Task[None]] = set()
        self.progressed = False
        self._read: dict[int, OutputKind | None] = {}  # read end -> stream (None: metrics)
        self._write: list[int] = []
        prefix = f"[rank {self.rank}] ".encode()
        self._labels = {OutputKind.STDOUT: _Labeller(prefix), OutputKind.STDERR: _Labeller(prefix)}
        self._partial = b""  # the metrics pipe's unfinished line
        self._watched = False
        try:
            for kind in (OutputKind.STDOUT, OutputKind.STDERR, None):
                r, w = os.pipe()
                os.set_blocking(r, False)
                self._read[r] = kind
                self._write.append(w)
        except BaseException:
            self.close()
            raise

    @property
    def stdout_fd(self) -> int:
        return self._write[0]

    @property
    def stderr_fd(self) -> int:
        return self._write[1]

    @property
    def metrics_fd(self) -> int:
        return self._write[2]

    def watch(self) -> None:
        """The rank is spawned: close the write ends here, read the read ends on the loop."""
        self._close_write_ends()
        loop = asyncio.get_running_loop()
        for fd in self._read:
            loop.add_reader(fd, self._readable, fd)
        self._watched = True

    def close(self) -> None:
        """Read what the pipes still hold (the rank has exited), then close them. Idempotent."""
        self._close_write_ends()
        loop = asyncio.get_running_loop() if self._watched else None
        for fd in list(self._read):
            if loop is not None:
                loop.remove_reader(fd)
                for _ in range(LAST_READS):
                    if not self._readable(fd):
                        break
            self._forget(fd)
        if self._partial:
            self._line(self._partial)
            self._partial = b""

    def _close_write_ends(self) -> None:
        for w in self._write:
            with contextlib.suppress(OSError):
                os.close(w)
        self._write = [-1, -1, -1] if self._write else []

    def _forget(self, fd: int) -> None:
        if self._read.pop(fd, "gone") != "gone":
            with contextlib.suppress(OSError):
                os.close(fd)

    def _readable(self, fd: int) -> bool:
        """Read one chunk from ``fd``; False when there is nothing more to read now."""
        if fd not in self._read:
            return False
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("reading rank %d's pipe failed: %s", self.rank, exc)
            data = b""
        kind = self._read[fd]
        if not data:  # EOF: the rank (and whatever inherited the pipe) closed it
            asyncio.get_running_loop().remove_reader(fd)
            self._forget(fd)
            return False
        if kind is None:
            self._metrics(data)
        else:
            self._text(kind, data)
        return True

    def _text(self, kind: OutputKind, data: bytes) -> None:
        t = self._task
        out = Output(t.job_id, t.index, -1, kind, self._labels[kind](data))
        self._outputs([out])

    def _metrics(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_METRICS_LINE_BYTES:
            log.warning("rank %d wrote an overlong metrics line: dropped", self.rank)
            self._partial = b""
        for line in lines:
            if line.strip():
                self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self._text(OutputKind.STDERR, line + b"\n")
            return
        self.progressed = True
        if "checkpoint" in record and "rank" not in record:
            self._checkpoint(record)
            return
        record["rank"] = self.rank
        t = self._task
        self._outputs([Output(t.job_id, t.index, -1, OutputKind.METRICS, record)])

    def _checkpoint(self, record: dict[str, Any]) -> None:
        where, seq = str(record["checkpoint"]), int(record.get("seq", 0))
        if not record.get("url"):
            upload = asyncio.get_running_loop().create_task(self._store(where, seq))
            self._uploads.add(upload)
            upload.add_done_callback(self._uploads.discard)
            return
        t = self._task
        name = where.rstrip("/").rpartition("/")[2]
        ref = FileRef(name, int(record.get("size", 0)), url=where, item=seq)
        self._outputs([Output(t.job_id, t.index, seq, OutputKind.CHECKPOINT, ref)])

    async def _store(self, path: str, seq: int) -> None:
        t = self._task
        home = self._checkpoint_dir.resolve()
        try:
            file = Path(path).resolve()
            if file.parent != home:  # never read (and delete) a file of anyone else's
                raise OSError(f"{path} is not in the checkpoint directory {home}")
            data, digest = await asyncio.to_thread(_read_and_forget, file)
        except OSError as exc:
            log.warning("checkpoint %d of job %s: %s", seq, t.job_id, exc)
            text = f"[pilot] checkpoint {seq} could not be stored: {exc}\n".encode()
            self._outputs([Output(t.job_id, t.index, -1, OutputKind.STDERR, text)])
            return
        self._forward(PutBlob(digest, Payload(data)))  # ahead of the output that names it
        ref = FileRef(file.name, len(data), digest, item=seq)
        self._outputs([Output(t.job_id, t.index, seq, OutputKind.CHECKPOINT, ref)])

    async def stored(self) -> None:
        """Wait until the checkpoints announced so far are stored (or failed to be)."""
        while self._uploads:
            await asyncio.gather(*list(self._uploads), return_exceptions=True)


def _read_and_forget(path: Path) -> tuple[bytes, str]:
    """A checkpoint file's bytes and SHA-256 (hex); the file is deleted (the gateway keeps
    it from now on). Runs in a thread: it may be large."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    path.unlink(missing_ok=True)
    return data, digest
