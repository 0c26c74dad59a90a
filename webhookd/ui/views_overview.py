"""The overview (counts and disabled webhooks) and its chart, which the page loads after itself."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from aiohttp import web

from webhookd.store.model import DELIVERY_STATUSES
from webhookd.ui import chart
from webhookd.ui.present import state_of

if TYPE_CHECKING:
    from webhookd.ui.app import Dashboard


class OverviewViews:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/", self.overview)
        r.add_get("/chart.svg", self.chart)

    async def overview(self, request: web.Request) -> web.Response:
        dash = self.dash
        hooks = dash.webhooks(request)
        counts = await dash.counts(request, hooks)
        states = Counter(state_of(wh).key for wh in hooks)
        disabled = [(wh, state_of(wh)) for wh in hooks if not wh.enabled]
        return dash.page(request, "overview.html", {
            "counts": [(s, counts.get(s, 0)) for s in DELIVERY_STATUSES],
            "total": sum(counts.values()),
            "states": [(k, states.get(k, 0)) for k in ("active", "failing", "disabled")],
            "webhook_count": len(hooks),
            "disabled": disabled,
        }, nav="overview")

    async def chart(self, request: web.Request) -> web.Response:
        now = self.dash.now
        start = (int(now // chart.HOUR) - 23) * chart.HOUR
        counts = await self.dash.storage.hourly_counts(start, now + 1)
        return web.Response(text=chart.render(counts, start, 24), content_type="image/svg+xml")
