"""What the dashboard shows, as JSON-ready dicts built from the gateway's parts.

Read-only views, called on the gateway's loop by the live feed (every batch) and the API:

- ``worker_row``: a worker's name, host, resources, tags, Blender, Slurm job, what its last
  heartbeat said (CPU, memory, round trip), tasks out on it, tasks done, when last heard, and
  its state (``idle``, ``busy``, ``draining``; the feed adds ``lost`` and ``left``);
- ``live_job_row`` / ``stored_job_row``: a job's owner, kind, state, progress and times;
- ``gateway_row``: queue depth, running tasks, task rate, latency, bytes, refused messages;
- ``output_event``: one ``Output`` as the page draws it (a metrics point, a frame thumbnail, a
  piece of output text, a restart), or None for what the page does not show;
- ``job_detail``: a job's kept outputs (frames, metrics, the tail of its output) and its failed
  tasks with their tracebacks, from the store.

Every text here is data for the page to put in the DOM as text (``textContent``), never markup.
"""

from __future__ import annotations

import base64
import re
import time
from typing import TYPE_CHECKING, Any

from gateway.protocol import FrameDone, JobInfo, JobKind, Output, OutputKind, Status

if TYPE_CHECKING:
    from gateway.server._registry import JobRecord, WorkerRecord
    from gateway.server._server import Gateway

__all__ = [
    "failed_rows",
    "gateway_row",
    "job_detail",
    "live_job_row",
    "output_event",
    "stored_job_row",
    "worker_row",
]

TEXT_TAIL_CHARS = 4000  # of a job's output, in its detail and per event
FAILED_SHOWN = 50  # failed tasks listed in a job's detail
# The gateway's own note when a training group restarts (``_instructions.Executor``).
RESTART_NOTE = re.compile(r"the group stopped and restarts .*\(restart (\d+)\)")
REFUSED_COUNTERS = ("rejected", "refused", "not_yours", "unroutable")


def worker_row(gw: Gateway, w: WorkerRecord, now: float) -> dict[str, Any]:
    h = w.hello
    sched = gw.scheduler.workers.get(h.name)
    load = w.load
    out = gw.scheduler.running_on(h.name)
    draining = sched is not None and sched.draining
    return {
        "name": h.name,
        "host": h.host,
        "slots": h.slots,
        "cpus": h.cpus,
        "memory": h.memory_bytes,
        "gpus": [{"name": g.name, "memory": g.memory_bytes} for g in h.gpus],
        "tags": list(h.tags),
        "blender": h.blender,
        "slurm": h.slurm_job_id,
        "cpu": load.cpu_percent if load is not None else -1.0,
        "mem_used": load.memory_used_bytes if load is not None else 0,
        "rtt": load.rtt_s if load is not None else -1.0,
        "running": out,
        "done": w.done,
        # when it was last heard from (UNIX time, to the second: a row changes once a second)
        "heard": round(time.time() - (now - sched.last_seen)) if sched is not None else 0,
        "state": "draining" if draining else ("busy" if out else "idle"),
    }


def _kind(kind: JobKind) -> str:
    return {JobKind.CALL: "partitions"}.get(kind, kind.name.lower())


def live_job_row(gw: Gateway, job_id: str, j: JobRecord, running: int) -> dict[str, Any]:
    state, done, failed = gw.scheduler.job_progress(job_id)
    n = j.spec.n_tasks
    return {
        "id": job_id,
        "name": j.spec.name,
        "owner": j.user,
        "kind": _kind(j.spec.kind),
        "state": state.name.lower(),
        "n": n,
        "done": done,
        "failed": failed,
        "running": running,
        "queued": max(0, n - done - failed - running),
        "created": j.created,
        "finished": 0.0,
        "error": "",
    }


def stored_job_row(info: JobInfo, kind: JobKind | None) -> dict[str, Any]:
    return {
        "id": info.job_id,
        "name": info.name,
        "owner": info.owner,
        "kind": _kind(kind) if kind is not None else "",
        "state": Status(info.state).name.lower(),
        "n": info.n_tasks,
        "done": info.done,
        "failed": info.failed,
        "running": 0,
        "queued": 0,
        "created": info.created,
        "finished": info.finished,
        "error": info.error,
    }


