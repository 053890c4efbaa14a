"""The gateway's outbox: what one loop turn will send, buffered per peer, sent at the turn's end.

Owned by the ``Gateway``; its handlers and the instruction executor append to it during a turn,
and ``Gateway._end_turn`` calls ``send`` once the turn's rows are committed. Sending:

- workers first (an assignment is on the critical path, an acknowledgement is not): per worker
  what was queued for it, then one ``Assign`` and one ``CancelTasks``;
- then clients: ``Outputs`` (one per client per turn, or one per ``OUTPUTS_MESSAGE_BYTES`` of
  them) and one ``TaskEvents`` per client per turn, then the rest, with
  job ends folded into the ``TaskEvents`` before them (``coalesce``); ``Submitted``
  acknowledgements ride on the next message to that client, or leave on the next tick.

Durable before sent: when the turn's commit failed, ``send(durable=False)`` sends only the
messages that do not report stored state (``UNSTORED_OK``: welcomes, refusals, error replies,
status answers) and keeps everything else, in order, for the first turn whose commit succeeds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from gateway.protocol import (
    Assign,
    Assignment,
    CancelTasks,
    ErrorReply,
    Heartbeat,
    JobsReply,
    JobUpdate,
    Output,
    Outputs,
    Refused,
    StatusReply,
    Submitted,
    TaskAttempt,
    TaskDone,
    TaskEvents,
    Welcome,
)

__all__ = ["UNSTORED_OK", "Outbox", "coalesce"]

OUTPUTS_MESSAGE_BYTES = 1 << 20  # outputs per message to a client, about

#: Messages that may leave in a turn whose commit failed: none reports stored state.
UNSTORED_OK = (Welcome, Refused, ErrorReply, StatusReply, JobsReply, Heartbeat)


class Outbox:
    """See the module docstring. ``send_client(ident, msg)`` and ``send_worker(name, msg)`` are
    the gateway's socket senders (the worker sender drops a worker that is gone)."""

    def __init__(
        self,
        send_client: Callable[[bytes, Any], None],
        send_worker: Callable[[str, Any], None],
    ) -> None:
        self._send_client = send_client
        self._send_worker = send_worker
        self.to_clients: dict[bytes, list[Any]] = defaultdict(list)
        self.to_workers: dict[str, list[Any]] = defaultdict(list)
        self._done: dict[bytes, list[TaskDone]] = defaultdict(list)
        self._outputs: dict[bytes, list[Output]] = defaultdict(list)
        self._acks: dict[bytes, list[str]] = defaultdict(list)
        self._assign: dict[str, list[Assignment]] = defaultdict(list)
        self._cancel: dict[str, list[TaskAttempt]] = defaultdict(list)

    # -- during a turn --------------------------------------------------------------------

    def client(self, ident: bytes, msg: Any) -> None:
        self.to_clients[ident].append(msg)

    def worker(self, name: str, msg: Any) -> None:
        self.to_workers[name].append(msg)

    def task_done(self, ident: bytes, done: TaskDone) -> None:
        self._done[ident].append(done)

    def output(self, ident: bytes, out: Output) -> None:
        self._outputs[ident].append(out)

    def ack(self, ident: bytes, job_ids: list[str]) -> None:
        self._acks[ident].extend(job_ids)

    def assign(self, worker: str, task: Assignment) -> None:
        self._assign[worker].append(task)

    def cancel(self, worker: str, attempt: TaskAttempt) -> None:
        self._cancel[worker].append(attempt)

    # -- at the end of a turn -------------------------------------------------------------

    def send(self, *, durable: bool = True, acks: bool = False) -> None:
        """Send the turn's messages (see the module docstring). ``acks``: send pending
        acknowledgements even to clients that get nothing else this turn (the tick)."""
        if not durable:
            self._send_unstored_only()
            return
        self._fold()
        for name, tasks in self._assign.items():
            self.to_workers[name].append(Assign(tuple(tasks)))
        for name, attempts in self._cancel.items():
            self.to_workers[name].append(CancelTasks(tuple(attempts)))
        self._assign.clear()
        self._cancel.clear()
        for name, msgs in self.to_workers.items():
            for msg in msgs:
                self._send_worker(name, msg)
        self.to_workers.clear()
        for ident in [i for i in self._acks if acks or i in self.to_clients]:
            msgs = self.to_clients[ident]
            ended = {m.job_id for m in msgs if isinstance(m, JobUpdate) and m.spec is None}
            ended.update(j.job_id for m in msgs if isinstance(m, TaskEvents) for j in m.ended)
            ids = tuple(j for j in self._acks.pop(ident) if j not in ended)
            if ids:
                msgs.insert(0, Submitted(ids))
        for ident, msgs in self.to_clients.items():
            for msg in coalesce(msgs):
                self._send_client(ident, msg)
        self.to_clients.clear()

    def _fold(self) -> None:
        """Each client's outputs, then its finished tasks, before anything else for it."""
        for ident, done in self._done.items():
            self.to_clients[ident].insert(0, TaskEvents(tuple(done)))
        for ident, outs in self._outputs.items():
            self.to_clients[ident][:0] = _batches(outs)
        self._done.clear()
        self._outputs.clear()

    def _send_unstored_only(self) -> None:
        for ident, msgs in list(self.to_clients.items()):
            keep = []
            for msg in msgs:
                if isinstance(msg, UNSTORED_OK):
                    self._send_client(ident, msg)
                else:
                    keep.append(msg)
            self.to_clients[ident] = keep
        for name, msgs in list(self.to_workers.items()):
            keep = []
            for msg in msgs:
                if isinstance(msg, UNSTORED_OK):
                    self._send_worker(name, msg)
                else:
                    keep.append(msg)
            self.to_workers[name] = keep


def _batches(outs: list[Output]) -> list[Outputs]:
    """``outs`` in order, in messages of about ``OUTPUTS_MESSAGE_BYTES`` at most."""
    batches: list[Outputs] = []
    batch: list[Output] = []
    size = 0
    for out in outs:
        n = len(out.data) if isinstance(out.data, bytes) else 1024
        if batch and size + n > OUTPUTS_MESSAGE_BYTES:
            batches.append(Outputs(tuple(batch)))
            batch, size = [], 0
        batch.append(out)
        size += n
    batches.append(Outputs(tuple(batch)))
    return batches


def coalesce(msgs: list[Any]) -> list[Any]:
    """Fold job ends (``JobUpdate`` without a spec) into the ``TaskEvents`` just before them,
    or into one ``TaskEvents`` per run of them: the order of everything is kept, and a burst of
    small jobs costs one message per turn, not one per job."""
    out: list[Any] = []
    ended: list[JobUpdate] = []  # job ends to add to out[-1], a TaskEvents
    for msg in msgs:
        if isinstance(msg, JobUpdate) and msg.spec is None:
            if not ended and not (out and isinstance(out[-1], TaskEvents)):
                out.append(TaskEvents(()))
            ended.append(msg)
            continue
        if ended:
            out[-1] = TaskEvents(out[-1].done, (*out[-1].ended, *ended))
            ended = []
        out.append(msg)
    if ended:
        out[-1] = TaskEvents(out[-1].done, (*out[-1].ended, *ended))
    return out
