"""Webhooks: the list, the create form, and a webhook's page with its edit form."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiDictProxy

from webhookd.apimodel import (
    ApiError,
    validate_batching,
    validate_description,
    validate_events,
    validate_filter,
    validate_url,
)
from webhookd.batching import FIELDS as BATCH_FIELDS
from webhookd.batching import OFF, Batching
from webhookd.events import EVENT_TYPES
from webhookd.filters import MAX_METADATA, WebhookFilter
from webhookd.store.model import DeliveryFilter, WebhookStats
from webhookd.ui.auth import SecretFlash
from webhookd.ui.forms import input_value
from webhookd.ui.present import events_text, state_of, webhook_row
from webhookd.ui.security import form_of, session_of
from webhookd.ui.snippets import verification_snippets
from webhookd.webhooks import Webhook

if TYPE_CHECKING:
    from webhookd.ui.app import Dashboard

RECENT = 20


FILTER_INPUTS = ("from_domains", "to_domains", "tags", "metadata")


def _split(text: str) -> list[str]:
    """A comma-separated field (newlines count as commas)."""
    return [v.strip() for v in text.replace("\n", ",").split(",") if v.strip()]


def read_filter_form(form: MultiDictProxy[str]) -> WebhookFilter:
    """Plain inputs: domains and tags comma-separated, metadata as key=value lines."""
    metadata: dict[str, str] = {}
    lines = [line for line in form.get("metadata", "").splitlines() if line.strip()]
    if len(lines) > MAX_METADATA:
        raise ApiError(400, f"filter.metadata: at most {MAX_METADATA} pairs, got {len(lines)}")
    for n, line in enumerate(lines, 1):
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise ApiError(400, f"filter.metadata line {n}: expected key=value")
        metadata[key.strip()] = value.strip()
    return validate_filter({
        "from_domains": _split(form.get("from_domains", "")),
        "to_domains": _split(form.get("to_domains", "")),
        "tags": list(dict.fromkeys(_split(form.get("tags", "")))),
        "metadata": metadata,
    })


def filter_values(f: WebhookFilter) -> dict[str, str]:
    """A filter as the form's inputs show it."""
    return {
        "from_domains": ", ".join(f.from_domains), "to_domains": ", ".join(f.to_domains), "tags": ", ".join(f.tags),
        "metadata": "\n".join(f"{k}={v}" for k, v in f.metadata),
    }


def read_batch_form(form: MultiDictProxy[str]) -> Batching:
    """The three batch inputs (an empty one: its default); the API's rules and texts."""
    fields: dict[str, object] = {}
    for name in ("batch_max_events", "batch_max_bytes"):
        text = form.get(name, "").strip()
        if text:
            fields[name] = int(text) if text.isdigit() and len(text) <= 18 else text
    linger = form.get("batch_linger", "").strip()
    if linger:
        fields["batch_linger"] = linger
    return validate_batching(fields)


def batch_values(b: Batching) -> dict[str, str]:
    """Batch settings as the form's inputs show them."""
    return {k: str(v) for k, v in b.to_json().items()}


def read_webhook_form(
    form: MultiDictProxy[str], *, production: bool
) -> tuple[str, tuple[str, ...], str, WebhookFilter, Batching]:
    events = form.getall("events", [])
    return (
        validate_url(form.get("url", "").strip(), production=production),
        validate_events(["*"] if "*" in events else events),
        validate_description(form.get("description", "")),
        read_filter_form(form),
        read_batch_form(form),
    )


def form_values(form: MultiDictProxy[str]) -> dict[str, Any]:
    return {"url": form.get("url", ""), "events": form.getall("events", []),
            "description": form.get("description", ""), **{k: form.get(k, "") for k in FILTER_INPUTS},
            **{k: form.get(k, "") for k in BATCH_FIELDS}}