def gateway_row(gw: Gateway, queued: int, running: int, now: float) -> dict[str, Any]:
    m = gw.monitor
    counters = gw.clients.counters()
    refused = sum(n for k, n in counters.items() if k.startswith(REFUSED_COUNTERS))
    rtts = sorted(
        w.load.rtt_s for w in gw.registry.workers.values() if w.load and w.load.rtt_s >= 0
    )
    return {
        "id": gw.gateway_id,
        "uptime": round(now - m.started, 1),
        "workers": len(gw.registry.workers),
        "jobs": len(gw.registry.jobs),
        "queued": queued,
        "running": running,
        "rate": round(m.task_rate(now), 1),
        "ok": m.tasks_ok,
        "failed": m.tasks_failed,
        "latency_p50": m.recent_latency(0.5),
        "latency_p95": m.recent_latency(0.95),
        "rtt": rtts[len(rtts) // 2] if rtts else -1.0,
        "bytes_in": counters.get("bytes_in", 0),
        "bytes_out": counters.get("bytes_out", 0),
        "refused": refused,
        "time": time.time(),
    }


def _text(data: Any) -> str:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data).decode(errors="replace")
    return str(data)


def output_event(out: Output) -> dict[str, Any] | None:
    """``out`` as the page draws it (see the module docstring)."""
    job = out.job_id
    match out.kind:
        case OutputKind.METRICS if isinstance(out.data, dict):
            values = {
                k: v
                for k, v in out.data.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "time"
            }
            return {"k": "m", "job": job, "task": out.index, "values": values}
        case OutputKind.FRAME if isinstance(out.data, FrameDone):
            f = out.data
            thumb = base64.b64encode(f.thumbnail).decode() if f.thumbnail else ""
            stored = bool(f.file.digest)  # in the gateway's blob store (a video can be made)
            return {"k": "f", "job": job, "frame": f.frame, "stored": stored, "thumb": thumb}
        case OutputKind.STDOUT | OutputKind.STDERR:
            text = _text(out.data)[-TEXT_TAIL_CHARS:]
            event: dict[str, Any] = {
                "k": "o",
                "job": job,
                "task": out.index,
                "err": out.kind == OutputKind.STDERR,
                "text": text,
            }
            if out.index < 0 and (m := RESTART_NOTE.search(text)):
                event["restart"] = int(m.group(1))
            return event
        case OutputKind.DISPLAY if isinstance(out.data, dict) and "text/plain" in out.data:
            text = _text(out.data["text/plain"])[-TEXT_TAIL_CHARS:] + "\n"
            return {"k": "o", "job": job, "task": out.index, "err": False, "text": text}
    return None


def job_detail(gw: Gateway, job_id: str) -> dict[str, Any]:
    """A job's kept outputs as events (frames and metrics all, text only its tail) and its
    failed tasks; the caller checked who may see it."""
    events: list[dict[str, Any]] = []
    text: list[dict[str, Any]] = []
    for out in gw.store.outputs(job_id):
        e = output_event(out)
        if e is None:
            continue
        if e["k"] == "o" and "restart" not in e:
            text.append(e)
        else:
            events.append(e)
    kept, size = [], 0
    for e in reversed(text):  # the tail: the latest pieces, up to TEXT_TAIL_CHARS
        size += len(e["text"])
        if size > TEXT_TAIL_CHARS and kept:
            break
        kept.append(e)
    return {"job": job_id, "events": events + kept[::-1], "failed": failed_rows(gw, job_id)}


def failed_rows(gw: Gateway, job_id: str) -> list[dict[str, Any]]:
    """The job's first ``FAILED_SHOWN`` failed tasks: index, item, worker, error (traceback)."""
    return [
        {"task": i, "item": item, "worker": worker or "", "error": error or ""}
        for i, item, worker, error in gw.store.failed_tasks(job_id, FAILED_SHOWN)
    ]
