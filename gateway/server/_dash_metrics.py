"""``/metrics``: the gateway's figures in Prometheus' exposition format (``prometheus_client``).

Read when scraped, from the gateway's parts (a custom collector on a registry of this
gateway's own: nothing is counted twice on the hot path): tasks queued, running and finished
(OK or failed), workers by state, jobs live, the task duration and latency histograms of the
``Monitor``, bytes in and out, and refused messages by reason.

Behind the same login as the dashboard (the session cookie works), and also open to a scraper
that sends the read-only scrape token (``Authorization: Bearer TOKEN``; ``pilot dashboard
--scrape-token`` prints it for the admin). A scraper's token reads ``/metrics`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gateway.server._dash_auth import LOGIN_HINT, Authed
from gateway.server._dash_view import REFUSED_COUNTERS
from gateway.server._monitor import Histogram

if TYPE_CHECKING:
    from gateway.server._server import Gateway

__all__ = ["GatewayCollector", "Metrics", "Registry", "registry_for"]

# prometheus_client is imported on the first scrape: it costs every gateway start 14 ms, and
# most gateways are never scraped.


class GatewayCollector:
    """A ``prometheus_client`` collector over one gateway (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        gw = self._gw
        m = gw.monitor
        out = sum(len(w.out) for w in gw.scheduler.workers.values())
        unsettled = sum(j.unsettled for j in gw.scheduler.jobs.values())
        tasks = GaugeMetricFamily("pilot_tasks", "Tasks of live jobs by state", labels=["state"])
        tasks.add_metric(["queued"], max(0, unsettled - out))
        tasks.add_metric(["running"], out)
        yield tasks
        done = CounterMetricFamily(
            "pilot_tasks_finished", "Tasks settled since the gateway started", labels=["outcome"]
        )
        done.add_metric(["ok"], m.tasks_ok)
        done.add_metric(["failed"], m.tasks_failed)
        yield done
        states = {"idle": 0, "busy": 0, "draining": 0}
        for name in gw.registry.workers:
            w = gw.scheduler.workers.get(name)
            if w is not None:
                states["draining" if w.draining else ("busy" if w.out else "idle")] += 1
        workers = GaugeMetricFamily("pilot_workers", "Connected workers by state", labels=["state"])
        for state, n in states.items():
            workers.add_metric([state], n)
        yield workers
        yield GaugeMetricFamily("pilot_jobs_live", "Jobs not finished", value=len(gw.registry.jobs))
        yield _histogram(
            "pilot_task_duration_seconds", "A task's run time on its worker", m.duration
        )
        yield _histogram(
            "pilot_task_latency_seconds",
            "From a task's assignment to its result at the gateway",
            m.latency,
        )
        counters = gw.clients.counters()
        relayed = CounterMetricFamily(
            "pilot_bytes", "Bytes through the gateway's sockets", labels=["direction"]
        )
        relayed.add_metric(["in"], counters.get("bytes_in", 0))
        relayed.add_metric(["out"], counters.get("bytes_out", 0))
        yield relayed
        refused = CounterMetricFamily(
            "pilot_refused_messages", "Messages and handshakes refused", labels=["reason"]
        )
        for key, n in sorted(counters.items()):
            if key.startswith(REFUSED_COUNTERS):
                refused.add_metric([key], n)
        yield refused


def _histogram(name: str, doc: str, h: Histogram) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    buckets, running = [], 0
    for bound, c in zip((*h.bounds, float("inf")), h.counts, strict=True):
        running += c
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class Registry:
    """One gateway's collector registry, built on the first scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._registry: Any = None

    def exposition(self) -> tuple[str, bytes]:
        """The content type and the body of a scrape."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(GatewayCollector(self._gw))
        return CONTENT_TYPE_LATEST, generate_latest(self._registry)


def registry_for(gateway: Gateway) -> Registry:
    return Registry(gateway)


class Metrics(Authed):
    """``GET /metrics``: a session or the scrape token."""

    def initialize(self, ctx: Any, registry: Registry) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.registry = registry

    def prepare(self) -> None:
        if self.ctx.auth.scraper(self.request.headers.get("Authorization", "")):
            return
        if self.current_user is None:
            self.set_header("WWW-Authenticate", 'Bearer realm="pilot"')
            self.refuse(401, LOGIN_HINT + " Scrapers: send the scrape token as a Bearer token.")

    def get(self) -> None:
        content_type, body = self.registry.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(body)
