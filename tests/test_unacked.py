"""What a client keeps to send again after a gateway restart (``gateway.client._unacked``): each
job until it is acknowledged, and each function while a job queued or unacknowledged uses it.

Unit tests of the ledger; a gateway restart that sends jobs again is in ``test_failures`` and
``test_by_content``.
"""

from __future__ import annotations

from gateway.client._unacked import Unacked
from gateway.protocol import JobKind, JobSpec, Payload


def spec(job_id: str, fn: str) -> JobSpec:
    return JobSpec(job_id, "f", JobKind.CALL, fn, 1)


def test_a_function_is_kept_while_a_queued_or_unacknowledged_job_uses_it() -> None:
    kept = Unacked()
    f, g = Payload(b"f"), Payload(b"g")
    kept.queued(spec("a", "F"), f)
    kept.sent(spec("a", "F"), ())
    kept.queued(spec("b", "F"), None)  # the same function: its payload is here already
    kept.sent(spec("b", "F"), ())
    kept.queued(spec("c", "G"), g)  # queued, not sent yet
    kept.acked("a")
    kept.drop_unused_functions()  # a job ended
    assert kept.functions == {"F": f, "G": g}, "b needs F; c, not sent yet, needs G"
    assert "a" not in kept and "b" in kept
    kept.sent(spec("b", "F"), ())  # sent again after a restart: still one user
    kept.acked("b")
    kept.acked("b")  # acknowledged twice (Submitted, then its end): counted once
    kept.drop_unused_functions()
    assert kept.functions == {"G": g}
    kept.sent(spec("c", "G"), ())
    kept.acked("c")
    kept.drop_unused_functions()
    assert kept.functions == {} and not kept.jobs


def test_a_job_acknowledged_while_it_waits_to_be_sent_again_is_counted_again() -> None:
    """After a restart the kept jobs are queued to go again; one acknowledged meanwhile (its
    end arrived) and then sent is kept again, with its function."""
    kept = Unacked()
    f = Payload(b"f")
    kept.queued(spec("a", "F"), f)
    kept.sent(spec("a", "F"), ())
    kept.acked("a")  # ...while a copy of it waits to be sent again
    kept.sent(spec("a", "F"), ())
    kept.drop_unused_functions()
    assert kept.functions == {"F": f}, "its function stays while it is kept"
    kept.acked("a")
    kept.drop_unused_functions()
    assert kept.functions == {}
