"""The scheduler as a pure state machine: events in, instructions out, time by hand."""

from __future__ import annotations

from gateway.protocol import Resources, SchedulingPolicy, Status, TaskAttempt, TaskStatus
from gateway.server._scheduler import (
    AssignTask,
    CancelAttempt,
    JobAdded,
    JobCancel,
    JobSettled,
    JobStarted,
    Scheduler,
    TaskFinished,
    TaskSettled,
    TaskStarted,
    Tick,
    Unschedulable,
    WorkerDraining,
    WorkerHeard,
    WorkerJoined,
    WorkerLeft,
)

CPU = Resources()


def sched(**policy) -> Scheduler:
    policy.setdefault("prefetch", 0)
    return Scheduler(SchedulingPolicy(**policy), heartbeat_timeout_s=5, orphan_grace_s=5)


def settled_jobs(out) -> list[tuple[str, Status]]:
    return [(i.job_id, i.state) for i in out if isinstance(i, JobSettled)]


def join(s: Scheduler, name: str, slots: int = 1, gpus: int = 0, tags=(), now=0.0, holding=()):
    return s.handle(WorkerJoined(name, slots, gpus, frozenset(tags), now, tuple(holding)))


def assigns(out) -> list[tuple[str, str, int, int]]:
    return [(i.worker, i.job_id, i.index, i.attempt) for i in out if isinstance(i, AssignTask)]


def finish(s, worker, job, index, attempt=1, status=TaskStatus.OK, now=1.0, duration=0.01):
    return s.handle(TaskFinished(worker, job, index, attempt, status, now, duration))


def test_assigns_to_free_slots_only_without_prefetch() -> None:
    s = sched()
    join(s, "w1", slots=2)
    out = s.handle(JobAdded("j", 5, CPU, 0.0))
    assert assigns(out) == [("w1", "j", 0, 1), ("w1", "j", 1, 1)]
    out = finish(s, "w1", "j", 0)
    assert [type(i) for i in out] == [TaskSettled, AssignTask]
    assert assigns(out) == [("w1", "j", 2, 1)]


def test_prefetch_is_used_for_short_tasks_and_not_for_long_ones() -> None:
    s = sched(prefetch=2, prefetch_max_task_s=0.5)
    join(s, "w1", slots=1)
    assert len(assigns(s.handle(JobAdded("short", 10, CPU, 0.0)))) == 3
    s2 = sched(prefetch=2, prefetch_max_task_s=0.5)
    join(s2, "w1", slots=1)
    s2.handle(JobAdded("long", 10, CPU, 0.0))  # 3 out: unknown duration gets prefetch
    out = finish(s2, "w1", "long", 0, duration=10.0)
    assert assigns(out) == [], "a slow job does not refill the prefetch"
    out = finish(s2, "w1", "long", 1, duration=10.0)
    out += finish(s2, "w1", "long", 2, duration=10.0)
    assert len(assigns(out)) == 1, "only the free slot is filled"


def test_spreads_over_workers_before_prefetching() -> None:
    s = sched(prefetch=4)
    join(s, "w1")
    join(s, "w2")
    out = s.handle(JobAdded("j", 4, CPU, 0.0))
    first_two = {a[0] for a in assigns(out)[:2]}
    assert first_two == {"w1", "w2"}


def test_fair_round_robin_across_jobs() -> None:
    s = sched()
    join(s, "w1", slots=4)
    s.handle(JobAdded("a", 100, CPU, 0.0))  # takes all 4 slots at once
    s.handle(JobAdded("b", 100, CPU, 0.0))
    jobs = []
    for k in range(4):
        out = finish(s, "w1", "a", k)
        jobs += [a[1] for a in assigns(out)]
    assert jobs.count("b") == 2 and jobs.count("a") == 2


def test_resources_and_tags_decide_placement() -> None:
    s = sched()
    join(s, "cpu", slots=4)
    join(s, "gpu", slots=4, gpus=1, tags=("cuda",))
    out = s.handle(JobAdded("g", 2, Resources(gpus=1, tags=("cuda",)), 0.0))
    assert assigns(out) == [("gpu", "g", 0, 1)], "one GPU: one task at a time, on the GPU box"
    out = s.handle(JobAdded("big", 1, Resources(cpus=3), 0.0))
    assert assigns(out)[0][0] == "cpu"


