"""Prometheus metrics (prometheus-client), served as text at `GET /metrics`.

Hot paths only bump plain counters (the store's `received`, the intake's
`rejected`) or observe one histogram per attempt; everything else is read
when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from webhookd.reasons import ATTEMPT_REASONS, Reason

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The `outcome` label of webhookd_delivery_attempts: "success" or the failure's Reason
# (only attempt reasons; anything else would be a bug and is counted as "other").
_OUTCOME_LABELS: dict[Reason | None, str] = {None: "success", **{r: r.value for r in ATTEMPT_REASONS}}


class Metrics(Collector):
    """All of webhookd's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.attempts = Counter(
            "webhookd_delivery_attempts", "Delivery attempts by outcome.", ["outcome"], registry=self.registry
        )
        self.attempt_seconds = Histogram(
            "webhookd_attempt_duration_seconds",
            "Duration of delivery attempts.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.auto_disabled = Counter(
            "webhookd_webhooks_auto_disabled", "Webhooks disabled after consecutive failures.",
            registry=self.registry,
        )
        self.received: Callable[[], Mapping[str, int]] = dict
        self.rejected: Callable[[], Mapping[Reason, int]] = dict
        self.gauges: dict[str, Any] = {}
        self.tracking: Callable[[], Mapping[tuple[str, str], int]] = dict
        self.failed_commits: Callable[[], int] = int
        self.store_health: Callable[[], Any] | None = None  # webhookd.store.backends.Health
        self.registry.register(self)
        self._attempt_children: dict[str, Any] = {}

    def observe_attempt(self, reason: Reason | None, seconds: float) -> None:
        """One finished attempt: `reason` is None for a success, else why it failed."""
        label = _OUTCOME_LABELS.get(reason, "other")
        child = self._attempt_children.get(label)
        if child is None:
            child = self._attempt_children[label] = self.attempts.labels(label)
        child.inc()
        self.attempt_seconds.observe(seconds)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        received = CounterMetricFamily("webhookd_events_received", "Events committed, by type.", labels=["event"])
        for event, n in sorted(self.received().items()):
            received.add_metric([event], n)
        yield received
        rejected = CounterMetricFamily(
            "webhookd_intake_rejections", "Intake lines or requests refused, by reason.", labels=["reason"]
        )
        for reason, n in sorted(self.rejected().items()):
            rejected.add_metric([reason.value], n)
        yield rejected
        hits = CounterMetricFamily(
            "webhookd_tracking_hits", "Tracking hits by kind (open, click) and outcome.", labels=["kind", "outcome"]
        )
        for (kind, outcome), n in sorted(self.tracking().items()):
            hits.add_metric([kind, outcome], n)
        yield hits
        yield CounterMetricFamily(
            "webhookd_store_commit_failures",
            "Store transactions that failed to commit (intake and admin writes refused, internal ones retried).",
            value=self.failed_commits(),
        )
        if self.store_health is not None:
            health = self.store_health()
            yield CounterMetricFamily(
                "webhookd_store_reconnects",
                "Times the storage connection was lost and regained (PostgreSQL; always 0 for SQLite).",
                value=health.reconnects,
            )
            yield GaugeMetricFamily(
                "webhookd_store_connected", "1 while the storage's writer holds a working connection, else 0.",
                value=1 if health.connected else 0,
            )
        deliveries = GaugeMetricFamily("webhookd_deliveries", "Deliveries by status.", labels=["status"])
        for status, n in self.gauges.get("deliveries", {}).items():
            deliveries.add_metric([status], n)
        yield deliveries
        webhooks = GaugeMetricFamily("webhookd_webhooks", "Webhooks by state.", labels=["state"])
        for state, n in self.gauges.get("webhooks", {}).items():
            webhooks.add_metric([state], n)
        yield webhooks
        for name, help_text in (
            ("intake_connections", "Open intake socket connections."),
            ("in_flight", "Delivery attempts in flight."),
            ("store_queue", "Operations waiting for the next commit."),
            ("oldest_pending_age_seconds", "Seconds since the oldest pending delivery was created; 0 if none."),
        ):
            yield GaugeMetricFamily(f"webhookd_{name}", help_text, value=self.gauges.get(name, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
