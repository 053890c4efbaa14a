"""What a task sees of a ``--data`` dataset: local cached paths or fsspec ``OpenFile`` objects.

The worker calls :func:`materialize` in the task process with the partition's
:class:`~gateway._dataref.DataRef` (already narrowed with ``DataRef.sharded``). Bytes come
straight from storage through fsspec, never through the gateway, and land in the worker's
:class:`~worker._cache.DiskCache`.

Credentials: this module passes ``ref.storage_options`` (if the user gave any) to fsspec and
nothing else. It never reads ``os.environ``: s3fs/botocore and fsspec's config read the
worker's own environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3``, profiles...).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from gateway.protocol import DataError, DataRef
from worker._cache import DiskCache

if TYPE_CHECKING:  # fsspec is imported on first use: most tasks read no dataset
    import fsspec.core
    from fsspec import AbstractFileSystem

__all__ = ["filesystem", "materialize", "version_token"]

# One filesystem per (scheme, options) per process: building an s3fs client (botocore
# session, connection pool, credential lookup) costs far more than a lookup here.
_FILESYSTEMS: dict[tuple[str, str], AbstractFileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()

# info() keys that identify a version of an object, best first, across fsspec backends.
_ETAG_KEYS = ("ETag", "etag", "e_tag", "Content-MD5", "Digest")
_MTIME_KEYS = (
    "mtime", "LastModified", "Last-Modified", "last_modified", "updated", "modified", "created",
)  # fmt: skip


def materialize(ref: DataRef, cache: DiskCache | None = None) -> list[Any]:
    """Return what the task binds to ``ref.name``, one item per ``ref.files``, same order.

    Mode ``"local"``: local file paths (``str``) in ``cache``, downloading only files whose
    current version is not cached yet; the paths stay in use until ``cache.release()``.
    Mode ``"open"``: ``fsspec.core.OpenFile`` objects, nothing downloaded (``cache`` unused).

    Raises :class:`DataError` naming the URL when a file vanished since the job was
    submitted, this worker may not read it, or storage fails otherwise.
    """
    options = ref.storage_options or {}
    if ref.mode == "open":
        return [_open(url, options) for url in ref.files]
    if cache is None:
        raise ValueError(f"materialize({ref.name!r}) in local mode needs a DiskCache")
    return [str(_fetch(url, options, cache)) for url in ref.files]


def filesystem(url: str, storage_options: Mapping[str, Any]) -> tuple[AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``url``, reusing this process's filesystem for the same
    scheme and options."""
    import fsspec.core

    scheme, sep, _ = url.partition("://")
    if not sep or "::" in url:
        # Local paths and chained URLs: fsspec's own instance cache is enough here.
        return fsspec.core.url_to_fs(url, **storage_options)
    key = (scheme, json.dumps(storage_options, sort_keys=True, default=repr))
    with _FILESYSTEMS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs, path = fsspec.core.url_to_fs(url, **storage_options)
            _FILESYSTEMS[key] = fs
            return fs, path
    return fs, fs._strip_protocol(url)


def version_token(info: Mapping[str, Any]) -> str:
    """A string that changes when the object changes: its ETag where the store gives one
    (s3, gcs, http), else its modification time and size, else its size alone."""
    for name in _ETAG_KEYS:
        if info.get(name):
            return f"etag:{str(info[name]).strip(chr(34))}"
    size = info.get("size")
    for name in _MTIME_KEYS:
        if info.get(name) is not None:
            return f"mtime:{info[name]}:size:{size}"
    return f"size:{size}"


def _open(url: str, options: Mapping[str, Any]) -> fsspec.core.OpenFile:
    import fsspec.core

    with _as_data_error(url):
        return fsspec.core.OpenFile(*filesystem(url, options), mode="rb")


def _fetch(url: str, options: Mapping[str, Any], cache: DiskCache) -> Any:
    with _as_data_error(url):
        fs, path = filesystem(url, options)
        # A long-lived worker must see objects replaced or deleted since it last listed.
        fs.invalidate_cache(path)
        version = version_token(fs.info(path))
        return cache.get(url, lambda dest: fs.get_file(path, dest), version)


@contextlib.contextmanager
def _as_data_error(url: str) -> Iterator[None]:
    """Convert storage errors for ``url`` into :class:`DataError` with a fix in the message."""
    try:
        yield
    except FileNotFoundError as exc:
        raise DataError(
            f"{url} no longer exists: it was listed when the job was submitted and was "
            "deleted or moved since; re-run the cell to list the data again"
        ) from exc
    except PermissionError as exc:
        raise DataError(
            f"Permission denied reading {url} on this worker ({exc}): workers use their own "
            "credentials (AWS_* environment variables, profiles, fsspec config); give this "
            "worker read access"
        ) from exc
    except DataError:
        raise
    except Exception as exc:
        # An unreachable endpoint is a botocore error, not an OSError: name the URL anyway.
        raise DataError(f"Could not fetch {url}: {type(exc).__name__}: {exc}") from exc
