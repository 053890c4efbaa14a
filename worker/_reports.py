"""What a worker owes its gateway: outputs, starts and results, gathered and sent per turn.

Parts of the worker add to ``Reports`` as things happen (a task process's outputs and results,
a task handed out, a session's end); the worker calls ``flush()`` at the end of each turn of its
event loop, while it is registered, so a turn's worth travels in as few messages as possible:
outputs first (a task's outputs must reach the client before its result), then starts and
results together.

Starts wait for the next results, up to ``SchedulingPolicy.started_delay_s``, and travel in the
same ``TaskResults``: a short task's start and end cost the gateway one message and one commit,
and a start reported a few milliseconds late changes nothing (its timeout, if it has one, runs a
few milliseconds longer). A start that waited that long is sent on its own, by a timer that
calls ``wake()`` (the worker's end of turn).

Outputs travel in messages of about ``OUTPUTS_MESSAGE_BYTES`` at most: a task that prints fast
(up to its output budget, ``worker._capture``) makes several modest messages in a turn, not one
that could pass the message size limit.

While the worker is not registered (reconnecting) nothing is sent: reports accumulate and go
with the first flush after the gateway welcomed it again. Owned by the worker's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.protocol import (
    DEFAULT_POLICY,
    Output,
    Outputs,
    SchedulingPolicy,
    TaskAttempt,
    TaskResult,
    TaskResults,
    TasksStarted,
)

__all__ = ["OUTPUTS_MESSAGE_BYTES", "Reports"]

OUTPUTS_MESSAGE_BYTES = 1 << 20


class Reports:
    """See the module docstring. ``send(msg)`` reaches the gateway."""

    def __init__(
        self,
        send: Callable[[Any], None],
        wake: Callable[[], None],
        policy: SchedulingPolicy = DEFAULT_POLICY,
    ) -> None:
        self._send = send
        self._wake = wake
        self.policy = policy  # replaced by the gateway's, from its Welcome
        self._outputs: list[Output] = []
        self._started: list[TaskAttempt] = []
        self._started_since: float | None = None  # when the oldest unreported start was seen
        self._timer: asyncio.TimerHandle | None = None
        self._results: list[TaskResult] = []

    def outputs(self, outputs: Iterable[Output]) -> None:
        self._outputs.extend(outputs)

    def started(self, attempt: TaskAttempt) -> None:
        self._started.append(attempt)

    def result(self, result: TaskResult) -> None:
        self._results.append(result)

    @property
    def pending(self) -> int:
        """Reports not sent yet (for tests and logs)."""
        return len(self._outputs) + len(self._started) + len(self._results)

    def flush(self, *, force: bool = False) -> None:
        """Send this turn's outputs, then starts and results (in that order). Starts that may
        still wait (see the module docstring) stay unless ``force``. Call only while the
        gateway knows this worker."""
        if self._outputs:
            batch: list[Output] = []
            size = 0
            for out in self._outputs:
                n = len(out.data) if isinstance(out.data, bytes) else 1024
                if batch and size + n > OUTPUTS_MESSAGE_BYTES:
                    self._send(Outputs(tuple(batch)))
                    batch, size = [], 0
                batch.append(out)
                size += n
            self._send(Outputs(tuple(batch)))
            self._outputs.clear()
        started: tuple[TaskAttempt, ...] = ()
        if self._started:
            now = time.monotonic()
            if self._started_since is None:
                self._started_since = now
            due = self._started_since + self.policy.started_delay_s
            if self._results or force or now >= due:
                started = tuple(self._started)
                self._started.clear()
                self._started_since = None
                self._cancel_timer()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(due - now, self._due)
        if self._results:
            self._send(TaskResults(tuple(self._results), started))
            self._results.clear()
        elif started:
            self._send(TasksStarted(started))

    def _due(self) -> None:
        self._timer = None
        self._wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._cancel_timer()
