"""The dashboard's HTTP API: login, the session, status, a job's detail and stats, cancel.

Every route but ``/login`` needs a session (``_dash_auth.Authed``); a user gets their own jobs
only (the admin every job), and another's job is answered 404, as if it did not exist. The one
state-changing action, cancel, is a POST that must carry the session's CSRF token
(``Authed.check_csrf``), and only the job's owner may cancel it from here.

- ``GET /login?token=T``: redeems a one-time token, sets the session cookie, redirects to ``/``;
- ``GET /api/session``: who is logged in, and the CSRF token the page sends with a POST;
- ``GET /api/status``: workers and jobs (live and recent), counters;
- ``GET /api/jobs/ID``: a job's row and its detail (kept outputs, failed tasks);
- ``GET /api/jobs/ID/stats``: its timings (``_stats.job_stats``);
- ``POST /api/jobs/ID/cancel``: cancels it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from gateway.protocol import Status
from gateway.server._dash_auth import Authed
from gateway.server._dash_view import job_detail, live_job_row, stored_job_row
from gateway.server._sched_events import JobCancel
from gateway.server._stats import job_stats

__all__ = ["ROUTES", "JobHandler"]


class Login(Authed):
    """``/login?token=T``: a valid token becomes a session cookie (see ``_dash_auth``)."""

    api = False

    def prepare(self) -> None:  # no session needed here: this is where one starts
        pass

    def get(self) -> None:
        who = self.ctx.auth.redeem(self.get_query_argument("token", ""))
        if who is None:
            self.refuse(
                403,
                "This login link is not valid: it was used already, or it is older than ten "
                "minutes. Run `pilot dashboard` again for a fresh one.",
            )
            return
        self.start_session(who)
        self.redirect("/", status=303)


class SessionInfo(Authed):
    def get(self) -> None:
        s = self.session
        self.write_json({"user": s.who.name, "admin": s.who.admin, "csrf": s.csrf})


class JobHandler(Authed):
    """A handler about one job, the viewer's (or any, for the admin)."""

    def visible(self, job_id: str) -> dict[str, Any] | None:
        """The job's row, when the viewer may see it; else answers 404 and returns None."""
        gw, who = self.ctx.gateway, self.session.who
        live = gw.registry.jobs.get(job_id)
        if live is not None:
            row = live_job_row(gw, job_id, live, 0)
        else:
            gw.store.flush()
            info = gw.store.job_info(job_id)
            found = gw.store.job_spec(job_id) if info is not None else None
            row = stored_job_row(info, found[0].kind) if info and found else None
        if row is None or not (who.admin or row["owner"] == who.name):
            self.refuse(404, f"No job {job_id} of yours here.")
            return None
        row["mine"] = row["owner"] == who.name
        return row


class JobDetail(JobHandler):
    def get(self, job_id: str) -> None:
        row = self.visible(job_id)
        if row is not None:
            self.write_json({"row": row, **job_detail(self.ctx.gateway, job_id)})


class JobStatsHandler(JobHandler):
    def get(self, job_id: str) -> None:
        if self.visible(job_id) is None:
            return
        stats = job_stats(self.ctx.gateway.store, job_id, time.time())
        self.write_json(asdict(stats) if stats is not None else {})


class Cancel(JobHandler):
    def post(self, job_id: str) -> None:
        if not self.check_csrf():
            return
        row = self.visible(job_id)
        if row is None:
            return
        if not row["mine"]:
            self.refuse(403, f"Job {job_id} is not yours: only its owner cancels it here.")
            return
        if row["state"] in {s.name.lower() for s in Status if s.finished}:
            self.write_json({"cancelled": False, "state": row["state"]})
            return
        # Sent at the end of the gateway's next turn (its ticker's, within TICK_S).
        self.ctx.gateway.executor.handle(JobCancel(job_id, time.monotonic()))
        self.write_json({"cancelled": True})


class StatusApi(Authed):
    def get(self) -> None:
        gw, who = self.ctx.gateway, self.session.who
        reply = gw.clients.status_reply(who=who)
        recent = gw.store.jobs(20, owner=None if who.admin else who.name)
        live = {j.job_id for j in reply.jobs}
        self.write_json(
            {
                "gateway_id": reply.gateway_id,
                "workers": [asdict(w) for w in reply.workers],
                "jobs": [asdict(j) for j in reply.jobs]
                + [asdict(j) for j in recent if j.job_id not in live],
                "counters": reply.counters,
            }
        )


ROUTES: list[tuple[str, type]] = [
    (r"/login", Login),
    (r"/api/session", SessionInfo),
    (r"/api/status", StatusApi),
    (r"/api/jobs/([^/]+)", JobDetail),
    (r"/api/jobs/([^/]+)/stats", JobStatsHandler),
    (r"/api/jobs/([^/]+)/cancel", Cancel),
]
