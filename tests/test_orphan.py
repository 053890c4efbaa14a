"""A worker's task, session and rank processes never outlive it, even when it dies while they
are still starting (``worker._orphan``).

A child whose parent dies before the child asked the kernel for ``PR_SET_PDEATHSIG`` has been
re-parented already: its own ``getppid()`` cannot tell. So the spawner names itself in the
child's environment (``PILOT_PARENT_PID``), and the child checks against that name. The first
test makes the race certain with a real grandchild process; the second kills a real ``pilot
worker`` while its task processes start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests_support import wait_until

ROOT = Path(__file__).resolve().parent.parent

# The grandchild: waits until the process that spawned it has exited (as a task process's
# imports may take longer than its dying worker), then starts the way a task process does.
GRANDCHILD = textwrap.dedent(
    """
    import os, sys, time
    named = int(os.environ["PILOT_PARENT_PID"])
    deadline = time.monotonic() + 30
    while os.getppid() == named and time.monotonic() < deadline:
        time.sleep(0.01)
    from worker._orphan import die_with_parent
    die_with_parent()
    open(sys.argv[1], "w").write("outlived its parent")
    """
)

# The spawner: starts the grandchild as a worker starts its children, then exits at once.
SPAWNER = textwrap.dedent(
    """
    import os, subprocess, sys
    from worker._orphan import parent
    proc = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                            env=parent(dict(os.environ)), start_new_session=True)
    print(proc.pid, flush=True)
    """
)


def test_a_child_whose_parent_died_before_it_started_exits(tmp_path: Path) -> None:
    marker = tmp_path / "alive"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PILOT_PARENT_PID", None)
    out = subprocess.run(
        [sys.executable, "-c", SPAWNER, GRANDCHILD, str(marker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    grandchild = int(out.stdout.split()[0])
    wait_until(lambda: not psutil.pid_exists(grandchild), timeout=30, what="the orphan's exit")
    assert not marker.exists(), "a task process outlived the worker that started it"


@pytest.mark.system
def test_a_worker_killed_while_its_task_processes_start_leaves_none(tmp_path: Path) -> None:
    env = {**os.environ, "PILOT_HOME": str(tmp_path), "PILOT_LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "pilot", "worker", "--connect", "-", "--slots", "2"],
        stdin=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        proc = psutil.Process(worker.pid)
        children: list[psutil.Process] = []
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline:
            children = [c for c in proc.children() if "worker._child" in " ".join(c.cmdline())]
            time.sleep(0.005)
        assert len(children) == 2, "the worker starts its task processes before it connects"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"task processes outlived their worker: {[p.pid for p in alive]}"
