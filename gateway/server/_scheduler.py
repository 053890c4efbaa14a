"""The scheduler: a pure state machine. Events in, instructions out, the clock injected.

(Longer than 400 lines because it is one state machine: every transition of a job, a task and
a worker is here, so that a reader sees them together; gang placement's arithmetic lives in
``_gang``, its vocabulary in ``_sched_events``, its records in ``_sched_state``.)

It knows jobs, tasks, attempts and workers by name and number only: no sockets, no payloads,
no database. ``Scheduler.handle(event)`` returns the instructions the server must carry out
(assign, cancel, record an outcome). Every event carries ``now``; the scheduler never reads a
clock, so tests drive time by hand.

Policies (their knobs are ``SchedulingPolicy``'s, ``gateway.protocol._policy``):

- Workers pull: each worker holds at most its slots' worth of running tasks plus ``prefetch``
  queued ones, and the prefetch is only used for jobs whose tasks are short (mean duration under
  ``prefetch_max_task_s``), where it hides the round trip. For very short tasks it grows, up to
  ``prefetch_max``, to about ``prefetch_window_s`` of queued work per worker, so that each
  message to a worker carries many tasks. A job's mean duration is its own, or, before it has
  one, that of the recent jobs of the same ``family`` (the function).
- Fair across jobs: assignments go round-robin over jobs with queued tasks.
- A task needs ``max(1, cpus)`` slots, ``gpus`` GPUs and all of its ``tags`` on the worker.
- Retries by cause: an attempt the machine failed (worker lost, process crashed, timeout) is
  retried up to ``retries`` times, on another worker where one fits; one whose code raised
  fails its task at once unless the job asked for ``retry_errors``; unpicklable arguments or
  results are never retried (they would fail again). A worker with ``bad_worker_failures``
  failures in a job is kept off that job while another worker can run it.
- A job that no connected worker can ever run (resources, tags) is reported ``Unschedulable``
  (the server fails it when ``fail_unschedulable``).
- A worker silent for ``heartbeat_timeout_s`` is lost; its tasks go back to the queue at once.
- After a gateway restart, tasks that were out on workers are orphans: a returning worker that
  still runs one adopts it; the rest are requeued after ``orphan_grace_s``.
- The first OK result of a task wins; anything later is ignored (results are recorded once).
- Gangs (training ranks): a gang is placed only when all its ranks fit now, on free slots,
  packed onto as few workers as possible; never prefetched. A gang no connected pool could
  ever hold is unschedulable; one that must wait for busy workers says so once
  (``GangWaiting``). A rank that finishes OK is held until every rank has; any rank's failure
  stops the group (the other ranks are cancelled) and, for a machine-side cause or a code error
  after the rank reported progress, restarts it (``GangRestarted``) up to ``restarts`` times,
  on fewer ranks (down to ``min_tasks``) if the pool can no longer hold them all; a code error
  before any progress (an ImportError, a typo) fails the job at once. A group restarts only once
  every rank it stopped is known to have ended (its worker reported the attempt's end, or is
  gone), or ``GANG_STOP_S`` passed: a rank whose worker died unnoticed is not placed there
  again, and a new group never shares its slots (or GPU memory) with a dying one.
- Locality: a task may carry a data key (what it reads); a worker is offered first the tasks
  whose data it read last, across jobs, so a rerun finds its files in that worker's cache.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from gateway.protocol import DEFAULT_POLICY, SchedulingPolicy, Status, TaskAttempt, TaskStatus
from gateway.server import _gang as gang
from gateway.server._sched_events import (
    AssignGang,
    AssignTask,
    CancelAttempt,
    Event,
    GangRestarted,
    GangWaiting,
    Instruction,
    JobAdded,
    JobCancel,
    JobSettled,
    JobStarted,
    TaskFinished,
    TaskSettled,
    TaskStarted,
    Tick,
    Unschedulable,
    WorkerDraining,
    WorkerGone,
    WorkerHeard,
    WorkerJoined,
    WorkerLeft,
)
from gateway.server._sched_state import _T, _Job, _Task, _Tasks, _Worker

__all__ = [
    "AssignGang",
    "AssignTask",
    "CancelAttempt",
    "GangRestarted",
    "GangWaiting",
    "JobAdded",
    "JobCancel",
    "JobSettled",
    "JobStarted",
    "Scheduler",
    "TaskFinished",
    "TaskSettled",
    "TaskStarted",
    "Tick",
    "Unschedulable",
    "WorkerGone",
    "WorkerHeard",
    "WorkerJoined",
    "WorkerLeft",
]

_NEVER_RETRIED = (TaskStatus.UNPICKLABLE, TaskStatus.CANCELLED)
_ASSIGNED, _FULL, _NOTHING = object(), object(), object()  # what _assign_one did
GANG_STOP_S = 10.0  # a stopped rank whose worker says nothing this long counts as ended


class Scheduler:
    """See the module docstring. Owned by the gateway server; single-threaded."""

    def __init__(
        self,
        policy: SchedulingPolicy = DEFAULT_POLICY,
        *,
        heartbeat_timeout_s: float = 5.0,
        orphan_grace_s: float = 5.0,
    ) -> None:
        self.policy = policy
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.orphan_grace_s = orphan_grace_s
        self._family_mean: dict[str, float] = {}  # family -> recent mean task duration, s
        self.jobs: dict[str, _Job] = {}
        self.workers: dict[str, _Worker] = {}
        self._active: deque[str] = deque()  # jobs with queued tasks, round-robin order
        self._gangs: deque[str] = deque()  # gangs waiting to be placed, oldest first
        self._room: dict[str, _Worker] = {}  # workers that may have room for a task
        # workers with a free slot (before any prefetch), the one freed last first
        self._free: OrderedDict[str, _Worker] = OrderedDict()
        self._out: list[Instruction] = []
        self._orphans: list[tuple[str, _Task]] = []
        self._data_home: dict[str, str] = {}  # data key -> the worker that last read it

    # -- the one entry point --------------------------------------------------------------

    def handle(self, event: Event) -> list[Instruction]:
        """Apply ``event``; return the instructions it causes, in order."""
        if type(event) is WorkerHeard:  # the commonest event changes nothing to place
            if (w := self.workers.get(event.name)) is not None:
                w.last_seen = event.now
            return []
        match event:
            case JobAdded():
                self._job_added(event)
            case JobCancel(job_id=job_id):
                self._cancel_job(job_id)
            case WorkerJoined():
                self._worker_joined(event)
            case WorkerLeft(name=name, status=status):
                self._worker_left(name, status)
            case WorkerDraining(name=name, handed_back=handed_back):
                self._worker_draining(name, handed_back)
            case TaskStarted():
                self._task_started(event)
            case TaskFinished():
                self._task_finished(event)
            case Tick(now=now):
                self._tick(now)
        self._fill()
        out, self._out = self._out, []
        return out

    # -- queries (for status pages; no side effects) ---------------------------------------

    def running_on(self, worker: str) -> int:
        w = self.workers.get(worker)
        return len(w.out) if w else 0

    def job_progress(self, job_id: str) -> tuple[Status, int, int]:
        """A live job's (state, tasks done, tasks failed); QUEUED, 0, 0 for an unknown one."""
        job = self.jobs.get(job_id)
        if job is None:
            return Status.QUEUED, 0, 0
        return job.state, job.done, job.failed

    def job_queued(self, job_id: str) -> int:
        """A live job's tasks waiting to be placed (not out on a worker, not settled); 0 for an
        unknown one. A job's queue holds exactly its queued tasks (a task leaves it when it
        goes out or settles), so this is O(1): ``status()`` asks it of every live job, and a
        job may have a million tasks. A gang's ranks wait outside ``queue``: counted."""
        job = self.jobs.get(job_id)
        if job is None:
            return 0
        if job.gang:
            return sum(1 for t in job.tasks if t.state is _T.QUEUED)
        return len(job.queue)

    def workers_of(self, job_id: str) -> list[str]:
        """The workers a job's tasks are out on, each once (a gang's group)."""
        job = self.jobs.get(job_id)
        if job is None:
            return []
        return list(dict.fromkeys(t.worker for t in job.tasks if t.state is _T.OUT))

    def worker_of(self, job_id: str, index: int) -> str | None:
        """The worker a task is out on, if it is."""
        job = self.jobs.get(job_id)
        if job is None or not 0 <= index < len(job.tasks):
            return None
        t = job.tasks[index]
        return t.worker if t.state is _T.OUT else None

    def _job_added(self, ev: JobAdded) -> None:
        tasks = _Tasks(ev.n_tasks)
        job = _Job(ev.job_id, ev.resources, ev.timeout_s, ev.retries, tasks, family=ev.family)
        job.data_keys = ev.data_keys
        job.retry_errors = ev.retry_errors
        job.long_tasks = ev.long_tasks
        job.gang, job.world, job.restarts = ev.gang, ev.n_tasks, ev.restarts
        job.min_tasks = min(ev.min_tasks, ev.n_tasks) if ev.min_tasks > 0 else ev.n_tasks
        settled = {i for i in ev.settled if 0 <= i < ev.n_tasks}
        for i in settled:
            tasks[i].state = _T.FINAL
        for att, worker in zip(ev.orphans, ev.orphan_workers, strict=True):
            t = tasks[att.index]
            t.state, t.attempt, t.worker = _T.ORPHAN, att.attempt, worker
            t.orphan_deadline = ev.now + self.orphan_grace_s
            self._orphans.append((ev.job_id, t))
        job.queue.extend(tasks.queued() if settled or ev.orphans else range(ev.n_tasks))
        job.unsettled = ev.n_tasks - len(settled)
        self.jobs[job.job_id] = job
        if job.unsettled == 0:
            self._settle_job(job)
            return
        if job.gang:
            self._gangs.append(job.job_id)
            if self.workers and self._gang_capacity(job) < job.min_tasks:
                self._unschedulable(job)
            return
        if job.queue:
            self._active.append(job.job_id)
        if self.workers and not any(w.can_ever_run(job.resources) for w in self.workers.values()):
            self._unschedulable(job)

    def _gang_capacity(self, job: _Job) -> int:
        return sum(gang.capacity(w, job.resources) for w in self.workers.values())

    def _unschedulable(self, job: _Job) -> None:
        ranks = job.min_tasks if job.gang else 0
        self._out.append(Unschedulable(job.job_id, job.resources, ranks))
        if self.policy.fail_unschedulable:
            self._cancel_job(job.job_id, Status.FAILED)

    def _cancel_job(self, job_id: str, state: Status = Status.CANCELLED) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state.finished:
            return
        job.queue.clear()
        for t in job.tasks:
            if t.state is _T.FINAL:
                continue
            if t.state is _T.OUT:
                self._release(job, t)
                self._out.append(CancelAttempt(t.worker, job_id, t.index, t.attempt))
            t.state = _T.FINAL
            self._out.append(
                TaskSettled(job_id, t.index, TaskStatus.CANCELLED, t.attempt, t.worker, t.attempt)
            )
        job.unsettled = 0
        job.state = state
        self._out.append(JobSettled(job_id, state, job.done, job.failed))
        self.jobs.pop(job_id, None)

    def _settle_job(self, job: _Job) -> None:
        job.state = Status.FAILED if job.failed else Status.DONE
        self._out.append(JobSettled(job.job_id, job.state, job.done, job.failed))
        self.jobs.pop(job.job_id, None)

    # -- workers --------------------------------------------------------------------------

    def _worker_joined(self, ev: WorkerJoined) -> None:
        old = self.workers.get(ev.name)
        w = _Worker(ev.name, ev.slots, ev.gpus, ev.tags, ev.now)
        self.workers[ev.name] = w
        self._room[ev.name] = w
        if w.used_slots < w.slots:
            self._free[ev.name] = w
        holding = {(a.job_id, a.index): a.attempt for a in ev.holding}
        if old is not None and ev.same_process:
            # Assignments may still be on their way to it: keep them.
            w.out, w.used_slots, w.used_gpus = old.out, old.used_slots, old.used_gpus
        elif old is not None:  # a new process under the old name: what it lacks is lost
            for key, t in list(old.out.items()):
                if holding.get(key) != t.attempt and (job := self.jobs.get(key[0])):
                    self._attempt_failed(job, t, old.name, TaskStatus.LOST, old)
        for a in ev.holding:
            job = self.jobs.get(a.job_id)
            t = job.tasks[a.index] if job and 0 <= a.index < len(job.tasks) else None
            if t is not None and job is not None and w.out.get((a.job_id, a.index)) is t:
                continue  # already ours (a re-hello from the same process)
            adoptable = (
                t is not None
                and t.state is not _T.FINAL
                and (t.attempt == a.attempt or t.state is _T.ORPHAN)
            )
            if adoptable and t is not None and job is not None:
                t.attempt = max(t.attempt, a.attempt)
                if t.state is _T.QUEUED:
                    job.queue.remove(t.index)
                t.state, t.worker = _T.OUT, w.name
                self._take(w, job, t)
            else:
                self._out.append(CancelAttempt(w.name, a.job_id, a.index, a.attempt))
        for job in list(self.jobs.values()):
            if job.state is not Status.QUEUED:
                continue
            if job.gang:
                continue  # a pool that grows (adaptive scaling) may yet hold it: it waits
            if not any(x.can_ever_run(job.resources) for x in self.workers.values()):
                self._unschedulable(job)

    def _worker_draining(self, name: str, handed_back: tuple[TaskAttempt, ...]) -> None:
        w = self.workers.get(name)
        if w is None:
            return
        w.draining = True
        for a in handed_back:
            t = w.out.get((a.job_id, a.index))
            job = self.jobs.get(a.job_id)
            if t is not None and job is not None and t.attempt == a.attempt:
                if job.gang:
                    self._rank_failed(job, t, name, TaskStatus.LOST, True, w)
                    continue
                self._release(job, t, w)
                self._requeue(job, t)

    def _worker_left(self, name: str, status: TaskStatus) -> None:
        w = self.workers.pop(name, None)
        self._room.pop(name, None)
        self._free.pop(name, None)
        if w is None:
            return
        self._out.append(WorkerGone(name))
        for job_id in self._gangs:  # the ranks it was stopping are gone with it
            if (job := self.jobs.get(job_id)) is not None and job.stopping:
                job.stopping = {i: s for i, s in job.stopping.items() if s[0] != name}
        for (job_id, _), t in list(w.out.items()):
            if (job := self.jobs.get(job_id)) is not None:
                self._attempt_failed(job, t, name, status, w)

    # -- tasks ----------------------------------------------------------------------------

    def _task_started(self, ev: TaskStarted) -> None:
        job = self.jobs.get(ev.job_id)
        if job is None:
            return
        t = job.tasks[ev.index]
        if t.state is _T.OUT and t.attempt == ev.attempt and t.worker == ev.worker:
            t.started_at = ev.now
            if job.state is Status.QUEUED:
                job.state = Status.RUNNING
                self._out.append(JobStarted(job.job_id))

    def _task_finished(self, ev: TaskFinished) -> None:
        job = self.jobs.get(ev.job_id)
        if job is None or not 0 <= ev.index < len(job.tasks):
            return  # a late answer for a finished or unknown job
        if job.stopping.get(ev.index) == (ev.worker, ev.attempt):
            del job.stopping[ev.index]  # a rank its group stopped has ended
        t = job.tasks[ev.index]
        if t.state is _T.FINAL:
            return  # recorded once, whatever came later
        current = t.attempt == ev.attempt and t.worker == ev.worker and t.state is not _T.QUEUED
        if ev.status == TaskStatus.OK:
            if t.state is _T.OUT and not current:  # a stale attempt won the race
                self._out.append(CancelAttempt(t.worker, job.job_id, t.index, t.attempt))
            if t.state is _T.OUT:
                self._release(job, t)
            elif t.state is _T.QUEUED:
                job.queue.remove(t.index)
            job.duration_sum_s += ev.duration_s
            job.duration_n += 1
            if job.data_keys and job.data_keys[t.index]:
                self._data_home[job.data_keys[t.index]] = ev.worker
            if job.family:
                old = self._family_mean.pop(job.family, None)  # re-inserted: most recent last
                d = ev.duration_s if old is None else 0.8 * old + 0.2 * ev.duration_s
                self._family_mean[job.family] = d
                if len(self._family_mean) > self.policy.families_kept:
                    del self._family_mean[next(iter(self._family_mean))]
            if job.gang:
                self._rank_done(job, t)
            else:
                self._final(job, t, TaskStatus.OK, ev.attempt, ev.worker)
        elif current and t.state is _T.OUT:
            w = self.workers.get(ev.worker)
            if job.gang:
                self._rank_failed(job, t, ev.worker, ev.status, ev.progressed, w)
            else:
                self._attempt_failed(job, t, ev.worker, ev.status, w)

    def _attempt_failed(
        self, job: _Job, t: _Task, worker: str, status: TaskStatus, w: _Worker | None
    ) -> None:
        if job.gang:
            self._rank_failed(job, t, worker, status, False, w)
            return
        if w is not None and w.out.get((job.job_id, t.index)) is t:
            self._release(job, t, w)
        t.failures += 1
        if worker not in t.failed_on:
            t.failed_on = (*t.failed_on, worker)
        job.bad_workers[worker] = job.bad_workers.get(worker, 0) + 1
        retried = status.machine_side or (status == TaskStatus.ERROR and job.retry_errors)
        if status in _NEVER_RETRIED or not retried or t.failures > job.retries:
            job.failed += 1
            self._final(job, t, status, t.attempt, worker)
            return
        self._requeue(job, t)

    # -- gangs ----------------------------------------------------------------------------

    def _rank_done(self, job: _Job, t: _Task) -> None:
        t.state = _T.HELD
        live = [x for x in job.tasks if x.state is not _T.FINAL]
        if all(x.state is _T.HELD for x in live):  # the whole group succeeded
            for x in live:
                self._final(job, x, TaskStatus.OK, x.attempt, x.worker)

    def _rank_failed(
        self,
        job: _Job,
        t: _Task,
        worker: str,
        status: TaskStatus,
        progressed: bool,
        w: _Worker | None,
    ) -> None:
        """Stop the group; restart it or fail the job (see the module docstring)."""
        if t.state is not _T.OUT:
            return  # already stopped with its group
        if w is not None and w.out.get((job.job_id, t.index)) is t:
            self._release(job, t, w)
        job.stopping_since = None
        for x in job.tasks:  # no survivor is left waiting in a collective
            if x is not t and x.state is _T.OUT:
                self._out.append(CancelAttempt(x.worker, job.job_id, x.index, x.attempt))
                job.stopping[x.index] = (x.worker, x.attempt)  # until it is known to end
                self._release(job, x)
        code_error = status in _NEVER_RETRIED or (
            status == TaskStatus.ERROR and not progressed and not job.retry_errors
        )
        if code_error or job.restart_count >= job.restarts:
            job.failed += 1
            self._final(job, t, status, t.attempt, worker)
            for x in job.tasks:
                if x.state is not _T.FINAL:
                    self._final(job, x, TaskStatus.CANCELLED, x.attempt, x.worker)
            return
        job.restart_count += 1
        self._out.append(GangRestarted(job.job_id, job.restart_count, t.index, status))
        for x in job.tasks:
            if x.state is not _T.FINAL:
                x.state, x.worker, x.started_at = _T.QUEUED, "", None
        job.waiting_said = False
        if job.job_id not in self._gangs:
            self._gangs.appendleft(job.job_id)

    def _place_gangs(self) -> None:
        for job_id in list(self._gangs):
            job = self.jobs.get(job_id)
            if job is None or job.state.finished:
                self._gangs.remove(job_id)
                continue
            if job.stopping:  # the group it restarts from has not ended yet
                continue
            live = [x for x in job.tasks if x.state is not _T.FINAL]
            world = len(live)
            if job.restart_count and self._gang_capacity(job) < world:
                # the pool lost what it had: restart on fewer ranks, down to min_tasks
                world = max(job.min_tasks, self._gang_capacity(job))
            if world < job.min_tasks or world == 0:
                continue
            placement = gang.plan(world, job.resources, self.workers.values())
            if not placement:
                if not job.waiting_said:
                    job.waiting_said = True
                    free = sum(gang.free_capacity(w, job.resources) for w in self.workers.values())
                    self._out.append(GangWaiting(job_id, world, free))
                continue
            for x in live[world:]:  # the world shrank: these ranks are not needed
                self._final(job, x, TaskStatus.CANCELLED, x.attempt, x.worker)
            ranks = []
            it = iter(live[:world])
            for w, n in placement:
                for _ in range(n):
                    x = next(it)
                    x.attempt += 1
                    x.state, x.worker, x.started_at = _T.OUT, w.name, None
                    self._take(w, job, x)
                    ranks.append((w.name, x.index, x.attempt))
            job.world = world
            self._gangs.remove(job_id)
            self._out.append(AssignGang(job_id, world, job.restart_count, tuple(ranks)))

    def _requeue(self, job: _Job, t: _Task) -> None:
        t.state, t.worker, t.started_at = _T.QUEUED, "", None
        job.queue.appendleft(t.index)  # retries first
        if job.job_id not in self._active:
            self._active.appendleft(job.job_id)

    def _final(self, job: _Job, t: _Task, status: TaskStatus, attempt: int, worker: str) -> None:
        t.state = _T.FINAL
        if status == TaskStatus.OK:
            job.done += 1
        self._out.append(TaskSettled(job.job_id, t.index, status, attempt, worker, t.attempt))
        job.unsettled -= 1
        if job.unsettled == 0:
            self._settle_job(job)

    # -- time -----------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        for w in list(self.workers.values()):
            if now - w.last_seen > self.heartbeat_timeout_s:
                self._worker_left(w.name, TaskStatus.LOST)
        for w in list(self.workers.values()):
            for (job_id, _), t in list(w.out.items()):
                job = self.jobs[job_id]
                started = t.started_at
                if job.timeout_s > 0 and started is not None and now - started > job.timeout_s:
                    self._out.append(CancelAttempt(w.name, job_id, t.index, t.attempt))
                    self._attempt_failed(job, t, w.name, TaskStatus.TIMEOUT, w)
        for job_id in self._gangs:
            job = self.jobs.get(job_id)
            if job is None or not job.stopping:
                continue
            if job.stopping_since is None:
                job.stopping_since = now
            elif now - job.stopping_since >= GANG_STOP_S:
                job.stopping.clear()  # their workers never answered: stop waiting for them
        if self._orphans:
            keep = []
            for job_id, t in self._orphans:
                job = self.jobs.get(job_id)
                if job is None or t.state is not _T.ORPHAN:
                    continue
                if now >= t.orphan_deadline:
                    self._requeue(job, t)  # not the task's fault: no failure counted
                else:
                    keep.append((job_id, t))
            self._orphans = keep

    # -- placement ------------------------------------------------------------------------

    def _fill(self) -> None:
        if self._gangs and self.workers:
            self._place_gangs()  # first: a gang needs many slots free at once
        if not self._active or not self.workers:
            return
        # Free slots first across all workers, then prefetch: spreads work before queueing it.
        # Only workers that may have room are looked at (a worker is forgotten once full and
        # remembered again when a task of its ends), so an event costs O(1), not O(workers).
        gone: list[str] = []  # full or draining: forgotten after the loops (not while in them)
        try:
            for allow_prefetch in (False, True):
                # Free slots: the worker freed last first (``_release``), so tasks that come
                # one at a time go to the warm process that ran the last one, not round the
                # pool (0.3-0.5 ms a round trip here). A copy, as taking a slot changes it.
                for w in self._room.values() if allow_prefetch else list(self._free.values()):
                    if not self._active:
                        return  # nothing queued any more: the other workers need no look
                    if w.draining:
                        gone.append(w.name)
                        continue
                    while (got := self._assign_one(w, allow_prefetch)) is _ASSIGNED:
                        pass
                    if got is _FULL and allow_prefetch:
                        gone.append(w.name)
        finally:
            for name in gone:
                self._room.pop(name, None)
                self._free.pop(name, None)

    def _assign_one(self, w: _Worker, allow_prefetch: bool) -> object:
        """One task for ``w``: ``_ASSIGNED``, ``_FULL`` (no room, even to prefetch) or
        ``_NOTHING`` (room, but no queued task fits it now)."""
        extra = 0
        if allow_prefetch:  # the next job in turn says how deep the prefetch may go
            head = self.jobs.get(self._active[0]) if self._active else None
            extra = max(self.policy.prefetch, self._prefetch_for(head) if head else 0)
        room = w.slots + extra - w.used_slots
        if room < 1:
            return _FULL  # full: no need to look at any job (keeps a burst of jobs O(n))
        for _ in range(len(self._active)):
            job_id = self._active[0]
            job = self.jobs.get(job_id)
            if job is None or not job.queue:
                self._active.popleft()
                continue
            self._active.rotate(-1)
            if not self._fits(w, job, allow_prefetch) or self._kept_off(w, job):
                continue
            prefetching = w.used_slots + job.cost > w.slots
            index = self._pop_task_for(job, w, prefetching)
            if index is None:
                continue
            t = job.tasks[index]
            t.attempt += 1
            t.state, t.worker, t.started_at = _T.OUT, w.name, None
            self._take(w, job, t)
            self._out.append(AssignTask(w.name, job.job_id, index, t.attempt))
            return _ASSIGNED
        return _NOTHING

    def _fits(self, w: _Worker, job: _Job, allow_prefetch: bool) -> bool:
        res = job.resources
        if not w.can_ever_run(res) or w.used_gpus + res.gpus > w.gpus:
            return False
        if w.used_slots + job.cost <= w.slots:
            return True
        if not allow_prefetch:
            return False
        return w.used_slots + job.cost <= w.slots + self._prefetch_for(job)

    def _prefetch_for(self, job: _Job) -> int:
        """How many slots' worth of ``job``'s tasks a worker may hold beyond its slots."""
        if job.resources.gpus or job.long_tasks or not self.policy.prefetch:
            return 0
        if job.duration_n:
            mean = job.duration_sum_s / job.duration_n
        else:
            family_mean = self._family_mean.get(job.family) if job.family else None
            if family_mean is None:
                return self.policy.prefetch  # unknown durations: the small default
            mean = family_mean
        if mean >= self.policy.prefetch_max_task_s:
            return 0
        deep = int(self.policy.prefetch_window_s / max(mean, 1e-6))
        return max(self.policy.prefetch, min(self.policy.prefetch_max, deep))

    def _kept_off(self, w: _Worker, job: _Job) -> bool:
        if job.bad_workers.get(w.name, 0) < self.policy.bad_worker_failures:
            return False
        return any(
            x is not w
            and x.can_ever_run(job.resources)
            and job.bad_workers.get(x.name, 0) < self.policy.bad_worker_failures
            for x in self.workers.values()
        )

    def _pop_task_for(self, job: _Job, w: _Worker, prefetching: bool = False) -> int | None:
        """The queued task that should run on ``w``. Retries avoid the workers they failed on
        while another fitting worker exists. With data keys, ``w`` first takes a task whose
        data it read last (its cache has it), then one nobody has read, and only then one
        another live worker has cached (work beats locality when the queue has nothing else),
        but not to prefetch: a worker with no free slot leaves those to the worker that has
        their data."""
        home = self._data_home
        best: tuple[int, int] | None = None  # (rank, position): lower is better
        for pos, index in enumerate(job.queue):
            t = job.tasks[index]
            if w.name in t.failed_on and self._other_worker_for(job, t.failed_on):
                continue
            if not job.data_keys:
                best = (0, pos)
                break
            where = home.get(job.data_keys[index])
            rank = 0 if where == w.name else 1 if where not in self.workers else 2
            if rank == 2 and prefetching:
                continue
            if best is None or rank < best[0]:
                best = (rank, pos)
            if rank == 0 or pos >= self.policy.locality_scan:
                break
        if best is None:
            return None
        index = job.queue[best[1]]
        del job.queue[best[1]]
        return index

    def _other_worker_for(self, job: _Job, avoid: Iterable[str]) -> bool:
        avoid = set(avoid)
        return any(
            name not in avoid and x.can_ever_run(job.resources) for name, x in self.workers.items()
        )

    def _take(self, w: _Worker, job: _Job, t: _Task) -> None:
        w.out[(job.job_id, t.index)] = t
        w.used_slots += job.cost
        w.used_gpus += job.resources.gpus
        if w.used_slots >= w.slots:
            self._free.pop(w.name, None)

    def _release(self, job: _Job, t: _Task, w: _Worker | None = None) -> None:
        w = w or self.workers.get(t.worker)
        if w is not None and w.out.pop((job.job_id, t.index), None) is not None:
            w.used_slots -= job.cost
            w.used_gpus -= job.resources.gpus
            if self.workers.get(w.name) is w:
                self._room[w.name] = w  # it has room again
                if w.used_slots < w.slots:
                    self._free[w.name] = w
                    self._free.move_to_end(w.name, last=False)  # warm: first in line
