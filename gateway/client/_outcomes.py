"""``Outcomes``: a job's finished tasks on the client, by task index, kept in columns.

A ``TaskDone`` object per task costs about 500 bytes on the client (the object, its own copy of
the job id and of the worker's name, a float, the ``Payload`` and a dict slot): 500 MB for a
job of a million tasks. ``Outcomes`` keeps what a task that succeeded says in columns instead
(its status, value, worker, attempts and duration: about 60 bytes beside the value's own
bytes) and builds the ``TaskDone`` when it is asked for. An outcome that says more (an error,
result files, a failed item of a map chunk) is kept whole.

It is a ``Mapping[int, TaskDone]``, iterated in index order. ``add`` is called on the client's
IO thread while the user's thread reads: each column is written before the status byte that
says the task is there, so a reader never sees half an outcome.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping

from gateway.protocol import Payload, TaskDone, TaskStatus

__all__ = ["Outcomes"]

_KNOWN = bytes([0] + [1] * 255)  # a status byte -> whether the task is there


class Outcomes(Mapping[int, TaskDone]):
    """See the module docstring. ``n`` is the job's number of tasks where it is known (the
    columns grow past it for a job attached to before its spec came)."""

    def __init__(self, job_id: str, n: int = 0) -> None:
        self._job_id = job_id
        self._status = bytearray(n)  # 0: not finished; else TaskStatus + 1
        self._values: list[bytes | Payload | None] = [None] * n  # bytes: a plain Payload's
        self._worker = array("I", bytes(4 * n))  # index into _workers
        self._attempts = array("I", bytes(4 * n))
        self._duration = array("d", bytes(8 * n))
        self._workers: list[str] = []
        self._worker_ids: dict[str, int] = {}
        self._whole: dict[int, TaskDone] = {}  # outcomes that say more than the columns hold
        self._count = 0

    def add(self, d: TaskDone) -> None:
        """Record ``d`` (the IO thread's side)."""
        i = d.index
        if i < 0:
            raise ValueError(f"task index {i} of job {d.job_id}")
        if i >= len(self._status):
            self._grow(i + 1)
        if d.error or d.files or d.item != -1:
            self._whole[i] = d
        else:
            v = d.value
            plain = v is not None and type(v.data) is bytes and not v.buffers and not v.digests
            self._values[i] = v.data if plain else v  # type: ignore[union-attr]
            self._worker[i] = self._worker_id(d.worker)
            self._attempts[i] = max(0, d.attempts)
            self._duration[i] = d.duration_s
        new = not self._status[i]
        self._status[i] = int(d.status) + 1  # last: the task is there from now on
        if new:
            self._count += 1

    def _worker_id(self, name: str) -> int:
        wid = self._worker_ids.get(name)
        if wid is None:
            wid = self._worker_ids[name] = len(self._workers)
            self._workers.append(name)
        return wid

    def _grow(self, n: int) -> None:
        more = max(n, 2 * len(self._status)) - len(self._status)
        self._values.extend([None] * more)
        self._worker.extend(array("I", bytes(4 * more)))
        self._attempts.extend(array("I", bytes(4 * more)))
        self._duration.extend(array("d", bytes(8 * more)))
        self._status.extend(bytes(more))  # last: its length bounds what readers look at

    def __getitem__(self, index: int) -> TaskDone:
        if not isinstance(index, int) or not 0 <= index < len(self._status):
            raise KeyError(index)
        status = self._status[index]
        if not status:
            raise KeyError(index)
        whole = self._whole.get(index)
        if whole is not None:
            return whole
        v = self._values[index]
        return TaskDone(
            self._job_id,
            index,
            TaskStatus(status - 1),
            Payload(v) if isinstance(v, bytes) else v,
            worker=self._workers[self._worker[index]],
            attempts=self._attempts[index],
            duration_s=self._duration[index],
        )

    def __contains__(self, index: object) -> bool:
        return (
            isinstance(index, int) and 0 <= index < len(self._status) and bool(self._status[index])
        )

    def __iter__(self) -> Iterator[int]:
        status = self._status
        return (i for i in range(len(status)) if status[i])

    def __len__(self) -> int:
        return self._count

    def whole(self) -> list[tuple[int, TaskDone]]:
        """The outcomes kept whole (those with an error, files or a failed item), in index
        order."""
        return sorted(self._whole.items())

    def known(self) -> bytes:
        """One byte per task index, 1 where its outcome is here (``AttachJob.known``)."""
        return self._status.translate(_KNOWN)

    def status(self, index: int) -> TaskStatus:
        """Task ``index``'s status without building its ``TaskDone`` (``KeyError``: not
        finished)."""
        if index not in self:
            raise KeyError(index)
        return TaskStatus(self._status[index] - 1)
