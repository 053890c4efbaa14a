"""Smoke test for the benchmark's Parallel Pilot backend and script (tiny sizes; nothing is
timed against a bound: the figures only have to exist and be positive)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _baselines as B  # noqa: E402
from bench._pilot_backend import Pilot  # noqa: E402

pytestmark = pytest.mark.system


def run_script(name: str, *args: str, out: Path, timeout: float) -> tuple[str, dict]:
    """Run ``bench/NAME`` with ``args`` and ``--out OUT``; its stdout and the JSON it wrote."""
    command = [sys.executable, str(ROOT / "bench" / name), *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, json.loads(out.read_text())


@pytest.mark.timeout(120)
def test_pilot_backend_runs_every_workload() -> None:
    with Pilot(n_workers=2, start_timeout=60, task_timeout=60) as backend:
        assert backend.startup_s is not None and backend.startup_s > 0
        assert len(backend.pids) == 3  # the gateway and two workers
        figures = {name: getattr(backend, name)(**kw) for name, kw in B.TINY_SIZES.items()}
    assert backend.pids == []
    for name, figs in figures.items():
        for key, value in figs.items():
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (
                name,
                key,
                value,
            )


@pytest.mark.timeout(180)
def test_throughput_script_writes_table_and_json(tmp_path: Path) -> None:
    args = ("--quick", "--backends", "raw_zmq,pilot")
    stdout, data = run_script("throughput.py", *args, out=tmp_path / "r.json", timeout=170)
    assert "ratio to raw pyzmq" in stdout
    assert "Parallel Pilot against its targets" in stdout
    assert [r["backend"] for r in data["summary"]] == ["raw_zmq", "pilot"]
    pilot = next(r for r in data["results"] if r["backend"] == "pilot")
    assert "error" not in pilot, pilot.get("error")
    for workload in ("startup", *B.DEFAULT_SIZES):
        assert workload in pilot
    assert {t["figure"] for t in data["targets"]} >= {"noop tasks/s", "startup s"}


@pytest.mark.timeout(180)
def test_output_latency_script_writes_table_and_json(tmp_path: Path) -> None:
    stdout, data = run_script(
        "output_latency.py", "--quick", out=tmp_path / "latency.json", timeout=170
    )
    assert "target: a line now and then reaches the client" in stdout
    rows = data["rows"]
    assert {(r["backend"], r["workload"]) for r in rows} == {
        (b, w) for b in ("pilot", "raw_zmq") for w in ("now-and-then", "burst")
    }
    for r in rows:
        assert r["lines"] == 40 and 0 < r["median_ms"] <= r["worst_line_ms"], r


@pytest.mark.timeout(120)
def test_hops_script_times_each_step_of_a_round_trip(tmp_path: Path) -> None:
    args = ("--n", "30", "--warm", "10")
    _, data = run_script("hops.py", *args, out=tmp_path / "hops.json", timeout=110)
    assert data["round_trips"] == 30 and data["on_the_common_path"] >= 1
    steps = [row["step"] for row in data["steps"]]
    # the whole path, every process of it stamped: out to a task process and back
    assert steps[0] == "client: user submit -> client: enc Submit"
    assert steps[-1].endswith("client: user result")
    assert any(s.startswith("worker: enc Assign -> task process: dec") for s in steps), steps
    assert any(s.startswith("task process: enc") for s in steps), steps
    kinds = [row["is"] for row in data["steps"]]
    assert kinds.count("hop") == 6 and kinds.count("commit") == 2, data["steps"]
    for row in data["steps"]:
        assert 0 < row["median us"] <= row["p90 us"], row
    assert 0 < data["median_us"] <= data["worst_us"]


@pytest.mark.timeout(180)
def test_worker_memory_script_counts_one_shared_copy_of_an_array(tmp_path: Path) -> None:
    args = ("--mb", "40", "--slots", "2", "--repeats", "1")
    stdout, data = run_script("worker_memory.py", *args, out=tmp_path / "m.json", timeout=170)
    assert "copies of the array" in stdout
    (run,) = data["runs"]
    # right after: the shared copy, and the worker's freed receive buffer kept for the next one
    assert 0.5 < run["copies"] < 2.9, f"two task processes held {run['copies']:.2f} copies"
    # once idle, the worker's allocator handed the kept buffer back (pilot/_malloc.py: kept,
    # it would be about 2.3 copies; whether it was still kept right after depends on when the
    # trim's clock ticked, so that is not asserted)
    idle = run["copies_idle"]
    assert 0.5 < idle < 1.9, f"{idle:.2f} copies once idle"


@pytest.mark.timeout(300)
def test_million_script_restarts_the_gateway_halfway_and_loses_nothing(tmp_path: Path) -> None:
    """bench/million.py at a small size: its figures exist, and the job whose gateway was
    SIGKILLed and restarted halfway has every result, each reported once."""
    args = ("--n", "4000", "--ref", "1000")
    _, data = run_script("million.py", *args, out=tmp_path / "million.json", timeout=280)
    for run in (data["clean"], data["restarted"]):
        assert run["results_ok"], run
        assert run["results_lost"] == 0 and run["results_repeated"] == 0, run
        assert run["gateway_peak_mb"] > 0 and run["client_peak_mb"] > 0
    assert data["restarted"]["restarted_at_done"] >= 2000
    assert data["clean"]["answers_ms"]["status"]["n"] > 0
    answers = data["restarted"]["answers_ms"]["status"]  # told apart around the restart
    assert answers["restart_s"] > 0
    assert answers["gateway_up"]["n"] + answers["across_restart"]["n"] == answers["n"] > 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("viewers", ["websocket", "live", "quiet", "blank"])
def test_dashboard_script_runs_with_and_without_viewers(tmp_path: Path, viewers: str) -> None:
    """bench/dashboard.py at a small size, with WebSocket viewers or real Chromium pages in
    each of its ``--pages`` modes: both sides ran, the viewers were open, the JSON says so."""
    chromium = viewers != "websocket"
    if chromium and not Path("/usr/bin/chromium").exists():
        pytest.skip("apt-get install chromium")  # ./scripts/test installs it
    # 4,000 tasks: a run of most of a second at least, so a live page gets updates (every 250 ms)
    args = ["--n", "4000", "--repeats", "1"]
    if chromium:  # live pages settle before the run (the default); the others need not
        args += ["--chromium", "--pages", viewers]
        args += [] if viewers == "live" else ["--settle-cores", "0"]
    stdout, got = run_script("dashboard.py", *args, out=tmp_path / "d.json", timeout=280)
    assert "ratio of medians" in stdout
    assert len(got["off"]) == len(got["on"]) == 1 and min(got["off"] + got["on"]) > 0
    assert got["args"]["pages"] == viewers if chromium else not got["args"]["chromium"]
    (received,) = got["received"]
    if chromium:  # a quiet page (its feed closed once drawn) and a blank one got no update
        assert received["viewers"] == 3 and len(received["updates"]) == 3, received
        if viewers == "live":
            assert min(received["updates"]) > 0, received
            (settled,) = got["settled_s"]
            assert settled > 0 and "the viewers settled" in stdout
        else:
            assert received["updates"] == [0, 0, 0], received
            assert got["settled_s"] == [None]
        assert "Chromium pages (" + viewers + ")" in stdout
    else:  # the snapshot at least, on each of the three
        assert received["messages"] >= 3 and received["bytes"] > 0, received
