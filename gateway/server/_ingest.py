"""Big jobs stored over several turns: ``Ingest``.

A job of a million tasks arrives in one ``Submit``. Storing its arguments (a row each) and
building its records takes seconds, and in one turn the gateway would answer nobody meanwhile:
workers that hear nothing for their heartbeat timeout reconnect, ``pilot status`` waits. So the
arguments of a job of more than ``SLICE`` tasks are stored ``SLICE`` rows a turn, each turn
ending with its commit, and the loop answers other messages between turns. When every row is on
disk, a last turn records the job itself (its row, its record, the scheduler's ``JobAdded``)
and acknowledges it (``ClientHandler``'s ``record``).

A gateway killed meanwhile has no row for the job, only some of its tasks' rows: the client,
which was never acknowledged, sends the ``Submit`` again, and the rows already there stay
(``INSERT OR IGNORE``). A cancel that arrives meanwhile is applied once the job is recorded.
Owned by the gateway loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.protocol import JobSpec, Payload
from gateway.server._state import StateStore

__all__ = ["SLICE", "Ingest"]

SLICE = 5_000  # tasks' rows stored per turn: about 25 ms here (20,000 took 100 ms a turn)
RETRY_S = 0.5  # while the store cannot write, how often the last step looks again


@dataclass(slots=True, eq=False)
class _Job:
    ident: bytes
    spec: JobSpec
    args: tuple[Payload, ...]
    user: str
    stored: int = 0  # rows stored so far (committed by the end of their turn)
    cancelled: bool = False


class Ingest:
    """See the module docstring. ``later(fn, delay_s)`` runs ``fn`` in a turn of its own, ended
    with a commit and the turn's sends; ``record(ident, spec, args, user, cancelled)`` records and
    acknowledges a job whose tasks' rows are all stored."""

    def __init__(
        self,
        store: StateStore,
        later: Callable[[Callable[[], None], float], None],
        record: Callable[[bytes, JobSpec, tuple[Payload, ...], str, bool], None],
    ) -> None:
        self._store = store
        self._later = later
        self._record = record
        self._jobs: dict[str, _Job] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def start(self, ident: bytes, spec: JobSpec, args: tuple[Payload, ...], user: str) -> None:
        job = self._jobs[spec.job_id] = _Job(ident, spec, tuple(args), user)
        self._later(lambda: self._step(job), 0.0)

    def cancel(self, job_id: str, user: str, admin: bool) -> bool:
        """Whether ``job_id`` is being stored and may be cancelled by ``user``; if so, it is
        cancelled as soon as it is recorded."""
        job = self._jobs.get(job_id)
        if job is None or not (admin or job.user == user):
            return False
        job.cancelled = True
        return True

    def _step(self, job: _Job) -> None:
        if job.stored < len(job.args):
            end = min(len(job.args), job.stored + SLICE)
            self._store.add_tasks(job.spec.job_id, job.args, job.stored, end)
            job.stored = end
            self._later(lambda: self._step(job), 0.0)
        elif not self._store.healthy:  # the last rows are not on disk yet: wait for them
            self._later(lambda: self._step(job), RETRY_S)
        else:
            del self._jobs[job.spec.job_id]
            self._record(job.ident, job.spec, job.args, job.user, job.cancelled)
