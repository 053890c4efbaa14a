"""``pilot dashboard`` and ``pilot stats``: the gateway's web dashboard and a job's timings.

::

    pilot dashboard [--scrape-token] [--json]   # a one-time login link (and the scrape token)
    pilot stats JOB [--json]                    # per attempt and per worker timings

``pilot dashboard`` asks the gateway (as the user whose connection file this is) for a link
that logs in once; opening it sets the session cookie. ``--scrape-token`` also prints the
read-only token for Prometheus scrapers (the admin's connection file only). ``pilot stats``
prints a job's wall time, task time and speed-up, a line per worker and, with ``--json``, every
attempt as well.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from gateway.protocol import ConfigError, JobStats, TaskStatus, find_connection

__all__ = ["add_dashboard_parsers", "format_stats"]


def add_dashboard_parsers(sub: Any) -> None:
    """Add ``dashboard`` and ``stats`` to the ``pilot`` subcommands."""
    d = sub.add_parser("dashboard", help="print a one-time login link to the web dashboard")
    d.add_argument("--scrape-token", action="store_true", help="also the Prometheus token")
    d.add_argument("--json", action="store_true")
    d.set_defaults(run=_dashboard)
    s = sub.add_parser("stats", help="a job's timings: per task and per worker")
    s.add_argument("job")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_stats)


def _dashboard(args: Any) -> int:
    from gateway.client import Client, dashboard_link

    with Client(find_connection()) as c:
        link = dashboard_link(c, scrape=args.scrape_token)
    if not link.url:
        raise ConfigError(
            "This gateway runs without a dashboard (it was started with --http-port none)."
        )
    if args.scrape_token and not link.scrape_token:
        raise ConfigError("Only the admin's connection file gets the scrape token.")
    if args.json:
        body = {
            "url": link.url,
            **({"scrape_token": link.scrape_token} if args.scrape_token else {}),
        }
        print(json.dumps(body))
        return 0
    print(f"Open the dashboard (this link logs in once, within 10 minutes):\n  {link.url}")
    if args.scrape_token:
        base = link.url.split("/login", 1)[0]
        print(f"Prometheus: scrape {base}/metrics with 'Authorization: Bearer {link.scrape_token}'")
    return 0


def _stats(args: Any) -> int:
    from gateway.client import Client, job_stats

    with Client(find_connection()) as c:
        stats = job_stats(c, args.job)
    if args.json:
        print(json.dumps(asdict(stats), indent=2))
    else:
        print(format_stats(stats))
    return 0


def format_stats(s: JobStats) -> str:
    """``s`` as a few lines of text: the job, then one line per worker."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created))
    retried = sum(1 for a in s.attempts if a.attempt > 1)  # attempts count from 1
    ok = sum(1 for a in s.attempts if a.status == TaskStatus.OK)
    lines = [
        f"job {s.job_id} {s.name!r} ({s.kind.name.lower()}, {s.state.name.lower()}), "
        f"owner {s.owner or '-'}, submitted {when}",
        f"  {s.n_tasks} tasks, {len(s.attempts)} attempts ({ok} OK, {retried} retries)",
        f"  wall time {s.wall_s:.3f}s, task time {s.task_s:.3f}s, speed-up {s.speedup:.2f}x",
    ]
    for w in s.workers:
        lines.append(
            f"  {w.worker or '(unassigned)'}: {w.attempts} attempts, {w.ok} OK, "
            f"busy {w.busy_s:.3f}s"
        )
    return "\n".join(lines)
