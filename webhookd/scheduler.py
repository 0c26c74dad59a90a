"""Due windows and pumps: the scheduler applies the policy's decisions.

Source of truth is the storage; memory holds, per webhook, a bounded window of its
soonest pending deliveries (webhookd.webhooks). Each enabled webhook has one pump task
that starts attempts when a delivery is due, the webhook's gate allows it
(webhookd.policy.start_at) and a global slot is free within the webhook's fair share.

The scheduler owns every webhook's runtime state, and the live delivery config
(`reconfigure` replaces it; every pump reads it on each turn). It never waits for a
commit to decide: outcomes change memory at once and are written in batches, and
what a commit makes due (new events, refills) arrives through continuations that the
storage runs right after the commit, in commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

import orjson
import structlog

from webhookd import __version__, batching, policy
from webhookd.config import DeliveryConfig
from webhookd.dispatcher import Outcome
from webhookd.events import Event
from webhookd.filters import EventFacts, Matcher, parents_of
from webhookd.metrics import Metrics
from webhookd.reasons import Lead, Reason
from webhookd.store.base import Storage
from webhookd.store.model import (
    PENDING,
    BatchOutcomeRecord,
    DueItem,
    FreshEvent,
    OutcomeRecord,
    Subscriber,
    WebhookRecord,
)
from webhookd.webhooks import START, Webhook

log = structlog.get_logger("webhookd.scheduler")

USER_AGENT = f"webhookd/{__version__}"


class Poster(Protocol):
    """The one method the scheduler needs from a dispatcher (a fake one in unit tests)."""

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome: ...


D = TypeVar("D", policy.Decision, policy.BatchDecision)


class FleetGate(Protocol):
    """What the scheduler asks of a fleet of daemons sharing one queue (PostgreSQL:
    webhookd.store.postgres_cluster.Fleet): the gate is decided from the stored one, under
    a lock, and a backing-off webhook's one probe is taken fleet-wide."""

    async def claim_probe(self, webhook_id: str, seconds: float) -> float: ...

    def share(self, rows: dict[str, list[int]]) -> None: ...

    def settle(
        self,
        webhook_id: str,
        decide: Callable[[policy.Gate], D],
        build: Callable[[D], OutcomeRecord | BatchOutcomeRecord],
        *,
        on_commit: Callable[[D | None], None],
    ) -> None: ...


MIN_WINDOW = 64


def window_size(cfg: DeliveryConfig, smallest: int = MIN_WINDOW) -> int:
    """Deliveries of one webhook held in memory (refilled from storage below half)."""
    return max(smallest, 4 * cfg.per_webhook_concurrency)


BATCH_WINDOW = 16  # batches a batching webhook's window holds

MAX_VARIANTS = 256


class _Fanout:
    """The webhooks subscribed to one event type, and the filters among them, compiled for
    many tenants: the sender domains of every filter are indexed (domain → the bits of the
    webhooks that name it), so an event costs one lookup per label of its sender's domain,
    not one test per webhook; only the webhooks whose sender matched and whose filter has
    more fields, and those without a sender field, run a matcher.

    Events whose filters pass and fail alike share one list (as events of an unfiltered
    type share the whole one), so push_fresh still takes them together."""

    __slots__ = ("by_from", "by_parent", "filtered", "from_bits", "others", "rest", "rest_bits", "subs", "variants")

    def __init__(self, subs: list[Subscriber], filtered: tuple[tuple[int, Matcher], ...]) -> None:
        self.subs = subs
        self.filtered = bool(filtered)
        self.variants: dict[int, list[Subscriber]] = {}  # by the bits of the filters that failed
        self.by_from: dict[str, int] = {}
        self.by_parent: dict[str, int] = {}
        self.from_bits = 0  # the webhooks with sender domains
        self.rest: dict[int, Matcher] = {}  # ... and more fields to test when the sender matched, by bit
        self.rest_bits = 0
        self.others: list[tuple[int, Matcher]] = []  # filters without sender domains
        for bit, m in filtered:
            if m.from_exact is None:
                self.others.append((bit, m))
                continue
            self.from_bits |= bit
            for d in m.from_exact:
                self.by_from[d] = self.by_from.get(d, 0) | bit
            for p in m.from_parents:
                self.by_parent[p] = self.by_parent.get(p, 0) | bit
            if m.rest:
                self.rest[bit] = m
                self.rest_bits |= bit

    def select(self, body: bytes) -> list[Subscriber]:
        if not self.filtered:
            return self.subs
        try:
            data = orjson.loads(body).get("data")
        except (orjson.JSONDecodeError, AttributeError):  # intake built it: cannot happen
            data = None
        facts = EventFacts(data)  # each address is read once, for every filter
        failed = 0
        if self.from_bits:
            domain = facts.from_domain
            passed = 0
            if domain is not None:
                passed = self.by_from.get(domain, 0)
                if self.by_parent:
                    for parent in parents_of(domain):
                        passed |= self.by_parent.get(parent, 0)
            failed = self.from_bits & ~passed
            todo = passed & self.rest_bits
            while todo:  # only the webhooks whose sender matched
                bit = todo & -todo
                todo ^= bit
                if not self.rest[bit].test_rest(facts):
                    failed |= bit
        for bit, matcher in self.others:
            if not matcher.test(facts):
                failed |= bit
        if not failed:
            return self.subs
        subs = self.variants.get(failed)
        if subs is None:
            if len(self.variants) >= MAX_VARIANTS:
                self.variants.clear()
            subs = [s for i, s in enumerate(self.subs) if not (failed >> i) & 1]
            self.variants[failed] = subs
        return subs