class WebhookViews:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/webhooks", self.list)
        r.add_get("/webhooks/new", self.new)
        r.add_post("/webhooks/new", self.create)
        r.add_get("/webhooks/{id}", self.detail)
        r.add_post("/webhooks/{id}", self.edit)

    def _webhook(self, request: web.Request) -> Webhook:
        return self.dash.webhook(request, request.match_info["id"])

    async def list(self, request: web.Request) -> web.Response:
        dash = self.dash
        stats = await dash.storage.webhook_stats(dash.now)
        rows = [webhook_row(wh, stats.get(wh.id)) for wh in dash.webhooks(request)]
        return dash.page(request, "webhooks.html", {"rows": rows, "events_text": events_text}, nav="webhooks")

    async def new(self, request: web.Request) -> web.Response:
        return self._new_form(request, {"url": "", "events": ["*"], "description": "",
                                        **filter_values(WebhookFilter()), **batch_values(OFF)})

    def _new_form(self, request: web.Request, values: dict[str, Any], error: str | None = None,
                  status: int = 200) -> web.Response:
        return self.dash.page(request, "webhook_new.html", {
            "values": values, "error": error, "event_types": EVENT_TYPES, "production": self.dash.production,
        }, status=status, nav="webhooks")

    async def create(self, request: web.Request) -> web.Response:
        form = form_of(request)
        try:
            url, events, description, filter_, batching = read_webhook_form(form, production=self.dash.production)
            self.dash.check_covers(request, filter_)
        except ApiError as exc:
            return self._new_form(request, form_values(form), exc.message, status=exc.status)
        wh = await self.dash.ops.create(url=url, events=events, description=description, filter=filter_,
                                        batching=batching)
        session = session_of(request)
        assert session is not None
        session.secret = SecretFlash(wh.id, wh.secret, "created")
        session.flash(f"Webhook {wh.id} created.")
        return self.dash.redirect(f"/webhooks/{wh.id}")

    async def detail(self, request: web.Request) -> web.Response:
        return await self._detail(request, self._webhook(request))

    async def _detail(self, request: web.Request, wh: Webhook, *, values: dict[str, Any] | None = None,
                      error: str | None = None, status: int = 200) -> web.Response:
        dash = self.dash
        stats = (await dash.storage.webhook_stats(dash.now)).get(wh.id) or WebhookStats(wh.id)
        recent = await dash.storage.list_deliveries(DeliveryFilter(webhook_id=wh.id), limit=RECENT)
        session = session_of(request)
        secret = session.take_secret(wh.id) if session is not None else None
        test = session.take_test(wh.id) if session is not None else None
        return dash.page(request, "webhook.html", {
            "wh": wh,
            "state": state_of(wh),
            "row": webhook_row(wh, stats),
            "stats": stats,
            "recent": recent,
            "more": len(recent) == RECENT,
            "secret": secret,
            "snippets": verification_snippets(wh.id, secret.secret) if secret is not None else [],
            "test": test,
            "values": values or {"url": wh.url, "events": list(wh.events), "description": wh.description,
                                 **filter_values(wh.filter), **batch_values(wh.batching)},
            "error": error,
            "event_types": EVENT_TYPES,
            "events_text": events_text,
            "replay_since": input_value(dash.now - 24 * 3600),
            "production": dash.production,
        }, status=status, headers={"Cache-Control": "no-store"}, nav="webhooks")

    async def edit(self, request: web.Request) -> web.Response:
        wh = self._webhook(request)
        form = form_of(request)
        try:
            url, events, description, filter_, batching = read_webhook_form(form, production=self.dash.production)
            self.dash.check_covers(request, filter_)
        except ApiError as exc:
            return await self._detail(request, wh, values=form_values(form), error=exc.message, status=exc.status)
        await self.dash.ops.update(wh, url=url, events=events, description=description, filter=filter_,
                                   batching=batching)
        session = session_of(request)
        assert session is not None
        session.flash("Changes saved.")
        return self.dash.redirect(f"/webhooks/{wh.id}")
