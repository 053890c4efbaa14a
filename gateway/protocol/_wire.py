"""Framing and signing: messages to ZeroMQ frames and back.

A message on the wire is the multipart::

    [routing ids..., b"PILOT/1", signature, header, body, *buffers]

``header`` is a msgpack map (``msg_id``, ``msg_type``, ``session``, ``date``, ``version``);
``body`` the msgpack array of the message's fields in declaration order, with nested records
and ``Payload``s as msgpack extension types; ``buffers`` hold payload bytes too large to inline.

The signature is HMAC-SHA256 (key from the connection file) over the header, the body and the
BLAKE3 digest of every buffer, in order (``frame_digest``). ``Codec.decode`` checks size,
protocol frame, signature (``hmac.compare_digest``), replay (per-session increasing sequence
numbers and a date window) and version **before** it decodes a byte of the body. Buffer digests
are kept on the decoded ``Payload`` so that forwarding it (gateway to worker) does not hash it
again.

A ``Codec`` with ``key=None`` neither signs nor verifies: it is for the worker's private IPC
channel to its own task processes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import itertools
import os
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any, NamedTuple

import msgpack

from gateway.protocol import _messages
from gateway.protocol._digest import frame_digest
from gateway.protocol._errors import (
    AuthenticationError,
    MessageTooLarge,
    ProtocolError,
    VersionMismatch,
)
from gateway.protocol._messages import Payload
from gateway.protocol._vocabulary import MESSAGE_TYPES, RECORD_TYPES

__all__ = [
    "PROTOCOL_FRAME",
    "VERSION",
    "Codec",
    "Envelope",
    "pack_record",
    "unpack_record",
]

PROTOCOL_MAJOR = 2  # 2: buffer digests are BLAKE3 (1 had SHA-256)
VERSION = "2.0"
PROTOCOL_FRAME = f"PILOT/{PROTOCOL_MAJOR}".encode()
INLINE_MAX_BYTES = 64 * 1024  # payload data larger than this travels as its own frame

_EXT_PAYLOAD = 1
_EXT_RECORD = 2

_TYPE_BY_NAME = {cls.__name__: cls for cls in MESSAGE_TYPES}
_NAME_OF = {cls: cls.__name__ for cls in MESSAGE_TYPES}
_RECORD_CODE = {cls: i for i, cls in enumerate(RECORD_TYPES)}
_NFIELDS = {cls: len(fields(cls)) for cls in (*MESSAGE_TYPES, *RECORD_TYPES)}
# A record's or message's field values in declaration order (a tuple), one C call.
_GETTERS = {
    cls: attrgetter(*(f.name for f in fields(cls))) if len(fields(cls)) > 1 else None
    for cls in (*MESSAGE_TYPES, *RECORD_TYPES)
}


def _enum_fields(cls: type) -> tuple[tuple[int, dict[int, enum.IntEnum]], ...]:
    """(position, the enum's members by value) of each field typed with an ``IntEnum``."""
    # the names its module sees (``_messages``, or ``_monitoring`` that extends it)
    hints = typing.get_type_hints(cls, {**vars(_messages), **vars(sys.modules[cls.__module__])})
    out = []
    for pos, f in enumerate(fields(cls)):
        hint = hints[f.name]
        if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
            out.append((pos, dict(hint._value2member_map_)))  # type: ignore[arg-type]
    return tuple(out)


# Fields that travel as ints and are decoded back into their enum (an unknown value is a
# malformed message).
_ENUMS = {cls: e for cls in (*MESSAGE_TYPES, *RECORD_TYPES) if (e := _enum_fields(cls))}


def _construct(cls: type, values: tuple[Any, ...]) -> Any:
    conv = _ENUMS.get(cls)
    if conv is None:
        return cls(*values[: _NFIELDS[cls]])
    vals = list(values[: _NFIELDS[cls]])
    for pos, members in conv:
        if pos < len(vals):  # a field an older peer does not send keeps its default
            vals[pos] = members[vals[pos]]  # KeyError: not a member (a malformed message)
    return cls(*vals)


def _field_values(obj: Any) -> Any:
    getter = _GETTERS[type(obj)]
    if getter is not None:
        return getter(obj)
    return [getattr(obj, name) for name in obj.__slots__]


class Envelope(NamedTuple):
    """A decoded message with what the header said about it."""

    msg: Any
    msg_id: str
    session: str
    date: float


class Codec:
    """Encode and decode messages for one peer role.

    Owned by one socket's user; not thread-safe (the sequence counter and the replay state).
    ``accept`` limits which message types ``decode`` lets through (None: all).
    """

    def __init__(
        self,
        key: bytes | str | None,
        *,
        max_message_bytes: int = 1 << 30,
        replay_window_s: float = 300.0,
        accept: Sequence[type] | None = None,
    ) -> None:
        if isinstance(key, str):
            key = bytes.fromhex(key)
        self._key = key
        # HMAC-SHA256 (RFC 2104) with the key schedule done once: each message copies the two
        # keyed hash states (cheaper than hmac.new, or HMAC.copy, per message).
        self._inner = self._outer = None
        if key is not None:
            block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
            self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
            self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        self.max_message_bytes = max_message_bytes
        self.replay_window_s = replay_window_s
        self._accept = frozenset(accept) if accept is not None else None
        self.session = os.urandom(8).hex()
        self._seq = itertools.count(1)
        self._last_seq: dict[str, tuple[int, float]] = {}  # session -> (highest seq, date)
        self.rejected: dict[str, int] = {}
        self._packers: list[msgpack.Packer] = [msgpack.Packer()]
        self._depth = 0
        self._frames: list[Any] = []
        self._digests: list[bytes] = []
        self.last_msg_id = ""
        # what the payloads of the body being decoded refer to (see _ext_hook)
        self._buffers: list[memoryview] = []
        self._known: tuple[bytes, ...] = ()
        self._ext = self._ext_hook

    # -- encode ---------------------------------------------------------------------------

    def encode(self, msg: Any) -> list[Any]:
        """Frames for ``msg`` (without routing ids). Raises ``MessageTooLarge``."""
        cls = type(msg)
        name = _NAME_OF.get(cls)
        if name is None:
            raise ProtocolError(f"{cls.__name__} is not a protocol message")
        self._frames, self._digests = frames, digests = [], []
        try:
            body = self._pack(_field_values(msg))
        finally:
            self._frames, self._digests = [], []
        seq = next(self._seq)
        self.last_msg_id = f"{self.session}:{seq}"
        header = self._packers[0].pack(
            {
                "msg_id": self.last_msg_id,
                "msg_type": name,
                "session": self.session,
                "date": time.time(),
                "version": VERSION,
            }
        )
        size = len(header) + len(body) + sum(memoryview(f).nbytes for f in frames)
        if size > self.max_message_bytes:
            raise MessageTooLarge(
                f"A {cls.__name__} message of {size:,} bytes is over the limit of "
                f"{self.max_message_bytes:,} bytes. Pass large data by reference (--data URL, "
                "--ship PATH), or raise the limit with PILOT_MAX_MESSAGE_BYTES on both sides."
            )
        return [PROTOCOL_FRAME, self._sign(header, body, digests), header, body, *frames]

    def _pack(self, obj: Any) -> bytes:
        # msgpack packers are not reentrant, and records nest: one packer per depth, reused.
        depth = self._depth = self._depth + 1
        try:
            if depth == len(self._packers):
                self._packers.append(msgpack.Packer(default=self._default))
            return self._packers[depth].pack(obj)
        finally:
            self._depth -= 1

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, Payload):
            return self._pack_payload(obj)
        code = _RECORD_CODE.get(type(obj))
        if code is not None:
            return msgpack.ExtType(_EXT_RECORD, self._pack((code, *_field_values(obj))))
        raise TypeError(f"cannot encode {type(obj).__name__} in a message")

    def _pack_payload(self, p: Payload) -> msgpack.ExtType:
        inline = p.data if len(p.data) <= INLINE_MAX_BYTES else None
        out = ([] if inline is not None else [p.data]) + list(p.buffers)
        known = p.digests
        if known is not None and len(known) == len(out):
            self._digests.extend(known)
        elif self._key is not None:
            self._digests.extend(frame_digest(b) for b in out)
        start = len(self._frames)
        self._frames.extend(out)
        head = (inline, start, len(out), p.refs) if p.refs else (inline, start, len(out))
        return msgpack.ExtType(_EXT_PAYLOAD, self._pack(head))

    def _sign(self, header: Any, body: Any, digests: Sequence[bytes]) -> bytes:
        if self._inner is None or self._outer is None:
            return b""
        inner = self._inner.copy()
        inner.update(header)
        inner.update(body)
        for d in digests:
            inner.update(d)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest().encode()

    # -- decode ---------------------------------------------------------------------------

    def decode(self, frames: Sequence[Any]) -> Envelope:
        """Verify and decode ``[protocol, signature, header, body, *buffers]``.

        Raises ``MessageTooLarge``, ``VersionMismatch``, ``AuthenticationError`` or
        ``ProtocolError``; the rejection is counted in ``rejected``.
        """
        try:
            return self._decode(frames)
        except ProtocolError as exc:
            reason = type(exc).__name__
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            raise

    def _decode(self, frames: Sequence[Any]) -> Envelope:
        views = [memoryview(f) for f in frames]
        size = sum(v.nbytes for v in views)
        if size > self.max_message_bytes:
            raise MessageTooLarge(
                f"Refused a message of {size:,} bytes: the limit is {self.max_message_bytes:,}."
            )
        if len(views) < 4:
            raise ProtocolError(f"Truncated message: {len(views)} frames, at least 4 expected.")
        proto, signature, header, body = views[:4]
        buffers = views[4:]
        if proto != PROTOCOL_FRAME:
            if bytes(proto[:6]) == b"PILOT/":
                raise VersionMismatch(
                    f"Peer speaks {bytes(proto).decode(errors='replace')}, this side speaks "
                    f"{PROTOCOL_FRAME.decode()}: install the same major version of "
                    "parallel-pilot on both sides."
                )
            raise ProtocolError("Not a Parallel Pilot message (bad protocol frame).")
        digests: tuple[bytes, ...] = ()
        if self._key is not None:
            digests = tuple(frame_digest(b) for b in buffers)
            expected = self._sign(header, body, digests)
            if not hmac.compare_digest(expected, bytes(signature)):
                raise AuthenticationError("Bad signature: the sender does not have our key.")
        try:
            head = msgpack.unpackb(header, raw=False)
            msg_id, msg_type = head["msg_id"], head["msg_type"]
            session, date, version = head["session"], float(head["date"]), head["version"]
        except Exception as exc:
            raise ProtocolError(f"Malformed header: {exc}") from exc
        if str(version).split(".")[0] != str(PROTOCOL_MAJOR):
            raise VersionMismatch(
                f"Peer speaks protocol {version}, this side speaks {VERSION}: install the same "
                "major version of parallel-pilot on both sides."
            )
        if self._key is not None:
            self._check_replay(msg_id, session, date)
        cls = _TYPE_BY_NAME.get(msg_type)
        if cls is None or (self._accept is not None and cls not in self._accept):
            raise ProtocolError(f"Unexpected message type {msg_type!r} on this socket.")
        try:
            msg = self._build(cls, body, buffers, digests)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"Malformed {msg_type} body: {exc}") from exc
        return Envelope(msg, msg_id, session, date)

    def _check_replay(self, msg_id: str, session: str, date: float) -> None:
        now = time.time()
        if abs(now - date) > self.replay_window_s:
            raise AuthenticationError(
                f"Message {msg_id} is dated {now - date:+.0f}s from now, outside the replay "
                f"window of {self.replay_window_s:.0f}s (are the clocks in sync?)."
            )
        try:
            seq = int(str(msg_id).rsplit(":", 1)[1])
        except (IndexError, ValueError):
            raise AuthenticationError(f"Malformed message id {msg_id!r}.") from None
        last = self._last_seq.get(session)
        if last is not None and seq <= last[0]:
            raise AuthenticationError(f"Replayed message {msg_id}: refused.")
        self._last_seq[session] = (seq, now)
        if len(self._last_seq) > 4096:  # forget sessions older than the window
            cutoff = now - self.replay_window_s
            self._last_seq = {s: v for s, v in self._last_seq.items() if v[1] >= cutoff}

    def _build(
        self, cls: type, body: memoryview, buffers: list[memoryview], digests: tuple[bytes, ...]
    ) -> Any:
        self._buffers, self._known = buffers, digests
        try:
            values = msgpack.unpackb(body, ext_hook=self._ext, use_list=False, raw=False)
        finally:
            self._buffers, self._known = [], ()
        if not isinstance(values, tuple):
            raise ProtocolError("Body is not an array.")
        return _construct(cls, values)

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_RECORD:
            values = msgpack.unpackb(data, ext_hook=self._ext, use_list=False, raw=False)
            return _construct(RECORD_TYPES[values[0]], values[1:])
        if code == _EXT_PAYLOAD:
            inline, start, count, *more = msgpack.unpackb(data, use_list=False, raw=False)
            buffers = self._buffers
            if start < 0 or start + count > len(buffers):
                raise ProtocolError("Payload refers to missing frames.")
            parts = buffers[start : start + count]
            known = self._known[start : start + count] if self._known else None
            refs = _refs(more[0]) if more else ()
            if inline is None:
                if not parts:
                    raise ProtocolError("Payload without data.")
                return Payload(parts[0], tuple(parts[1:]), known, refs)
            return Payload(inline, tuple(parts), known, refs)
        raise ProtocolError(f"Unknown extension type {code}.")


