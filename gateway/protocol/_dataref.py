"""References to datasets in storage: what `--data NAME=URL` turns into.

The notebook side calls :func:`resolve` once per ``--data`` option. It lists the URL *on the
client* (with the client's credentials), and returns a :class:`DataRef`: the sorted list of
fully-qualified file URLs, never their bytes. The job carries the ``DataRef``; each partition
takes its contiguous slice with :func:`shard`, and the worker turns that slice into local
cached paths (``worker._datasets.materialize``). The gateway never carries dataset bytes.

Credentials: a ``DataRef`` holds ``storage_options`` only when the user passed them
explicitly. Workers otherwise use their own environment (``AWS_*`` variables, fsspec config),
so no credential is pickled into a job by default. ``repr`` redacts secret-looking options.

fsspec is imported lazily, inside :func:`resolve`: building or sharding a ``DataRef`` needs no
storage backend.
"""

from __future__ import annotations

import dataclasses
import keyword
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol._errors import DataError

__all__ = ["MODES", "DataError", "DataRef", "redact", "resolve", "shard"]

#: ``local``: the task gets local cached file paths; ``open``: fsspec ``OpenFile`` objects.
MODES = ("local", "open")

# Option names that hold secrets. Matched as substrings, case-insensitively, so nested and
# backend-specific spellings (aws_secret_access_key, sas_token, client_secret...) are caught.
_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|auth|session|signature", re.I)
_REDACTED = "***"
_GLOB_CHARS = ("*", "?", "[")
# Named in the "unknown scheme" message, so a typo's fix is in sight.
_COMMON_SCHEMES = ("s3", "gs", "az", "abfs", "http", "https", "hf", "file", "memory")


def redact(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Return a copy of ``options`` with secret-looking values replaced by ``"***"``.

    Recurses into nested mappings (``client_kwargs``, ``config_kwargs``). Used by ``repr`` and
    by anyone who logs storage options.
    """
    if options is None:
        return None
    out: dict[str, Any] = {}
    for name, value in options.items():
        if _SECRET_KEY.search(str(name)) and value is not None:
            out[name] = _REDACTED
        elif isinstance(value, Mapping):
            out[name] = redact(value)
        else:
            out[name] = value
    return out


def _has_secrets(options: Mapping[str, Any] | None) -> bool:
    for name, value in (options or {}).items():
        if _SECRET_KEY.search(str(name)) and value is not None:
            return True
        if isinstance(value, Mapping) and _has_secrets(value):
            return True
    return False


@dataclass(frozen=True)
class DataRef:
    """A named, listed dataset: ``files`` are sorted fully-qualified URLs.

    Built by :func:`resolve` on the client; immutable; pickled into the job. ``storage_options``
    are passed to fsspec on the worker as they are; they are excluded from hashing and
    redacted in ``repr``. A caller that ships a ``DataRef`` whose :attr:`has_secrets` is true
    must do so over an encrypted connection only.
    """

    name: str
    url: str
    files: tuple[str, ...]
    mode: str = "local"
    storage_options: dict[str, Any] | None = field(default=None, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or keyword.iskeyword(self.name):
            raise DataError(
                f"--data name {self.name!r} is not a Python identifier: "
                "write --data NAME=URL with NAME like images or train_files"
            )
        if self.mode not in MODES:
            raise DataError(f"Unknown data mode {self.mode!r}: use one of {', '.join(MODES)}")
        # Own copies: a caller mutating its dict or list later must not change the reference.
        object.__setattr__(self, "files", tuple(self.files))
        if self.storage_options is not None:
            object.__setattr__(self, "storage_options", dict(self.storage_options))

    def sharded(self, index: int, count: int) -> DataRef:
        """This reference narrowed to partition ``index`` of ``count`` (see :func:`shard`)."""
        return dataclasses.replace(self, files=shard(self.files, index, count))

    @property
    def has_secrets(self) -> bool:
        """True when ``storage_options`` hold a value that ``repr`` would redact."""
        return _has_secrets(self.storage_options)

    def __repr__(self) -> str:
        return (
            f"DataRef(name={self.name!r}, url={self.url!r}, files=<{len(self.files)} files>, "
            f"mode={self.mode!r}, storage_options={redact(self.storage_options)!r})"
        )


def shard(files: Sequence[str], index: int, count: int) -> tuple[str, ...]:
    """Return partition ``index`` of ``count`` contiguous, even slices of ``files``.

    Sizes differ by at most one; the first ``len(files) % count`` shards get the extra file.
    Deterministic: the same inputs give the same shard on every machine. Raises
    ``ValueError`` when ``count < 1`` or ``index`` is outside ``range(count)``.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"index must be in range({count}), got {index}")
    base, extra = divmod(len(files), count)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return tuple(files[start:stop])