def test_unmeetable_request_is_unschedulable_at_once_and_fails_the_job() -> None:
    s = sched()
    join(s, "w1", slots=2)
    out = s.handle(JobAdded("j", 1, Resources(gpus=1), 0.0))
    assert [type(i) for i in out] == [Unschedulable, TaskSettled, JobSettled]
    assert settled_jobs(out) == [("j", Status.FAILED)]


def test_an_unmeetable_job_waits_when_the_policy_says_so() -> None:
    s = sched(fail_unschedulable=False)
    join(s, "w1", slots=2)
    out = s.handle(JobAdded("j", 1, Resources(gpus=1), 0.0))
    assert [type(i) for i in out] == [Unschedulable]
    assert assigns(join(s, "gpu", gpus=1)) == [("gpu", "j", 0, 1)]


def test_a_job_is_said_running_once_when_its_first_task_starts() -> None:
    s = sched()
    join(s, "w1", slots=2)
    s.handle(JobAdded("j", 2, CPU, 0.0))
    out = s.handle(TaskStarted("w1", "j", 0, 1, 0.1))
    out += s.handle(TaskStarted("w1", "j", 1, 1, 0.2))
    assert [i for i in out if isinstance(i, JobStarted)] == [JobStarted("j")]


def test_no_workers_yet_is_not_unschedulable() -> None:
    s = sched()
    assert s.handle(JobAdded("j", 1, Resources(gpus=1), 0.0)) == []


def test_lost_worker_tasks_go_back_at_once() -> None:
    s = sched()
    join(s, "w1", now=0.0)
    join(s, "w2", now=0.0)
    s.handle(JobAdded("j", 2, CPU, 0.0))
    s.handle(WorkerHeard("w2", 4.0))
    out = s.handle(Tick(6.0))  # w1 silent for 6 s > 5 s
    assert "w1" not in s.workers
    assert assigns(out) == [], "w2 is busy; the task waits in the queue"
    out = finish(s, "w2", "j", 1, now=6.1)
    assert assigns(out) == [("w2", "j", 0, 2)]


def test_timeout_cancels_and_retries_then_fails() -> None:
    s = sched()
    join(s, "w1")
    s.handle(JobAdded("j", 1, CPU, 0.0, timeout_s=1.0, retries=1))
    s.handle(TaskStarted("w1", "j", 0, 1, 0.0))
    s.handle(WorkerHeard("w1", 1.5))
    out = s.handle(Tick(1.5))
    assert CancelAttempt("w1", "j", 0, 1) in out
    assert assigns(out) == [("w1", "j", 0, 2)]
    s.handle(TaskStarted("w1", "j", 0, 2, 1.6))
    s.handle(WorkerHeard("w1", 3.0))
    out = s.handle(Tick(3.0))
    settled = [i for i in out if isinstance(i, TaskSettled)]
    assert settled and settled[0].status == TaskStatus.TIMEOUT
    assert ("j", Status.FAILED) in settled_jobs(out)


def test_retry_goes_to_another_worker_when_one_exists() -> None:
    s = sched()
    join(s, "w1")
    join(s, "w2")
    s.handle(JobAdded("j", 2, CPU, 0.0))
    out = finish(s, "w1", "j", 0, status=TaskStatus.CRASHED)
    assert assigns(out) == [], "w1 is free but the retry should wait for w2"
    out = finish(s, "w2", "j", 1)
    assert assigns(out) == [("w2", "j", 0, 2)]


def test_retries_exhausted_fail_the_task_and_the_job() -> None:
    s = sched()
    join(s, "w1")
    s.handle(JobAdded("j", 1, CPU, 0.0, retries=2))
    for attempt in (1, 2):
        out = finish(s, "w1", "j", 0, attempt, TaskStatus.CRASHED)
        assert assigns(out) == [("w1", "j", 0, attempt + 1)]
    out = finish(s, "w1", "j", 0, 3, TaskStatus.CRASHED)
    assert TaskSettled("j", 0, TaskStatus.CRASHED, 3, "w1", 3) in out
    assert ("j", Status.FAILED) in settled_jobs(out)


def test_an_exception_in_the_code_fails_its_task_at_once() -> None:
    s = sched()
    join(s, "w1")
    s.handle(JobAdded("j", 1, CPU, 0.0, retries=2))
    out = finish(s, "w1", "j", 0, 1, TaskStatus.ERROR)
    assert assigns(out) == []
    assert TaskSettled("j", 0, TaskStatus.ERROR, 1, "w1", 1) in out
    assert ("j", Status.FAILED) in settled_jobs(out)


