"""Driving real kernels for the notebook benchmarks: run a cell, time its round trip."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from jupyter_client.manager import start_new_kernel


class Kernel:
    """A kernel started through jupyter_client; ``run`` waits for the cell's idle status."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.km, self.kc = start_new_kernel(kernel_name=name, env={**os.environ, **env})

    def run(self, code: str, timeout: float = 300.0) -> dict[str, Any]:
        msg_id = self.kc.execute(code)
        outputs: list[str] = []
        error = None
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                outputs.append(msg["content"]["text"])
            elif kind == "error":
                error = msg["content"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = self.kc.get_shell_msg(timeout=timeout)
        if error is not None or reply["content"]["status"] != "ok":
            raise RuntimeError(f"cell failed: {code!r}: {error or reply['content']}")
        return {"stdout": "".join(outputs)}

    def timed(self, code: str, repeat: int, warmup: int = 3) -> list[float]:
        for _ in range(warmup):
            self.run(code)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.run(code)
            times.append(time.perf_counter() - t0)
        return times

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(values) * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
        "n": len(values),
    }


def repo_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
