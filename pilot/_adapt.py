"""Adaptive scaling of Slurm workers: a controller beside the gateway.

Who uses it: ``SlurmWorkers.adapt()`` (a background thread) and ``pilot scale slurm --adapt``
(the foreground, until Ctrl-C). Every ``interval_s`` the controller observes, decides, acts:

- observe: the gateway's status (live jobs: their queued tasks and what each task needs; the
  connected workers, with their Slurm job ids and running tasks) and ``squeue`` (our jobs);
- decide: ``decide()``, a pure function of the observation, the policy, the clock and what it
  remembers (``Memory``), tested without Slurm;
- act: ``sbatch`` the jobs to add, drain the ones to remove (``SlurmWorkers.drain``).

The policy, in ``decide()``'s terms:

- Demand is the slots of the tasks that wait in the gateway's queue (tasks there wait because
  no connected worker can take them now: the scheduler hands out work as soon as a slot fits)
  and that one of our workers could run (cpus, gpus, tags): a GPU task does not make the
  controller start CPU workers.
- Supply on its way is every job of ours that has not registered yet: pending in Slurm's queue,
  or started and still connecting. The controller submits jobs for the demand that supply does
  not cover, one job per ``slots`` of it, so it never asks twice for the same tasks, and never
  past ``maximum`` jobs in all (pending ones count). Below ``minimum`` it submits up to it.
- A registered worker of ours that runs nothing is idle from the moment it is seen so; one
  idle for ``idle_grace_s`` is drained (SIGTERM to the worker: it says goodbye and its job
  ends), oldest idle first, never below ``minimum``. A pending job no demand needs is idle the
  same way and is cancelled after the grace. A worker that runs a task is never chosen; one
  that got a task since it was observed finishes it before it leaves (draining hands back only
  what has not started).
- A job that runs for ``REGISTER_WARN_S`` without its worker connecting is reported (a warning
  naming its output file): it still counts as supply, so a pool that cannot reach the gateway
  does not grow past ``maximum``.
- Jobs it drained or cancelled are no supply while Slurm still lists them. Workers of other
  jobs or none (a ``pilot worker`` by hand) count for nothing and are never touched.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.client import Client
from gateway.protocol import (
    ConfigError,
    ConnectionInfo,
    JobInfo,
    PilotError,
    Resources,
    WorkerInfo,
)

if TYPE_CHECKING:
    from pilot._slurm import SlurmJob, SlurmWorkers

__all__ = ["Adaptive", "Decision", "Memory", "Policy", "decide"]

log = logging.getLogger("pilot.slurm.adapt")

STOP_TIMEOUT_S = 30.0
REGISTER_WARN_S = 300.0  # a job running this long without its worker registering is reported


@dataclass(frozen=True, slots=True)
class Policy:
    """The controller's knobs. ``slots``: what one worker job offers; ``can_run``: whether one
    of our workers can run a task that needs these resources."""

    minimum: int
    maximum: int
    idle_grace_s: float
    slots: int
    can_run: Callable[[Resources], bool]

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.maximum:
            raise ConfigError(
                f"Adaptive scaling needs 0 <= min <= max (got min={self.minimum}, "
                f"max={self.maximum})."
            )
        if self.idle_grace_s < 0:
            raise ConfigError(f"The idle grace cannot be negative ({self.idle_grace_s}s).")


@dataclass(slots=True)
class Memory:
    """What the controller remembers between rounds (owned by one controller)."""

    idle_since: dict[str, float] = field(default_factory=dict)  # job id -> first seen idle
    stopping: set[str] = field(default_factory=set)  # drained or cancelled, still in squeue
    started: dict[str, float] = field(default_factory=dict)  # running, not registered: since


@dataclass(frozen=True, slots=True)
class Decision:
    """``submit`` new jobs; ``drain`` these (pending ones are cancelled, running ones drain)."""

    submit: int = 0
    drain: tuple[SlurmJob, ...] = ()
    demand: int = 0  # slots of waiting tasks we could run
    coming: int = 0  # our jobs not registered yet
    lost: tuple[str, ...] = ()  # running for REGISTER_WARN_S without registering

    def __bool__(self) -> bool:
        return bool(self.submit or self.drain)


def decide(
    jobs: Sequence[SlurmJob],
    workers: Sequence[WorkerInfo],
    live: Sequence[JobInfo],
    policy: Policy,
    memory: Memory,
    now: float,
) -> Decision:
    """One round of the policy (module docstring). ``jobs``: ours in Slurm's queue;
    ``workers``: connected to the gateway; ``live``: the gateway's unfinished jobs. Updates
    ``memory`` (idle clocks; what it decides to drain becomes ``stopping``)."""
    listed = {j.job_id for j in jobs}
    memory.stopping &= listed  # gone from Slurm: forget
    ours = [j for j in jobs if j.active and j.job_id not in memory.stopping]
    registered = {w.slurm_job_id: w for w in workers if w.slurm_job_id}
    coming = [j for j in ours if j.job_id not in registered]
    demand = sum(
        j.queued * max(1, j.resources.cpus)
        for j in live
        if not j.state.finished and policy.can_run(j.resources)
    )
    coming_ids = {j.job_id for j in coming}
    for job_id in list(memory.started):
        if job_id not in coming_ids:
            del memory.started[job_id]
    for j in coming:
        if not j.pending:
            memory.started.setdefault(j.job_id, now)
    lost = tuple(i for i, t in memory.started.items() if now - t >= REGISTER_WARN_S)
    unmet = max(0, demand - len(coming) * policy.slots)
    submit = min(math.ceil(unmet / policy.slots), policy.maximum - len(ours))
    submit = max(submit, policy.minimum - len(ours), 0)

    # Idle clocks: registered workers that run nothing; pending jobs no demand needs (the
    # newest first: they would start last).
    needed = math.ceil(demand / policy.slots)
    spare = [j for j in reversed(coming) if j.pending][: max(0, len(coming) - needed)]
    idle = [j for j in ours if j.job_id in registered and registered[j.job_id].running == 0]
    idle_ids = {j.job_id for j in (*idle, *spare)}
    for job_id in list(memory.idle_since):
        if job_id not in idle_ids:
            del memory.idle_since[job_id]
    for job_id in idle_ids:
        memory.idle_since.setdefault(job_id, now)

    drain: list[SlurmJob] = []
    if not submit:
        ripe = [
            j for j in (*spare, *idle) if now - memory.idle_since[j.job_id] >= policy.idle_grace_s
        ]
        ripe.sort(key=lambda j: memory.idle_since[j.job_id])
        drain = ripe[: max(0, len(ours) - policy.minimum)]
    for j in drain:
        memory.stopping.add(j.job_id)
        memory.idle_since.pop(j.job_id, None)
    return Decision(submit, tuple(drain), demand, len(coming), lost)


class Adaptive:
    """The controller (module docstring) for ``workers``. ``run()`` in the foreground until
    ``stop()``; or ``start()`` a thread of its own, which ``stop()`` joins. Leaving does not
    end the workers: ``SlurmWorkers.scale(0)`` drains them."""

    def __init__(
        self,
        workers: SlurmWorkers,
        *,
        minimum: int = 0,
        maximum: int = 16,
        idle_grace_s: float = 60.0,
        interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers = workers
        self.policy = Policy(minimum, maximum, idle_grace_s, workers.cpus, workers.can_run)
        self.interval_s = interval_s
        self.memory = Memory()
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0  # rounds done
        self.submitted: list[str] = []  # every job id it submitted, in order
        self.drained: list[str] = []
        self._warned: set[str] = set()

    def __enter__(self) -> Adaptive:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Adaptive:
        """Connect to the gateway (here: a missing connection file raises ``NoGateway`` to the
        caller) and run the rounds in a thread of its own. Started already: nothing to do."""
        if self._thread is not None:
            return self
        client = self._connect()
        self._thread = threading.Thread(
            target=self._loop, args=(client,), name="pilot-adapt", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)

    def run(self) -> None:
        """Run the rounds in this thread until ``stop()`` (from a signal handler, another
        thread). Raises ``NoGateway`` when the connection file is missing."""
        self._loop(self._connect())

    def _connect(self) -> Client:
        return Client(ConnectionInfo.load(self.workers.connection), name="pilot-adapt")

    def _loop(self, client: Client) -> None:
        """Observe, decide, act every ``interval_s`` until ``stop()``; owns ``client``. A
        gateway or Slurm that does not answer is logged and asked again next round (the
        gateway may be restarting, slurmctld busy)."""
        try:
            while not self._stop.is_set():
                try:
                    self.step(client)
                except PilotError as exc:
                    log.warning("adaptive scaling: %s (trying again)", exc, exc_info=True)
                self._stop.wait(self.interval_s)
        finally:
            client.close()

    def step(self, client: Client) -> Decision:
        """One round; returns what it decided (and did)."""
        status = client.status()
        jobs = self.workers.jobs()
        d = decide(jobs, status.workers, status.jobs, self.policy, self.memory, self._clock())
        if d.submit:
            log.info(
                "%d slot(s) of tasks wait, %d job(s) on their way: submitting %d",
                d.demand,
                d.coming,
                d.submit,
            )
            self.submitted += self.workers.submit(d.submit)
        if d.drain:
            ids = [j.job_id for j in d.drain]
            log.info("idle for %.0fs: draining %s", self.policy.idle_grace_s, ", ".join(ids))
            try:
                self.workers.drain(d.drain)
            except PilotError:
                self.memory.stopping.difference_update(ids)  # asked again next round
                raise
            self.drained += ids
        for job_id in set(d.lost) - self._warned:
            self._warned.add(job_id)
            log.warning(
                "worker job %s has run for %.0fs and its worker has not connected: see its "
                "output in %s (can the node reach the gateway? read the connection file?)",
                job_id,
                REGISTER_WARN_S,
                self.workers.log_dir,
            )
        self.rounds += 1
        return d
