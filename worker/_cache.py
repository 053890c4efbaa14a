"""A bounded content cache on a worker's local disk, shared by its task processes.

Task processes of one worker are separate OS processes that may want the same object at the
same moment. :class:`DiskCache` coordinates them through the file system only:

- An entry lives at ``ROOT/objects/DIGEST/BASENAME``, where DIGEST hashes (url, version) and
  BASENAME is the object's own file name (so ``Path(p).name`` and the extension are what the
  user expects). A new version of an object is a new entry; the old one ages out.
- A miss takes an exclusive ``flock`` on ``ROOT/locks/DIGEST.lock``, downloads into
  ``ROOT/tmp`` and ``os.replace``-s the file into place, so readers only ever see whole files
  and a second process that wants the same object waits for the first and reuses its file.
- Recency is the file's mtime, bumped on every hit (atime is unreliable: noatime/relatime).
  When the total passes ``max_bytes``, the least recently used entries are deleted down to
  ``LOW_WATER`` of the bound. Entries handed out by this process (until :meth:`release`) and
  entries another process is downloading are skipped.

Counters (:meth:`stats`) are per process: each task process reports its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.protocol import DataError

__all__ = ["CacheStats", "DiskCache", "parse_size"]

log = logging.getLogger(__name__)

#: Default wait for another process's download of the same object before giving up.
LOCK_TIMEOUT_S = 600.0
_LOCK_POLL_MIN_S = 0.002
_LOCK_POLL_MAX_S = 0.05
#: Eviction frees space down to this fraction of ``max_bytes``, so that a cache at its bound
#: does not rescan the directory on every miss.
LOW_WATER = 0.9
#: Other processes add files too; rescan at least this often to see them.
RESCAN_INTERVAL_S = 2.0
_MAX_NAME_CHARS = 120

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$", re.I)


def parse_size(text: str | int) -> int:
    """Parse ``"20GB"``, ``"512 MiB"``, ``"1.5TB"`` or ``"4096"`` into a number of bytes.

    Units: B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), in any
    case. Raises ``ValueError`` naming the accepted units.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"A size cannot be negative: {text}")
        return text
    match = _SIZE.match(text)
    unit = (match.group(2) or "b").lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(
            f"Cannot read size {text!r}: write a number and a unit, like 20GB or 512MiB "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """What one process's :class:`DiskCache` did: lookups served from disk, downloads, the
    bytes those downloads wrote, entries this process evicted, and lookups that waited for
    another process's download of the same entry (then counted as hits)."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    evictions: int = 0
    waits: int = 0


class DiskCache:
    """A disk cache under ``root`` holding at most about ``max_bytes``, safe across processes.

    Each task process builds its own ``DiskCache`` on the worker's shared ``root``; the object
    owns no open resources between calls (locks are held only inside :meth:`get` and
    eviction). ``max_bytes`` can be exceeded only by entries that are in use (see
    :meth:`get`) or, briefly, by files other processes added since this one last looked.
    """

    def __init__(
        self, root: Path | str, max_bytes: int, *, lock_timeout_s: float = LOCK_TIMEOUT_S
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock_timeout_s = lock_timeout_s
        self._objects = self.root / "objects"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        for directory in (self._objects, self._locks, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._in_use: set[str] = set()
        self._stats = CacheStats()
        self._approx_bytes = 0  # last scanned total plus what this process added since
        self._last_scan = float("-inf")

    def path_for(self, url: str, version: str) -> Path:
        """Where the entry for ``(url, version)`` lives (whether or not it exists yet)."""
        digest = _digest(url, version)
        return self._objects / digest / _basename(url)

    def get(self, url: str, fetch: Callable[[str], object], version: str) -> Path:
        """Return a local path holding ``url`` at ``version``, downloading it once if needed.

        ``fetch(dest)`` must write the whole object to the local path ``dest`` (a temporary
        file; the cache moves it into place). It is called at most once per entry across all
        processes sharing ``root``: a process that finds another one downloading the same
        entry waits for it (up to ``lock_timeout_s``, then :class:`DataError`) and reuses its
        file. Exceptions from ``fetch`` propagate and leave nothing behind.

        The returned entry is in use by this process, and eviction here skips it, until
        :meth:`release`.
        """
        digest = _digest(url, version)
        final = self._objects / digest / _basename(url)
        # Fast path without a lock: entries appear atomically, so existing means complete.
        if _touch(final):
            return self._hit(digest, final)
        with self._key_lock(digest, url):
            if _touch(final):  # another process fetched it while we waited for the lock
                return self._hit(digest, final)
            size = self._download(fetch, digest, final)
        self._in_use.add(digest)
        self._stats = _bump(self._stats, misses=1, bytes_fetched=size)
        self._approx_bytes += size
        stale = time.monotonic() - self._last_scan > RESCAN_INTERVAL_S
        if self._approx_bytes > self.max_bytes or stale:
            self.evict()
        return final

    def release(self) -> None:
        """Let eviction remove the entries :meth:`get` handed out so far (end of a task)."""
        self._in_use.clear()

    def stats(self) -> CacheStats:
        """Counters for this process since the cache object was made."""
        return self._stats

    def total_bytes(self) -> int:
        """Bytes in complete entries on disk now, across all processes."""
        return sum(size for _, size, _, _ in self._scan())

    def evict(self) -> int:
        """Delete least recently used entries until the total is at most ``LOW_WATER`` of
        ``max_bytes``, if it is over ``max_bytes``; return how many entries went.

        Runs in one process at a time (others skip it); skips entries in use by this process
        and entries whose key lock another process holds.
        """
        with _try_lock(self.root / "evict.lock") as held:
            if not held:
                return 0
            entries = self._scan()
            self._last_scan = time.monotonic()
            total = sum(size for _, size, _, _ in entries)
            removed = 0
            if total > self.max_bytes:
                goal = int(self.max_bytes * LOW_WATER)
                for mtime_ns, size, digest, path in sorted(entries):
                    if total <= goal:
                        break
                    if digest not in self._in_use and self._remove(digest, path, mtime_ns):
                        total -= size
                        removed += 1
                if total > self.max_bytes:
                    log.warning(
                        "Dataset cache %s holds %d bytes, over its %d-byte bound, in files "
                        "that are in use; raise --cache-size or use more partitions",
                        self.root,
                        total,
                        self.max_bytes,
                    )
            self._approx_bytes = total
            self._stats = _bump(self._stats, evictions=removed)
            self._clean_tmp()
            return removed

    def _hit(self, digest: str, final: Path) -> Path:
        self._in_use.add(digest)
        self._stats = _bump(self._stats, hits=1)
        return final

    def _download(self, fetch: Callable[[str], object], digest: str, final: Path) -> int:
        tmp = self._tmp / f"{digest}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            fetch(str(tmp))
            size = tmp.stat().st_size
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            _touch(final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    @contextlib.contextmanager
    def _key_lock(self, digest: str, url: str) -> Iterator[None]:
        path = self._locks / f"{digest}.lock"
        deadline = time.monotonic() + self._lock_timeout_s
        wait_s = _LOCK_POLL_MIN_S
        while True:
            with _try_lock(path) as held:
                if held:
                    yield
                    return
            if wait_s == _LOCK_POLL_MIN_S:
                log.debug("Waiting for another process to download %s", url)
                self._stats = _bump(self._stats, waits=1)
            # Polling (not a blocking flock) so that the wait has a deadline.
            if time.monotonic() >= deadline:
                raise DataError(
                    f"Timed out after {self._lock_timeout_s:.0f} s waiting for another task "
                    f"process on this worker to download {url}: check that worker's tasks, "
                    f"or remove {path} if no process holds it"
                )
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, _LOCK_POLL_MAX_S)

    def _remove(self, digest: str, path: Path, scanned_mtime_ns: int) -> bool:
        lock_path = self._locks / f"{digest}.lock"
        with _try_lock(lock_path) as held:
            if not held:
                return False  # being downloaded right now
            try:
                if path.stat().st_mtime_ns != scanned_mtime_ns:
                    return False  # used since the scan: no longer the least recent
                path.unlink()
            except FileNotFoundError:
                return False
            with contextlib.suppress(OSError):  # not empty or already gone: harmless
                path.parent.rmdir()
            # Deleted while held: a process waiting on the old inode notices and retries.
            lock_path.unlink(missing_ok=True)
            return True

    def _scan(self) -> list[tuple[int, int, str, Path]]:
        """(mtime_ns, size, digest, path) of every complete entry."""
        entries = []
        with contextlib.suppress(FileNotFoundError):
            for key_dir in os.scandir(self._objects):
                # Entries come and go under other processes: vanished ones are skipped.
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    for item in os.scandir(key_dir.path):
                        st = item.stat()
                        entries.append((st.st_mtime_ns, st.st_size, key_dir.name, Path(item.path)))
        return entries

    def _clean_tmp(self) -> None:
        """Remove partial downloads left by processes that died mid-download."""
        for item in self._tmp.glob("*.part"):
            parts = item.name.split(".")
            if len(parts) == 4 and parts[1].isdigit() and not _alive(int(parts[1])):
                item.unlink(missing_ok=True)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` if it is free now; yield whether it is held.

    Checks after locking that ``path`` still names the locked inode: an evictor may have
    deleted the lock file, and locking a deleted file would exclude nobody.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            current = os.stat(path)
        except FileNotFoundError:
            yield False
            return
        mine = os.fstat(fd)
        yield (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _touch(path: Path) -> bool:
    """Mark ``path`` as just used; False when it does not exist."""
    # An explicit nanosecond clock, not utime's default "now": the kernel's file timestamps
    # are coarse (a few ms), and LRU order needs two quick uses to differ.
    now_ns = time.time_ns()
    try:
        os.utime(path, ns=(now_ns, now_ns))
    except FileNotFoundError:
        return False
    return True


def _digest(url: str, version: str) -> str:
    return hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:40]


def _basename(url: str) -> str:
    """The object's file name, made safe for a local path; keeps the extension."""
    if url.startswith(("http://", "https://")):
        url = url.split("?", 1)[0].split("#", 1)[0]
    name = re.sub(r"[^A-Za-z0-9._=+-]", "_", url.rstrip("/").rsplit("/", 1)[-1])
    name = name[-_MAX_NAME_CHARS:]
    return name if name.strip(".") else "data"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bump(stats: CacheStats, **deltas: int) -> CacheStats:
    return dataclasses.replace(stats, **{k: getattr(stats, k) + v for k, v in deltas.items()})
