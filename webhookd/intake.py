"""Intake: newline-delimited JSON on a Unix socket, and HTTP `POST /v1/events`.

Every line gets exactly one response line, in order, written only after the
event is committed. Lines are parsed as they arrive and handed to storage
without waiting for earlier commits, so a pipelining client fills one group
commit with many events. Reading pauses while too many answers are
outstanding or while the client does not read its answers, so one slow or
hostile client cannot grow memory without bound.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, cast

import orjson
import structlog
from aiohttp import web

from webhookd.events import Event, EventError, decode_json, parse_event, validate_event
from webhookd.reasons import Lead, Reason
from webhookd.store import StoreError

log = structlog.get_logger("webhookd.intake")

MAX_OUTSTANDING = 4096  # unanswered lines per connection before reading pauses
RESUME_OUTSTANDING = 1024

Submit = Callable[[Event], asyncio.Future[str]]
"""Queues a valid event for the next commit (with its subscribers); resolves to its id."""


def ok_line(event_id: str) -> bytes:
    return b'{"ok":true,"id":"' + event_id.encode() + b'"}\n'


def error_line(text: str) -> bytes:
    return orjson.dumps({"ok": False, "error": text}) + b"\n"


class IntakeStats:
    """Counters read by /metrics: plain ints on the hot path, no locks, no allocations."""

    def __init__(self) -> None:
        self.connections = 0
        self.accepted = 0
        self.rejected: Counter[Reason] = Counter()  # the metric label is the Reason's value

    def reject(self, reason: Reason) -> None:
        self.rejected[reason] += 1


def _failure(exc: BaseException) -> tuple[Reason, str]:
    """The reason and answer text for an event whose commit failed."""
    if isinstance(exc, StoreError):
        return exc.reason, str(exc)
    return Reason.INTERNAL, Lead.INTERNAL.text(f": {exc}")


class LineProtocol(asyncio.Protocol):
    """One intake connection."""

    def __init__(
        self, submit: Submit, *, max_line: int, max_connections: int, stats: IntakeStats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.submit = submit
        self.max_line = max_line
        self.max_connections = max_connections
        self.stats = stats
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.discarding = False
        self.pending: deque[bytes | asyncio.Future[str]] = deque()
        self.waiting: asyncio.Future[str] | None = None  # the unanswered head whose commit wakes _flush
        self.eof = False
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False
        self.counted = False

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        if self.stats.connections >= self.max_connections:
            log.warning("intake connection refused", reason="max_connections", limit=self.max_connections)
            self.stats.reject(Reason.TOO_MANY_CONNECTIONS)
            self.transport.write(error_line(
                Lead.TOO_MANY_CONNECTIONS.text(f" (intake.max_connections = {self.max_connections})")
            ))
            self.transport.close()
            self.closed = True
            return
        self.stats.connections += 1
        self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.stats.connections -= 1
            self.counted = False
        self.pending.clear()  # committed events stay committed; nobody is left to answer

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        start = 0
        if self.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            self.discarding = False
            start = nl + 1
        find = data.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            self._line(data[start:nl])
            start = nl + 1
        rest = data[start:]
        if len(rest) > self.max_line:
            self._answer_now(self._too_long())
            self.discarding = True
        elif rest:
            self.buffer = rest
        self._flush()

    def eof_received(self) -> bool:
        self.eof = True
        if self.buffer and not self.discarding:
            self._line(self.buffer)
        self.buffer = b""
        self._flush()
        return True  # keep the write side open until every line is answered

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    def stop_reading(self) -> None:
        """Shutdown: read nothing more, answer what was read, then close."""
        if self.transport is not None and not self.closed:
            if not self.reading_paused:
                self.transport.pause_reading()
                self.reading_paused = True
            self.eof = True
            self.buffer = b""
            self._flush()

    # -- lines --------------------------------------------------------------------------
    def _too_long(self) -> bytes:
        self.stats.reject(Reason.TOO_LONG)
        return error_line(Lead.TOO_LONG.text(f" ({self.max_line} bytes); skipped"))

    def _line(self, line: bytes) -> None:
        if len(line) > self.max_line:
            self._answer_now(self._too_long())
            return
        try:
            event = parse_event(line, now=self.clock())
        except EventError as exc:
            self.stats.reject(exc.reason)
            self._answer_now(error_line(str(exc)))
            return
        self.pending.append(self.submit(event))  # every caller of _line flushes afterwards

    def _answer_now(self, response: bytes) -> None:
        self.pending.append(response)

    def _on_commit(self, _fut: asyncio.Future[str]) -> None:
        self._flush()

    def _flush(self) -> None:
        out: list[bytes] = []
        pending = self.pending
        while pending:
            head = pending[0]
            if isinstance(head, bytes):
                out.append(head)
            elif head.done():
                exc = head.exception()
                if exc is None:
                    self.stats.accepted += 1
                    out.append(ok_line(head.result()))
                else:
                    reason, text = _failure(exc)
                    self.stats.reject(reason)
                    out.append(error_line(text))
            else:
                # Answers go in order, so only the head's commit can make more of them
                # writable: one callback per wait, not one per event (a group commit
                # resolves a whole read's events at once).
                if self.waiting is not head:
                    self.waiting = head
                    head.add_done_callback(self._on_commit)
                break
            pending.popleft()
        transport = self.transport
        if transport is None or self.closed:
            return
        if out:
            transport.write(b"".join(out))
        if self.eof and not pending:
            transport.close()
            self.closed = True
            return
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed or self.eof:
            return
        n = len(self.pending)
        should_pause = self.writing_paused or n >= MAX_OUTSTANDING
        if should_pause and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True
        elif self.reading_paused and not self.writing_paused and n <= RESUME_OUTSTANDING:
            transport.resume_reading()
            self.reading_paused = False


# -- HTTP intake -----------------------------------------------------------------------
HTTP_MAX_EVENTS = 1000


def http_app(
    submit: Submit, *, token: str, max_event_bytes: int, stats: IntakeStats,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The HTTP intake application (`POST /v1/events`)."""
    max_body = max(max_event_bytes, min(HTTP_MAX_EVENTS * max_event_bytes, 16 * 1024 * 1024))
    app = web.Application(client_max_size=max_body)
    expected = f"Bearer {token}".encode() if token else b""

    def fail(status: int, reason: Reason, text: str) -> web.Response:
        stats.reject(reason)
        return web.Response(status=status, body=orjson.dumps({"error": text}), content_type="application/json")

    async def post_events(request: web.Request) -> web.Response:
        if expected:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                stats.reject(Reason.UNAUTHORIZED)
                return web.Response(
                    status=401,
                    body=orjson.dumps({"error": Lead.UNAUTHORIZED.text()}),
                    content_type="application/json",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return fail(413, Reason.TOO_LONG, f"body larger than {max_body} bytes")
        try:
            doc: Any = decode_json(raw)
        except EventError as exc:
            return fail(400, exc.reason, str(exc))
        now = clock()
        events: list[Event] = []
        many = isinstance(doc, list)
        items = doc if many else [doc]
        if many and not items:
            return fail(400, Reason.INVALID_EVENT, "empty array: no events")
        if len(items) > HTTP_MAX_EVENTS:
            return fail(413, Reason.TOO_LONG, f"more than {HTTP_MAX_EVENTS} events in one request")
        for i, item in enumerate(items):
            where = f"events[{i}]: " if many else ""
            try:
                ev = validate_event(item, now=now)
            except EventError as exc:
                return fail(400, exc.reason, f"{where}{exc}")
            if len(ev.body) > max_event_bytes:
                too_big = f"{where}event larger than intake.max_event_bytes ({max_event_bytes})"
                return fail(413, Reason.TOO_LONG, too_big)
            events.append(ev)
        # Queued together, synchronously: they land in one transaction (all or nothing).
        futures = [submit(ev) for ev in events]
        try:
            ids = await asyncio.gather(*futures)
        except StoreError as exc:
            return fail(503, exc.reason, str(exc))
        stats.accepted += len(ids)
        body = {"ids": ids} if many else {"id": ids[0]}
        return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")

    app.router.add_post("/v1/events", post_events)
    return app