def resolve(
    name: str,
    url: str,
    *,
    mode: str = "local",
    storage_options: Mapping[str, Any] | None = None,
) -> DataRef:
    """List ``url`` and return a :class:`DataRef` named ``name``.

    ``url`` is any fsspec URL or a plain local path. It may be a glob (``*``, ``?``, ``[``;
    only files match, use ``**`` to descend), a directory or prefix (all files below it,
    recursively), or a single file. Called on the client, with the client's credentials plus
    ``storage_options``. Raises :class:`DataError` when nothing matches, access is denied,
    the scheme is unknown or its backend is not installed, or listing fails otherwise.
    """
    options = dict(storage_options or {})
    # Validate before touching the network: a typo in NAME or MODE should not cost a listing.
    DataRef(name, url, (), mode, options or None)
    fs, path = _filesystem(url, options)
    fs.invalidate_cache()  # fsspec keeps listings per filesystem instance: list afresh
    try:
        files = _list_files(fs, path)
    except FileNotFoundError as exc:
        raise DataError(f"No files match {url}: {_missing_hint(fs, path)}") from exc
    except PermissionError as exc:
        raise DataError(
            f"Permission denied listing {url} ({exc}): check the credentials this notebook "
            "uses (AWS_* environment variables, a profile, or --data storage options) and "
            "that they may list and read this location"
        ) from exc
    except Exception as exc:
        # Anything else (an unreachable endpoint is a botocore error, not an OSError) still
        # becomes a DataError that names the URL, with the original chained.
        raise DataError(
            f"Could not list {url}: {type(exc).__name__}: {exc}; check the endpoint, the "
            "network and the storage options"
        ) from exc
    if not files:
        raise DataError(f"No files match {url}: {_missing_hint(fs, path)}")
    qualified = sorted(fs.unstrip_protocol(p) for p in files)
    return DataRef(name, url, tuple(qualified), mode, options or None)


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """Return ``(fs, path)`` for ``url``; missing backends become a :class:`DataError`."""
    import fsspec.core
    from fsspec.registry import known_implementations

    scheme = fsspec.core.split_protocol(url)[0] or "file"
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        # fsspec raises ImportError(known_implementations[scheme]["err"]) from the
        # ModuleNotFoundError of the backend package; name the package to install.
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        module = getattr(cause, "name", None)
        if not module:
            cls = known_implementations.get(scheme, {}).get("class", "")
            module = cls.split(".")[0]
        package = module.split(".")[0] if module else "the backend package"
        raise DataError(
            f"Cannot read {url}: the {scheme}:// backend is not installed ({exc}). "
            f"Run `pip install {package}` where the notebook runs and on every worker"
        ) from exc
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise DataError(f"Invalid data URL {url}: {exc}") from exc
        common = [s for s in _COMMON_SCHEMES if s in known_implementations]
        raise DataError(
            f"Unknown storage scheme {scheme}:// in {url}: use an fsspec URL such as "
            f"s3://bucket/prefix/*.png or a local path (schemes: {', '.join(common)}; all "
            "in fsspec.available_protocols())"
        ) from exc


def _list_files(fs: Any, path: str) -> list[str]:
    """Expand a glob, a directory/prefix, or a single file into file paths (no protocol)."""
    if any(ch in path for ch in _GLOB_CHARS):
        matches = fs.glob(path, detail=True)
        return [p for p, info in matches.items() if info.get("type") != "directory"]
    info = fs.info(path)
    if info.get("type") == "directory":
        return list(fs.find(path))
    return [info.get("name", path)]


def _missing_hint(fs: Any, path: str) -> str:
    """Say what to check when nothing matched; names a missing bucket when it can tell."""
    generic = "check the bucket and prefix, or the path and pattern, and that the files exist"
    bucket = path.split("/", 1)[0]
    # Object stores (s3, gs, az...) have no root marker and the bucket is the first part of
    # the path; http paths keep their "scheme://" and have no bucket.
    if not bucket or fs.root_marker != "" or "://" in path:
        return generic
    try:
        exists = fs.exists(bucket)
    except OSError:
        # Only a hint: the caller raises the real error with its cause chained.
        return generic
    if exists:
        return generic
    return (
        f"the bucket {bucket!r} does not exist, or these credentials cannot see it; "
        "check the bucket name, the endpoint and the credentials"
    )