class Scheduler:
    """Owns the webhooks in memory and drives their deliveries."""

    def __init__(
        self,
        storage: Storage,
        dispatcher: Poster,
        cfg: DeliveryConfig,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_disabled: Callable[[Webhook], None] | None = None,
        metrics: Metrics | None = None,
        fleet: FleetGate | None = None,
    ) -> None:
        self.storage = storage
        self.dispatcher = dispatcher
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.on_disabled = on_disabled
        self.metrics = metrics
        self.fleet = fleet  # several daemons share the queue: the gate is theirs (FleetGate)
        self.webhooks: dict[str, Webhook] = {}
        self._fanouts: dict[str, _Fanout] = {}  # by event type; cleared when a webhook changes
        self._used = 0  # global slots in use
        self._slot_waiters: deque[Webhook] = deque()
        self._attempts: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._share = cfg.concurrency
        self._share_at = float("-inf")
        self.min_window = MIN_WINDOW  # tests make it small to exercise refills

    @property
    def window(self) -> int:
        return window_size(self.cfg, self.min_window)

    def _window_of(self, wh: Webhook, cfg: DeliveryConfig | None = None) -> int:
        """A webhook's window: a batching one holds at least BATCH_WINDOW batches' worth (at
        most 1000 events each): a backlog that keeps up with intake stays in memory instead
        of being read back from storage."""
        base = window_size(cfg or self.cfg, self.min_window)
        return max(base, BATCH_WINDOW * wh.batching.max_events) if wh.batching.on else base

    # -- start, reconfigure, stop ----------------------------------------------------
    async def load(self) -> None:
        for record in await self.storage.load_webhooks():
            self.add(Webhook.from_record(record))

    def reconfigure(self, cfg: DeliveryConfig) -> None:
        """Apply a reloaded [delivery] config now: every pump re-reads it at once."""
        self.cfg = cfg
        self.wake_all()

    def wake_all(self) -> None:
        """Every pump looks again now (the config or, in tests, the injected clock moved)."""
        self._share_at = float("-inf")
        for wh in self.webhooks.values():
            wh.wake.set()

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

    # -- the registry --------------------------------------------------------------------
    def add(self, wh: Webhook) -> None:
        self.webhooks[wh.id] = wh
        self._fanouts.clear()
        wh.task = asyncio.create_task(self._pump(wh), name=f"pump-{wh.id}")

    def remove(self, wh: Webhook) -> None:
        """Forget a webhook (deleted): no more deliveries, its outcomes no longer count."""
        self.webhooks.pop(wh.id, None)
        self._fanouts.clear()
        wh.gate = policy.disabled_by_hand(wh.gate)
        wh.forget_queue()
        if wh.task is not None:
            wh.task.cancel()

    def changed_subscriptions(self) -> None:
        self._fanouts.clear()

    def _fanout(self, event_type: str) -> _Fanout:
        fanout = self._fanouts.get(event_type)
        if fanout is None:
            hooks = [wh for wh in self.webhooks.values() if wh.subscribes(event_type)]
            fanout = _Fanout([(wh.id, wh.enabled) for wh in hooks],
                             tuple((1 << i, wh.matcher) for i, wh in enumerate(hooks) if wh.matcher is not None))
            self._fanouts[event_type] = fanout
        return fanout

    def subscribers(self, event_type: str) -> Sequence[Subscriber]:
        """Every webhook subscribed to this type, before filters (cached per type)."""
        return self._fanout(event_type).subs

    def fan_out(self, event: Event) -> Sequence[Subscriber]:
        """Who this event goes to, as intake submits it: the webhooks subscribed to its type
        whose filter matches its data. When none of them has a filter, that is the cached
        list of the type, and the body is not even read."""
        fanout = self._fanouts.get(event.type) or self._fanout(event.type)
        return fanout.select(event.body) if fanout.filtered else fanout.subs

    def set_gate(self, wh: Webhook, gate: policy.Gate, now: float) -> None:
        """Apply a gate change made by hand (disable, enable): the window restarts from
        storage, which the write queued right after this sees first."""
        wh.gate = gate
        wh.updated_at = now
        wh.forget_queue()
        self._fanouts.clear()
        wh.wake.set()

    def requeue(self, wh: Webhook, item: DueItem, next_at: float) -> None:
        if wh.enabled and self.webhooks.get(wh.id) is wh:
            wh.reschedule(item, next_at)
            wh.wake.set()

    def reload_window(self, wh: Webhook) -> None:
        if wh.enabled:
            wh.forget_queue()
            wh.wake.set()

    def refresh(self, webhook_id: str, stored: tuple[WebhookRecord, int] | None) -> None:
        """Apply a webhook as another instance of the fleet stored it (with its gate epoch):
        created, edited, rotated, disabled, enabled or deleted there."""
        wh = self.webhooks.get(webhook_id)
        if stored is None:
            if wh is not None:
                self.remove(wh)
            return
        record, epoch = stored
        if wh is None:
            wh = Webhook.from_record(record)
            wh.gate = replace(wh.gate, epoch=epoch)
            self.add(wh)
            return
        wh.url, wh.events, wh.description = record.url, record.events, record.description
        wh.secret, wh.previous_secret = record.secret, record.previous_secret
        wh.previous_secret_expires_at = record.previous_secret_expires_at
        wh.declared_in, wh.batching, wh.updated_at = record.declared_in, record.batching, record.updated_at
        if record.filter != wh.filter:
            wh.set_filter(record.filter)
        self._fanouts.clear()
        gate = policy.Gate(enabled=record.enabled, consecutive_failures=record.consecutive_failures,
                           backoff_until=record.backoff_until, epoch=epoch, ramp=wh.gate.ramp,
                           disabled_reason=record.disabled_reason)
        if gate != wh.gate:
            if gate.enabled != wh.enabled:
                wh.forget_queue()  # disabled: nothing more from memory; enabled: read it again
            wh.gate = gate
        wh.wake.set()

    @staticmethod
    def refresh_epoch(wh: Webhook, epoch: int) -> None:
        wh.gate = replace(wh.gate, epoch=epoch)

    def released(self, webhook_ids: Sequence[str] | None) -> None:
        """Pending rows of these webhooks (None: of any) were released by the fleet (an
        instance's lease ended, or an operator queued them again): read their windows again."""
        hooks = self.webhooks.values() if webhook_ids is None else \
            [w for i in webhook_ids if (w := self.webhooks.get(i)) is not None]
        for wh in list(hooks):
            self.reload_window(wh)

    # -- what a commit made due ------------------------------------------------------------
    def push_fresh(self, events: list[FreshEvent]) -> None:
        """Queue a commit's new deliveries in memory, webhook by webhook. Events that share
        a subscriber list (the cached one of their type) are taken together: for each
        enabled subscriber, if even the soonest of its new deliveries lies beyond its
        window's boundary (a webhook with a full window: its backlog stays in storage and
        a refill brings it), none is built at all; otherwise each is pushed."""
        self._share_at = float("-inf")  # new work: count busy webhooks afresh
        groups: dict[int, list[FreshEvent]] = {}
        for fe in events:  # each holds its list, so no id() is reused meanwhile
            if fe.resync:  # deferred fan-out: read these windows again (FreshEvent.resync)
                self._resync(fe.resync)
                continue
            groups.setdefault(id(fe.subscribers), []).append(fe)
        touched: set[Webhook] = set()
        shared: dict[str, list[int]] = {}  # in a fleet: rows this daemon does not hold in memory
        webhooks = self.webhooks
        for group in groups.values():
            # ids grow with the events, so the group's soonest event holds each
            # subscriber's soonest key
            soonest = min(group, key=lambda fe: (fe.next_at, fe.first_delivery_id))
            for i, (webhook_id, enabled) in enumerate(group[0].subscribers):
                if not enabled:
                    continue
                wh = webhooks.get(webhook_id)
                if wh is None or not wh.enabled:
                    continue  # deleted, or disabled after the event was submitted
                touched.add(wh)
                boundary = wh.boundary
                if boundary is not None and (soonest.next_at, soonest.delivery_id(i)) > boundary:
                    if self.fleet is not None:
                        shared.setdefault(webhook_id, []).extend(fe.delivery_id(i) for fe in group)
                    continue  # all of them stay in storage
                for fe in group:
                    wh.push(fe.item(i))
        window = self.window
        for wh in touched:
            keep = self._window_of(wh) if wh.batching.on else window
            if len(wh.items) > 2 * keep:
                dropped = wh.trim(keep)
                if self.fleet is not None:
                    shared.setdefault(wh.id, []).extend(dropped)
            wh.wake.set()
        if shared and self.fleet is not None:
            # a backlog beyond this daemon's window: let the fleet's other daemons take it
            self.fleet.share(shared)

    def _resync(self, webhook_ids: Sequence[str]) -> None:
        """The storage now defers these webhooks' new deliveries, or made some of them rows
        outside a refill: what memory holds may be all it will ever be handed, so the window
        must not claim to hold everything (boundary None). Read it again from storage."""
        for webhook_id in webhook_ids:
            wh = self.webhooks.get(webhook_id)
            if wh is not None:
                self.reload_window(wh)

    # -- the pump ----------------------------------------------------------------------------
    async def _pump(self, wh: Webhook) -> None:
        while not self._stopping:
            wh.wake.clear()
            cfg = self.cfg  # the live config, on every turn
            if not wh.enabled:
                await wh.wake.wait()
                continue
            if wh.boundary is not None and len(wh.items) < self._window_of(wh, cfg) // 2 and not wh.refilling:
                await self._refill(wh)
                continue
            if wh.batching.on or wh.forming:
                await self._batch_turn(wh, cfg)
                continue
            item = wh.peek()
            if item is None:
                await wh.wake.wait()
                continue
            at = policy.start_at(wh.gate, active=wh.active, next_at=item.next_at,
                                 per_webhook_concurrency=cfg.per_webhook_concurrency)
            if at is None:
                await wh.wake.wait()  # at its limit: an attempt's end wakes it
                continue
            now = self.clock()
            if at > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wh.wake.wait(), timeout=min(at - now, 3600.0))
                continue
            if self._needs_probe(wh):
                await self._take_probe(wh, cfg)
                continue
            if self._used >= cfg.concurrency or (wh.active and wh.active >= self._fair_share()):
                self._slot_waiters.append(wh)
                await wh.wake.wait()
                continue
            self._start(wh, wh.pop())

    def _needs_probe(self, wh: Webhook) -> bool:
        """In a fleet, a backing-off webhook's next attempt is the fleet's one probe: this
        instance must hold it first, and a probe held serves one attempt."""
        return (self.fleet is not None and wh.gate.consecutive_failures > 0
                and (wh.probing or self.monotonic() >= wh.probe_held_until))

    async def _take_probe(self, wh: Webhook, cfg: DeliveryConfig) -> None:
        assert self.fleet is not None
        if wh.probing:  # the last probe's outcome is not committed yet: that commit wakes the pump
            await wh.wake.wait()
            return
        lease = cfg.connect_timeout + cfg.timeout + 10.0  # longer than any attempt
        left = await self.fleet.claim_probe(wh.id, lease)
        if left == 0.0:
            wh.probe_held_until = self.monotonic() + lease / 2
        else:  # another instance probes: its outcome (a gate change) wakes this one, or the lease ends
            await self._wait(wh, left)

    def _fair_share(self) -> int:
        """Slots one webhook may hold: the max-min fair share of `delivery.concurrency`
        among the webhooks that have work (policy.water_level of what each can use now,
        policy.want), so webhooks that hang cannot take every slot from the healthy ones.
        Counted at most every 10 ms: O(webhooks) per count."""
        now = self.monotonic()
        if now - self._share_at > 0.01:
            cfg = self.cfg
            per = cfg.per_webhook_concurrency
            wants = [
                policy.want(w.gate, active=w.active, per_webhook_concurrency=per)
                for w in self.webhooks.values()
                if w.active or (w.enabled and not w.consecutive_failures and w.heap)
            ]
            self._share = policy.water_level(cfg.concurrency, wants)
            self._share_at = now
        return self._share

    def _use_probe(self, wh: Webhook) -> None:
        if self.fleet is not None and wh.gate.consecutive_failures:
            wh.probing = True
            wh.probe_held_until = 0.0

    def _start(self, wh: Webhook, item: DueItem) -> None:
        self._use_probe(wh)
        self._used += 1
        wh.active += 1
        wh.inflight.add(item.delivery_id)
        task = asyncio.create_task(self._attempt(wh, item, wh.gate.epoch))
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    def _release_slot(self, wh: Webhook) -> None:
        self._used -= 1
        wh.active -= 1
        wh.wake.set()
        # Wake every webhook waiting for a slot: each re-checks its own gate, and one
        # that no longer wants the slot must not leave the others asleep.
        while self._slot_waiters:
            self._slot_waiters.popleft().wake.set()

    async def _attempt(self, wh: Webhook, item: DueItem, epoch: int) -> None:
        at = self.clock()
        try:
            headers = wh.signer(at).headers(
                event_id=item.event_uid, event_type=item.event_type, body=item.body, timestamp=int(at),
                user_agent=USER_AGENT,
            )
            outcome = await self.dispatcher.post(wh.url, item.body, headers)
        except Exception as exc:  # a bug or bad stored data (a secret that is not base64): a failure
            log.exception("attempt failed inside webhookd", webhook_id=wh.id, delivery_id=item.delivery_id)
            outcome = Outcome(False, None, Lead.INTERNAL.text(f": {type(exc).__name__}: {exc}"), 0.0, b"",
                              reason=Reason.INTERNAL)
        except asyncio.CancelledError:
            # Shutdown ran out of grace: the delivery stays pending in storage with its
            # schedule unchanged and is attempted again after a restart.
            self._release_slot(wh)
            wh.inflight.discard(item.delivery_id)
            log.warning("attempt abandoned at shutdown", webhook_id=wh.id, delivery_id=item.delivery_id)
            raise
        self._release_slot(wh)
        self.record(wh, item, epoch, outcome, at)

    # -- outcomes -----------------------------------------------------------------------------
    def _apply_gate(self, wh: Webhook, gate: policy.Gate, *, gate_changed: bool, disabled: bool,
                    outcome: Outcome, now: float) -> None:
        """An attempt's (or a batch attempt's) decision applied in memory, with its metrics."""
        wh.gate = gate
        if gate_changed:
            wh.updated_at = now
        if disabled:
            wh.forget_queue()
            self._fanouts.clear()
            wh.wake.set()
        if self.metrics is not None:
            self.metrics.observe_attempt(outcome.reason, outcome.duration_ms / 1000)
            if disabled:
                self.metrics.auto_disabled.inc()

    def _store_gate(self, wh: Webhook, *, disabled: bool) -> None:
        """Queue the gate's write after an outcome changed it; a disable also pauses the backlog
        and, once committed, tells `on_disabled` (the notify command)."""
        def state_committed(_: None) -> None:
            if self.on_disabled is not None:
                self.on_disabled(wh)

        self.storage.set_webhook_state(
            wh.id, wh.state(), pause_pending=disabled, on_commit=state_committed if disabled else None
        )

    @staticmethod
    def _log_disabled(wh: Webhook) -> None:
        log.warning("webhook disabled", webhook_id=wh.id, url=wh.url, reason=policy.CONSECUTIVE_FAILURES,
                    consecutive_failures=wh.consecutive_failures)

    def record(self, wh: Webhook, item: DueItem, epoch: int, outcome: Outcome, at: float) -> None:
        """Apply an attempt's outcome in memory now (policy.decide) and queue its writes."""
        now = self.clock()
        if self.webhooks.get(wh.id) is not wh:
            wh.inflight.discard(item.delivery_id)
            return  # deleted meanwhile: its deliveries are gone, nothing to record
        if self._in_fleet(wh, outcome):
            self._record_in_fleet(wh, item, epoch, outcome, at)
            return
        wh.probing = False  # a probe whose gate healed meanwhile: recorded as any success
        item.attempts += 1
        d = policy.decide(
            wh.gate, success=outcome.success, retry_after=outcome.retry_after, attempt_epoch=epoch,
            attempts=item.attempts, cfg=self.cfg, now=now,
        )
        self._apply_gate(wh, d.gate, gate_changed=d.gate_changed, disabled=d.disabled, outcome=outcome, now=now)
        self._log_attempt(wh, item, d, outcome)
        if d.disabled:
            self._log_disabled(wh)
        if d.next_at is not None:
            item.next_at = d.next_at
        record = self._outcome_record(wh, item, d, outcome, at, now)
        pending = d.status == PENDING

        def committed(_: None) -> None:
            wh.inflight.discard(item.delivery_id)
            if pending and wh.enabled and self.webhooks.get(wh.id) is wh:
                wh.push(item)
                wh.wake.set()

        self.storage.record_outcome(record, on_commit=committed)
        if d.gate_changed:
            self._store_gate(wh, disabled=d.disabled)

    @staticmethod
    def _outcome_record(wh: Webhook, item: DueItem, d: policy.Decision, outcome: Outcome, at: float,
                        now: float) -> OutcomeRecord:
        return OutcomeRecord(
            delivery_id=item.delivery_id, webhook_id=wh.id, status=d.status, attempts=item.attempts,
            next_attempt_at=d.next_at, at=at, duration_ms=outcome.duration_ms, status_code=outcome.status_code,
            error=outcome.error, response_body=outcome.response_body[:1024].decode("utf-8", "replace"),
            updated_at=now,
        )

    @staticmethod
    def _log_attempt(wh: Webhook, item: DueItem, d: policy.Decision, outcome: Outcome) -> None:
        log.info(
            "attempt", webhook_id=wh.id, event_id=item.event_uid, delivery_id=item.delivery_id,
            attempt=item.attempts, status_code=outcome.status_code, duration_ms=round(outcome.duration_ms, 1),
            outcome=d.status, error=outcome.error,
        )

    # -- refill --------------------------------------------------------------------------------
    async def _refill(self, wh: Webhook) -> None:
        wh.refilling = True
        after = wh.boundary if wh.boundary is not None else START
        limit = self._window_of(wh)
        try:
            await self.storage.take_due(wh.id, after, limit, on_commit=lambda rows: wh.load(after, rows, limit))
        finally:
            wh.refilling = False

    # -- batches (webhookd.batching; a webhook with batch_max_events > 1) ------------------------
    async def _wait(self, wh: Webhook, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wh.wake.wait(), timeout=min(seconds, 3600.0))

    async def _batch_turn(self, wh: Webhook, cfg: DeliveryConfig) -> None:
        """One turn of a batching webhook's pump. Due deliveries are taken, in order, into the
        batch being formed (`wh.forming`) until it is full (batch_max_events, or the next one
        would pass batch_max_bytes); a batch that is not full waits until `batch_linger`
        after its first delivery became due. A failed batch's deliveries (`DueItem.batch`)
        are retried together, alone and at once. The gate and the slots are those of a
        single attempt: one batch is one attempt."""
        settings = wh.batching
        if not settings.on:
            wh.unform()  # batching was turned off: back to single deliveries
            return
        first = next(iter(wh.forming.values()), None) or wh.peek()
        if first is None:
            await wh.wake.wait()
            return
        at = policy.start_at(wh.gate, active=wh.active, next_at=first.next_at,
                             per_webhook_concurrency=cfg.per_webhook_concurrency)
        if at is None:
            await wh.wake.wait()  # at its limit: an attempt's end wakes it
            return
        now = self.clock()
        if at > now:
            await self._wait(wh, at - now)
            return
        kept = first.batch if not wh.forming else None
        if kept is None:
            more = self._gather(wh, settings, now)
            if not more and not batching.full(len(wh.forming), wh.forming_bytes, settings):
                linger_end = first.next_at + settings.linger
                if linger_end > now:
                    await self._wait(wh, linger_end - now)
                    return
        if self._needs_probe(wh):
            await self._take_probe(wh, cfg)
            return
        if self._used >= cfg.concurrency or (wh.active and wh.active >= self._fair_share()):
            self._slot_waiters.append(wh)
            await wh.wake.wait()
            return
        if kept is None:
            items = wh.take_formed()
        else:
            items = [wh.pop()]
            while (nxt := wh.peek()) is not None and nxt.batch == kept and nxt.next_at == first.next_at:
                items.append(wh.pop())
        self._start_batch(wh, items)

    @staticmethod
    def _gather(wh: Webhook, settings: batching.Batching, now: float) -> bool:
        """Take due deliveries into the batch being formed; True if the next due one does not
        fit (the batch is full by bytes)."""
        forming = wh.forming
        while len(forming) < settings.max_events:
            nxt = wh.peek()
            if nxt is None or nxt.next_at > now or nxt.batch is not None:
                return False
            if forming and wh.forming_bytes + batching.element_size(nxt.event_uid, nxt.body) + 1 > settings.max_bytes:
                return True
            wh.form(wh.pop())
        return False

    def _start_batch(self, wh: Webhook, items: list[DueItem]) -> None:
        self._use_probe(wh)
        self._used += 1
        wh.active += 1
        for item in items:
            wh.inflight.add(item.delivery_id)
        task = asyncio.create_task(self._attempt_batch(wh, items, wh.gate.epoch))
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def _attempt_batch(self, wh: Webhook, items: list[DueItem], epoch: int) -> None:
        at = self.clock()
        batch_id = batching.batch_id(wh.id, [item.event_uid for item in items])
        try:
            body = batching.body([(item.event_uid, item.body) for item in items])
            headers = wh.signer(at).headers(event_id=batch_id, event_type=batching.EVENT_TYPE, body=body,
                                            timestamp=int(at), user_agent=USER_AGENT)
            outcome = await self.dispatcher.post(wh.url, body, headers)
        except Exception as exc:  # a bug or bad stored data: a failure, as for one delivery
            log.exception("batch attempt failed inside webhookd", webhook_id=wh.id, batch_id=batch_id)
            outcome = Outcome(False, None, Lead.INTERNAL.text(f": {type(exc).__name__}: {exc}"), 0.0, b"",
                              reason=Reason.INTERNAL)
        except asyncio.CancelledError:
            # as for one delivery: they stay pending in storage, schedule unchanged
            self._release_slot(wh)
            for item in items:
                wh.inflight.discard(item.delivery_id)
            log.warning("batch attempt abandoned at shutdown", webhook_id=wh.id, batch_id=batch_id,
                        deliveries=len(items))
            raise
        self._release_slot(wh)
        self.record_batch(wh, items, batch_id, epoch, outcome, at)

    def record_batch(
        self, wh: Webhook, items: list[DueItem], batch_id: str, epoch: int, outcome: Outcome, at: float
    ) -> None:
        """Apply a batch attempt's outcome: the gate once (policy.decide_batch), every delivery's
        status, one attempt row each (carrying the batch id); the still-pending ones go back
        into the window together, marked with the batch, due at the same time."""
        now = self.clock()
        if self.webhooks.get(wh.id) is not wh:
            for item in items:
                wh.inflight.discard(item.delivery_id)
            return  # deleted meanwhile
        if self._in_fleet(wh, outcome):
            self._record_batch_in_fleet(wh, items, batch_id, epoch, outcome, at)
            return
        wh.probing = False  # a probe whose gate healed meanwhile: recorded as any success
        for item in items:
            item.attempts += 1
        d = policy.decide_batch(
            wh.gate, success=outcome.success, retry_after=outcome.retry_after, attempt_epoch=epoch,
            attempts=[item.attempts for item in items], cfg=self.cfg, now=now,
        )
        self._apply_gate(wh, d.gate, gate_changed=d.gate_changed, disabled=d.disabled, outcome=outcome, now=now)
        self._log_batch(wh, items, batch_id, d, outcome)
        if d.disabled:
            self._log_disabled(wh)
        next_at = d.next_at
        pending: list[DueItem] = []
        if next_at is not None:
            for item, status in zip(items, d.statuses, strict=True):
                if status == PENDING:
                    item.next_at = next_at
                    item.batch = batch_id
                    pending.append(item)
        record = self._batch_record(wh, items, batch_id, d, outcome, at, now)

        def committed(_: None) -> None:
            inflight = wh.inflight
            for item in items:
                inflight.discard(item.delivery_id)
            if pending and wh.enabled and self.webhooks.get(wh.id) is wh:
                for item in pending:
                    wh.push(item)
                wh.wake.set()

        self.storage.record_batch_outcome(record, on_commit=committed)
        if d.gate_changed:
            self._store_gate(wh, disabled=d.disabled)

    @staticmethod
    def _batch_record(wh: Webhook, items: list[DueItem], batch_id: str, d: policy.BatchDecision, outcome: Outcome,
                      at: float, now: float) -> BatchOutcomeRecord:
        return BatchOutcomeRecord(
            webhook_id=wh.id, batch_id=batch_id, delivery_ids=tuple([item.delivery_id for item in items]),
            statuses=d.statuses, attempts=tuple([item.attempts for item in items]), next_attempt_at=d.next_at,
            at=at, duration_ms=outcome.duration_ms, status_code=outcome.status_code, error=outcome.error,
            response_body=outcome.response_body[:1024].decode("utf-8", "replace"), updated_at=now,
        )

    @staticmethod
    def _log_batch(wh: Webhook, items: list[DueItem], batch_id: str, d: policy.BatchDecision,
                   outcome: Outcome) -> None:
        log.info(
            "batch attempt", webhook_id=wh.id, batch_id=batch_id, deliveries=len(items),
            first_delivery_id=items[0].delivery_id, status_code=outcome.status_code,
            duration_ms=round(outcome.duration_ms, 1), succeeded=outcome.success, error=outcome.error,
            retried=sum(1 for st in d.statuses if st == PENDING),
        )

    # -- outcomes in a fleet (several daemons, one queue: FleetGate) ----------------------------
    def _in_fleet(self, wh: Webhook, outcome: Outcome) -> bool:
        """Whether the fleet decides this outcome: any failure, and any outcome while the gate
        is not healthy here. A success of a healthy webhook changes no gate: it is written in
        the usual batches (which close a failure episode stored by another instance)."""
        g = wh.gate
        return self.fleet is not None and (not outcome.success or bool(g.consecutive_failures)
                                           or bool(g.backoff_until) or not g.enabled)

    def _fleet_gate(self, wh: Webhook, d: policy.Decision | policy.BatchDecision, outcome: Outcome,
                    now: float) -> None:
        """The fleet's decision, committed, applied here; only the instance whose transaction
        disabled the webhook tells `on_disabled`."""
        was_enabled = wh.enabled
        self._apply_gate(wh, d.gate, gate_changed=d.gate_changed, disabled=d.disabled, outcome=outcome, now=now)
        if was_enabled and not d.gate.enabled and not d.disabled:  # another instance disabled it
            wh.forget_queue()
            self._fanouts.clear()
            wh.wake.set()
        if d.disabled:
            self._log_disabled(wh)
            if self.on_disabled is not None:
                self.on_disabled(wh)

    @staticmethod
    def _fleet_committed(wh: Webhook, items: list[DueItem]) -> None:
        """A settled outcome committed: its deliveries are no longer in flight, the probe it used is over."""
        for item in items:
            wh.inflight.discard(item.delivery_id)
        wh.probing = False
        wh.wake.set()

    def _record_in_fleet(self, wh: Webhook, item: DueItem, epoch: int, outcome: Outcome, at: float) -> None:
        assert self.fleet is not None
        now, cfg, ramp = self.clock(), self.cfg, wh.gate.ramp
        item.attempts += 1
        attempts = item.attempts

        def decide(stored: policy.Gate) -> policy.Decision:
            return policy.decide(replace(stored, ramp=ramp), success=outcome.success, retry_after=outcome.retry_after,
                                 attempt_epoch=epoch, attempts=attempts, cfg=cfg, now=now)

        def build(d: policy.Decision) -> OutcomeRecord:
            return self._outcome_record(wh, item, d, outcome, at, now)

        def committed(d: policy.Decision | None) -> None:
            self._fleet_committed(wh, [item])
            if d is None or self.webhooks.get(wh.id) is not wh:
                return  # deleted meanwhile
            self._fleet_gate(wh, d, outcome, now)
            self._log_attempt(wh, item, d, outcome)
            if d.status == PENDING and d.next_at is not None and wh.enabled:
                item.next_at = d.next_at
                wh.push(item)
                wh.wake.set()

        self.fleet.settle(wh.id, decide, build, on_commit=committed)

    def _record_batch_in_fleet(
        self, wh: Webhook, items: list[DueItem], batch_id: str, epoch: int, outcome: Outcome, at: float
    ) -> None:
        assert self.fleet is not None
        now, cfg, ramp = self.clock(), self.cfg, wh.gate.ramp
        for item in items:
            item.attempts += 1
        attempts = [item.attempts for item in items]

        def decide(stored: policy.Gate) -> policy.BatchDecision:
            return policy.decide_batch(replace(stored, ramp=ramp), success=outcome.success,
                                       retry_after=outcome.retry_after, attempt_epoch=epoch, attempts=attempts,
                                       cfg=cfg, now=now)

        def build(d: policy.BatchDecision) -> BatchOutcomeRecord:
            return self._batch_record(wh, items, batch_id, d, outcome, at, now)

        def committed(d: policy.BatchDecision | None) -> None:
            self._fleet_committed(wh, items)
            if d is None or self.webhooks.get(wh.id) is not wh:
                return  # deleted meanwhile
            self._fleet_gate(wh, d, outcome, now)
            self._log_batch(wh, items, batch_id, d, outcome)
            if d.next_at is not None and wh.enabled:
                for item, status in zip(items, d.statuses, strict=True):
                    if status == PENDING:
                        item.next_at = d.next_at
                        item.batch = batch_id
                        wh.push(item)
                wh.wake.set()

        self.fleet.settle(wh.id, decide, build, on_commit=committed)
