"""What ``bench/render.py`` watches from outside the cluster while it renders.

- ``FrameFileWatcher``: when each frame file was saved on this machine's workers (its
  ``st_mtime_ns``), polled every ``POLL_S`` from a thread: nothing in the protocol carries a
  frame's save time, and the preview latency is measured from it.
- ``ClusterCpu``: the CPU seconds of a ``LocalCluster``'s processes (Parallel Pilot's own) and
  of the Blenders they started and reaped.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

import psutil

import pilot

__all__ = ["POLL_S", "ClusterCpu", "FrameFileWatcher"]

# The frame-folder watcher's period. A frame's time is its file's mtime, so this only has to
# catch the file before its chunk ends and removes the folder; each poll costs this process
# (which shares the 2 cores with the Blenders being timed) a glob and a stat per frame.
POLL_S = 0.05
_FRAME_FILE = re.compile(r"^frame_(\d+)\.png$")


class FrameFileWatcher:
    """Polls the frame folders of one job on this machine's workers and keeps each frame
    file's latest ``st_mtime_ns`` (a file seen mid-write is stat'ed again on the next poll).
    A context manager: the thread runs inside ``with``; ``watch(job_id)`` says which job."""

    def __init__(self, home: Path) -> None:
        self._home = home
        self._job = ""
        self.saved_ns: dict[int, int] = {}  # frame -> mtime
        self.chunk_of: dict[int, str] = {}  # frame -> its chunk folder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-watcher", daemon=True)

    def __enter__(self) -> FrameFileWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def watch(self, job_id: str) -> None:
        self.saved_ns, self.chunk_of = {}, {}
        self._job = job_id

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            if self._job:
                self._poll(self._job)

    def _poll(self, job: str) -> None:
        for folder in self._home.glob(f"cache/*/jobs/{job}/.pilot-frames/*"):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:  # the chunk ended and removed it
                continue
            for entry in entries:
                if not (m := _FRAME_FILE.match(entry.name)):
                    continue
                try:
                    mtime = entry.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                frame = int(m.group(1))
                self.saved_ns[frame] = max(mtime, self.saved_ns.get(frame, 0))
                self.chunk_of[frame] = folder.name


class ClusterCpu:
    """CPU seconds of a ``LocalCluster``'s processes: the gateway, the workers and their task
    processes (their own time: Parallel Pilot's cost), and the Blenders those task processes
    started and reaped (their children's time). ``take()`` returns a snapshot; ``since(a)``
    the seconds spent since snapshot ``a`` (a process started since counts from zero)."""

    def __init__(self, cluster: pilot.LocalCluster) -> None:
        self._cluster = cluster

    def take(self) -> dict[int, tuple[float, float]]:
        roots = [p for p in (self._cluster.gateway, *self._cluster.workers) if p is not None]
        snap: dict[int, tuple[float, float]] = {}
        for root in roots:
            try:
                proc = psutil.Process(root.pid)
                procs = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    if p.name().startswith("blender"):
                        continue  # counted by its task process once reaped
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                snap[p.pid] = (t.user + t.system, t.children_user + t.children_system)
        return snap

    def spares(self) -> int:
        """Idle spare Blenders of the task processes (``worker._blender_spare``: they wait in
        ``/``, and move to their chunk's directory once they have one)."""
        found = 0
        for root in (p for p in self._cluster.workers if p is not None):
            with contextlib.suppress(psutil.Error):
                for p in psutil.Process(root.pid).children(recursive=True):
                    found += p.name() == "blender" and p.cwd() == "/"
        return found

    @staticmethod
    def since(
        before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
    ) -> tuple[float, float]:
        """(Parallel Pilot's processes' own CPU s, their reaped children's CPU s)."""
        own = children = 0.0
        for pid, (o, c) in after.items():
            o0, c0 = before.get(pid, (0.0, 0.0))
            own, children = own + o - o0, children + c - c0
        return own, children
