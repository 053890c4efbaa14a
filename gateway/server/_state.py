"""The gateway's state in SQLite: jobs, tasks, attempts, results, kept outputs.

WAL mode, one connection owned by the gateway's loop (another, on a thread, checkpoints: ``_wal``).
Writes are buffered and committed together by ``flush()``, which the server calls once per loop
turn (group commit), so a burst of thousands of results costs one transaction. A gateway killed
at any point restarts from the last committed turn: ``unfinished_jobs()`` is what it resumes.

Payloads (functions, task arguments, results) small enough live in the database; larger ones in
the blob store, referenced by digest. Job specs are stored without secrets (``_secrets``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.protocol import (
    JobInfo,
    JobSpec,
    Output,
    Payload,
    Status,
    TaskDone,
    TaskStatus,
    pack_record,
    unpack_record,
)
from gateway.server._blobs import BlobStore, known_key, pack_payload, unpack_payload
from gateway.server._schema import prepare
from gateway.server._secrets import for_disk
from gateway.server._wal import Checkpointer, hold_state

__all__ = ["StateStore", "UnfinishedJob"]

log = logging.getLogger("pilot.gateway")

KNOWN_JOBS_CHUNK = 900  # ids per query (SQLite allows 999 parameters by default)
_JOB_RUNNING = "UPDATE jobs SET state=? WHERE id=? AND state=?"


@dataclass(frozen=True, slots=True)
class UnfinishedJob:
    spec: JobSpec
    settled: tuple[int, ...]
    out: tuple[tuple[int, int, str], ...]  # (index, attempt, worker) without an outcome
    created: float = 0.0
    owner: str = ""


class StateStore:
    """See the module docstring. Not thread-safe: one owner, the gateway loop."""

    def __init__(self, path: Path, blobs: BlobStore, *, inline_bytes: int = 1 << 20) -> None:
        self.blobs = blobs
        self.inline_bytes = inline_bytes
        with contextlib.ExitStack() as undo:  # what is open so far, closed if opening fails
            self._lock = hold_state(path.parent)  # a second gateway here fails, saying so
            undo.callback(os.close, self._lock)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            undo.callback(self._db.close)
            prepare(self._db, path.parent)
            undo.pop_all()
        self._checkpointer = Checkpointer(path)
        self._pending: dict[str, list[tuple[Any, ...]]] = {}
        # jobs that started running since the last flush; a job that also ended meanwhile
        # needs one write, not two (short jobs start and end within one turn)
        self._running: dict[str, None] = {}
        self._failure: sqlite3.Error | None = None  # the last commit's error, until one works

    def close(self) -> None:
        self.blobs.close()
        self.flush()
        self._checkpointer.close()
        self._db.close()
        os.close(self._lock)

    # -- buffered writes --------------------------------------------------------------------

    def _later(self, sql: str, row: tuple[Any, ...]) -> None:
        self._pending.setdefault(sql, []).append(row)

    @property
    def healthy(self) -> bool:
        """False while the last commit failed (its rows wait in memory for the next one), or
        too many blobs wait to be written (``BlobStore.full``)."""
        return self._failure is None and not self.blobs.full

    def flush(self) -> bool:
        """Commit everything buffered in one transaction. Returns True when everything written
        so far is on disk. A failed commit (a full disk, ``SQLITE_FULL``) is rolled back, logged
        with its traceback, and keeps its rows buffered for the next call: nothing is lost, and
        the caller must not send what those rows record."""
        if not self._pending and not self._running:
            return self._failure is None
        pending = dict(self._pending)
        if self._running:
            rows = [(int(Status.RUNNING), job_id, int(Status.QUEUED)) for job_id in self._running]
            pending[_JOB_RUNNING] = rows
        try:
            with self._db:
                self._db.execute("BEGIN")
                for sql, rows in pending.items():
                    self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            if self._failure is None:
                log.exception("could not commit the gateway's state; holding it in memory")
            self._failure = exc
            return False
        self._checkpointer.poke()
        if self._failure is not None:
            log.warning("the gateway's state is written again (%s is over)", self._failure)
        self._failure = None
        self._pending = {}
        self._running = {}
        return True

    def page_count(self) -> int:
        """The database's size in pages (see ``limit_pages``)."""
        return int(self._db.execute("PRAGMA page_count").fetchone()[0])

    def limit_pages(self, pages: int) -> None:
        """Cap the database at ``pages`` pages (0: no cap beyond SQLite's own): an operator's
        limit on how much state the gateway may keep; writes past it fail like a full disk."""
        self._db.execute(f"PRAGMA max_page_count = {int(pages) or 4294967294}")

    def _payload_columns(self, p: Payload) -> tuple[bytes | None, str | None]:
        if p.nbytes <= self.inline_bytes:
            return pack_payload(p), None
        return None, self.blobs.put(p, key=known_key(p))

    def _payload_from(self, raw: bytes | None, ref: str | None) -> Payload:
        return unpack_payload(raw) if raw is not None else self.blobs.get(ref or "")

    def add_job(self, spec: JobSpec, now: float, owner: str = "") -> None:
        """The job (its spec but secrets) and who submitted it; its tasks: ``add_tasks``."""
        packed = pack_record(for_disk(spec))
        self._later(
            "INSERT OR IGNORE INTO jobs (id, name, n_tasks, spec, state, error, created, owner) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (spec.job_id, spec.name, spec.n_tasks, packed, int(Status.QUEUED), "", now, owner),
        )

    def add_tasks(self, job_id: str, args: Sequence[Payload], start: int, end: int) -> None:
        """The arguments of tasks ``start`` to ``end - 1`` (``args`` holds every task's)."""
        sql = "INSERT OR IGNORE INTO tasks (job_id, idx, args, args_ref) VALUES (?,?,?,?)"
        rows = self._pending.setdefault(sql, [])
        for i in range(start, end):
            raw, ref = self._payload_columns(args[i])
            rows.append((job_id, i, raw, ref))

    def attempt_assigned(self, job_id: str, index: int, attempt: int, worker: str) -> None:
        self._later(
            "INSERT OR REPLACE INTO attempts (job_id, idx, attempt, worker, assigned) "
            "VALUES (?,?,?,?,?)",
            (job_id, index, attempt, worker, time.time()),
        )

    def attempt_ended(
        self, job_id: str, index: int, attempt: int, status: int, error: str, started: float
    ) -> None:
        """One write per attempt end (its start time was kept in memory until now)."""
        self._later(
            "UPDATE attempts SET status=?, error=?, started=?, finished=? "
            "WHERE job_id=? AND idx=? AND attempt=?",
            (int(status), error, started, time.time(), job_id, index, attempt),
        )

    def task_settled(self, done: TaskDone) -> None:
        raw, ref = self._payload_columns(done.value) if done.value is not None else (None, None)
        self._later(
            "UPDATE tasks SET status=?, value=?, value_ref=?, error=?, worker=?, attempts=?, "
            "duration_s=?, finished=?, item=?, args=NULL "
            "WHERE job_id=? AND idx=? AND status IS NULL",
            (
                int(done.status),
                raw,
                ref,
                done.error,
                done.worker,
                done.attempts,
                done.duration_s,
                time.time(),
                done.item,
                done.job_id,
                done.index,
            ),
        )

    def job_settled(self, job_id: str, state: Status, error: str, done: int, failed: int) -> None:
        self._running.pop(job_id, None)
        self._later(
            "UPDATE jobs SET state=?, error=?, finished=?, done=?, failed=? WHERE id=?",
            (int(state), error, time.time(), done, failed, job_id),
        )

    def job_running(self, job_id: str) -> None:
        self._running[job_id] = None

    def add_output(self, out: Output) -> None:
        record = pack_record(out)
        self._later(
            "INSERT INTO outputs (job_id, idx, record) VALUES (?,?,?)",
            (out.job_id, out.index, record),
        )

    # -- reads ------------------------------------------------------------------------------

    def known_jobs(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` are stored (committed): one query per thousand ids."""
        found: set[str] = set()
        for i in range(0, len(job_ids), KNOWN_JOBS_CHUNK):
            chunk = job_ids[i : i + KNOWN_JOBS_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT id FROM jobs WHERE id IN ({marks})"
            found.update(row[0] for row in self._db.execute(sql, chunk))
        return found

    def task_args(self, job_id: str, index: int) -> Payload:
        row = self._db.execute(
            "SELECT args, args_ref FROM tasks WHERE job_id=? AND idx=?", (job_id, index)
        ).fetchone()
        if row is None or (row[0] is None and row[1] is None):
            raise KeyError(f"no arguments stored for task {job_id}[{index}]")
        return self._payload_from(*row)

    def task_args_from(self, job_id: str, start: int, count: int) -> dict[int, Payload]:
        """The stored arguments of the unsettled tasks ``start`` to ``start + count - 1``."""
        rows = self._db.execute(
            "SELECT idx, args, args_ref FROM tasks WHERE job_id=? AND idx>=? AND idx<? "
            "AND status IS NULL",
            (job_id, start, start + count),
        )
        return {i: self._payload_from(raw, ref) for i, raw, ref in rows if raw or ref}

    def job_spec(self, job_id: str) -> tuple[JobSpec, Status, str] | None:
        row = self._db.execute(
            "SELECT spec, state, error FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        return unpack_record(row[0]), Status(row[1]), row[2]

    def job_owner(self, job_id: str) -> str | None:
        """Who submitted the stored job ``job_id`` (None: no such job stored)."""
        row = self._db.execute("SELECT owner FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else row[0] or ""

    def unfinished_jobs(self) -> list[UnfinishedJob]:
        out = []
        for raw, created, owner in self._db.execute(
            # a literal bound, so that the partial index of unfinished jobs applies
            f"SELECT spec, created, owner FROM jobs WHERE state < {int(Status.DONE)} ORDER BY 2",
        ).fetchall():
            spec: JobSpec = unpack_record(raw)
            settled = tuple(
                i
                for (i,) in self._db.execute(
                    "SELECT idx FROM tasks WHERE job_id=? AND status IS NOT NULL", (spec.job_id,)
                )
            )
            running = self._db.execute(
                "SELECT a.idx, a.attempt, a.worker FROM attempts a JOIN tasks t "
                "ON a.job_id=t.job_id AND a.idx=t.idx WHERE a.job_id=? AND a.status IS NULL "
                "AND t.status IS NULL AND a.attempt = (SELECT MAX(attempt) FROM attempts b "
                "WHERE b.job_id=a.job_id AND b.idx=a.idx)",
                (spec.job_id,),
            ).fetchall()
            out.append(UnfinishedJob(spec, settled, tuple(running), created, owner or ""))
        return out

    def settled_tasks(
        self, job_id: str, known: bytes = b"", start: int = 0, end: int | None = None
    ) -> list[TaskDone]:
        """The settled tasks of ``job_id`` in index order, from ``start`` to before ``end``,
        but those ``known`` marks (one byte per index, nonzero: the asker has it already;
        ``AttachJob.known``)."""
        sql = (
            "SELECT idx, status, value, value_ref, error, worker, attempts, duration_s, item "
            "FROM tasks WHERE job_id=? AND status IS NOT NULL AND idx >= ? AND idx < ?"
        )
        span = (job_id, start, (1 << 62) if end is None else end)
        if not known:
            rows: Iterable[tuple[Any, ...]] = self._db.execute(sql + " ORDER BY idx", span)
        else:  # the indices first (a restart's half a million rows: 0.2 s, not 1 s)
            where = "FROM tasks WHERE job_id=? AND status IS NOT NULL AND idx >= ? AND idx < ?"
            ids = self._db.execute(f"SELECT idx {where} ORDER BY idx", span)
            missed = [i for (i,) in ids if i >= len(known) or not known[i]]
            rows = []
            for k in range(0, len(missed), 500):  # 500 bound parameters a query
                part = missed[k : k + 500]
                sql_part = f"{sql} AND idx IN ({','.join('?' * len(part))}) ORDER BY idx"
                rows += self._db.execute(sql_part, (*span, *part))
        return [
            TaskDone(
                job_id,
                idx,
                TaskStatus(status),
                self._payload_from(raw, ref) if (raw is not None or ref) else None,
                error or "",
                worker or "",
                attempts or 0,
                duration or 0.0,
                -1 if item is None else item,
            )
            for idx, status, raw, ref, error, worker, attempts, duration, item in rows
        ]

    def outputs(self, job_id: str, index: int = -1) -> list[Output]:
        sql = "SELECT idx, record FROM outputs WHERE job_id=?"
        params: tuple[Any, ...] = (job_id,)
        if index >= 0:
            sql += " AND idx=?"
            params += (index,)
        result = []
        for _idx, record in self._db.execute(sql + " ORDER BY seq", params):
            result.append(unpack_record(record))
        return result

    def jobs(self, limit: int = 50, owner: str | None = None) -> list[JobInfo]:
        """The latest ``limit`` jobs, of ``owner`` only unless None."""
        where, params = ("WHERE owner=? ", (owner, limit)) if owner is not None else ("", (limit,))
        rows = self._db.execute(
            "SELECT id, name, state, n_tasks, done, failed, created, finished, error, owner "
            f"FROM jobs {where}ORDER BY created DESC LIMIT ?",
            params,
        ).fetchall()
        return [
            JobInfo(i, n, Status(s), nt, d or 0, f or 0, c, fin or 0.0, e or "", owner=o or "")
            for i, n, s, nt, d, f, c, fin, e, o in rows
        ]

    def job_info(self, job_id: str) -> JobInfo | None:
        """The stored row of job ``job_id`` (None: no such job)."""
        cols = "id, name, state, n_tasks, done, failed, created, finished, error, owner"
        row = self._db.execute(f"SELECT {cols} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        i, n, s, nt, d, f, c, fin, e, o = row
        return JobInfo(i, n, Status(s), nt, d or 0, f or 0, c, fin or 0.0, e or "", owner=o or "")

    def attempts(self, job_id: str) -> list[tuple[Any, ...]]:
        """A job's attempts: (index, attempt, worker, status, assigned, started, finished, its
        task's run time as measured by the worker), times wall-clock or None, in order."""
        return self._db.execute(
            "SELECT a.idx, a.attempt, a.worker, a.status, a.assigned, a.started, a.finished, "
            "t.duration_s FROM attempts a LEFT JOIN tasks t ON t.job_id=a.job_id AND t.idx=a.idx "
            "WHERE a.job_id=? ORDER BY a.idx, a.attempt",
            (job_id,),
        ).fetchall()

    def failed_tasks(self, job_id: str, limit: int) -> list[tuple[int, int, str, str]]:
        """A job's first ``limit`` tasks that ended not OK: (index, item, worker, error)."""
        return self._db.execute(
            "SELECT idx, item, worker, error FROM tasks WHERE job_id=? AND status IS NOT NULL "
            "AND status != ? ORDER BY idx LIMIT ?",
            (job_id, int(TaskStatus.OK), limit),
        ).fetchall()
