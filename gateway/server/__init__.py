"""The server role of the gateway package: the ``Gateway`` (sockets, loop turns), the scheduler
(a pure state machine), the SQLite store, the blob store, the HTTP dashboard, and a secure
gateway's keys and users.

Front door: ``Gateway``; ``add_user``, ``remove_user``, ``list_users`` and ``GatewayKeys`` for
``pilot user`` (they change the users file in a gateway's state directory, which the running
gateway watches). Tests of the scheduler import ``gateway.server._scheduler`` directly.
"""

from gateway.server._server import Gateway
from gateway.server._users import GatewayKeys, UserEntry, add_user, list_users, remove_user

__all__ = ["Gateway", "GatewayKeys", "UserEntry", "add_user", "list_users", "remove_user"]
