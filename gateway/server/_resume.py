"""A restarted gateway's unfinished jobs, rebuilt from its store: ``resume``.

Each unfinished job gets its record back (with the frames and checkpoints it had stored, for a
render or training job) and the scheduler its tasks: those already settled stay settled, and
the attempts that were out on workers are orphans until their workers come back and say so
(or the orphan grace ends). A job whose dataset secrets lived only in the memory of the
gateway that stopped fails, saying why.
"""

from __future__ import annotations

import logging
import time

from gateway.protocol import GatewaySettings, JobKind, Status, TaskAttempt
from gateway.server._instructions import Executor
from gateway.server._registry import JobRecord, Registry
from gateway.server._sched_events import job_added
from gateway.server._secrets import LOST_SECRETS, lost_secrets
from gateway.server._state import StateStore

__all__ = ["resume"]

log = logging.getLogger("pilot.gateway")


def resume(
    store: StateStore, registry: Registry, executor: Executor, settings: GatewaySettings
) -> None:
    """Rebuild jobs and scheduler state from the store after a restart."""
    now = time.monotonic()
    for u in store.unfinished_jobs():
        spec = u.spec
        if lost_secrets(spec):  # they were in the memory of the gateway that stopped
            store.job_settled(spec.job_id, Status.FAILED, LOST_SECRETS, len(u.settled), 0)
            log.warning("job %s failed: %s", spec.job_id, LOST_SECRETS)
            continue
        record = JobRecord(spec, {}, set(), u.created, user=u.owner)
        registry.add(record)
        if spec.kind in (JobKind.RENDER, JobKind.DDP):  # frames and checkpoints stored
            for out in store.outputs(spec.job_id):
                record.keep(out)
        executor.handle(
            job_added(
                spec,
                now,
                settings,
                settled=u.settled,
                orphans=tuple(TaskAttempt(spec.job_id, i, a) for i, a, _ in u.out),
                orphan_workers=tuple(w for _, _, w in u.out),
            )
        )
        log.info(
            "resumed job %s: %d settled, %d out on workers",
            spec.job_id,
            len(u.settled),
            len(u.out),
        )
