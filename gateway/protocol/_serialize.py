"""Pickling user values into ``Payload``s: cloudpickle, protocol 5, buffers out-of-band.

Plain data goes through the C pickler (fast); anything it cannot handle (lambdas, classes
defined in a notebook) through cloudpickle, by value. Large contiguous buffers (numpy, torch,
bytes-like objects that support protocol 5) are not copied into the pickle stream: they travel
as their own frames and are loaded zero-copy on the other side. Buffers of a megabyte and more
travel once by content (``split_big_buffers``): the same array passed to ten tasks is sent once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import site
import sys
import sysconfig
from collections.abc import Callable, Collection
from types import ModuleType
from typing import Any

import cloudpickle

from gateway.protocol._digest import frame_digest
from gateway.protocol._errors import SerializationError
from gateway.protocol._messages import Blob, Payload

__all__ = [
    "by_content",
    "digest_of",
    "dumps",
    "dumps_function",
    "loads",
    "split_big_buffers",
    "with_buffers",
]

PROTOCOL = 5
OOB_MIN_BYTES = 64 * 1024  # smaller buffers stay in the stream: a frame costs more than a copy
BLOB_BUFFER_BYTES = 1 << 20  # buffers this big travel as blobs, once per gateway


def dumps(value: Any, *, what: str = "value") -> Payload:
    """Pickle ``value``; ``what`` names it in the error ("argument 'df'").

    Raises ``SerializationError`` that names ``what`` and the cause.
    """
    buffers: list[Any] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OOB_MIN_BYTES:
            return True  # in-band
        buffers.append(raw)
        return False

    try:
        data = pickle.dumps(value, protocol=PROTOCOL, buffer_callback=keep)
    except Exception:
        buffers.clear()
        try:
            data = cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=keep)
        except Exception as exc:
            raise SerializationError(
                f"Cannot send {what}: it cannot be pickled ({type(exc).__name__}: {exc}). "
                "Build it inside the task instead, or pass what it is made from."
            ) from exc
    return Payload(data, tuple(buffers))


def _local_module(fn: Any) -> ModuleType | None:
    """The module defining ``fn`` if workers cannot be expected to import it: a script's or a
    notebook's neighbour (``helpers.py``), not an installed package or the standard library."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if module is None or path is None or module.__name__ == "__main__":
        return None  # __main__ is pickled by value anyway
    if module.__name__.split(".")[0] in _distributed_packages():
        return None  # installed (editable installs too): the worker imports it by name
    path = os.path.realpath(path)
    installed = {os.path.realpath(p) for p in (sysconfig.get_paths()["stdlib"], *site_paths())}
    if any(path.startswith(root + os.sep) for root in installed):
        return None
    return module


@functools.cache
def _distributed_packages() -> frozenset[str]:
    import importlib.metadata  # on first use: it costs a start-up 15 ms, and workers never need it

    return frozenset(importlib.metadata.packages_distributions())


def site_paths() -> list[str]:
    paths = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    return [*paths, *site.getsitepackages(), site.getusersitepackages()]


def dumps_function(fn: Any, *, what: str = "function") -> Payload:
    """Pickle a callable by value with cloudpickle (so notebook functions travel), along with
    the code of a local, not-installed module that defines it."""
    module = _local_module(fn)
    try:
        if module is not None:
            cloudpickle.register_pickle_by_value(module)
        try:
            return Payload(cloudpickle.dumps(fn, protocol=PROTOCOL))
        finally:
            if module is not None:
                cloudpickle.unregister_pickle_by_value(module)
    except Exception as exc:
        raise SerializationError(
            f"Cannot send {what} {getattr(fn, '__name__', fn)!r}: it cannot be pickled "
            f"({type(exc).__name__}: {exc})."
        ) from exc


def loads(payload: Payload) -> Any:
    """Unpickle a payload. Only ever called on payloads whose signature was verified, and
    whose buffers are all in place (``with_buffers``)."""
    if payload.refs:
        raise SerializationError("A payload still refers to blobs: load it with_buffers first.")
    return pickle.loads(payload.data, buffers=payload.buffers)


def split_big_buffers(
    payload: Payload, min_bytes: int = BLOB_BUFFER_BYTES
) -> tuple[Payload, tuple[Blob, ...]]:
    """``payload`` with each buffer of ``min_bytes`` and more taken out, and those buffers as
    blobs, keyed by their BLAKE3 digest (hex): the codec reuses the digest when it signs the
    blob, and the gateway checks the key against the digest it verified, hashing nothing more.
    A payload without such buffers comes back as it is, with no blobs."""
    if payload.refs or not any(memoryview(b).nbytes >= min_bytes for b in payload.buffers):
        return payload, ()
    kept: list[Any] = []
    refs: list[tuple[int, str]] = []
    blobs: list[Blob] = []
    for pos, buf in enumerate(payload.buffers):
        view = memoryview(buf)
        if view.nbytes < min_bytes:
            kept.append(buf)
            continue
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        digest = frame_digest(view)
        refs.append((pos, digest.hex()))
        blobs.append(Blob(digest.hex(), Payload(view, (), (digest,))))
    return Payload(payload.data, tuple(kept), None, tuple(refs)), tuple(blobs)


def by_content(
    args: tuple[Payload, ...], sent: Collection[str], blobs: dict[str, Blob]
) -> tuple[Payload, ...]:
    """A job's ``args`` with their big buffers as references (``split_big_buffers``); each
    buffer not in ``sent`` (the blob keys this gateway has from us) goes into ``blobs``, once
    however many tasks hold it."""
    if not any(a.buffers for a in args):
        return args
    out = []
    for a in args:
        a, big = split_big_buffers(a)
        for blob in big:
            if blob.digest not in sent:
                blobs.setdefault(blob.digest, blob)
        out.append(a)
    return tuple(out)


def with_buffers(payload: Payload, blob: Callable[[str], Any]) -> Payload:
    """``payload`` with the buffers it refers to put back in place; ``blob(key)`` gives one
    (a buffer-like object)."""
    if not payload.refs:
        return payload
    buffers = list(payload.buffers)
    for pos, key in payload.refs:
        if pos > len(buffers):
            raise SerializationError(f"A payload refers to buffer {pos} of {len(buffers)}.")
        buffers.insert(pos, blob(key))
    return Payload(payload.data, tuple(buffers))


def digest_of(payload: Payload) -> str:
    """A payload's blob digest: the SHA-256 (hex) of its data then each buffer, as the blob
    store computes it (a function travels and is fetched under this digest)."""
    h = hashlib.sha256(payload.data)
    for buf in payload.buffers:
        h.update(buf)
    return h.hexdigest()
