"""``Drain`` turns are bounded in time: a backlog on one socket does not hold the loop.

Real ZeroMQ sockets (a PAIR over inproc) in a real asyncio loop; the handler does real work for
a few milliseconds a message.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import zmq

from gateway.protocol._drain import Drain

MESSAGES = 40
WORK_S = 0.003  # per message: 40 of them are 0.12 s of work, six turns of 20 ms
DEADLINE_S = 30.0


def _work() -> None:
    end = time.perf_counter() + WORK_S
    while time.perf_counter() < end:
        pass


def test_a_turn_stops_after_its_time_and_the_loop_runs_others_between_turns() -> None:
    async def run() -> tuple[list[int], list[int], list[str]]:
        ctx = zmq.Context.instance()
        rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        rx.bind("inproc://drain-test")
        tx.connect("inproc://drain-test")
        got: list[int] = []
        turns: list[int] = []  # messages handled by the end of each turn
        order: list[str] = []  # turns and the other callback, as they ran
        everything = asyncio.Event()

        def handle(frames: list[Any]) -> None:
            _work()
            got.append(int(frames[0].bytes))

        def end_turn() -> None:
            turns.append(len(got))
            order.append("turn")
            if len(got) == MESSAGES:
                everything.set()

        for i in range(MESSAGES):  # all waiting before the first turn
            tx.send(str(i).encode())
        drain = Drain(rx, handle, end_turn, max_turn_s=0.02)
        asyncio.get_running_loop().call_soon(lambda: order.append("other"))
        try:
            await asyncio.wait_for(everything.wait(), DEADLINE_S)
        finally:
            drain.close()
            rx.close(0)
            tx.close(0)
        return got, turns, order

    got, turns, order = asyncio.run(run())
    assert got == list(range(MESSAGES))  # every message, in order
    assert 0 < turns[0] < MESSAGES  # the first turn stopped early...
    assert len(turns) >= 2  # ...and the rest came in later turns
    # the other callback ran before the backlog was through, not after it
    assert order.index("other") < len(order) - 1
