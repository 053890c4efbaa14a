"""``IOThread``: the client's one IO thread, running its own event loop.

Owned by a ``Client``: user threads hand it coroutines (``run``, with a deadline) or callbacks
(``loop.call_soon_threadsafe``); it never runs user code. The sync facade and, through it, the
magic use no other thread and no ``nest_asyncio``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gateway.protocol import PilotTimeout

__all__ = ["IOThread"]


class IOThread:
    """A daemon thread running one event loop; owned by a ``Client``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            if fut.done():
                raise  # the coroutine's own PilotTimeout, with its own message
            fut.cancel()
            raise PilotTimeout("The operation did not finish in time.") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()
