"""Webhook registry, due-delivery queues and the per-webhook failure gate.

Source of truth is SQLite (the partial index `deliveries_due`); memory holds,
per webhook, a bounded window of its soonest pending deliveries. The window's
invariant: every pending, not-in-flight delivery whose key (next_attempt_at,
id) is <= `boundary` is in memory; `boundary is None` means memory holds all of
them. Rows beyond the boundary are read back in order by `_refill`, which runs
through the store's writer so that it sees every earlier change.

Each enabled webhook has one pump task that starts attempts when a delivery is
due, the webhook's gate is open and a global slot is free:

- healthy (counter 0): up to `per_webhook_concurrency` attempts at once;
- backing off (counter > 0): nothing until `backoff_until`, then one probe at a
  time. Only a failure of an attempt started in the current epoch counts, so a
  burst of concurrent failures adds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import orjson
import structlog

from webhookd import __version__
from webhookd.config import DeliveryConfig
from webhookd.dispatcher import Dispatcher, Outcome
from webhookd.events import format_timestamp, synthetic_event
from webhookd.ids import new_id
from webhookd.metrics import Metrics
from webhookd.retry import backoff
from webhookd.signing import Signer
from webhookd.store import FAILED, PAUSED, PENDING, SUCCEEDED, DueItem, FreshEvent, Store

log = structlog.get_logger("webhookd.scheduler")

USER_AGENT = f"webhookd/{__version__}"
# A webhook starts with this many attempts at once and doubles it with each success up
# to per_webhook_concurrency: one that hangs from the start never holds more than this.
SLOW_START = 4
MANUAL = "manual"
CONSECUTIVE_FAILURES = "consecutive_failures"
_START: tuple[float, int] = (float("-inf"), -1)


@dataclass(eq=False)
class Webhook:
    """A webhook's stored fields plus its runtime queue and gate."""

    id: str
    url: str
    events: tuple[str, ...]
    description: str
    enabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    backoff_until: float
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: float | None
    created_at: float
    updated_at: float
    # runtime
    heap: list[tuple[float, int]] = field(default_factory=list)
    items: dict[int, DueItem] = field(default_factory=dict)
    boundary: tuple[float, int] | None = _START
    inflight: set[int] = field(default_factory=set)
    active: int = 0
    ramp: int = 0  # slow start: attempts allowed at once until successes open it up
    epoch: int = 0
    refilling: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    _signer: tuple[tuple[str, ...], Signer] | None = None  # (the secrets it signs with, the signer)

    def subscribes(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events

    def secrets(self, now: float) -> tuple[str, ...]:
        """The valid secrets, newest first (the previous one during its rotation grace)."""
        if self.previous_secret and (self.previous_secret_expires_at or 0) > now:
            return (self.secret, self.previous_secret)
        return (self.secret,)

    def signer(self, now: float) -> Signer:
        secrets = self.secrets(now)
        if self._signer is None or self._signer[0] != secrets:
            self._signer = (secrets, Signer(secrets))
        return self._signer[1]

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "description": self.description,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "consecutive_failures": self.consecutive_failures,
            "created_at": format_timestamp(self.created_at),
            "updated_at": format_timestamp(self.updated_at),
        }

    # -- the in-memory window ------------------------------------------------
    def push(self, item: DueItem) -> None:
        if self.boundary is not None and item.key > self.boundary:
            return  # stays in the database; a refill will bring it
        self.items[item.delivery_id] = item
        heapq.heappush(self.heap, item.key)

    def peek(self) -> DueItem | None:
        heap, items = self.heap, self.items
        while heap:
            next_at, did = heap[0]
            item = items.get(did)
            if item is not None and item.next_at == next_at:
                return item
            heapq.heappop(heap)  # stale entry
        return None

    def pop(self) -> DueItem:
        _next_at, did = heapq.heappop(self.heap)
        return self.items.pop(did)

    def trim(self, keep: int) -> None:
        """Keep only the `keep` soonest deliveries in memory."""
        if len(self.items) <= keep:
            return
        ordered = sorted(self.items.values(), key=lambda i: i.key)
        kept = ordered[:keep]
        self.items = {i.delivery_id: i for i in kept}
        self.heap = [i.key for i in kept]
        heapq.heapify(self.heap)
        last = kept[-1].key if kept else _START
        self.boundary = last if self.boundary is None else min(self.boundary, last)

    def forget_queue(self) -> None:
        self.items.clear()
        self.heap.clear()
        self.boundary = _START