def test_an_exception_is_retried_when_the_job_retries_errors() -> None:
    s = sched()
    join(s, "w1")
    s.handle(JobAdded("j", 1, CPU, 0.0, retries=1, retry_errors=True))
    out = finish(s, "w1", "j", 0, 1, TaskStatus.ERROR)
    assert assigns(out) == [("w1", "j", 0, 2)]
    out = finish(s, "w1", "j", 0, 2, TaskStatus.ERROR)
    assert ("j", Status.FAILED) in settled_jobs(out)


def test_a_job_settles_with_its_counts() -> None:
    s = sched()
    join(s, "w1", slots=2)
    s.handle(JobAdded("j", 2, CPU, 0.0))
    finish(s, "w1", "j", 0)
    out = finish(s, "w1", "j", 1, status=TaskStatus.UNPICKLABLE)
    assert JobSettled("j", Status.FAILED, done=1, failed=1) in out


def test_unpicklable_is_not_retried() -> None:
    s = sched()
    join(s, "w1")
    s.handle(JobAdded("j", 1, CPU, 0.0, retries=5))
    out = finish(s, "w1", "j", 0, status=TaskStatus.UNPICKLABLE)
    assert ("j", Status.FAILED) in settled_jobs(out)


def test_a_failing_worker_is_kept_off_the_job() -> None:
    s = sched()
    join(s, "bad", slots=2)
    join(s, "good", slots=1)
    s.handle(JobAdded("j", 20, CPU, 0.0, retries=10))
    while s.jobs["j"].bad_workers.get("bad", 0) < 3:
        t = next(iter(s.workers["bad"].out.values()))
        finish(s, "bad", "j", t.index, t.attempt, TaskStatus.CRASHED)
    for t in list(s.workers["bad"].out.values()):  # what it still ran when it was judged
        finish(s, "bad", "j", t.index, t.attempt)
    placed = []
    for _ in range(5):
        t = next(iter(s.workers["good"].out.values()))
        placed += assigns(finish(s, "good", "j", t.index, t.attempt))
    assert placed and all(w == "good" for w, *_ in placed)
    assert not s.workers["bad"].out


def test_cancel_drops_queued_and_interrupts_running() -> None:
    s = sched()
    join(s, "w1")
    s.handle(JobAdded("j", 3, CPU, 0.0))
    out = s.handle(JobCancel("j", 1.0))
    assert CancelAttempt("w1", "j", 0, 1) in out
    assert sum(isinstance(i, TaskSettled) for i in out) == 3
    assert out[-1] == JobSettled("j", Status.CANCELLED, done=0, failed=0)
    assert s.workers["w1"].used_slots == 0


def test_result_is_recorded_once() -> None:
    s = sched()
    join(s, "w1")
    join(s, "w2")
    s.handle(JobAdded("j", 1, CPU, 0.0))
    s.handle(WorkerHeard("w2", 6.0))
    s.handle(Tick(6.0))  # w1 lost: the task moves to w2 as attempt 2
    join(s, "w1", now=6.1)  # w1 comes back...
    out = finish(s, "w1", "j", 0, attempt=1)  # ...and its old attempt finishes first
    assert next(i for i in out if isinstance(i, TaskSettled)).attempt == 1
    assert CancelAttempt("w2", "j", 0, 2) in out
    assert finish(s, "w2", "j", 0, attempt=2) == [], "the second result is ignored"


def test_orphans_are_adopted_or_requeued_after_grace() -> None:
    s = sched()
    s.handle(
        JobAdded(
            "j",
            3,
            CPU,
            0.0,
            settled=(0,),
            orphans=(TaskAttempt("j", 1, 1), TaskAttempt("j", 2, 4)),
            orphan_workers=("w1", "w2"),
        )
    )
    out = join(s, "w1", slots=2, now=1.0, holding=[TaskAttempt("j", 1, 1)])
    assert assigns(out) == [], "the adopted task is not run again; task 2 waits for its worker"
    out = s.handle(Tick(6.0))
    assert assigns(out) == [("w1", "j", 2, 5)]
    out = finish(s, "w1", "j", 1, attempt=1, now=6.5)
    out += finish(s, "w1", "j", 2, attempt=5, now=6.6)
    assert ("j", Status.DONE) in settled_jobs(out)


