"""Smoke test for the benchmark's raw-pyzmq baseline (tiny sizes; nothing is timed)."""

from __future__ import annotations

import json
import math
import operator
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _baselines as B  # noqa: E402
from bench._table import format_table, write_json  # noqa: E402

EXPECTED_KEYS = {
    "noop_submits": {"n", "seconds", "tasks_per_s"},
    "map_items": {"n", "chunk", "tasks", "seconds", "items_per_s"},
    "round_trip": {"n", "median_ms", "p90_ms", "min_ms"},
    "big_arg": {"mb", "repeats", "bytes", "median_s", "median_gb_s", "best_gb_s"},
}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if psutil.pid_exists(pid) and pid in _children()}
        time.sleep(0.05)
    return alive


def _check_figures(name: str, figures: dict) -> None:
    assert EXPECTED_KEYS[name] <= figures.keys(), (name, figures)
    for key, value in figures.items():
        assert isinstance(value, int | float), (name, key, value)
        assert math.isfinite(value) and value > 0, (name, key, value)


@pytest.mark.system
@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", ["process", "thread"])
def test_raw_zmq_workloads_and_cleanup(broker):
    before = _children()
    with B.RawZmq(n_workers=2, broker=broker, start_timeout=30, task_timeout=30) as backend:
        started = _children() - before
        expected_procs = 3 if broker == "process" else 2  # (broker +) 2 workers
        assert len(started) >= expected_procs
        assert set(backend.pids) <= started

        figures = {
            "noop_submits": backend.noop_submits(n=50),
            "map_items": backend.map_items(n=500, chunk=50),
            "round_trip": backend.round_trip(n=50),
            "big_arg": backend.big_arg(mb=1, repeats=2),
        }
    for name, figs in figures.items():
        _check_figures(name, figs)
    assert figures["noop_submits"]["n"] == 50
    assert figures["map_items"]["tasks"] == 10
    assert figures["big_arg"]["bytes"] == 1_000_000

    assert backend.pids == []
    assert not _wait_gone(started), "backend left child processes running"
    assert _children() <= before


@pytest.mark.system
@pytest.mark.timeout(60)
def test_raw_zmq_chain_runs_each_task_in_a_task_process_of_a_relaying_worker():
    before = _children()
    with B.RawZmqChain(n_workers=2, start_timeout=30, task_timeout=30) as backend:
        relays = set(backend.pids[1:])  # the broker, then the workers
        assert len(relays) == 2
        ran_in = {backend._run_one(operator.call, os.getpid) for _ in range(20)}
        assert ran_in.isdisjoint(relays), "a task ran in the relaying worker itself"
        assert {psutil.Process(pid).ppid() for pid in ran_in} <= relays
        started = _children() - before
        assert len(started) == 5  # the broker, 2 relaying workers, a task process each
        figures = {
            "noop_submits": backend.noop_submits(n=50),
            "round_trip": backend.round_trip(n=20),
            "big_arg": backend.big_arg(mb=1, repeats=2),
        }
    for name, figs in figures.items():
        _check_figures(name, figs)
    assert not _wait_gone(started), "the chain left processes running"


@pytest.mark.system
@pytest.mark.timeout(60)
def test_run_backend_returns_all_workloads():
    before = _children()
    result = B.run_backend(B.RawZmq, B.TINY_SIZES, start_timeout=30, task_timeout=30)
    assert "error" not in result, result
    assert result["backend"] == "raw_zmq"
    for name in EXPECTED_KEYS:
        _check_figures(name, result[name])
    row = B.summary_row(result)
    assert set(B.SUMMARY_COLUMNS) <= row.keys()
    assert "raw_zmq" in format_table([row], B.SUMMARY_COLUMNS)
    assert not _wait_gone(_children() - before)


def test_wrong_results_raise():
    class Broken(B.Backend):
        name = "broken"

        def _run_noops(self, n):
            return [0] * n

        def _run_map(self, items, chunk):
            return list(items)

        def _run_one(self, fn, arg):
            return None

    b = Broken()
    for call in (
        lambda: b.noop_submits(3),
        lambda: b.map_items(10, 5),
        lambda: b.round_trip(2),
        lambda: b.big_arg(1, 1),
    ):
        with pytest.raises(B.WrongResult):
            call()


def test_available_backends_and_write_json(tmp_path):
    available = B.available_backends()
    assert available["raw_zmq"] is B.RawZmq
    assert available["raw_zmq_chain"] is B.RawZmqChain
    assert set(available) <= {"raw_zmq", "raw_zmq_chain", "ipyparallel", "dask"}
    out = write_json(tmp_path / "a" / "b" / "r.json", {"x": 1.5})
    assert json.loads(out.read_text()) == {"x": 1.5}
