"""``pilot status``, ``pilot jobs``, ``pilot cancel`` and ``pilot logs``: asking a running
gateway (through the connection file ``find_connection`` finds) and printing its answer, as
text or ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from gateway.protocol import NoGateway, OutputKind, Status, find_connection

if TYPE_CHECKING:  # imported where used: `pilot gateway` and `pilot worker` start faster
    from gateway.client import Client

__all__ = ["add_ask_parsers"]

STATES = {s.value: s.name.lower() for s in Status}


def add_ask_parsers(sub: Any) -> None:
    st = sub.add_parser("status", help="workers and running jobs")
    st.add_argument("--json", action="store_true")
    st.add_argument("--wait-workers", type=int, default=0)
    st.add_argument("--timeout", type=float, default=30.0)
    st.set_defaults(run=_status)

    jobs = sub.add_parser("jobs", help="recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(run=_jobs)

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job")
    cancel.set_defaults(run=_cancel)

    logs = sub.add_parser("logs", help="a job's kept outputs")
    logs.add_argument("job")
    logs.add_argument("task", nargs="?", type=int, default=-1)
    logs.set_defaults(run=_logs)


def _client() -> Client:
    from gateway.client import Client

    return Client(find_connection())


def _client_within(deadline: float) -> Client:
    """A client, waiting for the gateway to appear (its connection file) until ``deadline``."""
    while True:
        try:
            return _client()
        except NoGateway:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)  # polling for a file another process will write


def _status(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + (args.timeout if args.wait_workers else 0.0)
    with _client_within(deadline) as c:
        left = max(0.0, deadline - time.monotonic())
        reply = c.status(args.wait_workers, left if args.wait_workers else 0.0)
    if args.json:
        print(json.dumps(asdict(reply), indent=2, default=str))
    else:
        print(f"gateway {reply.gateway_id}: {len(reply.workers)} workers, {len(reply.jobs)} jobs")
        for w in reply.workers:
            gpus = f", {len(w.gpus)} GPUs" if w.gpus else ""
            tags = f", tags {','.join(w.tags)}" if w.tags else ""
            gpus += f", Slurm job {w.slurm_job_id}" if w.slurm_job_id else ""
            print(f"  {w.name}: {w.running}/{w.slots} slots busy{gpus}{tags}, {w.tasks_done} done")
        for j in reply.jobs:
            print(f"  job {j.job_id} {j.name}: {STATES[j.state]} {j.done}/{j.n_tasks}")
    if args.wait_workers and len(reply.workers) < args.wait_workers:
        return 1
    return 0


def _jobs(args: argparse.Namespace) -> int:
    with _client() as c:
        jobs = c.jobs(args.limit)
    if args.json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
        return 0
    for j in jobs:
        when = time.strftime("%H:%M:%S", time.localtime(j.created))
        print(f"{j.job_id}  {when}  {STATES[j.state]:9}  {j.done}/{j.n_tasks}  {j.name}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client() as c:
        job = c.attach(args.job)
        job.cancel()
    print(f"cancelled {args.job}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    with _client() as c:
        outs = c.logs(args.job, args.task)
    for out in outs:
        if out.kind in (OutputKind.STDOUT, OutputKind.STDERR):
            stream = sys.stdout if out.kind == OutputKind.STDOUT else sys.stderr
            stream.write(out.data.decode(errors="replace"))
        elif out.kind == OutputKind.DISPLAY:
            print(out.data.get("text/plain", "<display>"))
        elif out.kind == OutputKind.METRICS:  # a training rank's pt.report(), one JSON line
            print(f"[metrics] {json.dumps(out.data)}")
    return 0
