"""Remote sessions: the notebook's cells run in one persistent namespace on a worker.

``RemoteSession`` is the kernel's side. Starting one submits a one-task job of kind
``JobKind.SESSION`` (placed like any task: ``--gpus``, ``--tags``), leased to this kernel's
client: the gateway ends it when the kernel says goodbye, or by itself when the kernel dies
silently. ``execute`` sends the cell (``RunCell``) and relays what comes back into the running
cell (streams, display data, the result), answers ``input()`` from the notebook
(``InputRequest``, then ``InputReply``), and turns a KeyboardInterrupt (Kernel → Interrupt)
into an ``InterruptTask``: the remote code is interrupted, the session lives on. The session's
own messages arrive as ``Output``s of kind ``SESSION`` holding a typed record.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any

from IPython.display import clear_output, publish_display_data, update_display

from gateway.client import Client, Job
from gateway.protocol import (
    CellDone,
    InputReply,
    InputRequest,
    InterruptTask,
    JobKind,
    JobUpdate,
    Output,
    OutputKind,
    PilotError,
    Resources,
    RunCell,
    SessionReady,
    TaskDone,
    dumps,
)

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
            kind=JobKind.SESSION,
            name="remote session",
            resources=Resources(1, gpus, tags),
            retries=0,
            lease=True,
        )
        self._cells = itertools.count(1)
        self.info = self._wait_ready()

    def _wait_ready(self) -> SessionReady:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match self.job.next_event(WAIT_STEP_S):
                case Output(kind=OutputKind.SESSION, data=SessionReady() as ready):
                    return ready
                case JobUpdate() if self.job.done():
                    raise PilotError(self.job.error or "The remote session could not start.")
                case TaskDone(error=error):
                    raise PilotError(f"The remote session could not start: {error}")
        self.job.cancel()
        raise PilotError(f"No worker took the remote session within {START_TIMEOUT_S:.0f}s.")

    @property
    def alive(self) -> bool:
        return not self.job.done()

    def close(self) -> None:
        if self.alive:
            self.job.cancel()

    def execute(self, code: str, kernel: Any) -> CellDone:
        """Run ``code`` remotely; relay its outputs; return its outcome (``ok``,
        ``execution_count``, and ename/evalue/traceback on error). Raises ``SessionLost``."""
        cell_id = str(next(self._cells))
        self.client.send(RunCell(self.job.id, 0, cell_id, code))
        interrupted = False
        while True:
            ev = None
            try:
                ev = self.job.next_event(WAIT_STEP_S)
                outcome = None if ev is None else self._relay(ev, kernel, cell_id)
            except KeyboardInterrupt:  # while waiting, or while writing the cell's output
                if (done := _cell_done(ev, cell_id)) is not None:
                    return done  # it had ended: nothing to interrupt
                if interrupted:  # a second interrupt: stop waiting, end the session
                    self.close()
                    raise
                interrupted = True
                self.client.send(InterruptTask(self.job.id, 0))
                continue
            if outcome is not None:
                return outcome

    def _relay(self, ev: Any, kernel: Any, cell_id: str) -> CellDone | None:
        match ev:
            case Output(kind=OutputKind.STDOUT | OutputKind.STDERR as kind, data=data):
                stream = sys.stdout if kind == OutputKind.STDOUT else sys.stderr
                stream.write(data.decode("utf-8", "replace"))
                stream.flush()
            case Output(kind=OutputKind.DISPLAY, data=data, extra=extra):
                transient = (extra or {}).get("transient") or {}
                if (extra or {}).get("update") and transient.get("display_id"):
                    update_display(data, raw=True, display_id=transient["display_id"])
                else:
                    publish_display_data(data, (extra or {}).get("metadata"), transient=transient)
            case Output(kind=OutputKind.CLEAR_OUTPUT, extra=extra):
                clear_output(wait=bool((extra or {}).get("wait")))
            case Output(kind=OutputKind.EXECUTE_RESULT, data=data, extra=extra):
                kernel.send_response(
                    kernel.iopub_socket,
                    "execute_result",
                    {
                        "data": data,
                        "metadata": (extra or {}).get("metadata") or {},
                        "execution_count": kernel.execution_count,
                    },
                )
            case Output(kind=OutputKind.SESSION, data=InputRequest(prompt=prompt) as request):
                ask = kernel.getpass if request.password else kernel.raw_input
                self.client.send(InputReply(self.job.id, 0, ask(prompt)))
            case _ if (done := _cell_done(ev, cell_id)) is not None:
                sys.stdout.flush()
                sys.stderr.flush()
                return done
            case TaskDone() | JobUpdate() if self.job.done():
                where = self.info.host
                raise SessionLost(
                    f"The remote session on {where} was lost ({self.job.error or 'it ended'}). "
                    "Cells run locally again; `%pilot remote` starts a fresh session."
                )
        return None


def _cell_done(ev: Any, cell_id: str) -> CellDone | None:
    """``ev`` if it says that cell ``cell_id`` ended, else None."""
    match ev:
        case Output(kind=OutputKind.SESSION, data=CellDone() as done) if done.cell_id == cell_id:
            return done
    return None