WEBHOOK_COLUMNS = (
    "id, url, events, description, enabled, disabled_reason, consecutive_failures, backoff_until,"
    " secret, previous_secret, previous_secret_expires_at, created_at, updated_at"
)


def webhook_from_row(row: Sequence[Any]) -> Webhook:
    return Webhook(
        id=row[0],
        url=row[1],
        events=tuple(orjson.loads(row[2])),
        description=row[3],
        enabled=bool(row[4]),
        disabled_reason=row[5],
        consecutive_failures=int(row[6]),
        backoff_until=float(row[7]),
        secret=row[8],
        previous_secret=row[9],
        previous_secret_expires_at=row[10],
        created_at=float(row[11]),
        updated_at=float(row[12]),
    )


@dataclass(slots=True)
class _OutcomeRow:
    wh: Webhook
    item: DueItem
    status: str
    next_at: float | None
    outcome: Outcome
    at: float
    now: float
    reply: str


def water_level(total: int, wants: list[int]) -> int:
    """Max-min fairness: the most each claimant may take of `total` slots when every
    claimant wanting less than that gets all it wants (at least 1; `total` when every
    want fits)."""
    remaining, left = total, len(wants)
    for want in sorted(wants):
        level = remaining // left
        if want > level:
            return max(1, level)
        remaining -= want
        left -= 1
    return max(1, total)