def _refs(value: Any) -> tuple[tuple[int, str], ...]:
    """A payload's blob references, checked: (position, key) pairs in increasing positions."""
    refs = tuple((pos, key) for pos, key in value)
    if any(type(p) is not int or type(k) is not str or p < 0 for p, k in refs) or any(
        a[0] >= b[0] for a, b in itertools.pairwise(refs)
    ):
        raise ProtocolError("Malformed buffer references in a payload.")
    return refs


_RECORDS = None  # the unsigned codec that packs records for storage, made on first use


def pack_record(record: Any) -> bytes:
    """``record`` (a message or record type, no payloads inside) as bytes, the way the wire
    carries it: every field, nested records typed. For storage (the gateway keeps job specs and
    outputs this way, so a field added to the protocol is stored too)."""
    global _RECORDS
    codec = _RECORDS = _RECORDS or Codec(None)
    codec._frames, codec._digests = [], []
    try:
        data = codec._pack(record)
        if codec._frames:
            raise ProtocolError(f"{type(record).__name__} holds a payload: it cannot be stored")
        return data
    finally:
        codec._frames, codec._digests = [], []


def unpack_record(data: bytes) -> Any:
    """The record ``pack_record`` made. Raises ``ProtocolError`` for bytes it did not make."""
    global _RECORDS
    codec = _RECORDS = _RECORDS or Codec(None)
    try:
        return msgpack.unpackb(data, ext_hook=codec._ext, use_list=False, raw=False)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"Not a stored record: {exc}") from exc
