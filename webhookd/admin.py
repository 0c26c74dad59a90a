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
from webhookd.ids import new_id
from webhookd.metrics import CONTENT_TYPE, Metrics
from webhookd.scheduler import Scheduler, Webhook
from webhookd.signing import generate_secret
from webhookd.store import DELIVERY_STATUSES, FAILED, PAUSED, SUCCEEDED, StoreError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROTATION_GRACE = 24 * 3600.0
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


DELIVERY_SELECT = (
    "SELECT d.id, e.uid, d.webhook_id, e.type, d.status, d.attempts, d.next_attempt_at,"
    " d.last_status_code, d.last_error, d.created_at, d.updated_at"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
)


def delivery_json(row: Any) -> dict[str, Any]:
    return {
        "id": f"dlv_{row[0]}",
        "event_id": row[1],
        "webhook_id": row[2],
        "event": row[3],
        "status": row[4],
        "attempts": row[5],
        "next_attempt_at": format_timestamp(row[6]) if row[6] is not None else None,
        "last_status_code": row[7],
        "last_error": row[8],
        "created_at": format_timestamp(row[9]),
        "updated_at": format_timestamp(row[10]),
    }


class AdminApi:
    def __init__(self, scheduler: Scheduler, *, production: bool, started: float | None = None) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
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
        except StoreError as exc:
            return reply({"error": str(exc)}, 503)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return reply({"error": exc.reason}, exc.status)
            raise

    # -- helpers ---------------------------------------------------------------------
    def _webhook(self, request: web.Request) -> Webhook:
        wid = request.match_info["id"]
        wh = self.scheduler.webhooks.get(wid)
        if wh is None:
            raise ApiError(404, f"no webhook with id {wid!r}")
        return wh

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
        rows = await self.store.read("SELECT status, count(*) FROM deliveries GROUP BY status")
        deliveries = dict.fromkeys(DELIVERY_STATUSES, 0)
        deliveries.update({row[0]: row[1] for row in rows})
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
        now = self.scheduler.clock()
        wh = Webhook(
            id=new_id("wh"),
            url=validate_url(body.get("url"), production=self.production),
            events=validate_events(body.get("events", ["*"])),
            description=validate_description(body.get("description")),
            enabled=True,
            disabled_reason=None,
            consecutive_failures=0,
            backoff_until=0.0,
            secret=generate_secret(),
            previous_secret=None,
            previous_secret_expires_at=None,
            created_at=now,
            updated_at=now,
        )
        await self.scheduler.create(wh)
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
        await self.scheduler.update(wh, url=url, events=events, description=description)
        return reply(wh.public())

    async def delete_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.scheduler.delete(wh)
        return reply({"deleted": wh.id})

    async def enable_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        body = await self._body(request)
        drop = body.get("drop_backlog", False)
        if not isinstance(drop, bool):
            raise ApiError(400, "drop_backlog must be true or false")
        _, count = await self.scheduler.enable(wh, drop_backlog=drop)
        key = "dropped" if drop else "resumed"
        return reply({**wh.public(), key: count})

    async def disable_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.scheduler.disable(wh)
        return reply(wh.public())

    async def test_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        body = await self._body(request)
        event_type = body.get("event") or "delivered"
        if event_type not in EVENT_TYPES:
            raise ApiError(400, f"unknown event {event_type!r} (expected one of {', '.join(EVENT_TYPES)})")
        outcome = await self.scheduler.send_test(wh, event_type)
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
        await self.scheduler.rotate_secret(wh, generate_secret(), ROTATION_GRACE)
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
        count = await self.scheduler.replay(wh, since=since, statuses=statuses)
        return reply({"id": wh.id, "replayed": count, "since": format_timestamp(since), "status": statuses})

    async def show_secret(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        return reply({"id": wh.id, "secret": wh.secret})

    async def list_deliveries(self, request: web.Request) -> web.Response:
        q = request.query
        where: list[str] = []
        params: list[Any] = []
        if q.get("webhook_id"):
            where.append("d.webhook_id = ?")
            params.append(q["webhook_id"])
        if q.get("status"):
            statuses = [s.strip() for s in q["status"].split(",") if s.strip()]
            bad = [s for s in statuses if s not in DELIVERY_STATUSES]
            if bad:
                raise ApiError(400, f"unknown status {bad[0]!r} (expected one of {', '.join(DELIVERY_STATUSES)})")
            where.append(f"d.status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            raise ApiError(400, "limit must be an integer") from None
        if not 1 <= limit <= MAX_LIST:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIST}")
        sql = DELIVERY_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY d.id DESC LIMIT ?"
        rows = await self.store.read(sql, [*params, limit])
        return reply({"deliveries": [delivery_json(r) for r in rows]})

    def _delivery_id(self, request: web.Request) -> int:
        raw = request.match_info["id"]
        digits = raw.removeprefix("dlv_")
        if not digits.isdigit() or len(digits) > 18:
            raise ApiError(404, f"no delivery with id {raw!r}")
        return int(digits)

    async def _delivery(self, did: int) -> dict[str, Any]:
        rows = await self.store.read(DELIVERY_SELECT + " WHERE d.id = ?", (did,))
        if not rows:
            raise ApiError(404, f"no delivery with id 'dlv_{did}'")
        return delivery_json(rows[0])

    async def show_delivery(self, request: web.Request) -> web.Response:
        did = self._delivery_id(request)
        delivery = await self._delivery(did)
        attempts = await self.store.read(
            "SELECT at, duration_ms, status_code, error, response_body FROM attempts"
            " WHERE delivery_id = ? ORDER BY id",
            (did,),
        )
        delivery["attempt_log"] = [
            {
                "at": format_timestamp(a[0]),
                "duration_ms": a[1],
                "status_code": a[2],
                "error": a[3],
                "response_body": a[4],
            }
            for a in attempts
        ]
        return reply(delivery)

    async def retry_delivery(self, request: web.Request) -> web.Response:
        did = self._delivery_id(request)
        try:
            await self.scheduler.retry_delivery(did)
        except KeyError:
            raise ApiError(404, f"no delivery with id 'dlv_{did}'") from None
        except RuntimeError as exc:
            raise ApiError(409, str(exc)) from None
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