class Scheduler:
    """Owns the webhooks in memory and drives their deliveries."""

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        cfg: DeliveryConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_disabled: Callable[[Webhook], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.cfg = cfg
        self.clock = clock
        self.on_disabled = on_disabled
        self.metrics = metrics
        self.webhooks: dict[str, Webhook] = {}
        self._subscribers: dict[str, list[tuple[str, bool]]] = {}
        self._free = cfg.concurrency
        self._slot_waiters: deque[Webhook] = deque()
        self._attempts: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._outcomes: list[_OutcomeRow] = []
        self._share = cfg.concurrency
        self._share_at = float("-inf")
        self._flush_queued = False
        self.window = max(64, 4 * cfg.per_webhook_concurrency)
        store.subscribers = self.subscribers
        store.on_fresh = self.push_fresh

    def reconfigure(self, cfg: DeliveryConfig) -> None:
        """Apply a reloaded [delivery] section (the caller keeps `concurrency`, which needs a
        restart). Pumps read `self.cfg` on each turn; each is woken so that a raised limit is
        used at once, not after an attempt of its webhook ends."""
        self.cfg = cfg
        self.window = max(64, 4 * cfg.per_webhook_concurrency)
        self._share_at = float("-inf")
        for wh in self.webhooks.values():
            wh.wake.set()

    # -- start and stop ------------------------------------------------------------
    async def load(self) -> None:
        rows = await self.store.read(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at")  # noqa: S608
        for row in rows:
            self._add(webhook_from_row(row))

    def _add(self, wh: Webhook) -> None:
        self.webhooks[wh.id] = wh
        self._subscribers.clear()
        wh.task = asyncio.create_task(self._pump(wh), name=f"pump-{wh.id}")

    def _remove(self, wh: Webhook) -> None:
        self.webhooks.pop(wh.id, None)
        self._subscribers.clear()
        if wh.task is not None:
            wh.task.cancel()

    def stop_starting(self) -> None:
        """No new attempts from now on; in-flight ones continue."""
        self._stopping = True
        for wh in self.webhooks.values():
            wh.wake.set()

    def cancel_attempts(self) -> None:
        """Abandon every attempt in flight (a second stop signal)."""
        for task in list(self._attempts):
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` seconds for in-flight attempts; cancel the rest."""
        self.stop_starting()
        pumps = [wh.task for wh in self.webhooks.values() if wh.task is not None]
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if self._attempts:
            _done, pending = await asyncio.wait(set(self._attempts), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            return len(pending)
        return 0

    # -- fan-out for the store ----------------------------------------------------
    def subscribers(self, event_type: str) -> Sequence[tuple[str, bool]]:
        subs = self._subscribers.get(event_type)
        if subs is None:
            subs = [(wh.id, wh.enabled) for wh in self.webhooks.values() if wh.subscribes(event_type)]
            self._subscribers[event_type] = subs
        return subs

    def push_fresh(self, events: list[FreshEvent]) -> None:
        """Queue a commit's new deliveries in memory, webhook by webhook. Events that share
        a subscriber list (the cached one of their type) are taken together: for each
        enabled subscriber, if even the soonest of its new deliveries lies beyond its
        window's boundary (a webhook with a full window: its backlog stays in SQLite and
        a refill brings it), none is built at all; otherwise each is pushed."""
        self._share_at = float("-inf")  # new work: count busy webhooks afresh
        groups: dict[int, list[FreshEvent]] = {}
        for fe in events:  # each holds its list, so no id() is reused meanwhile
            groups.setdefault(id(fe.subscribers), []).append(fe)
        touched: set[Webhook] = set()
        webhooks = self.webhooks
        for group in groups.values():
            # the soonest key of subscriber i is (next_at, first_delivery_id + i) of the
            # group's soonest event: ids grow with the events, by one per subscriber
            soonest = min(group, key=lambda fe: (fe.next_at, fe.first_delivery_id))
            for i, (webhook_id, enabled) in enumerate(group[0].subscribers):
                if not enabled:
                    continue
                wh = webhooks.get(webhook_id)
                if wh is None or not wh.enabled:
                    continue  # deleted, or paused by an operation committed after this one
                touched.add(wh)
                boundary = wh.boundary
                if boundary is not None and (soonest.next_at, soonest.first_delivery_id + i) > boundary:
                    continue  # all of them stay in the database
                for fe in group:
                    wh.push(fe.item(i, webhook_id))
        for wh in touched:
            if len(wh.items) > 2 * self.window:
                wh.trim(self.window)
            wh.wake.set()

    # -- the pump ----------------------------------------------------------------------
    async def _pump(self, wh: Webhook) -> None:
        while not self._stopping:
            wh.wake.clear()
            if not wh.enabled:
                await wh.wake.wait()
                continue
            if wh.boundary is not None and len(wh.items) < self.window // 2 and not wh.refilling:
                await self._refill(wh)
                continue
            item = wh.peek()
            if item is None:
                await wh.wake.wait()
                continue
            now = self.clock()
            if wh.consecutive_failures > 0:
                if wh.active:
                    await wh.wake.wait()  # one probe at a time
                    continue
                start_at = max(item.next_at, wh.backoff_until)
            else:
                if wh.active >= min(self.cfg.per_webhook_concurrency, wh.ramp or SLOW_START):
                    await wh.wake.wait()
                    continue
                start_at = item.next_at
            if start_at > now:
                await self._sleep(wh, start_at - now)
                continue
            if self._free <= 0 or (wh.active and wh.active >= self._fair_share()):
                self._slot_waiters.append(wh)
                await wh.wake.wait()
                continue
            self._start(wh, wh.pop())

    def _fair_share(self) -> int:
        """Slots one webhook may hold: the max-min fair share of `delivery.concurrency`
        among the webhooks that have work, so webhooks that hang cannot take every slot
        from the healthy ones. Each busy webhook wants what it can use now: its slow-start
        ramp (hanging receivers never succeed, so they stay at SLOW_START), one probe
        while it backs off, and never less than it already holds. Webhooks that want less
        than an equal share keep what they want; the rest is shared equally by the others.
        With few busy webhooks the share is above `per_webhook_concurrency` and changes
        nothing.
        """
        now = time.monotonic()
        if now - self._share_at > 0.01:  # counted at most every 10 ms: O(webhooks) per count
            cfg = self.cfg
            wants = [
                max(w.active, 1 if w.consecutive_failures else min(cfg.per_webhook_concurrency, w.ramp or SLOW_START))
                for w in self.webhooks.values()
                if w.active or (w.enabled and not w.consecutive_failures and w.heap)
            ]
            self._share = water_level(cfg.concurrency, wants)
            self._share_at = now
        return self._share

    async def _sleep(self, wh: Webhook, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wh.wake.wait(), timeout=min(seconds, 3600.0))

    def _start(self, wh: Webhook, item: DueItem) -> None:
        self._free -= 1
        wh.active += 1
        wh.inflight.add(item.delivery_id)
        task = asyncio.create_task(self._attempt(wh, item, wh.epoch))
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    def _release_slot(self, wh: Webhook) -> None:
        self._free += 1
        wh.active -= 1
        wh.wake.set()
        # Wake every webhook waiting for a slot: each re-checks its own gate, and one
        # that no longer wants the slot must not leave the others asleep.
        while self._slot_waiters:
            self._slot_waiters.popleft().wake.set()

    async def _attempt(self, wh: Webhook, item: DueItem, epoch: int) -> None:
        at = self.clock()
        headers = wh.signer(at).headers(
            event_id=item.event_uid,
            event_type=item.event_type,
            body=item.body,
            timestamp=int(at),
            user_agent=USER_AGENT,
        )
        try:
            outcome = await self.dispatcher.post(wh.url, item.body, headers)
        except asyncio.CancelledError:
            # Shutdown ran out of grace: the delivery stays pending in the database
            # with its schedule unchanged and is attempted again after a restart.
            self._release_slot(wh)
            wh.inflight.discard(item.delivery_id)
            log.warning("attempt abandoned at shutdown", webhook_id=wh.id, delivery_id=item.delivery_id)
            raise
        self._release_slot(wh)
        self.record(wh, item, epoch, outcome, at)

    # -- outcomes ---------------------------------------------------------------------
    def record(self, wh: Webhook, item: DueItem, epoch: int, outcome: Outcome, at: float) -> None:
        """Apply an attempt's outcome in memory now and queue its write."""
        cfg = self.cfg
        now = self.clock()
        item.attempts += 1
        webhook_changed = False
        disabled_now = False
        if outcome.success:
            status = SUCCEEDED
            wh.ramp = min(cfg.per_webhook_concurrency, 2 * (wh.ramp or SLOW_START))
            if wh.consecutive_failures or wh.backoff_until:
                wh.consecutive_failures = 0
                wh.backoff_until = 0.0
                wh.epoch += 1
                webhook_changed = True
        else:
            wh.ramp = 0  # back to slow start
            if epoch == wh.epoch and wh.enabled and wh.id in self.webhooks:
                wh.consecutive_failures += 1
                wh.epoch += 1
                delay = backoff(wh.consecutive_failures, base=cfg.retry_base, cap=cfg.retry_max)
                if outcome.retry_after is not None:
                    delay = min(max(delay, outcome.retry_after), cfg.retry_max)
                wh.backoff_until = now + delay
                webhook_changed = True
                if wh.consecutive_failures >= cfg.disable_after:
                    self._disable_in_memory(wh, CONSECUTIVE_FAILURES, now)
                    disabled_now = True
            if not wh.enabled:
                status = PAUSED
            elif item.attempts >= cfg.max_attempts:
                status = FAILED
            else:
                status = PENDING
                item.next_at = now + backoff(item.attempts, base=cfg.retry_base, cap=cfg.retry_max)
        if webhook_changed:
            wh.updated_at = now
        if self.metrics is not None:
            self.metrics.observe_attempt(outcome.success, outcome.error, outcome.duration_ms / 1000)
            if disabled_now:
                self.metrics.auto_disabled.inc()
        log.info(
            "attempt",
            webhook_id=wh.id,
            event_id=item.event_uid,
            delivery_id=item.delivery_id,
            attempt=item.attempts,
            status_code=outcome.status_code,
            duration_ms=round(outcome.duration_ms, 1),
            outcome="succeeded" if outcome.success else status,
            error=outcome.error,
        )
        if disabled_now:
            log.warning(
                "webhook disabled",
                webhook_id=wh.id,
                url=wh.url,
                reason=CONSECUTIVE_FAILURES,
                consecutive_failures=wh.consecutive_failures,
            )
        next_at = item.next_at if status == PENDING else None
        reply = outcome.response_body[:1024].decode("utf-8", "replace")
        self._outcomes.append(_OutcomeRow(wh, item, status, next_at, outcome, at, now, reply))
        self._queue_outcome_flush()
        if webhook_changed:
            snapshot = _webhook_state(wh)

            async def write_state(db: aiosqlite.Connection) -> None:
                await _write_webhook_state(db, wh.id, snapshot)
                if disabled_now:
                    await _pause_pending(db, wh.id, now)

            def state_committed(_: None) -> None:
                if disabled_now and self.on_disabled is not None:
                    self.on_disabled(wh)

            self.store.run(write_state, on_commit=state_committed, internal=True)

    def _queue_outcome_flush(self) -> None:
        """One store operation writes every outcome recorded until it runs (executemany)."""
        if self._flush_queued:
            return
        self._flush_queued = True
        taken: list[_OutcomeRow] | None = None

        async def write(db: aiosqlite.Connection) -> list[_OutcomeRow]:
            nonlocal taken
            if taken is None:  # first run; a retry after a failed commit writes the same rows
                taken, self._outcomes = self._outcomes, []
                self._flush_queued = False
            await db.executemany(
                "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status_code = ?,"
                " last_error = ?, updated_at = ? WHERE id = ?",
                [(r.status, r.item.attempts, r.next_at, r.outcome.status_code, r.outcome.error, r.now,
                  r.item.delivery_id) for r in taken],
            )
            await db.executemany(
                "INSERT INTO attempts (delivery_id, at, duration_ms, status_code, error, response_body)"
                " VALUES (?,?,?,?,?,?)",
                [(r.item.delivery_id, r.at, round(r.outcome.duration_ms, 3), r.outcome.status_code,
                  r.outcome.error, r.reply) for r in taken],
            )
            return taken

        self.store.run(write, on_commit=self._outcomes_committed, internal=True)

    def _outcomes_committed(self, rows: list[_OutcomeRow]) -> None:
        for r in rows:
            wh = r.wh
            wh.inflight.discard(r.item.delivery_id)
            if r.status == PENDING and wh.enabled and self.webhooks.get(wh.id) is wh:
                wh.push(r.item)
                wh.wake.set()

    def _disable_in_memory(self, wh: Webhook, reason: str, now: float) -> None:
        wh.enabled = False
        wh.disabled_reason = reason
        wh.updated_at = now
        wh.epoch += 1
        wh.forget_queue()
        self._subscribers.clear()
        wh.wake.set()

    # -- refill ----------------------------------------------------------------------
    async def _refill(self, wh: Webhook) -> None:
        wh.refilling = True
        after = wh.boundary if wh.boundary is not None else _START
        limit = self.window

        async def read(db: aiosqlite.Connection) -> list[Any]:
            sql = (
                "SELECT d.id, d.next_attempt_at, d.attempts, e.uid, e.type, e.body FROM deliveries d"
                " JOIN events e ON e.id = d.event_id WHERE d.webhook_id = ? AND d.status = 'pending'"
                " AND (d.next_attempt_at, d.id) > (?, ?) ORDER BY d.next_attempt_at, d.id LIMIT ?"
            )
            async with db.execute(sql, (wh.id, after[0], after[1], limit)) as cur:
                return list(await cur.fetchall())

        def loaded(rows: list[Any]) -> None:
            if wh.boundary != after:
                return  # the window was reset meanwhile (disable/enable); the pump will refill again
            for did, next_at, attempts, uid, etype, body in rows:
                if did in wh.inflight or did in wh.items:
                    continue
                item = DueItem(did, wh.id, float(next_at), int(attempts), uid, etype, bytes(body))
                wh.items[did] = item
                heapq.heappush(wh.heap, item.key)
            wh.boundary = None if len(rows) < limit else (float(rows[-1][1]), int(rows[-1][0]))

        try:
            await self.store.run(read, on_commit=loaded, internal=True)
        finally:
            wh.refilling = False

    # -- operations from the admin API ---------------------------------------------
    async def create(self, wh: Webhook) -> Webhook:
        state = _webhook_state(wh)

        async def insert(db: aiosqlite.Connection) -> None:
            await db.execute(
                f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (
                    wh.id,
                    wh.url,
                    orjson.dumps(list(wh.events)).decode(),
                    wh.description,
                    int(wh.enabled),
                    wh.disabled_reason,
                    *state[1:3],
                    wh.secret,
                    wh.previous_secret,
                    wh.previous_secret_expires_at,
                    wh.created_at,
                    wh.updated_at,
                ),
            )

        wh.boundary = None  # a new webhook has nothing pending
        await self.store.run(insert, on_commit=lambda _: self._add(wh))
        return wh

    async def update(
        self, wh: Webhook, *, url: str | None, events: tuple[str, ...] | None, description: str | None
    ) -> Webhook:
        now = self.clock()
        new_url = wh.url if url is None else url
        new_events = wh.events if events is None else events
        new_description = wh.description if description is None else description

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE webhooks SET url = ?, events = ?, description = ?, updated_at = ? WHERE id = ?",
                (new_url, orjson.dumps(list(new_events)).decode(), new_description, now, wh.id),
            )

        def committed(_: None) -> None:
            wh.url, wh.events, wh.description, wh.updated_at = new_url, new_events, new_description, now
            self._subscribers.clear()

        await self.store.run(write, on_commit=committed)
        return wh

    async def delete(self, wh: Webhook) -> None:
        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE webhook_id = ?)",
                (wh.id,),
            )
            await db.execute("DELETE FROM deliveries WHERE webhook_id = ?", (wh.id,))
            await db.execute("DELETE FROM webhooks WHERE id = ?", (wh.id,))

        await self.store.run(write, on_commit=lambda _: self._remove(wh))

    async def disable(self, wh: Webhook) -> Webhook:
        now = self.clock()
        if not wh.enabled:
            return wh
        self._disable_in_memory(wh, MANUAL, now)
        snapshot = _webhook_state(wh)

        async def write(db: aiosqlite.Connection) -> None:
            await _write_webhook_state(db, wh.id, snapshot)
            await _pause_pending(db, wh.id, now)

        await self.store.run(write, internal=True)
        log.info("webhook disabled", webhook_id=wh.id, reason=MANUAL)
        return wh

    async def enable(self, wh: Webhook, *, drop_backlog: bool = False) -> tuple[Webhook, int]:
        now = self.clock()

        async def write(db: aiosqlite.Connection) -> int:
            await db.execute(
                "UPDATE webhooks SET enabled = 1, disabled_reason = NULL, consecutive_failures = 0,"
                " backoff_until = 0, updated_at = ? WHERE id = ?",
                (now, wh.id),
            )
            if drop_backlog:
                cur = await db.execute(
                    "UPDATE deliveries SET status = 'failed', next_attempt_at = NULL,"
                    " last_error = 'backlog dropped when the webhook was re-enabled', updated_at = ?"
                    " WHERE webhook_id = ? AND status = 'paused'",
                    (now, wh.id),
                )
            else:
                cur = await db.execute(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = ?, updated_at = ?"
                    " WHERE webhook_id = ? AND status = 'paused'",
                    (now, now, wh.id),
                )
            return int(cur.rowcount)

        def committed(_: int) -> None:
            wh.enabled = True
            wh.disabled_reason = None
            wh.consecutive_failures = 0
            wh.backoff_until = 0.0
            wh.updated_at = now
            wh.epoch += 1
            wh.forget_queue()
            self._subscribers.clear()
            wh.wake.set()

        count = await self.store.run(write, on_commit=committed)
        log.info("webhook enabled", webhook_id=wh.id, resumed=0 if drop_backlog else count,
                 dropped=count if drop_backlog else 0)
        return wh, count

    async def rotate_secret(self, wh: Webhook, new_secret: str, grace: float) -> Webhook:
        now = self.clock()
        old = wh.secret
        expires = now + grace

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE webhooks SET secret = ?, previous_secret = ?, previous_secret_expires_at = ?,"
                " updated_at = ? WHERE id = ?",
                (new_secret, old, expires, now, wh.id),
            )

        def committed(_: None) -> None:
            wh.secret, wh.previous_secret, wh.previous_secret_expires_at = new_secret, old, expires
            wh.updated_at = now

        await self.store.run(write, on_commit=committed)
        return wh

    async def retry_delivery(self, delivery_id: int) -> str:
        """Queue a delivery for an attempt now; returns its new status."""
        now = self.clock()
        rows = await self.store.read(
            "SELECT d.webhook_id, d.status, d.attempts, e.uid, e.type, e.body FROM deliveries d"
            " JOIN events e ON e.id = d.event_id WHERE d.id = ?",
            (delivery_id,),
        )
        if not rows:
            raise KeyError(delivery_id)
        webhook_id, _status, attempts, uid, etype, body = rows[0]
        wh = self.webhooks.get(webhook_id)
        if wh is None:
            raise KeyError(delivery_id)
        if delivery_id in wh.inflight:
            raise RuntimeError("the delivery is being attempted right now")
        new_status = PENDING if wh.enabled else PAUSED

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (new_status, now if new_status == PENDING else None, now, delivery_id),
            )

        def committed(_: None) -> None:
            if new_status == PENDING and wh.enabled:
                item = wh.items.get(delivery_id)
                if item is not None:
                    item.next_at = now
                    heapq.heappush(wh.heap, item.key)
                else:
                    wh.push(DueItem(delivery_id, wh.id, now, int(attempts), uid, etype, bytes(body)))
                wh.wake.set()

        await self.store.run(write, on_commit=committed)
        return new_status

    async def replay(self, wh: Webhook, *, since: float, statuses: Sequence[str]) -> int:
        """Queue again every delivery of `wh` created since `since` with one of `statuses`."""
        now = self.clock()
        new_status = PENDING if wh.enabled else PAUSED
        marks = ",".join("?" * len(statuses))

        async def write(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                f"UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ?"  # noqa: S608
                f" WHERE webhook_id = ? AND created_at >= ? AND status IN ({marks})",
                (new_status, now if new_status == PENDING else None, now, wh.id, since, *statuses),
            )
            return int(cur.rowcount)

        def committed(count: int) -> None:
            if count and wh.enabled:
                wh.forget_queue()  # reload the window from SQLite, replayed rows included
                wh.wake.set()

        count = await self.store.run(write, on_commit=committed)
        log.info("deliveries replayed", webhook_id=wh.id, count=count, since=since, statuses=list(statuses))
        return count

    async def send_test(self, wh: Webhook, event_type: str) -> Outcome:
        now = self.clock()
        ev = synthetic_event(event_type, now=now)
        event_id = new_id("evt")
        headers = wh.signer(now).headers(
            event_id=event_id, event_type=ev.type, body=ev.body, timestamp=int(now), user_agent=USER_AGENT
        )
        outcome = await self.dispatcher.post(wh.url, ev.body, headers)
        log.info(
            "test event sent",
            webhook_id=wh.id,
            event_id=event_id,
            status_code=outcome.status_code,
            duration_ms=round(outcome.duration_ms, 1),
            error=outcome.error,
        )
        return outcome


def _webhook_state(wh: Webhook) -> tuple[Any, ...]:
    return (int(wh.enabled), wh.consecutive_failures, wh.backoff_until, wh.disabled_reason, wh.updated_at)


async def _write_webhook_state(db: aiosqlite.Connection, webhook_id: str, state: tuple[Any, ...]) -> None:
    await db.execute(
        "UPDATE webhooks SET enabled = ?, consecutive_failures = ?, backoff_until = ?, disabled_reason = ?,"
        " updated_at = ? WHERE id = ?",
        (*state, webhook_id),
    )


async def _pause_pending(db: aiosqlite.Connection, webhook_id: str, now: float) -> None:
    await db.execute(
        "UPDATE deliveries SET status = 'paused', next_attempt_at = NULL, updated_at = ?"
        " WHERE webhook_id = ? AND status = 'pending'",
        (now, webhook_id),
    )
