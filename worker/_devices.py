"""What this machine offers: CPUs, memory, GPUs.

GPUs are found with ``nvidia-smi`` (fast, no CUDA context); torch is not imported at start-up
because it costs seconds. None found is fine: the worker registers zero GPUs.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import psutil

from gateway.protocol import GpuInfo

__all__ = ["cpu_count", "detect_gpus", "machine_load", "memory_bytes"]

NVIDIA_SMI_TIMEOUT_S = 5.0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def machine_load() -> tuple[float, int]:
    """CPU in use (percent of all cores, since the last call) and memory in use, in bytes:
    what a worker's heartbeat reports for the dashboard (microseconds, no sampling wait)."""
    mem = psutil.virtual_memory()
    return float(psutil.cpu_percent(interval=None)), int(mem.total - mem.available)


def detect_gpus(visible: str | None = None) -> tuple[GpuInfo, ...]:
    """GPUs from ``nvidia-smi``; ``visible`` is a CUDA_VISIBLE_DEVICES-style filter."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        index, name, mem_mib = (part.strip() for part in line.split(",", 2))
        gpus.append(GpuInfo(int(index), name, int(float(mem_mib)) * 2**20))
    if visible:
        keep = {int(x) for x in visible.split(",") if x.strip().isdigit()}
        gpus = [g for g in gpus if g.index in keep]
    return tuple(gpus)
