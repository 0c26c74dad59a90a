"""The dashboard: server-rendered pages under /ui/ on the admin listeners.

One `Dashboard` per daemon holds the state every listener shares (sessions, log-in
links, the failed log-in limiter); `app()` builds a fresh aiohttp sub-application for
each listener. Pages are GETs; every action is a POST form answered with 303 to a page,
which shows the action's outcome from a one-shot server-side flash (so a signing secret
is rendered once, in a response to the browser, never in a URL).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from webhookd.apimodel import ApiError
from webhookd.config import DashboardConfig
from webhookd.filters import WebhookFilter
from webhookd.operations import Operations
from webhookd.store.base import Storage
from webhookd.store.model import DELIVERY_STATUSES, DeliveryFilter, NotFound
from webhookd.tokens import NOBODY, Principal, TokenAuth
from webhookd.ui.auth import FailedLogins, LoginLinks, Sessions
from webhookd.ui.render import PREFIX, Renderer
from webhookd.ui.security import MAX_FORM, Guard, see_other, session_of
from webhookd.ui.views_actions import ActionViews
from webhookd.ui.views_auth import AuthViews
from webhookd.ui.views_deliveries import DeliveryViews
from webhookd.ui.views_overview import OverviewViews
from webhookd.ui.views_webhooks import WebhookViews
from webhookd.webhooks import Webhook

NAV = (
    ("overview", "Overview", "/"), ("webhooks", "Webhooks", "/webhooks"), ("deliveries", "Deliveries", "/deliveries"),
)

_TITLES = {400: "Bad request", 403: "Refused", 404: "Not found", 405: "Method not allowed", 409: "Conflict",
           413: "Form too large", 415: "Unsupported form", 429: "Too many attempts", 500: "Server error",
           503: "Try again later"}


class Dashboard:
    prefix = PREFIX

    def __init__(
        self, ops: Operations, storage: Storage, cfg: DashboardConfig, *, production: bool, admin_token: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ops = ops
        self.storage = storage
        self.cfg = cfg
        self.production = production
        self.admin_token = admin_token
        self.clock = clock
        self.sessions = Sessions(cfg.session_ttl, clock)
        self.links = LoginLinks(cfg.login_link_ttl, clock)
        self.failed_logins = FailedLogins(clock)
        self.tokens: TokenAuth | None = None  # scoped API tokens log in too (set by the daemon)
        self.renderer = Renderer()
        self.guard = Guard(self)
        self.views = (
            AuthViews(self), OverviewViews(self), WebhookViews(self), ActionViews(self), DeliveryViews(self),
        )

    # -- the interface the daemon uses -------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard.middleware], client_max_size=MAX_FORM)
        for views in self.views:
            views.routes(app.router)
        app.router.add_get("/static/{version}/{name}", self.static, name="static")
        app.router.add_get("", self.slash)
        return app

    def create_login_link(self) -> tuple[str, float]:
        """("/ui/login/<token>", expiry): a one-time log-in link (the CLI's `webhookd dashboard`)."""
        token, expires = self.links.create()
        return f"{PREFIX}/login/{token}", expires

    # -- the principal's view: every screen reaches webhooks and deliveries through it --------
    def who(self, request: web.Request) -> Principal:
        session = session_of(request)
        return session.principal if session is not None else NOBODY

    def webhook(self, request: web.Request, webhook_id: str) -> Webhook:
        """A webhook the session may see; another tenant's is the NotFound of an unknown id."""
        wh = self.ops.webhook(webhook_id)
        if not self.who(request).sees(wh):
            raise NotFound(f"no webhook with id {webhook_id!r}")
        return wh

    def webhooks(self, request: web.Request) -> list[Webhook]:
        who = self.who(request)
        return [wh for wh in self.ops.scheduler.webhooks.values() if who.sees(wh)]

    def scoped_where(self, request: web.Request, where: DeliveryFilter) -> DeliveryFilter:
        """A scoped session must choose one of its webhooks (ApiError 400 without one)."""
        if self.who(request).admin:
            return where
        if where.webhook_id is None:
            raise ApiError(400, "Choose one of your webhooks to list its deliveries.")
        self.webhook(request, where.webhook_id)
        return where

    async def check_delivery(self, request: web.Request, delivery_id: int) -> None:
        """NotFound unless the delivery exists and its webhook is the session's."""
        who = self.who(request)
        if who.admin:
            return
        found = await self.storage.delivery(delivery_id)
        wh = self.ops.scheduler.webhooks.get(found.delivery.webhook_id) if found is not None else None
        if wh is None or not who.sees(wh):
            raise NotFound(f"no delivery with id 'dlv_{delivery_id}'")

    def check_covers(self, request: web.Request, f: WebhookFilter) -> None:
        who = self.who(request)
        if not who.covers(f):
            raise ApiError(403, "With an API token, a webhook's sender domains (filter from_domains) must lie"
                                f" within the token's domains: {', '.join(who.domains)}.")

    async def counts(self, request: web.Request, hooks: list[Webhook]) -> dict[str, int]:
        """Deliveries by status: all of them for the admin, the session's webhooks' otherwise."""
        if self.who(request).admin:
            return await self.storage.count_by_status()
        return {s: sum([await self.ops.count(DeliveryFilter(webhook_id=wh.id, statuses=(s,))) for wh in hooks])
                for s in DELIVERY_STATUSES}

    # -- helpers for the views ------------------------------------------------------------
    @property
    def now(self) -> float:
        """The time the data is shown against: the scheduler's clock."""
        return self.ops.clock

    def url(self, path: str) -> str:
        return PREFIX + path

    def redirect(self, path: str) -> web.Response:
        return see_other(PREFIX + path)

    def page(self, request: web.Request, template: str, ctx: dict[str, Any], *, status: int = 200,
             headers: dict[str, str] | None = None, nav: str = "") -> web.Response:
        session = session_of(request)
        base = {
            "session": session,
            "csrf": session.csrf if session is not None else "",
            "flashes": session.take_flashes() if session is not None else [],
            "nav": NAV,
            "active": nav,
            "now": self.now,
            "scoped": session is not None and not session.principal.admin,
        }
        return self.renderer.page(template, {**base, **ctx}, status=status, headers=headers)

    def error(self, request: web.Request, status: int, message: str, *,
              headers: dict[str, str] | None = None) -> web.Response:
        title = _TITLES.get(status, "Error")
        return self.page(request, "error.html", {"title": title, "message": message, "status": status},
                         status=status, headers=headers)

    async def slash(self, request: web.Request) -> web.Response:
        return self.redirect("/")

    async def static(self, request: web.Request) -> web.Response:
        found = self.renderer.static.get(request.match_info["name"])
        if found is None or found.version != request.match_info["version"]:
            raise web.HTTPNotFound()
        return web.Response(body=found.body, headers={
            "Content-Type": found.content_type, "Cache-Control": "public, max-age=31536000, immutable",
        })
