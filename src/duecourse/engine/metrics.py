"""Prometheus metrics (SPEC §9): queue depth by status, dispatch outcomes, dispatch latency."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from duecourse.db import Database
from duecourse.engine.models import QueueItem

# Process-wide: what this process's workers did.
DISPATCHES = Counter(
    "duecourse_dispatch_total",
    "Queue items handled by this process's workers, by outcome (dispatched, or skipped/cancelled/failed/retry/"
    "deferred with its reason, e.g. skipped:opt_out, failed:provider_error)",
    ["outcome"],
)
DISPATCH_SECONDS = Histogram(
    "duecourse_dispatch_seconds", "Time to handle one claimed batch of queue items (re-validation, rules, send, record)"
)


class QueueDepth(Collector):
    """Queue items by status, read from the database at scrape time (one GROUP BY)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("duecourse_queue_items", "Queue items by status", labels=["status"])
        with self.db.transaction() as session:
            for status, count in session.execute(select(QueueItem.status, func.count()).group_by(QueueItem.status)):
                gauge.add_metric([str(status.value if hasattr(status, "value") else status)], count)
        yield gauge


def render(db: Database) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueDepth(db))
    return generate_latest(registry) + generate_latest(REGISTRY)
