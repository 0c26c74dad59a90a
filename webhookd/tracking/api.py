"""Tracking on the admin API: sign links for applications, opt-outs, status.

    GET    /v1/tracking                    settings, key ids, opt-out count, hit counts
    POST   /v1/tracking/sign               {"message_id", "to"?, "url"?, "urls"?} → tracked URLs
    PUT    /v1/tracking/opt-outs/{address} stop recording hits for an address
    DELETE /v1/tracking/opt-outs/{address} record them again

Addresses are never stored: an opt-out is a keyed hash (the key ring's salt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from webhookd.apimodel import ApiError, reply
from webhookd.config import TrackingConfig
from webhookd.store import Storage
from webhookd.tracking.links import Links
from webhookd.tracking.listener import TrackingStats
from webhookd.tracking.tokens import MAX_MESSAGE_ID_CHARS, KeyFileError, KeyRing

MAX_URLS = 1000
MAX_ADDRESS = 320


class TrackingApi:
    def __init__(
        self,
        storage: Storage,
        config: Callable[[], TrackingConfig],
        ring: Callable[[], KeyRing],
        *,
        stats: TrackingStats | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.config = config
        self.ring = ring
        self.stats = stats
        self.clock = clock

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/tracking", self.status)
        router.add_post("/v1/tracking/sign", self.sign)
        router.add_put("/v1/tracking/opt-outs/{address}", self.opt_out)
        router.add_delete("/v1/tracking/opt-outs/{address}", self.opt_in)

    def _ring(self) -> KeyRing:
        try:
            return self.ring()
        except KeyFileError as exc:
            raise ApiError(503, str(exc)) from None

    async def status(self, request: web.Request) -> web.Response:
        cfg = self.config()
        ring = self._ring()
        hits: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted((self.stats.counts if self.stats else {}).items()):
            hits.setdefault(kind, {})[outcome] = n
        return reply({
            "enabled": cfg.enabled,
            "listen": f"{cfg.listen[0]}:{cfg.listen[1]}" if cfg.listen else None,
            "base_url": cfg.base_url or None,
            "emit": cfg.emit,
            "include_recipient": cfg.include_recipient,
            "key_ids": sorted(ring.keys),
            "current_key": ring.current,
            "opt_outs": await self.storage.count_opt_outs(),
            "hits": hits,
        })

    async def sign(self, request: web.Request) -> web.Response:
        cfg = self.config()
        if not cfg.base_url:
            raise ApiError(409, "tracking.base_url is not set: there is no address for tracked links")
        doc = await _json(request)
        message_id = doc.get("message_id")
        if not isinstance(message_id, str) or not message_id.strip() or len(message_id) > MAX_MESSAGE_ID_CHARS:
            raise ApiError(400, f"message_id must be a non-empty string of at most {MAX_MESSAGE_ID_CHARS} characters")
        to = doc.get("to", "")
        if not isinstance(to, str) or len(to) > MAX_ADDRESS:
            raise ApiError(400, f"to must be a string of at most {MAX_ADDRESS} characters")
        url = doc.get("url")
        urls = doc.get("urls", [])
        if url is not None and not isinstance(url, str):
            raise ApiError(400, "url must be a string")
        if not isinstance(urls, list) or len(urls) > MAX_URLS or not all(isinstance(u, str) for u in urls):
            raise ApiError(400, f"urls must be a list of at most {MAX_URLS} strings")
        links = Links(self._ring(), cfg.base_url, include_recipient=cfg.include_recipient, clock=self.clock)
        out: dict[str, Any] = {"pixel": links.pixel(message_id, to)}

        def click(u: str, key: str) -> str:
            try:
                return links.click(message_id, u, to)
            except ValueError as exc:
                raise ApiError(400, f"{key}: {exc}") from None

        if url is not None:
            out["url"] = click(url, "url")
        if urls:
            out["urls"] = [click(u, f"urls[{i}]") for i, u in enumerate(urls)]
        return reply(out)

    async def opt_out(self, request: web.Request) -> web.Response:
        return await self._set(request, opted_out=True)

    async def opt_in(self, request: web.Request) -> web.Response:
        return await self._set(request, opted_out=False)

    async def _set(self, request: web.Request, *, opted_out: bool) -> web.Response:
        address = request.match_info["address"].strip()
        if not address or len(address) > MAX_ADDRESS or "@" not in address:
            raise ApiError(400, "expected an email address")
        digest = self._ring().recipient_hash(address)
        changed = await self.storage.set_opt_out(digest, opted_out=opted_out, now=self.clock())
        return reply({"opted_out": opted_out, "changed": changed})


async def _json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        doc = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise ApiError(400, "body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "body must be a JSON object")
    return doc
