"""The admin API: JSON over HTTP on the admin Unix socket (and optional TCP)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from webhookd import __version__
from webhookd.apimodel import (
    ApiError,
    delivery_filter,
    delivery_json,
    delivery_number,
    parse_rfc3339,
    reply,
    validate_batching,
    validate_description,
    validate_events,
    validate_filter,
    validate_url,
    webhook_stats_json,
)
from webhookd.batching import FIELDS as BATCH_FIELDS
from webhookd.events import EVENT_TYPES, EventError, format_timestamp
from webhookd.filters import FilterError, parse_domains
from webhookd.ids import new_id
from webhookd.metrics import CONTENT_TYPE, Metrics
from webhookd.operations import Operations
from webhookd.scheduler import Scheduler
from webhookd.store import (
    FAILED,
    PAUSED,
    SUCCEEDED,
    ApiToken,
    Conflict,
    DeliveryFilter,
    NotFound,
    Storage,
    StoreError,
)
from webhookd.tokens import ADMIN, Principal, TokenAuth, new_token, token_hash, token_json
from webhookd.webhooks import Webhook

__all__ = [  # re-exported: the dashboard and the tests import them from here
    "AdminApi", "ApiError", "delivery_filter", "delivery_json", "delivery_number", "parse_rfc3339", "reply",
    "validate_description", "validate_events", "validate_filter", "validate_url", "webhook_stats_json",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LIST = 1000
WEBHOOK_FIELDS = frozenset({"url", "events", "description", "filter", *BATCH_FIELDS})
TOKEN_FIELDS = frozenset({"domains", "read_only", "description"})

# Who may call each route: every route of the admin app is here (tests/test_tokens.py fails
# for one that is not). "admin": the admin token and the Unix socket only, a scoped token
# gets the same 404 as an unknown path; "read": a scoped token too, its handler showing only
# the principal's webhooks and deliveries; "write": the same, and a read-only token gets 403.
# A route missing here is admin-only (default deny).
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "read",
    ("GET", "/metrics"): "admin",  # global counts
    ("GET", "/v1/status"): "admin",  # global counts
    ("GET", "/v1/stats"): "admin",  # global counts and every webhook
    ("POST", "/v1/dashboard/links"): "admin",  # a link logs in as the admin
    ("POST", "/v1/tokens"): "admin",
    ("GET", "/v1/tokens"): "admin",
    ("DELETE", "/v1/tokens/{id}"): "admin",
    ("GET", "/v1/tracking"): "admin",
    ("POST", "/v1/tracking/sign"): "admin",
    ("PUT", "/v1/tracking/opt-outs/{address}"): "admin",
    ("DELETE", "/v1/tracking/opt-outs/{address}"): "admin",
    ("POST", "/v1/webhooks"): "write",
    ("GET", "/v1/webhooks"): "read",
    ("GET", "/v1/webhooks/{id}"): "read",
    ("PATCH", "/v1/webhooks/{id}"): "write",
    ("DELETE", "/v1/webhooks/{id}"): "write",
    ("POST", "/v1/webhooks/{id}/enable"): "write",
    ("POST", "/v1/webhooks/{id}/disable"): "write",
    ("POST", "/v1/webhooks/{id}/test"): "write",
    ("POST", "/v1/webhooks/{id}/rotate-secret"): "write",
    ("POST", "/v1/webhooks/{id}/replay"): "write",
    ("GET", "/v1/webhooks/{id}/secret"): "write",  # the signing secret: not for a read-only token
    ("GET", "/v1/deliveries"): "read",
    ("GET", "/v1/deliveries/count"): "read",
    ("POST", "/v1/deliveries/retry-failed"): "write",
    ("GET", "/v1/deliveries/{id}"): "read",
    ("POST", "/v1/deliveries/{id}/retry"): "write",
}
_PRINCIPAL = web.RequestKey("webhookd_principal", Principal)


def principal_of(request: web.Request) -> Principal:
    """The request's principal, set by the admin app's auth middleware (KeyError if none: fail closed)."""
    return request[_PRINCIPAL]


def route_class(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return "admin"
    return ROUTES.get((route.method, resource.canonical), "admin")


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
        # the dashboard (webhookd.ui), mounted under /ui/ when the daemon enables it
        self.ui: Callable[[], web.Application] | None = None
        self.login_link: Callable[[], tuple[str, float]] | None = None
        # /v1/tracking/... (webhookd.tracking.api), added by the daemon
        self.tracking: Any = None
        self.tokens = TokenAuth(storage, time.time)

    def app(self, token: str = "") -> web.Application:
        """The admin API; with `token` (admin.http_listen), every request must bear it or a
        scoped token; without (the admin Unix socket), every request is the admin."""
        middlewares = [self._errors, _token_middleware(token, self.tokens) if token else _admin_middleware]
        app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
        if self.ui is not None:
            ui = self.ui()
            ui[UI_APP] = True
            app.add_subapp("/ui/", ui)
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
        r.add_get("/v1/stats", self.stats)
        r.add_post("/v1/dashboard/links", self.dashboard_link)
        r.add_get("/v1/deliveries", self.list_deliveries)
        r.add_get("/v1/deliveries/count", self.count_deliveries)
        r.add_post("/v1/deliveries/retry-failed", self.retry_failed)
        r.add_get("/v1/deliveries/{id}", self.show_delivery)
        r.add_post("/v1/deliveries/{id}/retry", self.retry_delivery)
        r.add_post("/v1/tokens", self.create_token)
        r.add_get("/v1/tokens", self.list_tokens)
        r.add_delete("/v1/tokens/{id}", self.revoke_token)
        if self.tracking is not None:
            self.tracking.add_routes(r)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if in_ui(request):
            return await handler(request)  # the dashboard answers its own errors, in HTML
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

    # -- helpers: the principal's view ----------------------------------------------------
    # Every route reaches a webhook through `_webhook`, a delivery through `_visible_delivery`,
    # lists through `_webhooks` and `_scoped_filter`: a scoped principal's foreign webhook or
    # delivery is the same NotFound as one that does not exist.
    def _webhook(self, request: web.Request, webhook_id: str | None = None) -> Webhook:
        wid = request.match_info["id"] if webhook_id is None else webhook_id
        wh = self.ops.webhook(wid)
        if not principal_of(request).sees(wh):
            raise NotFound(f"no webhook with id {wid!r}")
        return wh

    def _webhooks(self, request: web.Request) -> list[Webhook]:
        who = principal_of(request)
        return [wh for wh in self.scheduler.webhooks.values() if who.sees(wh)]

    def _scoped_filter(self, request: web.Request, where: DeliveryFilter) -> DeliveryFilter:
        """A scoped principal must name one of its webhooks (404 otherwise, as for an unknown one)."""
        if principal_of(request).admin:
            return where
        if where.webhook_id is None:
            raise ApiError(400, "webhook_id is required with a scoped token")
        self._webhook(request, where.webhook_id)
        return where

    def _visible_delivery(self, request: web.Request, webhook_id: str, did: int) -> None:
        who = principal_of(request)
        wh = self.scheduler.webhooks.get(webhook_id)
        if not who.admin and (wh is None or not who.sees(wh)):
            raise ApiError(404, f"no delivery with id 'dlv_{did}'")

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
    async def stats(self, request: web.Request) -> web.Response:
        """What the dashboard's overview and webhooks list show, in one document."""
        try:
            hours = int(request.query.get("hours", "24"))
        except ValueError:
            raise ApiError(400, "hours must be an integer") from None
        if not 1 <= hours <= 24 * 31:
            raise ApiError(400, "hours must be between 1 and 744")
        now = self.scheduler.clock()
        deliveries = await self.store.count_by_status()
        stats = await self.store.webhook_stats(now)
        hourly = await self.store.hourly_counts(now - hours * 3600, now + 1)
        return reply({
            "deliveries": deliveries,
            "webhooks": [webhook_stats_json(wh, stats.get(wh.id)) for wh in self.scheduler.webhooks.values()],
            "hourly": [{"hour": format_timestamp(h.hour), "succeeded": h.succeeded, "failed": h.failed}
                       for h in hourly],
        })

    async def dashboard_link(self, request: web.Request) -> web.Response:
        if self.login_link is None:
            raise ApiError(404, "the dashboard is disabled (dashboard.enabled = false)")
        path, expires = self.login_link()
        return reply({"path": path, "expires_at": format_timestamp(expires)}, 201)

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
        oldest = await self.store.oldest_pending()
        self.metrics.gauges = {
            "deliveries": deliveries,
            "webhooks": webhooks,
            "in_flight": self.scheduler.in_flight,
            "store_queue": self.store.queued,
            "oldest_pending_age_seconds": 0.0 if oldest is None else max(0.0, self.scheduler.clock() - oldest),
            **self.gauges(),
        }
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def create_webhook(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        unknown = set(body) - WEBHOOK_FIELDS
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
        url = validate_url(body.get("url"), production=self.production)
        events = validate_events(body.get("events", ["*"]))
        description = validate_description(body.get("description"))
        filter_ = validate_filter(body.get("filter"))
        _check_covers(principal_of(request), filter_)
        batching = validate_batching(body)
        wh = await self.ops.create(url=url, events=events, description=description, filter=filter_,
                                   batching=batching)
        return reply({**wh.public(), "secret": wh.secret}, 201)

    async def list_webhooks(self, request: web.Request) -> web.Response:
        return reply({"webhooks": [wh.public() for wh in self._webhooks(request)]})

    async def show_webhook(self, request: web.Request) -> web.Response:
        return reply(self._webhook(request).public())

    async def update_webhook(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        body = await self._body(request)
        unknown = set(body) - WEBHOOK_FIELDS
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
        url = validate_url(body["url"], production=self.production) if "url" in body else None
        events = validate_events(body["events"]) if "events" in body else None
        description = validate_description(body["description"]) if "description" in body else None
        filter_ = validate_filter(body["filter"]) if "filter" in body else None  # replaced whole; null/{} clears
        if filter_ is not None:
            _check_covers(principal_of(request), filter_)
        batching = validate_batching(body, wh.batching) if set(BATCH_FIELDS) & set(body) else None
        await self.ops.update(wh, url=url, events=events, description=description, filter=filter_,
                              batching=batching)
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
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ApiError(400, "dry_run must be true or false")
        statuses = body.get("status", ["failed"])
        if isinstance(statuses, str):
            statuses = [s.strip() for s in statuses.split(",") if s.strip()]
        allowed = (FAILED, PAUSED, SUCCEEDED)
        if not isinstance(statuses, list) or not statuses or any(s not in allowed for s in statuses):
            raise ApiError(400, f"status must be a list drawn from {', '.join(allowed)}")
        if dry_run:
            count = await self.ops.count(DeliveryFilter(webhook_id=wh.id, statuses=tuple(statuses), since=since))
            return reply({"id": wh.id, "would_replay": count, "since": format_timestamp(since), "status": statuses})
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
        where = self._scoped_filter(request, where)
        rows = await self.store.list_deliveries(where, before=before, limit=limit)
        more = len(rows) == limit
        return reply({"deliveries": [delivery_json(d) for d in rows],
                      "next_before": f"dlv_{rows[-1].id}" if rows and more else None})

    async def count_deliveries(self, request: web.Request) -> web.Response:
        where = self._scoped_filter(request, delivery_filter(request.query))
        return reply({"count": await self.ops.count(where)})

    async def retry_failed(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        unknown = set(body) - {"webhook_id", "event", "message_id", "to", "since", "until", "batch"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
        if not all(isinstance(v, str) for v in body.values()):
            raise ApiError(400, "every filter must be a string")
        count = await self.ops.retry_failed(self._scoped_filter(request, delivery_filter(body)))
        return reply({"retried": count})

    def _delivery_id(self, request: web.Request) -> int:
        raw = request.match_info["id"]
        did = delivery_number(raw)
        if did is None:
            raise ApiError(404, f"no delivery with id {raw!r}")
        return did

    async def _delivery(self, request: web.Request, did: int, *, attempts: bool = False) -> dict[str, Any]:
        found = await self.store.delivery(did)
        if found is None:
            raise ApiError(404, f"no delivery with id 'dlv_{did}'")
        self._visible_delivery(request, found.delivery.webhook_id, did)
        doc = delivery_json(found.delivery)
        if attempts:
            doc["attempt_log"] = [
                {"at": format_timestamp(a.at), "duration_ms": a.duration_ms, "status_code": a.status_code,
                 "error": a.error, "response_body": a.response_body, "batch_id": a.batch_id}
                for a in found.attempts
            ]
        return doc

    async def show_delivery(self, request: web.Request) -> web.Response:
        return reply(await self._delivery(request, self._delivery_id(request), attempts=True))

    async def retry_delivery(self, request: web.Request) -> web.Response:
        did = self._delivery_id(request)
        await self._delivery(request, did)  # 404 before anything changes for another tenant's delivery
        await self.ops.retry_delivery(did)
        return reply(await self._delivery(request, did))

    # -- scoped API tokens (admin only: ROUTES) ---------------------------------------------
    async def create_token(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        unknown = set(body) - TOKEN_FIELDS
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
        raw = body.get("domains")
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "domains is required: a non-empty list of sender domains (*.example allowed)")
        try:
            domains = parse_domains(raw, "domains")
        except FilterError as exc:
            raise ApiError(400, str(exc)) from None
        read_only = body.get("read_only", False)
        if not isinstance(read_only, bool):
            raise ApiError(400, "read_only must be true or false")
        description = validate_description(body.get("description"))
        secret = new_token()
        record = ApiToken(id=new_id("tok"), hash=token_hash(secret), domains=domains, read_only=read_only,
                          description=description, created_at=time.time())
        await self.store.create_token(record)
        return reply({**token_json(record), "token": secret}, 201)

    async def list_tokens(self, request: web.Request) -> web.Response:
        return reply({"tokens": [token_json(t) for t in await self.store.list_tokens()]})

    async def revoke_token(self, request: web.Request) -> web.Response:
        tid = request.match_info["id"]
        if not await self.store.revoke_token(tid, now=time.time()):
            raise ApiError(404, f"no token with id {tid!r} that is not revoked already")
        return reply({"revoked": tid})


def _check_covers(who: Principal, f: Any) -> None:
    if not who.covers(f):
        raise ApiError(
            403, "a scoped token can only give a webhook a filter whose from_domains lie within its domains"
            f" ({', '.join(who.domains)})"
        )


UI_APP = web.AppKey("webhookd_ui", bool)


def in_ui(request: web.Request) -> bool:
    """Whether the request was routed into the dashboard's sub-application."""
    return any(app.get(UI_APP, False) for app in request.match_info.apps)


@web.middleware
async def _admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The admin Unix socket: whoever can open it is the admin (its file mode decides)."""
    request[_PRINCIPAL] = ADMIN
    return await handler(request)


def _token_middleware(token: str, tokens: TokenAuth) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if in_ui(request):
            return await handler(request)  # the dashboard has its own log-in and sessions
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            request[_PRINCIPAL] = ADMIN
            return await handler(request)
        who = await tokens.principal(given.removeprefix("Bearer ")) if given.startswith("Bearer ") else None
        if who is None:
            return web.Response(
                status=401,
                body=orjson.dumps({"error": "missing or wrong bearer token"}),
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        request[_PRINCIPAL] = who
        kind = route_class(request)
        if kind == "admin":
            return reply({"error": "Not Found"}, 404)  # what an unknown path answers
        if kind == "write" and who.read_only:
            return reply({"error": "this token is read-only"}, 403)
        return await handler(request)

    return check
