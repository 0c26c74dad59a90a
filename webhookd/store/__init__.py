"""Storage: the `Storage` protocol (domain verbs, typed rows), the group-commit writer,
and one module per backend (today: SQLite).

    model.py          typed rows and values, domain errors
    base.py           the Storage protocol
    writer.py         the group-committing writer every backend uses
    sqlite.py         the SQLite backend (all of webhookd's SQL)
    sqlite_schema.py  its versioned migrations
"""

from webhookd.store.base import FreshSink, Storage
from webhookd.store.model import (
    DELIVERY_STATUSES,
    FAILED,
    PAUSED,
    PENDING,
    SUCCEEDED,
    ApiToken,
    Attempt,
    BatchOutcomeRecord,
    Conflict,
    Delivery,
    DeliveryDetail,
    DeliveryFilter,
    DueItem,
    FreshEvent,
    HourCount,
    NotFound,
    OutcomeRecord,
    StoreError,
    Subscriber,
    TrackingFacts,
    TrackingHit,
    WebhookRecord,
    WebhookState,
    WebhookStats,
)
from webhookd.store.sqlite import SqliteStorage, read_webhooks

__all__ = [
    "DELIVERY_STATUSES",
    "FAILED",
    "PAUSED",
    "PENDING",
    "SUCCEEDED",
    "ApiToken",
    "Attempt",
    "BatchOutcomeRecord",
    "Conflict",
    "Delivery",
    "DeliveryDetail",
    "DeliveryFilter",
    "DueItem",
    "FreshEvent",
    "FreshSink",
    "HourCount",
    "NotFound",
    "OutcomeRecord",
    "SqliteStorage",
    "Storage",
    "StoreError",
    "Subscriber",
    "TrackingFacts",
    "TrackingHit",
    "WebhookRecord",
    "WebhookState",
    "WebhookStats",
    "read_webhooks",
]
