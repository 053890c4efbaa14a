"""The server role of the gateway package: the ``Gateway`` (sockets, loop turns), the scheduler
(a pure state machine), the SQLite store, the blob store and the HTTP dashboard.

Front door: ``Gateway``. Tests of the scheduler import ``gateway.server._scheduler`` directly.
"""

from gateway.server._server import Gateway

__all__ = ["Gateway"]