def test_reconnect_claims_unknown_attempt_is_cancelled() -> None:
    s = sched()
    out = join(s, "w1", holding=[TaskAttempt("gone", 0, 1)])
    assert CancelAttempt("w1", "gone", 0, 1) in out


def test_draining_worker_hands_back_and_gets_nothing_new() -> None:
    s = sched(prefetch=2)
    join(s, "w1")
    s.handle(JobAdded("j", 5, CPU, 0.0))
    queued = [t for t in s.workers["w1"].out.values() if t.index > 0]
    out = s.handle(
        WorkerDraining("w1", 1.0, tuple(TaskAttempt("j", t.index, t.attempt) for t in queued))
    )
    assert assigns(out) == []
    assert s.jobs["j"].tasks[1].failures == 0, "handing back is nobody's fault"
    out = finish(s, "w1", "j", 0)
    assert assigns(out) == []
    join(s, "w2", now=2.0)
    s.handle(WorkerLeft("w1", 2.0))
    assert len(s.workers["w2"].out) == 3, "one slot plus a prefetch of two"


def _run_alternating(s: Scheduler, job: str, out: list) -> list:
    """Finish tasks taking turns between w1 and w2 (both equally fast); return assignments."""
    placed = list(assigns(out))
    turn = 0
    while busy := [w for w in ("w1", "w2") if s.workers[w].out]:
        w = busy[turn % len(busy)]
        t = next(iter(s.workers[w].out.values()))
        placed += assigns(finish(s, w, job, t.index))
        turn += 1
    return placed


def test_locality_sends_a_rerun_back_to_the_worker_that_read_its_data() -> None:
    s = sched()
    join(s, "w1")
    join(s, "w2")
    keys = tuple(f"shard-{i}" for i in range(8))
    first = _run_alternating(s, "a", s.handle(JobAdded("a", 8, CPU, 0.0, data_keys=keys)))
    ran_on = {keys[i]: w for w, _, i, _ in first}
    assert set(ran_on.values()) == {"w1", "w2"}
    again = _run_alternating(s, "b", s.handle(JobAdded("b", 8, CPU, 1.0, data_keys=keys)))
    hits = sum(ran_on[keys[i]] == w for w, _, i, _ in again)
    assert hits == 8, f"{hits}/8 tasks went back to the worker that has their data"


def test_without_data_keys_the_queue_order_holds() -> None:
    s = sched()
    join(s, "w1")
    out = s.handle(JobAdded("j", 3, CPU, 0.0))
    assert assigns(out) == [("w1", "j", 0, 1)]
    assert assigns(finish(s, "w1", "j", 0)) == [("w1", "j", 1, 1)]


def test_prefetch_does_not_take_data_another_live_worker_has_cached() -> None:
    s = sched(prefetch=4, prefetch_max_task_s=0.5)
    join(s, "w0")
    join(s, "w1")
    keys = tuple(f"shard-{i}" for i in range(8))
    home = ["w0", "w1", "w0", "w0", "w0", "w0", "w1", "w1"]  # a 5/3 split from a cold run
    for i, w in enumerate(home):
        s._data_home[keys[i]] = w
    s._family_mean["f"] = 2.0  # the cold run was slow: the rerun starts without prefetch
    out = s.handle(JobAdded("b", 8, CPU, 0.0, data_keys=keys, family="f"))
    assert len(assigns(out)) == 2, "one task per worker: no prefetch yet"
    out = finish(s, "w0", "b", 0, duration=0.01)  # cached now: fast, so prefetch opens
    placed = assigns(out)
    assert placed, "w0 takes more work"
    for w, _, i, _ in placed:
        assert home[i] == w, f"task {i} (data on {home[i]}) was prefetched by {w}"


# -- gangs (training ranks) -------------------------------------------------------------------


def gangs(out) -> list:
    from gateway.server._scheduler import AssignGang

    return [i for i in out if isinstance(i, AssignGang)]


def test_a_gang_is_placed_all_at_once_packed_on_the_fewest_workers() -> None:
    s = sched()
    join(s, "a", slots=1)
    join(s, "b", slots=2)
    out = s.handle(JobAdded("g", 2, CPU, 0.0, gang=True))
    (placed,) = gangs(out)
    assert placed.world == 2 and placed.restart == 0
    assert placed.ranks == (("b", 0, 1), ("b", 1, 1))
    assert assigns(out) == [], "ranks are not assigned one by one"


