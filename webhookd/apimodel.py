"""The admin API's request parsing and JSON shapes, shared by the API and the dashboard:
one place for each validation rule and its error text."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from webhookd.batching import OFF, Batching, BatchingError
from webhookd.events import EVENT_TYPES, EventError, format_timestamp, normalise_timestamp
from webhookd.filters import FilterError, WebhookFilter
from webhookd.store import DELIVERY_STATUSES, Delivery, DeliveryFilter, WebhookStats
from webhookd.webhooks import Webhook


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_rfc3339(value: str) -> float:
    """Epoch seconds of an RFC 3339 time (EventError if it is not one)."""
    from datetime import datetime

    return datetime.fromisoformat(normalise_timestamp(value).replace("Z", "+00:00")).timestamp()


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def validate_url(value: object, *, production: bool) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, "url is required and must be a string")
    if len(value) > 2048:
        raise ApiError(400, "url is longer than 2048 characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"url must be an http(s) URL with a host, got {value!r}")
    if production and parts.scheme != "https":
        raise ApiError(
            400, "url must use https:// in production (set environment = \"development\" to allow http://)"
        )
    if parts.username or parts.password:
        raise ApiError(400, "url must not carry credentials")
    return value


def validate_events(value: object) -> tuple[str, ...]:
    if value in ("all", "*", ["all"]):
        return ("*",)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ApiError(400, 'events must be a non-empty list of event names, or ["*"]')
    if "*" in value:
        return ("*",)
    unknown = [v for v in value if v not in EVENT_TYPES]
    if unknown:
        raise ApiError(400, f"unknown event {unknown[0]!r} (expected one of {', '.join(EVENT_TYPES)}, or *)")
    return tuple(dict.fromkeys(value))


def validate_description(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 1000:
        raise ApiError(400, "description must be a string of at most 1000 characters")
    return value


def validate_filter(value: object) -> WebhookFilter:
    """A webhook's `filter` object; null or {} is the empty filter (every event of its types)."""
    try:
        return WebhookFilter.parse(value)
    except FilterError as exc:
        raise ApiError(400, str(exc)) from None


def validate_batching(body: dict[str, Any], base: Batching = OFF) -> Batching:
    """The batch_* fields of a webhook's POST or PATCH over `base` (the defaults, or the
    webhook's settings: a PATCH changes only the fields it gives)."""
    try:
        return base.updated(body)
    except BatchingError as exc:
        raise ApiError(400, str(exc)) from None


def delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": f"dlv_{d.id}",
        "event_id": d.event_uid,
        "webhook_id": d.webhook_id,
        "event": d.event_type,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": format_timestamp(d.next_attempt_at) if d.next_attempt_at is not None else None,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": format_timestamp(d.created_at),
        "updated_at": format_timestamp(d.updated_at),
        "message_id": d.message_id,
        "to": d.recipient,
    }


def delivery_filter(q: Any) -> DeliveryFilter:
    """The filters of `GET /v1/deliveries` (shared with the dashboard)."""
    statuses: tuple[str, ...] = ()
    if q.get("status"):
        statuses = tuple(dict.fromkeys(s.strip() for s in q["status"].split(",") if s.strip()))
        bad = [s for s in statuses if s not in DELIVERY_STATUSES]
        if bad:
            raise ApiError(400, f"unknown status {bad[0]!r} (expected one of {', '.join(DELIVERY_STATUSES)})")
    event_type = q.get("event") or None
    if event_type is not None and event_type not in EVENT_TYPES:
        raise ApiError(400, f"unknown event {event_type!r} (expected one of {', '.join(EVENT_TYPES)})")
    times: dict[str, float | None] = {}
    for name in ("since", "until"):
        text = q.get(name)
        try:
            times[name] = parse_rfc3339(text) if text else None
        except EventError as exc:
            raise ApiError(400, f"{name}: {exc}") from None
    return DeliveryFilter(
        webhook_id=q.get("webhook_id") or None, statuses=statuses, event_type=event_type,
        message_id=q.get("message_id") or None, recipient=q.get("to") or None,
        since=times["since"], until=times["until"], batch_id=batch_param(q.get("batch")),
    )


def batch_param(value: object) -> str | None:
    """A `batch` filter: a batch id as webhookd makes them (`batch_` + 26 base32 characters)."""
    if not value:
        return None
    if not isinstance(value, str) or not (value.startswith("batch_") and len(value) == 32
                                         and value[6:].isalnum() and value.isascii()):
        raise ApiError(400, f"batch must be a batch id such as batch_{'a' * 26}, got {str(value)[:60]!r}")
    return value


def delivery_number(raw: str) -> int | None:
    """`dlv_123` (or `123`) → 123; None if it cannot name a delivery."""
    digits = raw.removeprefix("dlv_")
    return int(digits) if digits.isdigit() and len(digits) <= 18 else None


def webhook_stats_json(wh: Webhook, st: WebhookStats | None) -> dict[str, Any]:
    st = st or WebhookStats(wh.id)
    attempts = st.succeeded_24h + st.failed_24h
    return {
        "id": wh.id,
        "url": wh.url,
        "description": wh.description,
        "enabled": wh.enabled,
        "disabled_reason": wh.disabled_reason,
        "consecutive_failures": wh.consecutive_failures,
        "last_attempt_at": format_timestamp(st.last_attempt_at) if st.last_attempt_at is not None else None,
        "last_status_code": st.last_status_code,
        "last_error": st.last_error,
        "succeeded_24h": st.succeeded_24h,
        "failed_24h": st.failed_24h,
        "success_rate_24h": round(st.succeeded_24h / attempts, 4) if attempts else None,
        "pending": st.pending,
        "paused": st.paused,
    }


