"""What a job reads and writes besides its arguments: datasets, shipped files, result files.

Client side. ``JobData`` is built once per job from the user's options and becomes part of the
job's ``meta``, which workers read:

- ``data``: ``DataRef``s listed in the notebook (``resolve``), each as a plain dict; with
  ``shard_over`` items, item ``i`` sees ``ref.sharded(i, shard_over)``, otherwise every item
  sees every file;
- ``data_keys``: one key per task (the hash of the files its items read), so the scheduler can
  send a rerun to the worker whose cache holds them;
- ``ship``: files uploaded once to the gateway's blob store, addressed by SHA-256, placed by
  the worker in the task's working directory under the same relative path;
- ``results``: where result files go (``""``: the gateway's blob store; else an fsspec URL).

Secrets are never pickled into a job: storage options that hold one are refused (there is no
encrypted connection to carry them); workers use their own credentials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway._dataref import DataRef, resolve, shard
from gateway._errors import ConfigError, DataError

__all__ = ["JobData", "ShippedFile", "data_from_meta", "files_to_ship"]


@dataclass(frozen=True)
class ShippedFile:
    path: str  # relative, as the task will see it
    digest: str
    size: int


@dataclass(frozen=True)
class JobData:
    refs: tuple[DataRef, ...] = ()
    shard_over: int = 0  # number of items the files are split across; 0: no split
    ship: tuple[ShippedFile, ...] = ()
    results: str = ""

    @classmethod
    def build(
        cls,
        data: Mapping[str, str | DataRef] | None,
        *,
        n_items: int,
        shard: bool,
        mode: str = "local",
        storage_options: Mapping[str, Any] | None = None,
        ship: Sequence[ShippedFile] = (),
        results: str = "",
    ) -> JobData:
        """Resolve every dataset now: a missing bucket or object, no permission, or a backend
        that is not installed fails here, before any task starts (``DataError``)."""
        refs = []
        for name, url in (data or {}).items():
            ref = (
                url
                if isinstance(url, DataRef)
                else resolve(
                    name, url, mode=mode, storage_options=dict(storage_options or {}) or None
                )
            )
            if ref.has_secrets:
                raise ConfigError(
                    f"--data {name}: the storage options hold a secret, and a job is not the "
                    "place for one (nothing encrypts it on the way). Give the workers their "
                    "own credentials instead (AWS_* variables, ~/.aws, fsspec config)."
                )
            refs.append(ref)
        return cls(tuple(refs), n_items if shard and refs else 0, tuple(ship), results)

    @property
    def empty(self) -> bool:
        return not (self.refs or self.ship or self.results)

    def meta(self, n_items: int, chunk: int) -> dict[str, Any]:
        """The job ``meta`` entries for this data (nothing when there is none)."""
        if self.empty:
            return {}
        out: dict[str, Any] = {}
        if self.refs:
            out["data"] = [_ref_to_dict(r) for r in self.refs]
            out["data_shards"] = self.shard_over
            out["data_keys"] = self.task_keys(n_items, chunk)
        if self.ship:
            out["ship"] = [asdict(f) for f in self.ship]
        if self.results:
            out["results"] = self.results
        return out

    def task_keys(self, n_items: int, chunk: int) -> list[str]:
        keys = []
        for start in range(0, n_items, chunk):
            h = hashlib.sha256()
            for i in range(start, min(start + chunk, n_items)):
                for ref in self.refs:
                    files = shard(ref.files, i, self.shard_over) if self.shard_over else ref.files
                    for f in files:
                        h.update(f.encode() + b"\0")
            keys.append(h.hexdigest()[:24])
        return keys


def _ref_to_dict(ref: DataRef) -> dict[str, Any]:
    return {
        "name": ref.name,
        "url": ref.url,
        "files": list(ref.files),
        "mode": ref.mode,
        "storage_options": ref.storage_options,
    }


def data_from_meta(meta: Mapping[str, Any]) -> tuple[list[DataRef], int]:
    """Worker side: the job's ``DataRef``s and the number of items they are split across."""
    refs = [
        DataRef(d["name"], d["url"], tuple(d["files"]), d["mode"], d.get("storage_options"))
        for d in meta.get("data") or ()
    ]
    return refs, int(meta.get("data_shards") or 0)


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
