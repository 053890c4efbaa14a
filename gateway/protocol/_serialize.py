"""Pickling user values into ``Payload``s: cloudpickle, protocol 5, buffers out-of-band.

Plain data goes through the C pickler (fast); anything it cannot handle (lambdas, classes
defined in a notebook) through cloudpickle, by value. Large contiguous buffers (numpy, torch,
bytes-like objects that support protocol 5) are not copied into the pickle stream: they travel
as their own frames and are loaded zero-copy on the other side.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import site
import sys
import sysconfig
from types import ModuleType
from typing import Any

import cloudpickle

from gateway.protocol._errors import SerializationError
from gateway.protocol._messages import Payload

__all__ = ["digest_of", "dumps", "dumps_function", "loads"]

PROTOCOL = 5
OOB_MIN_BYTES = 64 * 1024  # smaller buffers stay in the stream: a frame costs more than a copy


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
    """Unpickle a payload. Only ever called on payloads whose signature was verified."""
    return pickle.loads(payload.data, buffers=payload.buffers)


def digest_of(payload: Payload) -> str:
    """A payload's blob digest: the SHA-256 (hex) of its data then each buffer, as the blob
    store computes it (a function travels and is fetched under this digest)."""
    h = hashlib.sha256(payload.data)
    for buf in payload.buffers:
        h.update(buf)
    return h.hexdigest()
