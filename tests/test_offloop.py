"""Big client messages are decoded off the gateway's loop (``gateway.server._offloop``): each
client's messages are still handled in the order it sent them, a big message that does not
verify is refused without holding back what follows, and the gateway runs a big job whole.

The part is tested on its own with a real codec and a real thread (no socket), then through a
gateway in this process, a real worker process and a real client.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from gateway.client import Client
from gateway.protocol import (
    AuthenticationError,
    Blob,
    Codec,
    Envelope,
    GatewaySettings,
    Output,
    OutputKind,
    Outputs,
    Submit,
    dumps,
    new_key,
    split_big_buffers,
)
from gateway.protocol._digest import frame_digest
from gateway.server._blobs import BlobStore, write_ahead
from gateway.server._offloop import BIG_BYTES, OffLoopDecoder
from tests_support import TEST_TIMEOUTS, ThreadGateway, thread_gateway_with_a_worker

KEY = new_key()
DEADLINE_S = 60.0


def frames_of(codec: Codec, ident: bytes, size: int, tag: str) -> list[zmq.Frame]:
    """A client message of about ``size`` bytes, as the ROUTER socket hands it over."""
    msg = Outputs((Output(tag, 0, -1, OutputKind.STDOUT, b"x" * size),))
    return [zmq.Frame(ident), *(zmq.Frame(bytes(f)) for f in codec.encode(msg))]


class Seen:
    """What the decoder handed over, in order: (where it was decoded, tag or error)."""

    def __init__(self, expected: int) -> None:
        self.items: list[tuple[str, Any]] = []
        self.expected = expected
        self.all_in = asyncio.Event()

    def add(self, where: str, decoded: Envelope | Exception) -> None:
        if isinstance(decoded, Exception):
            self.items.append((where, type(decoded)))
        else:
            (out,) = decoded.msg.outputs
            self.items.append((where, (out.job_id, len(out.data))))
        if len(self.items) >= self.expected:
            self.all_in.set()


def decoder_with(seen: Seen) -> tuple[OffLoopDecoder, Codec]:
    loop_codec = Codec(KEY)  # the loop's own, for messages that waited behind a big one
    decoder = OffLoopDecoder(
        Codec(KEY),
        lambda frames, who, decoded: seen.add("thread", decoded),
        lambda frames, who: seen.add("loop", loop_codec.decode(frames[1:])),
        lambda fn: asyncio.get_running_loop().call_soon(fn),
    )
    return decoder, Codec(KEY)


def test_a_clients_messages_are_handled_in_the_order_it_sent_them() -> None:
    big, small = BIG_BYTES + 1000, 100

    async def run() -> list[tuple[str, Any]]:
        seen = Seen(expected=4)
        decoder, sender = decoder_with(seen)
        try:
            sent = [("big-1", big), ("small-1", small), ("big-2", big), ("small-2", small)]
            for tag, size in sent:
                frames = frames_of(sender, b"A", size, tag)
                assert decoder.takes(b"A", sum(len(f) for f in frames))
                decoder.take(b"A", frames, None)
            # Another client's small message does not wait: the loop decodes it at once.
            assert not decoder.takes(b"B", small)
            await asyncio.wait_for(seen.all_in.wait(), DEADLINE_S)
            assert not decoder.takes(b"A", small), "nothing of A's waits any more"
            return seen.items
        finally:
            decoder.close()

    assert asyncio.run(run()) == [
        ("thread", ("big-1", BIG_BYTES + 1000)),
        ("loop", ("small-1", 100)),
        ("thread", ("big-2", BIG_BYTES + 1000)),
        ("loop", ("small-2", 100)),
    ]


def test_a_big_message_that_does_not_verify_is_refused_and_the_next_is_handled() -> None:
    async def run() -> list[tuple[str, Any]]:
        seen = Seen(expected=2)
        decoder, sender = decoder_with(seen)
        forger = Codec(new_key())  # not the gateway's key
        try:
            decoder.take(b"A", frames_of(forger, b"A", BIG_BYTES, "forged"), None)
            decoder.take(b"A", frames_of(sender, b"A", 10, "after"), None)
            await asyncio.wait_for(seen.all_in.wait(), DEADLINE_S)
            return seen.items
        finally:
            decoder.close()

    assert asyncio.run(run()) == [("thread", AuthenticationError), ("loop", ("after", 10))]


def test_closing_while_a_big_message_is_decoded_hands_nothing_over() -> None:
    async def run() -> list[tuple[str, Any]]:
        seen = Seen(expected=1)
        decoder, sender = decoder_with(seen)
        decoder.take(b"A", frames_of(sender, b"A", 8 * BIG_BYTES, "late"), None)
        decoder.close()  # waits for the thread
        await asyncio.sleep(0)  # a callback already scheduled would run now
        return seen.items

    assert asyncio.run(run()) == []


def test_the_thread_writes_a_submits_blobs_ahead_and_a_failed_write_loses_nothing(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    split, (blob,) = split_big_buffers(dumps(np.random.default_rng(0).random(BIG_BYTES // 8)))
    forged = Blob(frame_digest(b"other").hex(), blob.data)
    sender = Codec(KEY)

    async def run(prepare: Any, *msgs: Submit) -> list[Any]:
        got: list[Any] = []
        done = asyncio.Event()

        def handled(frames: Any, who: Any, decoded: Any) -> None:
            got.append((threading.current_thread().name, decoded))
            if len(got) == len(msgs):
                done.set()

        decoder = OffLoopDecoder(
            Codec(KEY),
            handled,
            lambda *a: None,
            lambda fn: asyncio.get_running_loop().call_soon(fn),
            prepare,
        )
        try:
            for msg in msgs:
                decoder.take(b"A", [zmq.Frame(b"A"), *map(zmq.Frame, sender.encode(msg))], None)
            await asyncio.wait_for(done.wait(), DEADLINE_S)
            return got
        finally:
            decoder.close()

    writers: list[str] = []

    def prepare(msg: Any) -> None:
        writers.append(threading.current_thread().name)
        write_ahead(blobs, msg)

    (_, env), _ = asyncio.run(
        run(prepare, Submit((), ((split,),), True, (blob,)), Submit((), (), True, (forged,)))
    )
    assert isinstance(env, Envelope) and writers[0].startswith("pilot-decode")
    assert bytes(blobs.get(blob.digest).data) == bytes(blob.data.data), "written on the thread"
    assert not blobs.path(forged.digest).exists(), "a blob not keyed by its content is not"

    def failing(msg: Any) -> None:
        raise OSError(28, "No space left on device")

    ((_, env),) = asyncio.run(run(failing, Submit((), ((split,),), True, (blob,))))
    assert isinstance(env, Envelope) and env.msg.blobs[0].digest == blob.digest, "handed over"


# -- through a gateway ------------------------------------------------------------------------


def size_of(blob: bytes) -> int:
    return len(blob)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ThreadGateway, Client]]:
    conn = tmp_path / "connection.json"
    settings = GatewaySettings(
        state_dir=tmp_path / "state", http_port=None, connection_file=conn, timeouts=TEST_TIMEOUTS
    )
    with thread_gateway_with_a_worker(settings) as (gw, client):
        yield gw, client


@pytest.mark.system
def test_a_job_submitted_in_one_big_message_runs_whole(
    cluster: tuple[ThreadGateway, Client],
) -> None:
    gw, client = cluster
    blobs = [os.urandom(1000) for _ in range(BIG_BYTES // 1000 + 50)]  # one Submit over BIG_BYTES
    big = client.map(size_of, blobs, chunk=1)
    small = client.submit(size_of, b"abc")  # sent right after, from the same client
    assert small.result(DEADLINE_S) == 3
    assert big.wait(DEADLINE_S).results == [1000] * len(blobs)
    assert gw.call(lambda g: g.counters["decoded_off_loop"]) == 1, "the Submit was big"
    assert gw.call(lambda g: g.counters["rejected"]) == 0
