"""The state database's log is checkpointed by a thread, never by the loop's commits, and one
gateway at a time holds a state directory (``gateway.server._wal``).

A real SQLite database and a real ``flock``; the second holder is a real gateway process.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.protocol import ConfigError, JobKind, JobSpec, dumps
from gateway.server._blobs import BlobStore
from gateway.server._state import StateStore
from tests_support import wait_until

ROWS = 4_000
ROW_BYTES = 500  # inline arguments: 2 MB of rows, which the log holds until a checkpoint


def _store(state: Path) -> StateStore:
    return StateStore(state / "state.sqlite", BlobStore(state / "blobs"))


def test_commits_on_the_loop_never_checkpoint_and_the_thread_does(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        db = tmp_path / "state.sqlite"
        empty = db.stat().st_size
        store.add_job(JobSpec("j1", "f", JobKind.MAP, "digest", ROWS), time.time())
        store.add_tasks("j1", [dumps(bytes(ROW_BYTES))] * ROWS, 0, ROWS)
        assert store.flush()
        # The rows reach the database file only through a checkpoint, and the loop's
        # connection runs none: the thread's did.
        wait_until(
            lambda: (
                store._checkpointer.checkpoints >= 1
                and db.stat().st_size > empty + ROWS * ROW_BYTES // 2
            ),
            what="the checkpointer copies the log into the database",
        )
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "state.sqlite") as reread:  # all there after close
        assert reread.execute("SELECT count(*) FROM tasks").fetchone()[0] == ROWS


def test_a_second_store_on_the_same_state_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    first = _store(tmp_path)
    with pytest.raises(ConfigError, match=r"in use by another gateway.*another --state"):
        _store(tmp_path)
    first.close()
    _store(tmp_path).close()


def test_a_second_gateway_process_on_the_same_state_fails_and_says_why(tmp_path: Path) -> None:
    store = _store(tmp_path)  # this process holds it, as a running gateway would
    try:
        second = subprocess.run(
            [sys.executable, "-m", "pilot", "gateway", "--state", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        store.close()
    assert second.returncode != 0
    assert "in use by another gateway" in second.stderr, second.stderr
