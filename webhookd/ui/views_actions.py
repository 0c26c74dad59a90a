"""A webhook's actions. Each is a POST answered with 303 to the webhook's page; the ones
that need a confirmation (enable with its backlog, replay, delete) have a GET step first
that shows what will happen (counts included) and carries the confirming form."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from multidict import MultiMapping

from webhookd.apimodel import ApiError
from webhookd.events import EVENT_TYPES
from webhookd.store.model import FAILED, PAUSED, PENDING, SUCCEEDED, DeliveryFilter
from webhookd.ui.auth import SecretFlash, Session, TestFlash
from webhookd.ui.forms import input_value, parse_time, statuses_of
from webhookd.ui.present import state_of
from webhookd.ui.security import form_of, session_of
from webhookd.webhooks import Webhook

if TYPE_CHECKING:
    from webhookd.ui.app import Dashboard

REPLAY_STATUSES = (FAILED, SUCCEEDED, PAUSED)


class ActionViews:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_post("/webhooks/{id}/disable", self.disable)
        r.add_get("/webhooks/{id}/enable", self.enable_confirm)
        r.add_post("/webhooks/{id}/enable", self.enable)
        r.add_post("/webhooks/{id}/test", self.test)
        r.add_post("/webhooks/{id}/secret", self.reveal_secret)
        r.add_post("/webhooks/{id}/rotate-secret", self.rotate_secret)
        r.add_get("/webhooks/{id}/replay", self.replay_confirm)
        r.add_post("/webhooks/{id}/replay", self.replay)
        r.add_get("/webhooks/{id}/delete", self.delete_confirm)
        r.add_post("/webhooks/{id}/delete", self.delete)

    def _webhook(self, request: web.Request) -> Webhook:
        return self.dash.webhook(request, request.match_info["id"])

    def _session(self, request: web.Request) -> Session:
        session = session_of(request)
        assert session is not None  # the guard lets no POST through without one
        return session

    def _back(self, wh: Webhook) -> web.Response:
        return self.dash.redirect(f"/webhooks/{wh.id}")

    async def _count(self, wh: Webhook, *statuses: str) -> int:
        return await self.dash.ops.count(DeliveryFilter(webhook_id=wh.id, statuses=statuses))

    # -- state ------------------------------------------------------------------------------
    async def disable(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.dash.ops.disable(wh)
        self._session(request).flash("Webhook disabled. New deliveries are kept as paused until it is enabled.")
        return self._back(wh)

    async def enable_confirm(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        return self.dash.page(request, "webhook_enable.html", {
            "wh": wh, "state": state_of(wh), "paused": await self._count(wh, PAUSED),
        }, nav="webhooks")

    async def enable(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        drop = form_of(request).get("drop_backlog") == "yes"
        count = await self.dash.ops.enable(wh, drop_backlog=drop)
        plural = "y" if count == 1 else "ies"
        what = f"{count} paused deliver{plural} dropped" if drop else f"{count} paused deliver{plural} resumed"
        self._session(request).flash(f"Webhook enabled; {what}.")
        return self._back(wh)

    # -- test and secrets -------------------------------------------------------------------
    async def test(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        event_type = form_of(request).get("event", "delivered")
        if event_type not in EVENT_TYPES:
            raise ApiError(400, f"unknown event {event_type!r} (expected one of {', '.join(EVENT_TYPES)})")
        outcome = await self.dash.ops.send_test(wh, event_type)
        self._session(request).test = TestFlash(
            webhook_id=wh.id, event_type=event_type, ok=outcome.success, status_code=outcome.status_code,
            duration_ms=outcome.duration_ms, body=outcome.response_body[:1024].decode("utf-8", "replace"),
            error=outcome.error,
        )
        return self._back(wh)

    async def reveal_secret(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        self._session(request).secret = SecretFlash(wh.id, wh.secret, "revealed")
        return self._back(wh)

    async def rotate_secret(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.dash.ops.rotate_secret(wh)
        self._session(request).secret = SecretFlash(wh.id, wh.secret, "rotated", wh.previous_secret_expires_at)
        return self._back(wh)

    # -- replay -----------------------------------------------------------------------------
    def _replay_args(self, wh: Webhook, q: MultiMapping[str]) -> tuple[float, list[str]]:
        since = parse_time("since", q.get("since", ""))
        statuses = statuses_of(q) or [FAILED]
        bad = [s for s in statuses if s not in REPLAY_STATUSES]
        if bad:
            raise ApiError(400, f"status must be drawn from {', '.join(REPLAY_STATUSES)}")
        return since, statuses

    async def replay_confirm(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        q = request.query
        try:
            since, statuses = self._replay_args(wh, q)
        except ApiError as exc:
            return self.dash.page(request, "webhook_replay.html", {
                "wh": wh, "error": exc.message, "since": q.get("since", ""), "statuses": statuses_of(q),
                "count": None, "replay_statuses": REPLAY_STATUSES,
            }, status=400, nav="webhooks")
        count = await self.dash.ops.count(DeliveryFilter(webhook_id=wh.id, statuses=tuple(statuses), since=since))
        return self.dash.page(request, "webhook_replay.html", {
            "wh": wh, "error": None, "since": input_value(since), "since_ts": since, "statuses": statuses,
            "count": count, "replay_statuses": REPLAY_STATUSES, "pending_after": PENDING if wh.enabled else PAUSED,
        }, nav="webhooks")

    async def replay(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        since, statuses = self._replay_args(wh, form_of(request))
        count = await self.dash.ops.replay(wh, since=since, statuses=statuses)
        plural = "y" if count == 1 else "ies"
        state = "queued again" if wh.enabled else "queued again as paused (the webhook is disabled)"
        self._session(request).flash(f"{count} deliver{plural} {state}.")
        return self._back(wh)

    # -- delete -----------------------------------------------------------------------------
    async def delete_confirm(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        self.dash.ops.editable(wh)  # a declared one: 409 naming its file, no form
        return self.dash.page(request, "webhook_delete.html", {
            "wh": wh, "waiting": await self._count(wh, PENDING, PAUSED),
        }, nav="webhooks")

    async def delete(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        await self.dash.ops.delete(wh)
        self._session(request).flash(f"Webhook {wh.id} deleted.")
        return self.dash.redirect("/webhooks")
