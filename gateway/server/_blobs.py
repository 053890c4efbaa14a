"""The blob store: payloads too big for the database, addressed by content hash.

A directory of files named by SHA-256 (two-level fan-out). A stored payload is a small msgpack
header (the length of the data and of each buffer) followed by the raw bytes; reading maps the
file, so a large result is loaded without a copy. Owned by the gateway.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from pathlib import Path

import msgpack

from gateway.protocol import Payload

__all__ = ["BlobStore", "known_key", "pack_payload", "unpack_payload"]

_LEN = struct.Struct("<I")


def pack_payload(p: Payload) -> bytes:
    """A payload as one bytes object (for the database: small payloads only)."""
    return msgpack.packb([bytes(p.data), [bytes(b) for b in p.buffers]])


def unpack_payload(raw: bytes) -> Payload:
    data, buffers = msgpack.unpackb(raw, use_list=False)
    return Payload(data, tuple(buffers))


class BlobStore:
    """Content-addressed files under ``root``. ``put`` is idempotent."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, p: Payload, key: str | None = None) -> str:
        """Store ``p``; return its digest, or store it under ``key`` (64 hex digits the caller
        derived from the content, e.g. from digests it already has) and return that. Writes to
        a temporary file, then renames."""
        parts = [memoryview(p.data), *(memoryview(b).cast("B") for b in p.buffers)]
        if key is None:
            h = hashlib.sha256()
            for part in parts:
                h.update(part)
            digest = h.hexdigest()
        else:
            digest = key
        path = self._path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(exist_ok=True)
        head = msgpack.packb([part.nbytes for part in parts])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(_LEN.pack(len(head)))
            fh.write(head)
            for part in parts:
                fh.write(part)
        os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> Payload:
        """Map the stored payload. Raises ``FileNotFoundError`` if it is not there."""
        with open(self._path(digest), "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        (hlen,) = _LEN.unpack(view[: _LEN.size])
        sizes = msgpack.unpackb(view[_LEN.size : _LEN.size + hlen])
        pos = _LEN.size + hlen
        parts = []
        for size in sizes:
            parts.append(view[pos : pos + size])
            pos += size
        return Payload(parts[0], tuple(parts[1:]))

    def path(self, digest: str) -> Path:
        return self._path(digest)


def known_key(p: Payload) -> str | None:
    """A blob key for ``p`` made from the SHA-256 of its frames that the codec computed when it
    verified them (``Payload.digests``), so a 100 MB argument is not hashed a second time. The
    key hashes a tag and every part's digest: content-addressed, and apart from plain content
    digests. None when the digests are not known."""
    known = p.digests
    if not known:
        return None
    if len(known) == len(p.buffers):  # the data travelled inline: hash it (it is small)
        known = (hashlib.sha256(p.data).digest(), *known)
    elif len(known) != len(p.buffers) + 1:
        return None
    return hashlib.sha256(b"pilot-payload-v1\0" + b"".join(known)).hexdigest()
