"""The tracking listener (`[tracking] listen`) and the recorder behind it.

    GET/HEAD /o/{token}.gif  → always the 43-byte transparent GIF (also for a bad token,
                               which records nothing)
    GET/HEAD /c/{token}      → 302 to the URL signed inside the token, or 404; never a
                               redirect to anything webhookd did not sign

The visitor never waits for storage: the handler verifies the token (an HMAC, no
database), answers, and offers the hit to the recorder's bounded queue. A full queue
drops the hit (counted and logged); so does a store that cannot commit. The recorder
takes hits in batches: one storage call learns, for all of them, which recipients
opted out, which hits are the first of their kind, and when the message was delivered;
then each recorded hit becomes an `opened` or `clicked` event, submitted like any other
(so it is committed, fanned out and delivered with the same guarantees from there on).

Clients are known by address: the peer's, or, when the peer is a trusted proxy, the
rightmost address in X-Forwarded-For that is not one. A client presenting more than
`bad_tokens_per_minute` bad tokens gets 429 for links (the GIF still answers) until its
budget refills, and nothing it sends is verified meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import hashlib
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from multidict import CIMultiDictProxy

from webhookd.config import TrackingConfig
from webhookd.events import Event, EventError, format_timestamp, validate_event
from webhookd.store import Storage, StoreError
from webhookd.store.model import TrackingFacts, TrackingHit
from webhookd.tracking.classify import classify, parse_ip
from webhookd.tracking.tokens import Claims, KeyRing, Kind, TokenError

log = structlog.get_logger("webhookd.tracking")

# The 43-byte transparent 1x1 GIF (GIF89a, one transparent white pixel).
GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
BATCH = 500  # hits per storage call
MAX_USER_AGENT = 512
MAX_CLIENTS = 65536  # addresses remembered by the bad-token limiter
MAX_RECENT = 10000  # (message, recipient) pairs remembered for the fast-click signal
DROP_LOG_INTERVAL = 10.0  # seconds between log lines about dropped hits

_NO_STORE = {"Cache-Control": "no-store, max-age=0", "Pragma": "no-cache", "Referrer-Policy": "no-referrer",
             "X-Content-Type-Options": "nosniff"}
_PREFETCH_HEADERS = ("Purpose", "Sec-Purpose", "X-Purpose", "X-Moz")


@dataclass(frozen=True, slots=True)
class Hit:
    claims: Claims
    method: str
    user_agent: str
    ip: str
    headers: dict[str, str]
    at: float  # wall clock
    mono: float = 0.0  # monotonic, for the one-second fast-click window


@dataclass
class TrackingStats:
    """Counts by (kind, outcome): recorded, not_first, opted_out, queue_full, storage,
    bad_token, rate_limited, internal."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, kind: str, outcome: str, n: int = 1) -> None:
        key = (kind, outcome)
        self.counts[key] = self.counts.get(key, 0) + n


class ClientAddress:
    """The client's address: the peer, or behind trusted proxies, X-Forwarded-For's."""

    def __init__(self, trusted: Sequence[str]) -> None:
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in trusted]

    def _is_trusted(self, text: str) -> bool:
        ip = parse_ip(text)
        return ip is not None and any(ip in net for net in self.trusted)

    def of(self, request: web.BaseRequest) -> str:
        """In its usual form: an IPv4-mapped IPv6 address (a dual-stack proxy's) as IPv4."""
        peer = _plain(request.remote or "")
        if not self._is_trusted(peer):
            return peer
        chain = [p.strip() for p in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if p.strip()]
        for hop in reversed(chain):
            if parse_ip(hop) is None:
                return peer  # a hop we cannot read: believe no more of the chain
            if not self._is_trusted(hop):
                return _plain(hop)
        return _plain(chain[0]) if chain else peer


def _plain(address: str) -> str:
    ip = parse_ip(address)
    return address if ip is None else str(ip)


