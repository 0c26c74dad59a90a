"""What an operator can do to webhooks and deliveries, for the admin API (and the dashboard).

Each operation writes through the storage and changes the scheduler's memory in the
order the storage commits. Operations that restrict what may be delivered (disable,
delete, enable's reset) change memory when they are queued, so an event submitted
after them already fans out by the new state; their writes are internal (retried
until they commit). Domain errors are `NotFound` and `Conflict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import structlog

from webhookd import policy
from webhookd.batching import OFF, Batching
from webhookd.declared import REMOVED_FROM_CONFIG, Change, DeclaredWebhook, plan
from webhookd.dispatcher import Outcome
from webhookd.events import synthetic_event
from webhookd.filters import EMPTY_FILTER, WebhookFilter
from webhookd.ids import new_id
from webhookd.scheduler import USER_AGENT, Scheduler
from webhookd.signing import generate_secret
from webhookd.store.base import Storage
from webhookd.store.model import PAUSED, PENDING, Conflict, DeliveryFilter, NotFound
from webhookd.webhooks import Webhook

log = structlog.get_logger("webhookd.operations")

ROTATION_GRACE = 24 * 3600.0


class Operations:
    def __init__(self, scheduler: Scheduler, storage: Storage) -> None:
        self.scheduler = scheduler
        self.storage = storage

    @property
    def clock(self) -> float:
        return self.scheduler.clock()

    def webhook(self, webhook_id: str) -> Webhook:
        wh = self.scheduler.webhooks.get(webhook_id)
        if wh is None:
            raise NotFound(f"no webhook with id {webhook_id!r}")
        return wh

    @staticmethod
    def editable(wh: Webhook) -> None:
        """Conflict for a webhook declared in a file: its file owns its url, events, filter,
        description and secret, and deleting it would only bring it back at the next sync."""
        if wh.declared_in:
            raise Conflict(
                f"webhook {wh.name} ({wh.id}) is declared in {wh.declared_in}: change it there and reload"
                " webhookd (systemctl reload webhookd); enable and disable still work here"
            )

    async def create(
        self, *, url: str, events: tuple[str, ...], description: str, filter: WebhookFilter = EMPTY_FILTER,
        name: str | None = None, declared_in: str | None = None, secret: str | None = None,
        batching: Batching = OFF,
    ) -> Webhook:
        now = self.clock
        wh = Webhook(
            id=new_id("wh"), url=url, events=events, description=description, secret=secret or generate_secret(),
            previous_secret=None, previous_secret_expires_at=None, created_at=now, updated_at=now, filter=filter,
            name=name, declared_in=declared_in, batching=batching,
        )
        wh.boundary = None  # a new webhook has nothing pending
        await self.storage.create_webhook(wh.record(), on_commit=lambda _: self.scheduler.add(wh))
        return wh

    async def update(
        self, wh: Webhook, *, url: str | None, events: tuple[str, ...] | None, description: str | None,
        filter: WebhookFilter | None = None, batching: Batching | None = None,
    ) -> Webhook:
        """Change what is given (None: keep it). Like a create, it applies to the events
        submitted after its commit: memory (the fan-out included) changes then. Conflict for
        a declared webhook (`editable`). New batch settings apply from the pump's next turn."""
        self.editable(wh)
        return await self._update(wh, url=url, events=events, description=description, filter=filter,
                                  batching=batching)

    async def _update(
        self, wh: Webhook, *, url: str | None, events: tuple[str, ...] | None, description: str | None,
        filter: WebhookFilter | None = None, batching: Batching | None = None,
    ) -> Webhook:
        now = self.clock
        new_url = wh.url if url is None else url
        new_events = wh.events if events is None else events
        new_description = wh.description if description is None else description
        new_filter = wh.filter if filter is None else filter

        def committed(_: None) -> None:
            wh.url, wh.events, wh.description, wh.updated_at = new_url, new_events, new_description, now
            if new_filter != wh.filter:
                wh.set_filter(new_filter)
            if batching is not None and batching != wh.batching:
                wh.batching = batching
                wh.wake.set()  # the pump takes the new settings on its next turn
            self.scheduler.changed_subscriptions()

        await self.storage.update_webhook(
            wh.id, url=new_url, events=new_events, description=new_description, filter=new_filter, updated_at=now,
            batching=batching, on_commit=committed,
        )
        return wh

    async def delete(self, wh: Webhook) -> None:
        self.editable(wh)
        self.scheduler.remove(wh)
        await self.storage.delete_webhook(wh.id)

    async def disable(self, wh: Webhook) -> Webhook:
        if not wh.enabled:
            return wh
        now = self.clock
        self.scheduler.set_gate(wh, policy.disabled_by_hand(wh.gate), now)
        await self.storage.set_webhook_state(wh.id, wh.state(), pause_pending=True)
        log.info("webhook disabled", webhook_id=wh.id, reason=policy.MANUAL)
        return wh

    async def enable(self, wh: Webhook, *, drop_backlog: bool = False) -> int:
        """Returns how many paused deliveries were resumed (or dropped)."""
        now = self.clock
        self.scheduler.set_gate(wh, policy.enabled_again(wh.gate), now)
        count = await self.storage.enable_webhook(
            wh.id, now=now, drop_backlog=drop_backlog, on_commit=lambda _: self.scheduler.reload_window(wh)
        )
        log.info("webhook enabled", webhook_id=wh.id, resumed=0 if drop_backlog else count,
                 dropped=count if drop_backlog else 0)
        return count

    async def rotate_secret(self, wh: Webhook, grace: float = ROTATION_GRACE) -> Webhook:
        self.editable(wh)
        return await self._rotate(wh, generate_secret(), grace)

    async def _rotate(self, wh: Webhook, new: str, grace: float = ROTATION_GRACE) -> Webhook:
        now = self.clock
        old = wh.secret
        expires = now + grace

        def committed(_: None) -> None:
            wh.secret, wh.previous_secret, wh.previous_secret_expires_at = new, old, expires
            wh.updated_at = now

        await self.storage.rotate_secret(
            wh.id, secret=new, previous_secret=old, previous_expires_at=expires, now=now, on_commit=committed
        )
        return wh

    # -- webhooks as code (webhookd/declared.py) ----------------------------------------------
    def plan(self, declared: Sequence[DeclaredWebhook]) -> list[Change]:
        return plan(declared, [wh.record() for wh in self.scheduler.webhooks.values()])

    async def sync(self, declared: Sequence[DeclaredWebhook]) -> list[Change]:
        """Make the declared webhooks exist as declared (at start and on SIGHUP): create the
        missing ones, update the changed ones (a new secret from a secret_file is rotated in
        with the usual grace), re-enable one declared again after it was removed, and disable
        (never delete) those whose entry is gone, as removed_from_config. Returns the changes."""
        changes = self.plan(declared)
        for change in changes:
            d = change.declared
            if change.kind == "create":
                assert d is not None
                wh = await self.create(url=d.url, events=d.events, description=d.description, filter=d.filter,
                                       name=d.name, declared_in=d.source, secret=d.secret, batching=d.batching)
                log.info("declared webhook created", webhook_id=wh.id, name=d.name, declared_in=d.source)
                continue
            assert change.webhook_id is not None
            wh = self.webhook(change.webhook_id)
            if change.kind == "update":
                assert d is not None
                names = change.fieldnames()
                if {"url", "events", "description", "filter", "batching"} & set(names):
                    await self._update(wh, url=d.url, events=d.events, description=d.description, filter=d.filter,
                                       batching=d.batching)
                if "declared_in" in names:
                    await self._declare(wh, d.source)
                if change.secret_changed and d.secret is not None:
                    await self._rotate(wh, d.secret)
                if change.enable:
                    await self.enable(wh)
                log.info("declared webhook updated", webhook_id=wh.id, name=wh.name, fields=list(names),
                         secret_changed=change.secret_changed, enabled_again=change.enable)
            else:
                if wh.enabled:
                    now = self.clock
                    gate = dataclasses.replace(policy.disabled_by_hand(wh.gate), disabled_reason=REMOVED_FROM_CONFIG)
                    self.scheduler.set_gate(wh, gate, now)
                    await self.storage.set_webhook_state(wh.id, wh.state(), pause_pending=True)
                await self._declare(wh, None)
                log.info("declared webhook disabled", webhook_id=wh.id, name=wh.name, reason=REMOVED_FROM_CONFIG)
        return changes

    async def _declare(self, wh: Webhook, declared_in: str | None) -> None:
        now = self.clock

        def committed(_: None) -> None:
            wh.declared_in, wh.updated_at = declared_in, now

        await self.storage.set_declared_in(wh.id, declared_in, updated_at=now, on_commit=committed)

    async def retry_delivery(self, delivery_id: int) -> str:
        """Queue a delivery for an attempt now; returns its new status."""
        now = self.clock
        found = await self.storage.due_item(delivery_id)
        if found is None:
            raise NotFound(f"no delivery with id 'dlv_{delivery_id}'")
        item, _status = found
        wh = self.scheduler.webhooks.get(item.webhook_id)
        if wh is None:
            raise NotFound(f"no delivery with id 'dlv_{delivery_id}'")
        if delivery_id in wh.inflight:
            raise Conflict("the delivery is being attempted right now")
        status = PENDING if wh.enabled else PAUSED
        await self.storage.reschedule(
            delivery_id, status=status, next_attempt_at=now if status == PENDING else None, now=now,
            on_commit=lambda _: self.scheduler.requeue(wh, item, now) if status == PENDING else None,
        )
        return status

    async def replay(self, wh: Webhook, *, since: float, statuses: Sequence[str]) -> int:
        """Queue again every delivery of `wh` created since `since` with one of `statuses`."""
        now = self.clock
        status = PENDING if wh.enabled else PAUSED
        count = await self.storage.replay(
            wh.id, since=since, statuses=statuses, status=status,
            next_attempt_at=now if status == PENDING else None, now=now,
            on_commit=lambda n: self.scheduler.reload_window(wh) if n else None,
        )
        log.info("deliveries replayed", webhook_id=wh.id, count=count, since=since, statuses=list(statuses))
        return count

    async def retry_failed(self, where: DeliveryFilter) -> int:
        """Queue again every failed delivery matching `where` (the dashboard's "retry all
        failed that match these filters"); returns how many."""
        now = self.clock
        hooks = list(self.scheduler.webhooks.values())
        if where.webhook_id is not None:
            hooks = [wh for wh in hooks if wh.id == where.webhook_id]
        targets = [(wh.id, wh.enabled) for wh in hooks]

        def committed(count: int) -> None:
            if count:
                for wh in hooks:
                    self.scheduler.reload_window(wh)

        count = await self.storage.retry_failed(where, targets, now=now, on_commit=committed)
        log.info("failed deliveries retried", count=count, webhook_id=where.webhook_id)
        return count

    async def count(self, where: DeliveryFilter) -> int:
        return await self.storage.count_deliveries(where)

    async def send_test(self, wh: Webhook, event_type: str) -> Outcome:
        now = self.clock
        ev = synthetic_event(event_type, now=now)
        event_id = new_id("evt")
        headers = wh.signer(now).headers(
            event_id=event_id, event_type=ev.type, body=ev.body, timestamp=int(now), user_agent=USER_AGENT
        )
        outcome = await self.scheduler.dispatcher.post(wh.url, ev.body, headers)
        log.info("test event sent", webhook_id=wh.id, event_id=event_id, status_code=outcome.status_code,
                 duration_ms=round(outcome.duration_ms, 1), error=outcome.error)
        return outcome
