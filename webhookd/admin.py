"""The admin API: JSON over HTTP on the admin Unix socket (and optional TCP)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from webhookd import __version__
from webhookd.events import EVENT_TYPES, EventError, format_timestamp, normalise_timestamp
from webhookd.metrics import CONTENT_TYPE, Metrics
from webhookd.operations import Operations
from webhookd.scheduler import Scheduler
from webhookd.store import (
    DELIVERY_STATUSES,
    FAILED,
    PAUSED,
    SUCCEEDED,
    Conflict,
    Delivery,
    DeliveryFilter,
    NotFound,
    Storage,
    StoreError,
)
from webhookd.webhooks import Webhook

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LIST = 1000


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
        since=times["since"], until=times["until"],
    )


def delivery_number(raw: str) -> int | None:
    """`dlv_123` (or `123`) → 123; None if it cannot name a delivery."""
    digits = raw.removeprefix("dlv_")
    return int(digits) if digits.isdigit() and len(digits) <= 18 else None


class AdminApi:
    def __init__(
        self, scheduler: Scheduler, storage: Storage, *, production: bool, started: float | None = None
    ) -> None:
        self.scheduler = scheduler
        self.store = storage
        self.ops = Operations(scheduler, storage)
        self.production = production
        self.started = started if started is not None else time.time()
        self.extra_status: Callable[[], dict[str, Any]] = dict
        self.metrics: Metrics | None = None
        self.gauges: Callable[[], dict[str, Any]] = dict

    def app(self, token: str = "") -> web.Application:
        middlewares = [self._errors]
        if token:
            middlewares.insert(0, _token_middleware(token))
        app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/v1/status", self.status)
        r.add_post("/v1/webhooks", self.create_webhook)
        r.add_get("/v1/webhooks", self.list_webhooks)
        r.add_get("/v1/webhooks/{id}", self.show_webhook)
        r.add_patch("/v1/webhooks/{id}", self.update_webhook)
        r.add_delete("/v1/webhooks/{id}", self.delete_webhook)
        r.add_post("/v1/webhooks/{id}/enable", self.enable_webhook)
        r.add_post("/v1/webhooks/{id}/disable", self.disable_webhook)
        r.add_post("/v1/webhooks/{id}/test", self.test_webhook)
        r.add_post("/v1/webhooks/{id}/rotate-secret", self.rotate_secret)
        r.add_post("/v1/webhooks/{id}/replay", self.replay)
        r.add_get("/v1/webhooks/{id}/secret", self.show_secret)
        r.add_get("/v1/deliveries", self.list_deliveries)
        r.add_get("/v1/deliveries/{id}", self.show_delivery)
        r.add_post("/v1/deliveries/{id}/retry", self.retry_delivery)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return reply({"error": exc.message}, exc.status)
        except NotFound as exc:
            return reply({"error": str(exc)}, 404)
        except Conflict as exc:
            return reply({"error": str(exc)}, 409)
        except StoreError as exc:
            return reply({"error": str(exc)}, 503)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return reply({"error": exc.reason}, exc.status)
            raise

    # -- helpers ---------------------------------------------------------------------
    def _webhook(self, request: web.Request) -> Webhook:
        return self.ops.webhook(request.match_info["id"])

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"invalid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ApiError(400, "request body must be a JSON object")
        return doc

    # -- routes -------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return reply({"ok": True})

    async def _counts(self) -> tuple[dict[str, int], dict[str, int]]:
        deliveries = await self.store.count_by_status()
        hooks = self.scheduler.webhooks.values()
        enabled = sum(1 for wh in hooks if wh.enabled)
        return deliveries, {"enabled": enabled, "disabled": len(hooks) - enabled}

    async def status(self, request: web.Request) -> web.Response:
        deliveries, webhooks = await self._counts()
        return reply(
            {
                "version": __version__,
                "uptime_s": round(time.time() - self.started, 1),
                "deliveries": deliveries,
                "webhooks": webhooks,
                "in_flight": self.scheduler.in_flight,
                **self.extra_status(),
            }
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise ApiError(404, "metrics are not enabled")
        deliveries, webhooks = await self._counts()
        self.metrics.gauges = {
            "deliveries": deliveries,
            "webhooks": webhooks,
            "in_flight": self.scheduler.in_flight,
            "store_queue": self.store.queued,
            **self.gauges(),
        }
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def create_webhook(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        unknown = set(body) - {"url", "events", "description"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
        wh = await self.ops.create(
            url=validate_url(body.get("url"), production=self.production),
            events=validate_events(body.get("events", ["*"])),
            description=validate_description(body.get("description")),
        )
        return reply({**wh.public(), "secret": wh.secret}, 201)

    async def list_webhooks(self, request: web.Request) -> web.Response:
        return reply({"webhooks": [wh.public() for wh in self.scheduler.webhooks.values()]})

    async def show_webhook(self, request: web.Request) -> web.Response:
        return reply(self._webhook(request).public())

    async def update_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        body = await self._body(request)
        unknown = set(body) - {"url", "events", "description"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
        url = validate_url(body["url"], production=self.production) if "url" in body else None
        events = validate_events(body["events"]) if "events" in body else None
        description = validate_description(body["description"]) if "description" in body else None
        await self.ops.update(wh, url=url, events=events, description=description)
        return reply(wh.public())

    async def delete_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.ops.delete(wh)
        return reply({"deleted": wh.id})

    async def enable_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        body = await self._body(request)
        drop = body.get("drop_backlog", False)
        if not isinstance(drop, bool):
            raise ApiError(400, "drop_backlog must be true or false")
        count = await self.ops.enable(wh, drop_backlog=drop)
        key = "dropped" if drop else "resumed"
        return reply({**wh.public(), key: count})

    async def disable_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.ops.disable(wh)
        return reply(wh.public())

    async def test_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        body = await self._body(request)
        event_type = body.get("event") or "delivered"
        if event_type not in EVENT_TYPES:
            raise ApiError(400, f"unknown event {event_type!r} (expected one of {', '.join(EVENT_TYPES)})")
        outcome = await self.ops.send_test(wh, event_type)
        return reply(
            {
                "ok": outcome.success,
                "status_code": outcome.status_code,
                "duration_ms": round(outcome.duration_ms, 1),
                "response_body": outcome.response_body[:1024].decode("utf-8", "replace"),
                "error": outcome.error,
            }
        )

    async def rotate_secret(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.ops.rotate_secret(wh)
        expires = wh.previous_secret_expires_at
        return reply(
            {
                **wh.public(),
                "secret": wh.secret,
                "previous_secret_expires_at": format_timestamp(expires) if expires else None,
            }
        )

    async def replay(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        body = await self._body(request)
        since_text = body.get("since")
        if not isinstance(since_text, str):
            raise ApiError(400, "since is required: an RFC 3339 time such as 2026-02-23T10:00:00Z")
        try:
            since = parse_rfc3339(since_text)
        except EventError as exc:
            raise ApiError(400, f"since: {exc}") from None
        statuses = body.get("status", ["failed"])
        if isinstance(statuses, str):
            statuses = [s.strip() for s in statuses.split(",") if s.strip()]
        allowed = (FAILED, PAUSED, SUCCEEDED)
        if not isinstance(statuses, list) or not statuses or any(s not in allowed for s in statuses):
            raise ApiError(400, f"status must be a list drawn from {', '.join(allowed)}")
        count = await self.ops.replay(wh, since=since, statuses=statuses)
        return reply({"id": wh.id, "replayed": count, "since": format_timestamp(since), "status": statuses})

    async def show_secret(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        return reply({"id": wh.id, "secret": wh.secret})

    async def list_deliveries(self, request: web.Request) -> web.Response:
        q = request.query
        where = delivery_filter(q)
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            raise ApiError(400, "limit must be an integer") from None
        if not 1 <= limit <= MAX_LIST:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIST}")
        before = None
        if q.get("before"):
            before = delivery_number(q["before"])
            if before is None:
                raise ApiError(400, f"before must be a delivery id such as dlv_42, got {q['before']!r}")
        rows = await self.store.list_deliveries(where, before=before, limit=limit)
        more = len(rows) == limit
        return reply({"deliveries": [delivery_json(d) for d in rows],
                      "next_before": f"dlv_{rows[-1].id}" if rows and more else None})

    def _delivery_id(self, request: web.Request) -> int:
        raw = request.match_info["id"]
        did = delivery_number(raw)
        if did is None:
            raise ApiError(404, f"no delivery with id {raw!r}")
        return did

    async def _delivery(self, did: int, *, attempts: bool = False) -> dict[str, Any]:
        found = await self.store.delivery(did)
        if found is None:
            raise ApiError(404, f"no delivery with id 'dlv_{did}'")
        doc = delivery_json(found.delivery)
        if attempts:
            doc["attempt_log"] = [
                {"at": format_timestamp(a.at), "duration_ms": a.duration_ms, "status_code": a.status_code,
                 "error": a.error, "response_body": a.response_body}
                for a in found.attempts
            ]
        return doc

    async def show_delivery(self, request: web.Request) -> web.Response:
        return reply(await self._delivery(self._delivery_id(request), attempts=True))

    async def retry_delivery(self, request: web.Request) -> web.Response:
        did = self._delivery_id(request)
        await self.ops.retry_delivery(did)
        return reply(await self._delivery(did))


def _token_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.Response(
                status=401,
                body=orjson.dumps({"error": "missing or wrong bearer token"}),
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return check
