"""Requests with one answer that the client sends for the CLI and the notebook: a job's stats
(``pilot stats``, ``Job.stats()``) and a dashboard login link (``pilot dashboard``,
``%pilot dashboard``). Each goes through the sync facade's IO thread and the async client's
request table, like ``Client.status``; an ``ErrorReply`` raises what it maps to (``JobNotFound``,
``NotYourJob``), and no answer in time raises ``PilotTimeout``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.protocol import DashboardLink, DashboardLogin, JobStats, StatsQuery, StatsReply

if TYPE_CHECKING:
    from gateway.client._sync import Client

__all__ = ["dashboard_link", "job_stats"]


def job_stats(client: Client, job_id: str) -> JobStats:
    """Job ``job_id``'s timings: per attempt and per worker, its wall and task time."""
    reply: StatsReply = client._io.run(client._async._request(StatsQuery(job_id)))
    return reply.stats


def dashboard_link(client: Client, scrape: bool = False) -> DashboardLink:
    """A one-time login link to the gateway's dashboard for this client's user (``url`` is ""
    when the gateway runs without one); with ``scrape``, the admin also gets the read-only
    token for Prometheus scrapers."""
    link: DashboardLink = client._io.run(client._async._request(DashboardLogin(scrape)))
    return link
