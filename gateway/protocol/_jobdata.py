"""What a job reads and writes besides its arguments: datasets, shipped files, result files.

Client side. ``build_job_data`` makes a job's ``JobData`` record (``_messages``) once from the
user's options; it travels typed in ``JobSpec.data`` and ``Assignment.data``:

- ``refs``: ``DataRef``s listed in the notebook (``resolve``); with ``shard_over`` items, item
  ``i`` sees ``ref.sharded(i, shard_over)``, otherwise every item sees every file;
- ``task_keys``: one key per task (the hash of the files its items read, ``JobSpec.data_keys``),
  so the scheduler can send a rerun to the worker whose cache holds them;
- ``ship``: files uploaded once to the gateway's blob store, addressed by SHA-256, placed by
  the worker in the task's working directory under the same relative path;
- ``results_url``: where result files go (``""``: the gateway's blob store; else fsspec).

Storage options that hold a secret travel in a job only over an encrypted connection (a
``--secure`` gateway: ``secure=True``); elsewhere they are refused and workers use their own
credentials. The gateway keeps such secrets in memory only (``docs/security.md``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.protocol._dataref import DataRef, resolve, shard
from gateway.protocol._errors import ConfigError, DataError
from gateway.protocol._messages import JobData, ShippedFile

__all__ = ["build_job_data", "files_to_ship", "task_keys"]


def build_job_data(
    data: Mapping[str, str | DataRef] | None,
    *,
    n_items: int,
    shard: bool,
    mode: str = "local",
    storage_options: Mapping[str, Any] | None = None,
    ship: Sequence[ShippedFile] = (),
    results_url: str = "",
    secure: bool = False,
) -> JobData | None:
    """A job's ``JobData``, or None when it reads and writes nothing besides its arguments.

    Every dataset is resolved now: a missing bucket or object, no permission, or a backend that
    is not installed fails here, before any task starts (``DataError``). Storage options that
    hold a secret are refused (``ConfigError``) unless ``secure``: the connection to the
    gateway, and the gateway's to its workers, are encrypted.
    """
    refs = []
    for name, url in (data or {}).items():
        ref = (
            url
            if isinstance(url, DataRef)
            else resolve(name, url, mode=mode, storage_options=dict(storage_options or {}) or None)
        )
        if ref.has_secrets and not secure:
            raise ConfigError(
                f"--data {name}: the storage options hold a secret, and this gateway does not "
                "encrypt (start it with --secure to send secrets with a job). Or give the "
                "workers their own credentials (AWS_* variables, ~/.aws, fsspec config)."
            )
        refs.append(ref)
    if not (refs or ship or results_url):
        return None
    return JobData(tuple(refs), n_items if shard and refs else 0, tuple(ship), results_url)


def task_keys(data: JobData | None, n_items: int, chunk: int) -> tuple[str, ...]:
    """One locality key per task: the hash of the files its items read (empty without data)."""
    if data is None or not data.refs:
        return ()
    keys = []
    for start in range(0, n_items, chunk):
        h = hashlib.sha256()
        for i in range(start, min(start + chunk, n_items)):
            for ref in data.refs:
                files = shard(ref.files, i, data.shard_over) if data.shard_over else ref.files
                for f in files:
                    h.update(f.encode() + b"\0")
        keys.append(h.hexdigest()[:24])
    return tuple(keys)


def files_to_ship(paths: Iterable[str | Path]) -> list[tuple[ShippedFile, Path]]:
    """Each file under ``paths`` (files or directories), with its digest. Raises
    ``DataError`` for a path that does not exist."""
    out = []
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise DataError(f"--ship {raw}: no such file or directory here.")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        base = root.parent
        for f in files:
            digest = _sha256_file(f)
            rel = f.relative_to(base).as_posix()
            out.append((ShippedFile(rel, digest, f.stat().st_size), f))
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
