"""pilot/_malloc.py: a gateway or worker process receives big messages into memory it kept.

Real ZeroMQ sockets in a process of their own (the allocator's settings are the process's):
50 MB messages over TCP on 127.0.0.1, the page faults of each receive counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only"
)

_RECEIVER = """
import json, resource, sys
import zmq
from pilot._malloc import keep_freed_memory

kept = keep_freed_memory()
ctx = zmq.Context()
pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
push.connect(f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}")
big = bytearray(50_000_000)
faults = []
for _ in range(6):
    push.send(big, copy=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    frame = pull.recv(copy=False)
    assert len(frame) == len(big)
    del frame
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
push.close(0); pull.close(0); ctx.term()
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _receive(keep_mb: str) -> dict:
    env = {**os.environ, "PILOT_KEEP_FREED_MB": keep_mb, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _RECEIVER], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.timeout(150)
def test_big_messages_land_in_memory_already_faulted_in() -> None:
    """12,207 pages a 50 MB message: each faulted in anew without the settings; with them,
    from the third message on (two may be alive at once), almost none."""
    on = _receive("512")
    assert on["kept"] is True
    assert max(on["faults"][2:]) < 1000, on["faults"]
    off = _receive("0")  # turned off: the allocator as glibc has it
    assert off["kept"] is False
    assert min(off["faults"][2:]) > 10_000, off["faults"]


def test_a_bad_setting_says_how_to_fix_it_and_zero_changes_nothing() -> None:
    from gateway.protocol import ConfigError
    from pilot._malloc import keep_freed_memory

    with pytest.raises(ConfigError, match="whole number; 0 turns it off"):
        keep_freed_memory({"PILOT_KEEP_FREED_MB": "lots"})
    assert keep_freed_memory({"PILOT_KEEP_FREED_MB": "0"}) is False
