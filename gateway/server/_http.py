"""The gateway's HTTP side: the dashboard, its API, its live feed and ``/metrics``.

Runs on the gateway's own asyncio loop (tornado), listening where the gateway binds. Its parts:

- ``_dash_auth``: login with one-time tokens that become a session cookie, CSRF, scrape token;
- ``_dash_pages``: the page and its static files;
- ``_dash_api``: the JSON API (status, a job's detail and stats, cancel);
- ``_dash_video``: a render job's video, made from its stored frames;
- ``_dash_feed``: the WebSocket feed, batched updates;
- ``_dash_metrics``: Prometheus' ``/metrics``;
- ``_dash_view``: the rows and events they all show.

``start_http`` builds them and returns a ``Dashboard``; the gateway asks it for login links
(``login``) and stops it on the way out (``stop``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from gateway.protocol import DashboardLink
from gateway.server import _dash_api, _dash_pages, _dash_video
from gateway.server._dash_auth import DashboardAuth, DashContext
from gateway.server._dash_feed import Feed, FeedSocket
from gateway.server._dash_metrics import Metrics, registry_for
from gateway.server._users import Principal

if TYPE_CHECKING:
    from gateway.server._server import Gateway

__all__ = ["Dashboard", "start_http"]


@dataclass(slots=True)
class Dashboard:
    """The running HTTP side: its URL, its server and what its handlers share."""

    url: str
    server: Any
    ctx: DashContext

    def login(self, who: Principal) -> DashboardLink:
        """A one-time login link for ``who`` (``pilot dashboard``)."""
        return DashboardLink(self.ctx.auth.issue(who))

    @property
    def scrape_token(self) -> str:
        return self.ctx.auth.scrape_token

    async def stop(self) -> None:
        self.server.stop()
        await self.ctx.feed.close()


def start_http(gateway: Gateway, host: str, port: int) -> Dashboard:
    """Start listening on ``host:port`` (0: any free port); the caller stops it."""
    sockets = tornado.netutil.bind_sockets(port, host)
    bound = sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    auth = DashboardAuth(gateway.settings.state_dir, url)
    ctx = DashContext(gateway, auth, Feed(gateway), f"pilot-session-{bound}")
    routes: list[Any] = [
        (path, handler, {"ctx": ctx})
        for path, handler in _dash_pages.ROUTES + _dash_api.ROUTES + _dash_video.ROUTES
    ]
    routes.append((r"/api/feed", FeedSocket, {"ctx": ctx}))
    routes.append((r"/metrics", Metrics, {"ctx": ctx, "registry": registry_for(gateway)}))
    app = tornado.web.Application(
        routes, cookie_secret=auth.cookie_secret, websocket_ping_interval=20
    )
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    return Dashboard(url, server, ctx)