class BadTokenLimiter:
    """A token bucket of bad tokens per client address, `per_minute` deep."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip → (tokens, at)

    def _level(self, ip: str) -> float:
        tokens, at = self._buckets.get(ip, (float(self.per_minute), self.clock()))
        return min(float(self.per_minute), tokens + (self.clock() - at) * self.per_minute / 60.0)

    def limited(self, ip: str) -> bool:
        return ip in self._buckets and self._level(ip) < 1.0

    def bad(self, ip: str) -> bool:
        """Count a bad token; True when this one crossed the limit (log it once)."""
        before = self._level(ip)
        self._buckets[ip] = (max(before - 1.0, 0.0), self.clock())
        self._buckets.move_to_end(ip)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return before >= 1.0 > before - 1.0


def first_key(claims: Claims) -> bytes:
    """Opens: one per message and recipient; clicks: one per message, recipient and link."""
    parts = [claims.kind, claims.message_id, claims.recipient_key]
    if claims.kind == "click":
        parts.append(claims.url)
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).digest()[:16]


def _epoch(timestamp: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, TypeError):
        return None


class Recorder:
    """Hits → events, off the visitor's path: a bounded queue and one task."""

    def __init__(
        self,
        storage: Storage,
        submit: Callable[[Event], asyncio.Future[str]],
        ring: KeyRing,
        cfg: TrackingConfig,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        stats: TrackingStats | None = None,
    ) -> None:
        self.storage = storage
        self.submit = submit
        self.ring = ring
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.stats = stats or TrackingStats()
        self.queue: asyncio.Queue[Hit] = asyncio.Queue(cfg.queue_size)
        self._recent: OrderedDict[tuple[str, str], deque[tuple[float, str]]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._dropped_since_log: dict[str, int] = {}
        self._last_drop_log = -DROP_LOG_INTERVAL
        self._idle = asyncio.Event()
        self._idle.set()
        self._settled = 0  # hits of the batch being recorded that are counted already

    # -- the visitor's side ----------------------------------------------------------------
    def offer(self, hit: Hit) -> None:
        """Never blocks: a full queue drops the hit."""
        try:
            self.queue.put_nowait(hit)
            self._idle.clear()
        except asyncio.QueueFull:
            self._drop(hit.claims.kind, "queue_full", 1)

    def _drop(self, kind: str, outcome: str, n: int, error: str = "") -> None:
        self.stats.add(kind, outcome, n)
        self._dropped_since_log[outcome] = self._dropped_since_log.get(outcome, 0) + n
        now = self.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning("tracking hits dropped", dropped=dict(self._dropped_since_log), error=error or None)
            self._dropped_since_log.clear()

    # -- the recorder's task ---------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tracking-recorder")

    async def stop(self, grace: float = 5.0) -> None:
        """Record what is queued (up to `grace` seconds), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        left = self.queue.qsize()
        if left:
            self._drop("any", "shutdown", left)

    async def idle(self) -> None:
        """Until every hit offered so far has been handled (tests)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self._settled = 0
            try:
                await self.record(batch)
            except asyncio.CancelledError:  # stop() ran out of grace mid-batch: count what is lost
                if len(batch) > self._settled:
                    self._drop("any", "shutdown", len(batch) - self._settled)
                raise
            except Exception as exc:  # a bug here must not stop recording
                log.exception("tracking recorder failed", hits=len(batch))
                self._drop("any", "internal", len(batch), error=type(exc).__name__)
            if self.queue.empty():
                self._idle.set()

    async def record(self, batch: list[Hit]) -> None:
        keys = [self._storage_key(hit.claims) for hit in batch]
        try:
            facts = await self.storage.track_hits(keys, now=self.clock())
        except StoreError as exc:
            for kind in {hit.claims.kind for hit in batch}:
                self._drop(kind, "storage", sum(1 for h in batch if h.claims.kind == kind), error=str(exc))
            self._settled = len(batch)
            return
        pending: list[tuple[str, asyncio.Future[str]]] = []
        for hit, fact in zip(batch, facts, strict=True):
            kind = hit.claims.kind
            if fact.opted_out:
                self._settle(kind, "opted_out")
                continue
            links_in_second = self._note_click(hit) if kind == "click" else 1
            if self.cfg.emit == "first" and not fact.first:
                self._settle(kind, "not_first")
                continue
            try:
                event = self._event(hit, fact, links_in_second)
            except EventError as exc:  # cannot happen for claims we signed; never crash on it
                log.error("tracking hit makes no valid event", error=str(exc))
                self._settle(kind, "internal")
                continue
            pending.append((kind, self.submit(event)))
        for submitted, future in pending:
            try:
                await future
            except StoreError as exc:
                self._drop(submitted, "storage", 1, error=str(exc))
            except Exception as exc:
                self._drop(submitted, "storage", 1, error=type(exc).__name__)
            else:
                self.stats.add(submitted, "recorded")
            self._settled += 1

    def _settle(self, kind: str, outcome: str) -> None:
        self.stats.add(kind, outcome)
        self._settled += 1

    def _storage_key(self, claims: Claims) -> TrackingHit:
        opt_out = claims.to_hash or (self.ring.recipient_hash(claims.to) if claims.to else "")
        return TrackingHit(first_key(claims), claims.message_id, claims.to, opt_out)

    def _note_click(self, hit: Hit) -> int:
        """Remember this click; how many distinct links of its message were followed in the last second."""
        key = (hit.claims.message_id, hit.claims.recipient_key)
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = deque(maxlen=16)
        self._recent.move_to_end(key)
        while len(self._recent) > MAX_RECENT:
            self._recent.popitem(last=False)
        recent.append((hit.mono, hit.claims.url))
        return len({url for at, url in recent if hit.mono - at <= 1.0})

    def _event(self, hit: Hit, fact: TrackingFacts, links_in_second: int) -> Event:
        claims = hit.claims
        delivered = _epoch(fact.delivered_at) if fact.delivered_at else None
        since = int(hit.at - delivered) if delivered is not None and hit.at >= delivered else None
        verdict = classify(
            kind=claims.kind, method=hit.method, user_agent=hit.user_agent, headers=hit.headers, ip=hit.ip,
            seconds_since_delivered=since, links_in_last_second=links_in_second,
            machine_click_seconds=self.cfg.machine_click_seconds,
        )
        data: dict[str, Any] = {"message_id": claims.message_id}
        if claims.to:
            data["to"] = claims.to
        if claims.kind == "click":
            data["url"] = claims.url
        data.update({
            "user_agent": hit.user_agent,
            "ip": hit.ip,
            "first": fact.first,
            "seconds_since_delivered": since,
            "machine": verdict.machine,
            "bot": verdict.bot,
            "bot_reasons": list(verdict.reasons),
        })
        event_type = "opened" if claims.kind == "open" else "clicked"
        return validate_event(
            {"event": event_type, "timestamp": format_timestamp(hit.at), "data": data}, now=hit.at
        )


class TrackingListener:
    """The aiohttp application of `[tracking] listen`."""

    def __init__(
        self,
        ring: KeyRing,
        recorder: Recorder,
        cfg: TrackingConfig,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ring = ring
        self.recorder = recorder
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.clients = ClientAddress(cfg.trusted_proxies)
        self.limiter = BadTokenLimiter(cfg.bad_tokens_per_minute, clock=monotonic)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024, handler_args={"max_field_size": 8190})
        app.router.add_route("GET", "/o/{name}", self.pixel)
        app.router.add_route("HEAD", "/o/{name}", self.pixel)
        app.router.add_route("GET", "/c/{token}", self.click)
        app.router.add_route("HEAD", "/c/{token}", self.click)
        return app

    def _limited(self, kind: Kind, ip: str) -> bool:
        if self.limiter.limited(ip):
            self.recorder.stats.add(kind, "rate_limited")
            return True
        return False

    def _hit(self, request: web.Request, kind: Kind, token: str, ip: str) -> Claims | None:
        """Verify and offer the hit (the caller checked the client's budget); None for a bad token."""
        try:
            claims = self.ring.verify(token, kind)  # refuses overlong tokens before decoding
        except TokenError as exc:
            self.recorder.stats.add(kind, "bad_token")
            if self.limiter.bad(ip):
                log.warning("tracking: client rate-limited for bad tokens", ip=ip,
                            per_minute=self.cfg.bad_tokens_per_minute)
            else:
                log.debug("tracking: bad token", kind=kind, ip=ip, error=str(exc))
            return None
        headers = _prefetch_headers(request.headers)
        self.recorder.offer(Hit(
            claims, request.method, request.headers.get("User-Agent", "")[:MAX_USER_AGENT], ip, headers,
            self.clock(), self.monotonic(),
        ))
        return claims

    async def pixel(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        token = name[:-4] if name.endswith(".gif") else name
        ip = self.clients.of(request)
        if not self._limited("open", ip):
            self._hit(request, "open", token, ip)
        return web.Response(body=GIF, content_type="image/gif", headers=_NO_STORE)

    async def click(self, request: web.Request) -> web.Response:
        ip = self.clients.of(request)
        if self._limited("click", ip):
            return web.Response(status=429, text="too many bad links; try again in a minute\n",
                                headers={**_NO_STORE, "Retry-After": "60"})
        claims = self._hit(request, "click", request.match_info["token"], ip)
        if claims is None:
            return web.Response(status=404, text="this link is not valid\n", headers=_NO_STORE)
        return web.Response(status=302, headers={**_NO_STORE, "Location": claims.url})


def _prefetch_headers(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {name: headers[name][:100] for name in _PREFETCH_HEADERS if name in headers}
