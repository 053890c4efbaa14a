"""``pilot.cached(key, factory)``: build an object (a model) once per process, reuse it after.

A task process runs many items of a ``map``; a model loaded in the item function would be
loaded once per item. ``cached("model", load)`` calls ``load()`` the first time a process asks
for ``"model"`` and returns that same object every later time. Safe from several threads: one
builds, the others wait for it. A factory that raises caches nothing (the next call tries
again). Objects live until the process exits; nothing is evicted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["cached"]

T = TypeVar("T")

_values: dict[Hashable, Any] = {}
_key_locks: dict[Hashable, threading.Lock] = {}
_lock = threading.Lock()  # guards the two dicts; building happens under the key's own lock
_building: dict[Hashable, int] = {}  # key -> id of the thread running its factory


def cached(key: Hashable, factory: Callable[[], T]) -> T:
    """The object built by ``factory()`` for ``key`` in this process: built on the first call,
    the same object on every later call (whatever ``factory`` those pass). Raises what
    ``factory`` raises, and ``RuntimeError`` when ``factory`` asks for its own ``key``."""
    with _lock:
        if key in _values:
            return _values[key]
        if _building.get(key) == threading.get_ident():
            raise RuntimeError(f"pilot.cached({key!r}): the factory asked for its own key")
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _lock:
            if key in _values:  # another thread built it while we waited
                return _values[key]
            _building[key] = threading.get_ident()
        try:
            value = factory()
        finally:
            with _lock:
                del _building[key]
        with _lock:
            _values[key] = value
        return value
