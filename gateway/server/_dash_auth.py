"""The dashboard's login: one-time tokens that become a session cookie, CSRF, a scrape token.

The way Jupyter does it: ``pilot dashboard`` asks the gateway (a ``DashboardLogin`` message,
over the client socket, so a secure gateway knows who asks) for a link; the gateway makes a
one-time token for that principal (``DashboardAuth.issue``) and answers with
``URL/login?token=...``. Opening it redeems the token (once, within ``LOGIN_TOKEN_TTL_S``):
the gateway sets a session cookie and redirects to the dashboard, so the token leaves the
address bar and the history. The cookie is signed (tornado's signed cookies, HMAC-SHA256 with
a secret of this gateway's, not the signing key that every connection file holds), HttpOnly,
SameSite=Strict, and holds the user's name, whether they are the admin and their CSRF token; a
user removed with ``pilot user remove`` is logged out at their next request (and their open
pages are closed at the next batch of the live feed).

Every handler but the login's derives from ``Authed``: without a valid session it answers 401
(a page that says how to log in, or JSON for the API), and a state-changing request (POST)
must carry the session's CSRF token in the ``X-Pilot-CSRF`` header and, when the browser sends
one, an ``Origin`` equal to the dashboard's own (``check_csrf``). The page learns its CSRF
token from ``/api/session``: a cross-site page cannot read it (no CORS), and cannot send the
cookie with its request anyway (SameSite=Strict).

Prometheus scrapers use the read-only scrape token (``Authorization: Bearer TOKEN``) on
``/metrics`` only; it lives with the cookie secret in ``STATE/dashboard.json`` (mode 0600),
and ``pilot dashboard --scrape-token`` prints it for the admin.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.escape
import tornado.web

from gateway.server._users import Principal

if TYPE_CHECKING:
    from gateway.server._dash_feed import Feed
    from gateway.server._server import Gateway

__all__ = ["CSRF_HEADER", "Authed", "DashContext", "DashboardAuth", "still_a_user"]

LOGIN_TOKEN_TTL_S = 600.0  # an unused login link expires after this long
TOKENS_KEPT = 1024  # unused login tokens kept at most (the oldest go first)
SESSION_DAYS = 7  # a session cookie is refused after this many days
CSRF_HEADER = "X-Pilot-CSRF"
SECRETS_FILE = "dashboard.json"
LOGIN_HINT = (
    "Log in to the Parallel Pilot dashboard: run `pilot dashboard` (or `%pilot dashboard` in a "
    "notebook) and open the link it prints. Each link logs in once."
)


class DashboardAuth:
    """Login tokens, the cookie secret and the scrape token of one gateway (see the module
    docstring). Owned by the gateway's HTTP side; used on its loop only."""

    def __init__(self, state_dir: Path, base_url: str) -> None:
        self.base_url = base_url
        path = state_dir / SECRETS_FILE
        try:
            raw = json.loads(path.read_text())
            self.cookie_secret, self.scrape_token = raw["cookie_secret"], raw["scrape_token"]
        except (OSError, ValueError, KeyError):
            self.cookie_secret = secrets.token_hex(32)
            self.scrape_token = secrets.token_urlsafe(32)
            body = {"cookie_secret": self.cookie_secret, "scrape_token": self.scrape_token}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(body, fh)
            os.replace(tmp, path)
        self._tokens: dict[str, tuple[Principal, float]] = {}

    def issue(self, who: Principal, now: float | None = None) -> str:
        """A one-time login link for ``who``."""
        now = time.monotonic() if now is None else now
        for t in [t for t, (_, exp) in self._tokens.items() if exp <= now]:
            del self._tokens[t]
        while len(self._tokens) >= TOKENS_KEPT:
            del self._tokens[next(iter(self._tokens))]
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (who, now + LOGIN_TOKEN_TTL_S)
        return f"{self.base_url}login?token={token}"

    def redeem(self, token: str, now: float | None = None) -> Principal | None:
        """Who ``token`` logs in (it is spent now); None for an unknown, used or old one."""
        found = self._tokens.pop(token, None)
        now = time.monotonic() if now is None else now
        if found is None or found[1] <= now:
            return None
        return found[0]

    def scraper(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header holds the scrape token."""
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.scrape_token.encode()
        )


def still_a_user(gateway: Gateway, who: Principal) -> bool:
    """Whether ``who`` may still use the dashboard: on a secure gateway, a user removed with
    ``pilot user remove`` may not (on an insecure one everyone is the admin)."""
    return gateway.gate is None or gateway.gate.users.knows(who)


@dataclass(slots=True)
class DashContext:
    """What every dashboard handler is given: the gateway, its auth, the live feed and the
    session cookie's name (one per port: cookies are shared by every port of a host)."""

    gateway: Gateway
    auth: DashboardAuth
    feed: Feed
    cookie: str


@dataclass(frozen=True, slots=True)
class Session:
    who: Principal
    csrf: str


class Authed(tornado.web.RequestHandler):
    """A dashboard handler that needs a session (see the module docstring). ``api`` handlers
    refuse with JSON, the others with a page that says how to log in."""

    api = True

    def initialize(self, ctx: DashContext) -> None:
        self.ctx = ctx

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        # Scripts and styles come from the dashboard only: no inline script can run, even
        # one that a user's text would smuggle in.
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'self' http://localhost:* http://127.0.0.1:*",
        )

    def get_current_user(self) -> Session | None:
        raw = self.get_signed_cookie(self.ctx.cookie, max_age_days=SESSION_DAYS)
        if raw is None:
            return None
        try:
            body = json.loads(raw)
            session = Session(Principal(str(body["u"]), bool(body["a"])), str(body["x"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if still_a_user(self.ctx.gateway, session.who) else None

    @property
    def session(self) -> Session:
        s = self.current_user
        assert s is not None  # prepare() refused the request otherwise
        return s  # type: ignore[no-any-return]

    def start_session(self, who: Principal) -> None:
        body = json.dumps({"u": who.name, "a": who.admin, "x": secrets.token_urlsafe(24)})
        self.set_signed_cookie(
            self.ctx.cookie,
            body,
            expires_days=SESSION_DAYS,
            httponly=True,
            samesite="Strict",
            path="/",
        )

    def prepare(self) -> None:
        if self.current_user is None:
            self.refuse(401, LOGIN_HINT)

    def refuse(self, status: int, why: str) -> None:
        """End the request with ``status``: JSON for the API, a small page otherwise."""
        self.set_status(status)
        if self.api:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": why}))
        else:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            text = tornado.escape.xhtml_escape(why)
            self.finish(
                "<!doctype html><meta charset=utf-8><title>Parallel Pilot: log in</title>"
                f"<body style='font:15px system-ui;margin:3em'><h1>Parallel Pilot</h1>"
                f"<p>{text}</p>"
            )

    def check_csrf(self) -> bool:
        """For a state-changing request: the session's CSRF token in ``X-Pilot-CSRF``, and an
        ``Origin`` (when sent) that is this dashboard's. Refuses (403) and returns False
        otherwise."""
        sent = self.request.headers.get(CSRF_HEADER, "")
        origin = self.request.headers.get("Origin")
        own = f"{self.request.protocol}://{self.request.host}"
        if not hmac.compare_digest(sent.encode(), self.session.csrf.encode()):
            self.refuse(403, "This action needs the page's CSRF token: reload the dashboard.")
            return False
        if origin is not None and origin != own:
            self.refuse(403, f"Refused a request from another site ({origin}).")
            return False
        return True

    def write_json(self, body: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, separators=(",", ":")))
