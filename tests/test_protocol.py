"""The wire protocol: every message round-trips; bad frames are refused before decoding."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import os
import sys
import time
import typing

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import (
    PROTOCOL_FRAME,
    VERSION,
    AuthenticationError,
    Codec,
    MessageTooLarge,
    Payload,
    ProtocolError,
    VersionMismatch,
    dumps,
    loads,
)
from gateway.protocol import _messages as m
from gateway.protocol import _vocabulary as vocabulary

KEY = os.urandom(32).hex()


def sample(cls: type) -> typing.Any:
    """An instance of a message or record type with a value in every field."""
    hints = typing.get_type_hints(cls, {**vars(m), **vars(sys.modules[cls.__module__])})
    values = {}
    for f in dataclasses.fields(cls):
        values[f.name] = _value_for(hints[f.name], f.name)
    return cls(**values)


def _value_for(tp: typing.Any, name: str) -> typing.Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return list(tp)[-1]  # not the default: a dropped field would show
    if tp is str:
        return {"name": "images", "mode": "open"}.get(name, f"{name}-value")
    if tp is int:
        return 7
    if tp is float:
        return 1.5
    if tp is bool:
        return True
    if tp is bytes:
        return f"{name}-bytes".encode()
    if tp is Payload:
        return dumps({"name": name, "array": np.arange(20_000)})
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _value_for(next(a for a in args if a is not type(None)), name)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return (_value_for(args[0], name),)
        return tuple(_value_for(a, name) for a in args)
    if origin is dict:
        return {"k": [1, "two", 3.0]}
    if dataclasses.is_dataclass(tp):
        return sample(tp)
    if tp is typing.Any:
        return b"any-bytes"
    raise AssertionError(f"no sample for {tp}")


def _equal(a: typing.Any, b: typing.Any) -> bool:
    if isinstance(a, enum.Enum):  # decoded back into the enum, not left a bare int
        return type(a) is type(b) and a == b
    if isinstance(a, Payload):
        return isinstance(b, Payload) and _loads_eq(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            _equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _loads_eq(a: Payload, b: Payload) -> bool:
    x, y = loads(a), loads(b)
    return x["name"] == y["name"] and np.array_equal(x["array"], y["array"])


@pytest.mark.parametrize("cls", vocabulary.MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_every_message_round_trips(cls: type) -> None:
    msg = sample(cls)
    out = Codec(KEY).decode(Codec(KEY).encode(msg))
    assert type(out.msg) is cls
    assert _equal(msg, out.msg)


def test_large_buffers_travel_out_of_band_and_zero_copy() -> None:
    arr = np.random.default_rng(0).random(1_000_000)
    p = dumps((arr,))
    assert p.buffers, "the array should not be copied into the pickle stream"
    frames = Codec(KEY).encode(m.Submit((sample(m.JobSpec),), ((p,),)))
    assert any(memoryview(f).nbytes == arr.nbytes for f in frames)
    env = Codec(KEY).decode([zmq.Frame(f) for f in frames])
    (back,) = loads(env.msg.tasks[0][0])
    assert np.array_equal(back, arr)


def _frames() -> list[typing.Any]:
    return Codec(KEY).encode(sample(m.TaskResults))


def test_tampered_body_is_refused() -> None:
    frames = [bytes(memoryview(f)) for f in _frames()]
    body = bytearray(frames[3])
    body[-1] ^= 1
    frames[3] = bytes(body)
    with pytest.raises(AuthenticationError):
        Codec(KEY).decode(frames)


def test_tampered_buffer_is_refused() -> None:
    frames = [bytes(memoryview(f)) for f in _frames()]
    assert len(frames) > 4, "the sample carries an out-of-band buffer"
    buf = bytearray(frames[-1])
    buf[0] ^= 1
    frames[-1] = bytes(buf)
    with pytest.raises(AuthenticationError):
        Codec(KEY).decode(frames)


def test_forged_with_another_key_is_refused() -> None:
    frames = Codec(os.urandom(32).hex()).encode(m.Heartbeat())
    codec = Codec(KEY)
    with pytest.raises(AuthenticationError):
        codec.decode(frames)
    assert codec.rejected == {"AuthenticationError": 1}


def test_replayed_message_is_refused() -> None:
    frames = Codec(KEY).encode(m.Heartbeat())
    receiver = Codec(KEY)
    receiver.decode(frames)
    with pytest.raises(AuthenticationError, match="Replayed"):
        receiver.decode(frames)


def test_stale_message_is_refused() -> None:
    sender = Codec(KEY)
    header = msgpack.packb(
        {
            "msg_id": f"{sender.session}:1",
            "msg_type": "Heartbeat",
            "session": sender.session,
            "date": time.time() - 3600,
            "version": VERSION,
        }
    )
    body = msgpack.packb([0])
    sig = hmac.new(bytes.fromhex(KEY), header + body, hashlib.sha256).hexdigest().encode()
    with pytest.raises(AuthenticationError, match="replay window"):
        Codec(KEY).decode([PROTOCOL_FRAME, sig, header, body])


def test_oversized_is_refused_on_both_sides() -> None:
    big = m.Outputs((m.Output("j", 0, -1, m.OutputKind.STDOUT, b"x" * 10_000),))
    with pytest.raises(MessageTooLarge, match="limit"):
        Codec(KEY, max_message_bytes=1000).encode(big)
    frames = Codec(KEY).encode(big)
    with pytest.raises(MessageTooLarge):
        Codec(KEY, max_message_bytes=1000).decode(frames)


def test_truncated_is_refused() -> None:
    frames = _frames()
    with pytest.raises(ProtocolError, match="Truncated"):
        Codec(KEY).decode(frames[:3])
    with pytest.raises(AuthenticationError):
        Codec(KEY).decode(frames[:4])  # the buffers are covered by the signature


def test_other_major_version_gets_a_clear_refusal() -> None:
    frames = list(Codec(KEY).encode(m.Heartbeat()))
    frames[0] = b"PILOT/1"  # the SHA-256 protocol before BLAKE3 digests
    with pytest.raises(VersionMismatch, match="same major version"):
        Codec(KEY).decode(frames)


def test_message_type_not_allowed_on_a_socket_is_refused() -> None:
    frames = Codec(KEY).encode(sample(m.Assign))  # a gateway->worker message
    with pytest.raises(ProtocolError, match="Unexpected message type"):
        Codec(KEY, accept=vocabulary.FROM_CLIENT).decode(frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_frames_never_crash_the_decoder(frames: list[bytes]) -> None:
    codec = Codec(KEY)
    with pytest.raises(ProtocolError):
        codec.decode(frames)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=3), st.binary(min_size=1, max_size=64))
def test_random_corruption_of_a_real_message_is_refused(which: int, junk: bytes) -> None:
    frames = [bytes(memoryview(f)) for f in Codec(KEY).encode(sample(m.Submit))]
    frames[which] = junk
    with pytest.raises(ProtocolError):
        Codec(KEY).decode(frames)


def test_unsigned_codec_for_local_ipc_round_trips() -> None:
    msg = sample(m.Assign)
    assert _equal(msg, Codec(None).decode(Codec(None).encode(msg)).msg)
