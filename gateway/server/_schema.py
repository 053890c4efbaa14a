"""The gateway's database: its tables, and opening one (``prepare``).

``prepare`` sets the connection's pragmas (WAL; a checkpoint never inside a commit: ``_wal``'s
thread runs them), creates what is missing and brings a state written by an older Parallel
Pilot up to date, or says it cannot. ``StateStore`` (``_state``) reads and writes the rows.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.protocol import ConfigError

__all__ = ["SCHEMA", "prepare"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT, n_tasks INTEGER, spec BLOB, state INTEGER, error TEXT,
    created REAL, finished REAL, done INTEGER DEFAULT 0, failed INTEGER DEFAULT 0,
    owner TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT, idx INTEGER, args BLOB, args_ref TEXT,
    status INTEGER, value BLOB, value_ref TEXT, error TEXT, worker TEXT,
    attempts INTEGER DEFAULT 0, duration_s REAL, finished REAL, item INTEGER,
    PRIMARY KEY (job_id, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT, idx INTEGER, attempt INTEGER, worker TEXT, status INTEGER, error TEXT,
    assigned REAL, started REAL, finished REAL, PRIMARY KEY (job_id, idx, attempt))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outputs (
    job_id TEXT, idx INTEGER, seq INTEGER PRIMARY KEY AUTOINCREMENT, record BLOB);
CREATE INDEX IF NOT EXISTS outputs_by_task ON outputs (job_id, idx);
DROP INDEX IF EXISTS jobs_by_state;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (created) WHERE state < 2;
"""


def prepare(db: sqlite3.Connection, state_dir: Path) -> None:
    """Ready ``db`` (the state in ``state_dir``) for the gateway: pragmas, tables, upgrades.
    Raises ``ConfigError`` for a state too old to upgrade."""
    db.execute("PRAGMA page_size=1024")  # a commit logs whole pages; turns are small
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does it
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "spec" not in columns:
        raise ConfigError(
            f"The state in {state_dir} was written by an older Parallel Pilot (its jobs "
            "table has no spec column): give this gateway another --state directory, or "
            "remove that one once its jobs are no longer needed."
        )
    if "owner" not in columns:  # a state from before jobs had owners: the admin's
        db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT DEFAULT ''")
