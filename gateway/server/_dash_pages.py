"""The dashboard's page and its static files (HTML, JS, CSS in ``gateway/server/dashboard/``).

Plain files, no build step and nothing from a CDN (a gateway's machine may have no internet):
read once from the package and served from memory, behind the login like everything else. The
page draws everything itself from the API and the live feed, putting every text that users
wrote into the DOM as text; the Content-Security-Policy (``_dash_auth.Authed``) lets only these
files' scripts run.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from gateway.server._dash_auth import Authed

__all__ = ["ROUTES"]

HERE = Path(__file__).resolve().parent / "dashboard"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
FILES = ("app.js", "app.css")


@cache
def _read(name: str) -> bytes:
    return (HERE / name).read_bytes()


class Page(Authed):
    api = False

    def get(self) -> None:
        self.set_header("Content-Type", TYPES[".html"])
        self.finish(_read("index.html"))


class Static(Authed):
    api = False

    def get(self, name: str) -> None:
        if name not in FILES:
            self.refuse(404, "No such file.")
            return
        self.set_header("Content-Type", TYPES[Path(name).suffix])
        self.finish(_read(name))


ROUTES: list[tuple[str, type]] = [(r"/", Page), (r"/static/([a-z.]+)", Static)]
