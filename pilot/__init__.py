"""Parallel Pilot: send heavy notebook work to a pool of machines and watch it come back live.

The one name a user remembers::

    import pilot
    client = pilot.connect()                 # after `pilot up`, or PILOT_CONNECT=...
    job = client.map(f, items, chunk=40)     # returns at once
    job.wait(); job.results                  # in item order

    with pilot.LocalCluster(workers=2) as cluster:
        client = cluster.client()

    pilot.SlurmWorkers(partition="gpu", gpus=1, cpus=8).scale(4)   # workers as Slurm jobs

Inside tasks: ``pilot.cached(key, factory)`` builds a model once per task process, and
``import pilot.train as pt`` is what a training rank uses (``pt.report``, ``pt.checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.protocol import (
    ConfigError,
    DataError,
    JobCancelled,
    JobError,
    JobNotFound,
    NoGateway,
    Output,
    PilotError,
    PilotTimeout,
    SerializationError,
    TaskError,
    Unschedulable,
    find_connection,
)
from pilot._cached import cached

if TYPE_CHECKING:
    from gateway.client import Client, Job
    from pilot._cluster import LocalCluster
    from pilot._slurm import SlurmWorkers

# Imported on first use: `python -m pilot gateway` and `pilot worker` (and every task process,
# which imports pilot for pilot.cached and pilot.output_dir) need none of them, and they cost
# a start a twentieth of a second.
_LAZY = {
    "Client": "gateway.client",
    "Job": "gateway.client",
    "LocalCluster": "pilot._cluster",
    "SlurmWorkers": "pilot._slurm",
}

__all__ = [
    "Client",
    "ConfigError",
    "DataError",
    "Job",
    "JobCancelled",
    "JobError",
    "JobNotFound",
    "LocalCluster",
    "NoGateway",
    "Output",
    "PilotError",
    "PilotTimeout",
    "SerializationError",
    "SlurmWorkers",
    "TaskError",
    "Unschedulable",
    "cached",
    "connect",
    "output_dir",
]


def output_dir() -> Path:
    """Inside a task: a directory whose files come back as the task's result files (to the
    gateway, then ``job.files()`` in the notebook; or to the job's ``results`` URL). Raises
    ``PilotError`` outside a task."""
    path = os.environ.get("PILOT_OUTPUT_DIR")  # set by the worker for the running task
    if not path:
        raise PilotError("pilot.output_dir() is for code that runs as a task on a worker.")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def connect(target: str | Path | None = None, *, name: str = "") -> Client:
    """Connect to a gateway: ``target`` is a connection file or ``tcp://HOST:PORT``; without it,
    ``PILOT_CONNECT``, then ``$PILOT_HOME/connection.json``. Raises ``NoGateway`` with how to
    start one."""
    from gateway.client import Client

    return Client(find_connection(target), name=name)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pilot' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