def test_a_gang_that_does_not_fit_now_waits_and_says_so_once() -> None:
    from gateway.server._scheduler import GangWaiting

    s = sched()
    join(s, "a", slots=1)
    join(s, "b", slots=1)
    s.handle(JobAdded("busy", 1, CPU, 0.0))  # takes one slot
    out = s.handle(JobAdded("g", 2, CPU, 0.0, gang=True))
    assert gangs(out) == []
    assert [i for i in out if isinstance(i, GangWaiting)] == [GangWaiting("g", 2, 1)]
    assert [i for i in s.handle(Tick(0.1)) if isinstance(i, GangWaiting)] == []
    out = finish(s, "a", "busy", 0)
    assert len(gangs(out)) == 1, "placed as soon as both slots are free"


def test_a_gang_larger_than_the_pool_is_unschedulable() -> None:
    s = sched()
    join(s, "a", slots=1)
    out = s.handle(JobAdded("g", 3, CPU, 0.0, gang=True))
    (u,) = [i for i in out if isinstance(i, Unschedulable)]
    assert u.ranks == 3
    assert ("g", Status.FAILED) in settled_jobs(out)


def test_ranks_results_are_held_until_the_whole_group_succeeds() -> None:
    s = sched()
    join(s, "a", slots=2)
    s.handle(JobAdded("g", 2, CPU, 0.0, gang=True))
    out = finish(s, "a", "g", 0)
    assert not [i for i in out if isinstance(i, TaskSettled)]
    out = finish(s, "a", "g", 1)
    assert [(i.index, i.status) for i in out if isinstance(i, TaskSettled)] == [
        (0, TaskStatus.OK),
        (1, TaskStatus.OK),
    ]
    assert ("g", Status.DONE) in settled_jobs(out)


def test_a_lost_rank_stops_the_group_and_restarts_it_on_fewer_ranks() -> None:
    from gateway.server._scheduler import GangRestarted

    s = sched()
    join(s, "a", slots=1)
    join(s, "b", slots=1)
    s.handle(JobAdded("g", 2, CPU, 0.0, gang=True, restarts=2, min_tasks=1))
    out = s.handle(WorkerLeft("b", 1.0))
    assert CancelAttempt("a", "g", 0, 1) in out, "the survivor is stopped"
    assert GangRestarted("g", 1, 1, TaskStatus.LOST) in out
    assert gangs(out) == [], "not before the survivor is known to have stopped"
    out = finish(s, "a", "g", 0, attempt=1, status=TaskStatus.CANCELLED)
    (placed,) = gangs(out)
    assert placed.world == 1 and placed.restart == 1
    assert placed.ranks == (("a", 0, 2),)
    cancelled = [i for i in out if isinstance(i, TaskSettled)]
    assert [(i.index, i.status) for i in cancelled] == [(1, TaskStatus.CANCELLED)]
    out = finish(s, "a", "g", 0, attempt=2)
    assert ("g", Status.DONE) in settled_jobs(out)


def test_a_code_error_before_any_progress_fails_the_gang_at_once() -> None:
    s = sched()
    join(s, "a", slots=2)
    s.handle(JobAdded("g", 2, CPU, 0.0, gang=True, restarts=2))
    out = finish(s, "a", "g", 1, status=TaskStatus.ERROR)
    assert gangs(out) == [], "no restart"
    assert CancelAttempt("a", "g", 0, 1) in out
    assert ("g", Status.FAILED) in settled_jobs(out)


def test_an_error_after_progress_restarts_the_gang() -> None:
    s = sched()
    join(s, "a", slots=2)
    s.handle(JobAdded("g", 2, CPU, 0.0, gang=True, restarts=1))
    out = s.handle(TaskFinished("a", "g", 0, 1, TaskStatus.ERROR, 1.0, 0.5, progressed=True))
    assert gangs(out) == []
    out = finish(s, "a", "g", 1, attempt=1, status=TaskStatus.CANCELLED)  # rank 1 stopped
    (placed,) = gangs(out)
    assert placed.restart == 1 and placed.world == 2
    out = s.handle(TaskFinished("a", "g", 1, 2, TaskStatus.CRASHED, 2.0, 0.5, progressed=True))
    assert ("g", Status.FAILED) in settled_jobs(out), "restarts used up"


