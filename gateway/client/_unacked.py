"""What a client keeps to send again: ``Unacked``.

A job leaves in a ``Submit`` and is kept here until the gateway acknowledges it (``Submitted``,
its end, or a refusal); after a gateway restart, every job kept is sent again. The functions
those jobs name are kept too (the restarted gateway's blob store may lack them), with a count of
the jobs, queued or unacknowledged, that use each: a function is dropped once none does.
Looking through the unacknowledged jobs at each job's end instead made a burst of small jobs
quadratic (16% of the client's time in ``bench/throughput.py``'s no-op burst, py-spy).
Owned by the client's loop.
"""

from __future__ import annotations

from collections import Counter

from gateway.protocol import JobSpec, Payload

__all__ = ["Unacked"]


class Unacked:
    """See the module docstring. ``jobs``: job id -> (spec, the tasks' arguments);
    ``functions``: digest -> the function's payload."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[JobSpec, tuple[Payload, ...]]] = {}
        self.functions: dict[str, Payload] = {}
        self._users: Counter[str] = Counter()  # digest -> jobs queued or kept that use it
        self._queued: set[str] = set()  # jobs counted, not sent yet

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.jobs

    def queued(self, spec: JobSpec, fn: Payload | None) -> None:
        """A job is about to leave; ``fn`` is the payload of its ``fn_digest`` (None: none)."""
        if fn is not None:
            self.functions[spec.fn_digest] = fn
        self._users[spec.fn_digest] += 1
        self._queued.add(spec.job_id)

    def sent(self, spec: JobSpec, args: tuple[Payload, ...]) -> None:
        """A job left (or left again after a restart): kept until ``acked``."""
        if spec.job_id in self._queued:
            self._queued.discard(spec.job_id)  # counted when queued
        elif spec.job_id not in self.jobs:  # acknowledged between a restart and this send
            self._users[spec.fn_digest] += 1
        self.jobs[spec.job_id] = (spec, args)

    def acked(self, job_id: str) -> None:
        """``job_id`` is on the gateway's disk, or was refused: it is not sent again."""
        entry = self.jobs.pop(job_id, None)
        if entry is not None:
            digest = entry[0].fn_digest
            self._users[digest] -= 1
            if not self._users[digest]:
                del self._users[digest]

    def drop_unused_functions(self) -> None:
        """Drop each function that no job queued or unacknowledged uses."""
        for digest in [d for d in self.functions if d not in self._users]:
            del self.functions[digest]
