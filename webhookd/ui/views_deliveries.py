"""Deliveries: the filtered, keyset-paginated list (and its live-refreshed rows), retrying
every failed delivery that matches, and one delivery's page with its attempts."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from webhookd.apimodel import ApiError, delivery_number
from webhookd.events import EVENT_TYPES
from webhookd.store.model import DELIVERY_STATUSES, FAILED, PAUSED, Conflict, NotFound
from webhookd.ui.auth import Session
from webhookd.ui.forms import Filters, parse_filters
from webhookd.ui.security import form_of, session_of
from webhookd.ui.snippets import sent_headers

if TYPE_CHECKING:
    from webhookd.ui.app import Dashboard

PAGE = 50


def pretty_json(body: bytes) -> str:
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


class DeliveryViews:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/deliveries", self.list)
        r.add_get("/deliveries/rows", self.rows)
        r.add_get("/deliveries/retry-failed", self.retry_failed_confirm)
        r.add_post("/deliveries/retry-failed", self.retry_failed)
        r.add_get("/deliveries/{id}", self.detail)
        r.add_post("/deliveries/{id}/retry", self.retry)

    def _session(self, request: web.Request) -> Session:
        session = session_of(request)
        assert session is not None
        return session

    async def list(self, request: web.Request) -> web.Response:
        dash = self.dash
        f = parse_filters(request.query)
        before_text = request.query.get("before", "").strip()
        before = delivery_number(before_text) if before_text else None
        error = f.error
        if before_text and before is None:
            error = f"before must be a delivery id such as dlv_42, got {before_text!r}"
        rows = []
        if error is None:
            try:
                where = dash.scoped_where(request, f.where)
            except ApiError as exc:
                error = exc.message
            else:
                rows = await dash.storage.list_deliveries(where, before=before, limit=PAGE + 1)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        hooks = dash.webhooks(request)
        known = {wh.id for wh in hooks}
        return dash.page(request, "deliveries.html", {
            "f": f,
            "error": error,
            "rows": rows,
            "first_page": before is None,
            "older": dash.url("/deliveries" + f.query(("before", f"dlv_{rows[-1].id}"))) if more else None,
            "newest": dash.url("/deliveries" + f.query()),
            "live_src": dash.url("/deliveries/rows" + f.query()),
            "retry_url": dash.url("/deliveries/retry-failed" + f.query()),
            "hooks": hooks,
            "unknown_hook": f.values.get("webhook_id") if f.values.get("webhook_id") not in known else None,
            "statuses": DELIVERY_STATUSES,
            "event_types": EVENT_TYPES,
        }, status=400 if error else 200, nav="deliveries")

    async def rows(self, request: web.Request) -> web.Response:
        """The first page's table rows alone, for the live refresh."""
        dash = self.dash
        f = parse_filters(request.query)
        rows = [] if f.error else await dash.storage.list_deliveries(dash.scoped_where(request, f.where), limit=PAGE)
        return dash.renderer.page("_delivery_rows.html", {"rows": rows, "now": dash.now})

    def _retry_filters(self, f: Filters) -> Filters:
        """What 'retry all failed that match' acts on: the filters, with the status one
        replaced by failed."""
        return replace(f, where=replace(f.where, statuses=(FAILED,)), statuses=[])

    async def retry_failed_confirm(self, request: web.Request) -> web.Response:
        dash = self.dash
        f = parse_filters(request.query)
        if f.error:
            return dash.error(request, 400, f.error)
        target = self._retry_filters(f)
        count = await dash.ops.count(dash.scoped_where(request, target.where))
        return dash.page(request, "deliveries_retry.html", {
            "f": target, "count": count, "ignored_status": bool(f.statuses) and f.statuses != [FAILED],
            "back": dash.url("/deliveries" + f.query()),
        }, nav="deliveries")

    async def retry_failed(self, request: web.Request) -> web.Response:
        dash = self.dash
        f = parse_filters(form_of(request))
        if f.error:
            return dash.error(request, 400, f.error)
        target = self._retry_filters(f)
        count = await dash.ops.retry_failed(dash.scoped_where(request, target.where))
        plural = "y" if count == 1 else "ies"
        self._session(request).flash(f"{count} failed deliver{plural} queued again.")
        return dash.redirect("/deliveries" + target.query(("status", FAILED)))

    def _delivery_id(self, request: web.Request) -> int:
        raw = request.match_info["id"]
        did = delivery_number(raw)
        if did is None:
            raise NotFound(f"no delivery with id {raw!r}")
        return did

    async def detail(self, request: web.Request) -> web.Response:
        dash = self.dash
        did = self._delivery_id(request)
        await dash.check_delivery(request, did)
        found = await dash.storage.delivery(did)
        if found is None:
            raise NotFound(f"no delivery with id 'dlv_{did}'")
        d = found.delivery
        last_at = found.attempts[-1].at if found.attempts else None
        last_batch = found.attempts[-1].batch_id if found.attempts else None
        return dash.page(request, "delivery.html", {
            "d": d,
            "payload": pretty_json(found.body),
            "headers": sent_headers(d, last_at, last_batch),
            "last_batch": last_batch,
            "batches": list(dict.fromkeys(a.batch_id for a in found.attempts if a.batch_id)),
            "attempted": last_at is not None,
            "attempts": found.attempts,
            "wh": dash.ops.scheduler.webhooks.get(d.webhook_id),
            "retryable": d.status != PAUSED or d.webhook_id in dash.ops.scheduler.webhooks,
        }, nav="deliveries")

    async def retry(self, request: web.Request) -> web.Response:
        did = self._delivery_id(request)
        session = self._session(request)
        await self.dash.check_delivery(request, did)
        try:
            status = await self.dash.ops.retry_delivery(did)
        except Conflict as exc:
            session.flash(f"Not retried: {exc}.", "error")
        else:
            if status == PAUSED:
                session.flash("The webhook is disabled: the delivery is paused until the webhook is enabled.")
            else:
                session.flash("The delivery is queued for an attempt now.")
        return self.dash.redirect(f"/deliveries/dlv_{did}")
