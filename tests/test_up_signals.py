"""Nothing outlives ``pilot up``: closing its terminal (SIGHUP), SIGTERM, or even SIGKILL ends
its gateway and workers (and their task processes) too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests_support import wait_until

pytestmark = pytest.mark.system


def _start(home: Path) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    env = {**os.environ, "PILOT_HOME": str(home), "PILOT_LOG_LEVEL": "WARNING"}
    env.pop("PILOT_CONNECT", None)
    up = subprocess.Popen([sys.executable, "-m", "pilot", "up", "--workers", "2"], env=env)
    ready = subprocess.run(
        [sys.executable, "-m", "pilot", "status", "--wait-workers", "2", "--timeout", "60"],
        env=env,
        capture_output=True,
        timeout=90,
    )
    assert ready.returncode == 0, ready.stderr
    family = psutil.Process(up.pid).children(recursive=True)
    assert len(family) >= 3, "a gateway and two workers (and their task processes)"
    return up, family


def _all_gone(procs: list[psutil.Process]) -> bool:
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return not alive


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL], ids=str)
def test_pilot_up_ends_everything_it_started_when_it_gets(
    sig: signal.Signals, tmp_path: Path
) -> None:
    up, family = _start(tmp_path)
    try:
        up.send_signal(sig)
        up.wait(60)
        wait_until(lambda: _all_gone(family), timeout=60, what="every process pilot up started")
    finally:
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if up.poll() is None:
            up.kill()
            up.wait(10)
