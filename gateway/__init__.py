"""Parallel Pilot's gateway package, by role. It imports none of the other packages.

- ``gateway.protocol``: typed messages, framing, signing, serialization, the error tree,
  settings: all that workers, clients and the server share.
- ``gateway.server``: the ``Gateway`` (scheduler, SQLite state, blob store, dashboard).
- ``gateway.client``: the async client and the one sync facade (``Client``, ``Job``).

Each role is imported through its own front door; this package itself exports nothing, so a
worker's task process never loads the server or the client.
"""

__all__: list[str] = []
