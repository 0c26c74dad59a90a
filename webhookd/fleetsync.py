"""Keeping this daemon's scheduler in step with the other daemons sharing its queue
(PostgreSQL: webhookd/store/postgres_cluster.py). The fleet's notifications arrive as
webhook ids; each is read again from the database and applied (`Scheduler.refresh`), one
at a time, repeats coalesced. When notifications may have been missed (the listening
connection was lost, this instance's lease had ended) every webhook is read again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

import structlog

from webhookd.scheduler import Scheduler
from webhookd.store.model import StoreError, WebhookRecord

log = structlog.get_logger("webhookd.fleet")

EVERY = "*"
RETRY = 1.0  # seconds before reading again after a failed read


class FleetReads(Protocol):
    on_webhook: object
    on_work: object
    on_resync: object

    async def load_webhook(self, webhook_id: str) -> tuple[WebhookRecord, int] | None: ...

    async def load_epochs(self) -> dict[str, int]: ...


class FleetSync:
    def __init__(self, fleet: FleetReads, scheduler: Scheduler) -> None:
        self.fleet = fleet
        self.scheduler = scheduler
        self._pending: dict[str, None] = {}  # in arrival order
        self._task: asyncio.Task[None] | None = None
        fleet.on_webhook = self.changed
        fleet.on_work = self.released
        fleet.on_resync = lambda: self.changed(EVERY)

    async def start(self) -> None:
        """Give the loaded webhooks the fleet's gate epochs (an attempt started with a stale one
        would not count)."""
        epochs = await self.fleet.load_epochs()
        for wh in self.scheduler.webhooks.values():
            self.scheduler.refresh_epoch(wh, epochs.get(wh.id, 0))

    def changed(self, webhook_id: str) -> None:
        self._pending[webhook_id] = None
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._apply(), name="fleet-sync")

    def released(self, webhook_ids: Sequence[str] | None) -> None:
        self.scheduler.released(webhook_ids)

    async def _apply(self) -> None:
        while self._pending:
            webhook_id = next(iter(self._pending))
            try:
                if webhook_id == EVERY:
                    await self._everything()
                else:
                    self.scheduler.refresh(webhook_id, await self.fleet.load_webhook(webhook_id))
            except StoreError as exc:  # the database out of reach: try again
                log.warning("cannot read a webhook another instance changed; retrying", webhook_id=webhook_id,
                            error=type(exc).__name__)
                await asyncio.sleep(RETRY)
                continue
            self._pending.pop(webhook_id, None)

    async def _everything(self) -> None:
        epochs = await self.fleet.load_epochs()
        known = set(self.scheduler.webhooks) | set(epochs)
        for webhook_id in sorted(known):
            self.scheduler.refresh(webhook_id, await self.fleet.load_webhook(webhook_id))
        self.scheduler.released(None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
