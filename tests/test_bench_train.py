"""Smoke test for bench/train.py (tiny sizes; nothing is timed against a bound): both systems
run, their figures exist, and they train the same model to the same accuracy."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.system, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_train_bench_runs_pilot_and_torchrun_alike(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    argv = [sys.executable, str(ROOT / "bench" / "train.py"), "--steps", "5", "--repeats", "1"]
    done = subprocess.run(
        [*argv, "--out", str(out)], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pilot step time" in done.stdout, done.stdout
    systems = {row["system"]: row for row in json.loads(out.read_text())["systems"]}
    assert sorted(systems) == ["pilot", "torchrun"]
    for row in systems.values():
        assert row["runs"] == 1 and row["threads/rank"] >= 1
        for key in ("step ms", "startup s", "step ratio", "startup ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["system"], key)
    assert systems["pilot"]["accuracy"] == systems["torchrun"]["accuracy"], "the same training"
