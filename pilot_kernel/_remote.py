"""Remote sessions: the notebook's cells run in one persistent namespace on a worker.

``RemoteSession`` is the kernel's side. Starting one submits a one-task job in ``session`` mode
(placed like any task: ``--gpus``, ``--tags``), leased to this kernel's client: the gateway ends
it when the kernel says goodbye, or by itself when the kernel dies silently. ``execute`` sends
a cell and relays what comes back into the running cell (streams, display data, the result),
answers ``input()`` from the notebook, and turns a KeyboardInterrupt (Kernel → Interrupt) into
an interrupt of the remote code that leaves the session alive.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any

from IPython.display import clear_output, publish_display_data, update_display

from gateway import Client, JobUpdate, Output, PilotError, Resources, TaskDone, dumps
from gateway._job import Job

__all__ = ["RemoteSession", "SessionLost"]

START_TIMEOUT_S = 120.0
WAIT_STEP_S = 0.1


class SessionLost(PilotError):
    """The worker holding the session went away (or the session ended)."""


def _session_placeholder() -> None:
    """The job's function: a session process runs cells, not this."""


class RemoteSession:
    """A session on a worker. Owned by the kernel; ``close()`` releases it."""

    def __init__(self, client: Client, *, gpus: int = 0, tags: tuple[str, ...] = ()) -> None:
        self.client = client
        self.job: Job = client.submit_job(
            _session_placeholder,
            [dumps(((), {}))],
            mode="session",
            name="remote session",
            resources=Resources(1, gpus, tags),
            retries=0,
            meta={"lease": True},
        )
        self._cells = itertools.count(1)
        self.info = self._wait_ready()

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ev = self.job.next_event(WAIT_STEP_S)
            if isinstance(ev, Output) and ev.kind == "session_ready":
                return dict(ev.data)
            if isinstance(ev, JobUpdate) and self.job.done():
                raise PilotError(self.job.error or "The remote session could not start.")
            if isinstance(ev, TaskDone):
                raise PilotError(f"The remote session could not start: {ev.error}")
        self.job.cancel()
        raise PilotError(f"No worker took the remote session within {START_TIMEOUT_S:.0f}s.")

    @property
    def alive(self) -> bool:
        return not self.job.done()

    def close(self) -> None:
        if self.alive:
            self.job.cancel()

    def execute(self, code: str, kernel: Any) -> dict[str, Any]:
        """Run ``code`` remotely; relay its outputs; return the outcome (``cell_done``'s
        content: status, execution_count, and ename/evalue/traceback on error).
        Raises ``SessionLost``."""
        cell_id = str(next(self._cells))
        self.client.send_input(self.job.id, 0, "cell", {"code": code, "cell_id": cell_id})
        interrupted = False
        while True:
            try:
                ev = self.job.next_event(WAIT_STEP_S)
            except KeyboardInterrupt:
                if interrupted:  # a second interrupt: stop waiting, end the session
                    self.close()
                    raise
                interrupted = True
                self.client.send_input(self.job.id, 0, "interrupt")
                continue
            if ev is None:
                continue
            outcome = self._relay(ev, kernel, cell_id)
            if outcome is not None:
                return outcome

    def _relay(self, ev: Any, kernel: Any, cell_id: str) -> dict[str, Any] | None:
        match ev:
            case Output(kind="stdout" | "stderr" as kind, data=data):
                stream = sys.stdout if kind == "stdout" else sys.stderr
                stream.write(data.decode("utf-8", "replace"))
                stream.flush()
            case Output(kind="display", data=data, extra=extra):
                transient = (extra or {}).get("transient") or {}
                if (extra or {}).get("update") and transient.get("display_id"):
                    update_display(data, raw=True, display_id=transient["display_id"])
                else:
                    publish_display_data(data, (extra or {}).get("metadata"), transient=transient)
            case Output(kind="clear_output", extra=extra):
                clear_output(wait=bool((extra or {}).get("wait")))
            case Output(kind="execute_result", data=data, extra=extra):
                kernel.send_response(
                    kernel.iopub_socket,
                    "execute_result",
                    {
                        "data": data,
                        "metadata": (extra or {}).get("metadata") or {},
                        "execution_count": kernel.execution_count,
                    },
                )
            case Output(kind="input_request", data=prompt, extra=extra):
                ask = kernel.getpass if (extra or {}).get("password") else kernel.raw_input
                self.client.send_input(self.job.id, 0, "input_reply", ask(str(prompt)))
            case Output(kind="cell_done", data=outcome) if outcome.get("cell_id") == cell_id:
                sys.stdout.flush()
                sys.stderr.flush()
                return dict(outcome)
            case TaskDone() | JobUpdate() if self.job.done():
                where = self.info.get("host", "the worker")
                raise SessionLost(
                    f"The remote session on {where} was lost ({self.job.error or 'it ended'}). "
                    "Cells run locally again; `%pilot remote` starts a fresh session."
                )
        return None