def test_a_restart_waits_for_the_stopped_ranks_and_skips_a_worker_that_died_unnoticed() -> None:
    # Rank 0 fails first (its peer's death broke a collective); the peer's worker is lost only
    # later. Placing at once would put a rank on the dead worker and cost a second restart.
    s = sched()
    join(s, "a", slots=1)
    join(s, "b", slots=1)
    s.handle(JobAdded("g", 2, CPU, 0.0, gang=True, restarts=2, min_tasks=1))
    out = s.handle(TaskFinished("a", "g", 0, 1, TaskStatus.ERROR, 1.0, 0.5, progressed=True))
    assert CancelAttempt("b", "g", 1, 1) in out
    assert gangs(out) == []
    assert gangs(s.handle(Tick(2.0))) == []
    out = s.handle(WorkerLeft("b", 3.0))
    (placed,) = gangs(out)
    assert placed.restart == 1, "one failure, one restart"
    assert placed.world == 1 and placed.ranks == (("a", 0, 2),)


def test_a_stopped_rank_that_never_answers_is_given_up_after_a_while() -> None:
    from gateway.server._scheduler import GANG_STOP_S

    s = sched()
    join(s, "a", slots=2)
    s.handle(JobAdded("g", 2, CPU, 0.0, gang=True, restarts=1))
    s.handle(TaskFinished("a", "g", 0, 1, TaskStatus.ERROR, 1.0, 0.5, progressed=True))
    assert gangs(s.handle(Tick(1.0))) == []
    s.handle(WorkerHeard("a", 1.0 + GANG_STOP_S / 2))  # alive, but silent about rank 1
    assert gangs(s.handle(Tick(1.0 + GANG_STOP_S / 2))) == []
    s.handle(WorkerHeard("a", 1.0 + GANG_STOP_S))
    (placed,) = gangs(s.handle(Tick(1.0 + GANG_STOP_S)))
    assert placed.restart == 1 and placed.world == 2


def test_long_tasks_are_never_prefetched_so_every_worker_gets_a_chunk() -> None:
    s = sched(prefetch=4)
    join(s, "w1", slots=1)
    join(s, "w2", slots=1)
    out = s.handle(JobAdded("render", 4, CPU, 0.0, long_tasks=True))
    assert sorted(w for w, *_ in assigns(out)) == ["w1", "w2"], "one chunk each, none queued"


def test_job_queued_counts_the_tasks_waiting_through_assigns_retries_and_losses() -> None:
    """``job_queued`` (what ``status()`` shows) reads the queue's length; it must equal the
    tasks in the QUEUED state after every kind of event."""
    s = sched(prefetch=1)

    def check() -> None:
        for job_id, job in s.jobs.items():
            waiting = sum(1 for t in job.tasks if t.state.name == "QUEUED")
            assert s.job_queued(job_id) == waiting, job_id

    join(s, "w1", slots=2)
    s.handle(JobAdded("j", 10, CPU, 0.0, retries=2))
    check()
    finish(s, "w1", "j", 0)
    finish(s, "w1", "j", 1, status=TaskStatus.LOST)  # retried: back in the queue
    check()
    join(s, "w2")
    check()
    s.handle(WorkerHeard("w2", 6.0))
    s.handle(Tick(6.0))  # w1 is lost: its tasks go back
    check()
    s.handle(JobAdded("k", 3, CPU, 6.0))
    s.handle(JobCancel("k", 6.5))
    check()
    assert s.job_queued("unknown") == 0


def test_a_lone_task_goes_to_the_worker_freed_last() -> None:
    """Tasks that come one at a time run on the warm worker that ran the previous one (its
    process just ran, its function is loaded), not round the pool."""
    s = sched()
    join(s, "w1")
    join(s, "w2")
    assert assigns(s.handle(JobAdded("a", 1, CPU, 0.0))) == [("w1", "a", 0, 1)]
    finish(s, "w1", "a", 0)
    assert assigns(s.handle(JobAdded("b", 1, CPU, 1.0))) == [("w1", "b", 0, 1)]
    finish(s, "w1", "b", 0)
    out = s.handle(JobAdded("c", 2, CPU, 2.0))  # a burst still spreads over both
    assert sorted(w for w, *_ in assigns(out)) == ["w1", "w2"]
    finish(s, "w1", "c", 0)
    finish(s, "w2", "c", 1)  # w2 is freed last
    assert assigns(s.handle(JobAdded("d", 1, CPU, 3.0))) == [("w2", "d", 0, 1)]
