"""Prometheus metrics for one server process: HTTP requests, rejected input, ingest, rollouts, the Kafka export.

Each server has its own registry (two apps in one test process do not collide). Figures owned by other
parts (the ingest's counters, the orchestrator's steps) are read at scrape time through callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REJECT_REASONS = {400: "malformed_request", 401: "bad_credentials", 403: "bad_credentials", 404: "not_found",
                  405: "bad_method", 413: "oversized", 415: "malformed_request", 422: "malformed_request"}


class _Callbacks(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        ingest = CounterMetricFamily("edgefleet_ingest_messages", "MQTT messages by channel and outcome",
                                     labels=["outcome"])
        for outcome, n in sorted(self.metrics.ingest_counts().items()):
            ingest.add_metric([outcome], float(n))
        yield ingest
        gauges = GaugeMetricFamily("edgefleet_state", "Fleet and rollout state at scrape time", labels=["what"])
        for what, value in sorted(self.metrics.state().items()):
            gauges.add_metric([what], float(value))
        yield gauges
        yield from _export_metrics(self.metrics.export())


class Metrics:
    """The server's counters; ``render`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("edgefleet_http_requests", "HTTP requests by method, route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.rejected = Counter("edgefleet_rejected", "Input rejected, by source and reason", ["source", "reason"],
                                registry=self.registry)
        self.alerts = Counter("edgefleet_alerts", "Fleet alerts raised by monitors, by model", ["model"],
                              registry=self.registry)
        self.ingest_counts: Callable[[], Mapping[str, int]] = dict
        self.state: Callable[[], Mapping[str, float]] = dict
        self.export: Callable[[], Mapping[str, float]] = dict
        """The Kafka export's figures (:meth:`edgefleet.server.export.exporter.KafkaExporter.figures`), if it runs."""
        self.export_status: Callable[[], dict[str, Any]] | None = None
        """The Kafka export's status (``GET /api/v1/export/status``), if it runs here."""
        self.registry.register(_Callbacks(self))

    def http(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method, route, str(status)).inc()
        if status >= 400 and status in REJECT_REASONS:
            self.rejected.labels("http", REJECT_REASONS[status]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _export_metrics(figures: Mapping[str, float]) -> Iterable[Metric]:
    """The Kafka export: lag and backlog (shared by the replicas), lease, and this replica's message counts."""
    if not figures:
        return
    for name, help_text in (("lag_seconds", "Age of the oldest stored message Kafka has not acknowledged"),
                            ("pending", "Stored messages waiting for Kafka's acknowledgement"),
                            ("lease_held", "1 while this replica holds the export lease"),
                            ("broker_up", "1 while the last export round was acknowledged")):
        yield GaugeMetricFamily(f"edgefleet_export_{name}", help_text, value=float(figures.get(name, 0.0)))
    messages = CounterMetricFamily("edgefleet_export_messages", "Messages Kafka acknowledged, by outcome",
                                   labels=["outcome"])
    for outcome in ("exported", "nonconforming"):
        messages.add_metric([outcome], float(figures.get(outcome, 0.0)))
    yield messages
    yield CounterMetricFamily("edgefleet_export_failed_rounds", "Export rounds that failed and were retried",
                              value=float(figures.get("failed_rounds", 0.0)))
