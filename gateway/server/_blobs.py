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
import threading
from pathlib import Path
from typing import Any

import msgpack

from gateway.protocol import Payload, Submit

__all__ = ["BlobStore", "known_key", "pack_payload", "unpack_payload", "write_ahead"]

_LEN = struct.Struct("<I")


def pack_payload(p: Payload) -> bytes:
    """A payload as one bytes object (for the database: small payloads only)."""
    parts = [bytes(p.data), [bytes(b) for b in p.buffers]]
    return msgpack.packb([*parts, [list(r) for r in p.refs]] if p.refs else parts)


def unpack_payload(raw: bytes) -> Payload:
    data, buffers, *refs = msgpack.unpackb(raw, use_list=False)
    return Payload(data, tuple(buffers), None, _refs(refs[0] if refs else ()))


def _refs(pairs: Any) -> tuple[tuple[int, str], ...]:
    """Stored blob references as ``Payload.refs`` (older rows and files have none)."""
    return tuple((int(pos), str(key)) for pos, key in pairs)


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
        sizes = [part.nbytes for part in parts]
        head = msgpack.packb([sizes, [list(r) for r in p.refs]] if p.refs else sizes)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")  # two may write
        with open(tmp, "wb") as fh:
            fh.write(_LEN.pack(len(head)))
            fh.write(head)
            for part in parts:
                fh.write(part)
        os.replace(tmp, path)
        return digest

    def put_checked(self, digest: str, p: Payload) -> bool:
        """Store ``p`` under ``digest`` if that is its content's: the SHA-256 of its parts (a
        function, a shipped file), or the BLAKE3 of its one frame that the codec verified (an
        argument's buffer: nothing is hashed again). False, storing nothing, otherwise."""
        known = p.digests
        if known and len(known) == 1 and not p.buffers and known[0].hex() == digest:
            self.put(p, key=digest)
            return True
        stored = self.put(p)
        if stored != digest:
            self._path(stored).unlink(missing_ok=True)
            return False
        return True

    def get(self, digest: str) -> Payload:
        """Map the stored payload. Raises ``FileNotFoundError`` if it is not there."""
        with open(self._path(digest), "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        (hlen,) = _LEN.unpack(view[: _LEN.size])
        head = msgpack.unpackb(view[_LEN.size : _LEN.size + hlen], use_list=False)
        # [sizes, refs], or only the sizes for a payload without references
        sizes, refs = (head, ()) if type(head[0]) is int else head
        pos = _LEN.size + hlen
        parts = []
        for size in sizes:
            parts.append(view[pos : pos + size])
            pos += size
        return Payload(parts[0], tuple(parts[1:]), None, _refs(refs))

    def path(self, digest: str) -> Path:
        return self._path(digest)


def write_ahead(blobs: BlobStore, msg: Any) -> None:
    """Store a ``Submit``'s blobs (on the thread that decoded it: ``_offloop``). The loop checks
    them again when it handles the message, and finds them stored."""
    if isinstance(msg, Submit):
        for blob in msg.blobs:
            blobs.put_checked(blob.digest, blob.data)


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
    refs = "".join(f"{pos}:{key};" for pos, key in p.refs).encode()  # they are content too
    return hashlib.sha256(b"pilot-payload-v1\0" + b"".join(known) + refs).hexdigest()
