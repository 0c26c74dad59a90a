"""The `Storage` protocol: what webhookd asks of a database, in domain verbs.

Writes go through the backend's group-committing writer (`webhookd.store.writer`):
they are queued, committed together, and their `on_commit` continuations run right
after the commit, in queue order, before anything later is applied. A write that
returns a future resolves it at the same moment. `internal=True` writes (facts the
daemon already acted on) are retried until they commit; the others fail fast with
`StoreError`.

Reads that the scheduler depends on (`take_due`) also go through the writer, so they
see every earlier write. Reads for people (listings, stats, counts) use a separate
connection and see the last commit.

Every backend runs the same contract suite, tests/storage_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from webhookd.batching import Batching
from webhookd.events import Event
from webhookd.filters import WebhookFilter
from webhookd.store.model import (
    ApiToken,
    BatchOutcomeRecord,
    Delivery,
    DeliveryDetail,
    DeliveryFilter,
    DueItem,
    FreshEvent,
    HourCount,
    OutcomeRecord,
    Subscriber,
    TrackingFacts,
    TrackingHit,
    WebhookRecord,
    WebhookState,
    WebhookStats,
)

FreshSink = Callable[[list[FreshEvent]], None]
"""Receives, right after each commit, the events it made with at least one subscriber."""


class Storage(Protocol):
    @property
    def commits(self) -> int:
        """Transactions committed so far (group commit makes this far smaller than writes)."""
        ...

    @property
    def queued(self) -> int:
        """Writes waiting for the next transaction."""
        ...

    @property
    def failed_commits(self) -> int:
        """Transactions that failed to commit so far (their intake and admin writes failed with
        StoreError, their internal ones were retried)."""
        ...

    def received(self) -> dict[str, int]:
        """New events committed since open, by type (idempotent repeats not counted)."""
        ...

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        """Create or migrate the schema and start the writer. Raises StoreError."""
        ...

    async def close(self) -> None:
        """Commit what is queued, then close. Safe to call twice."""
        ...

    # -- intake ------------------------------------------------------------------------
    def submit(self, event: Event, subscribers: Sequence[Subscriber]) -> asyncio.Future[str]:
        """Queue an event and one delivery per subscriber; resolves to the event id once
        committed. An event whose idempotency key is known resolves to the first one's id
        and creates nothing. The committed event reaches the fresh sink.

        A backend may defer the deliveries of a subscriber that cannot take them now (a
        disabled webhook, one with a long backlog): they are then missing from the fresh
        event and become rows later, with their ids, in event order (when `take_due` runs
        out of rows, or before a verb that reads or changes them as rows). Every other verb
        counts and treats them exactly as rows: pending while their webhook is enabled,
        paused while it is disabled. A backend that defers tells the scheduler, through the
        fresh sink (`FreshEvent.resync`), of each webhook that starts lagging or gets pending
        rows outside `take_due`."""
        ...

    # -- the scheduler's verbs ----------------------------------------------------------
    async def load_webhooks(self) -> list[WebhookRecord]:
        """Every webhook, oldest first."""
        ...

    def take_due(
        self,
        webhook_id: str,
        after: tuple[float, int],
        limit: int,
        *,
        on_commit: Callable[[list[DueItem]], None] | None = None,
    ) -> asyncio.Future[list[DueItem]]:
        """Up to `limit` pending deliveries of a webhook whose (next_attempt_at, id) is
        above `after`, in that order, read in the writer's order. When fewer are stored, a
        backend that defers makes the webhook's next deferred deliveries rows and returns
        them too (all of them, keys below `after` included, sorted by key); it returns
        fewer than `limit` for an enabled webhook only when none of its deliveries is left deferred."""
        ...

    def record_outcome(self, record: OutcomeRecord, *, on_commit: Callable[[None], None] | None = None) -> None:
        """Queue an attempt's outcome (internal: retried until it commits)."""
        ...

    def record_batch_outcome(
        self, record: BatchOutcomeRecord, *, on_commit: Callable[[None], None] | None = None
    ) -> None:
        """Queue a batch attempt's outcome for all its deliveries (internal: retried until it commits)."""
        ...

    def set_webhook_state(
        self,
        webhook_id: str,
        state: WebhookState,
        *,
        pause_pending: bool = False,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        """Write a webhook's gate fields (internal). With `pause_pending`, its pending
        deliveries become paused (a disable)."""
        ...

    # -- webhook administration ------------------------------------------------------
    def create_webhook(
        self, webhook: WebhookRecord, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        """Store a new webhook, its `filter`, `name` and `declared_in` included (`load_webhooks`
        returns it equal). A `name` already taken is refused (StoreError)."""
        ...

    def update_webhook(
        self,
        webhook_id: str,
        *,
        url: str,
        events: tuple[str, ...],
        description: str,
        filter: WebhookFilter,
        updated_at: float,
        batching: Batching | None = None,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        """Replace the webhook's url, events, description and filter. A backend keeps the
        filter as `WebhookFilter.to_json()` (JSON) and reads it back with `WebhookFilter.parse`,
        refusing (StoreError) one it cannot read rather than widening it to every event."""
        ...

    def set_declared_in(
        self,
        webhook_id: str,
        declared_in: str | None,
        *,
        updated_at: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        """Set (or clear, None) the file a webhook is declared in; its `name` is set at create
        and never changes (internal)."""
        ...

    def delete_webhook(
        self, webhook_id: str, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        """The webhook, its deliveries and their attempts (internal)."""
        ...

    def enable_webhook(
        self,
        webhook_id: str,
        *,
        now: float,
        drop_backlog: bool,
        on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        """Enable, reset the gate, and resume its paused deliveries (due now) or, with
        `drop_backlog`, fail them; resolves to how many (internal)."""
        ...

    def rotate_secret(
        self,
        webhook_id: str,
        *,
        secret: str,
        previous_secret: str,
        previous_expires_at: float,
        now: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]: ...

    # -- deliveries -----------------------------------------------------------------------
    def reschedule(
        self,
        delivery_id: int,
        *,
        status: str,
        next_attempt_at: float | None,
        now: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        """Set a delivery pending at `next_attempt_at` (or paused) — a manual retry."""
        ...

    def replay(
        self,
        webhook_id: str,
        *,
        since: float,
        statuses: Sequence[str],
        status: str,
        next_attempt_at: float | None,
        now: float,
        on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        """Queue again every delivery of the webhook created at or after `since` whose
        status is one of `statuses`; resolves to how many."""
        ...

    def retry_failed(
        self,
        where: DeliveryFilter,
        webhooks: Sequence[Subscriber],
        *,
        now: float,
        on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        """Queue again every failed delivery that matches `where` (its statuses are
        ignored) and belongs to one of `webhooks`: pending and due now for an enabled
        webhook, paused for a disabled one. Resolves to how many."""
        ...

    async def due_item(self, delivery_id: int) -> tuple[DueItem, str] | None:
        """A delivery as the scheduler attempts it, with its current status."""
        ...

    # -- queries for people (the admin API and the dashboard) ------------------------
    async def list_deliveries(
        self, where: DeliveryFilter, *, before: int | None = None, limit: int = 100
    ) -> list[Delivery]:
        """Newest first; `before` is the keyset cursor (the last id of the previous page)."""
        ...

    async def count_deliveries(self, where: DeliveryFilter) -> int: ...

    async def delivery(self, delivery_id: int) -> DeliveryDetail | None: ...

    async def count_by_status(self) -> dict[str, int]:
        """Every status, zeros included."""
        ...

    async def oldest_pending(self) -> float | None:
        """The `created_at` of the oldest pending delivery (paused ones do not count), or None
        when nothing is pending. Cheap enough to ask at every metrics scrape: no scan of
        the backlog."""
        ...

    async def webhook_stats(self, now: float) -> dict[str, WebhookStats]:
        """By webhook id: last attempt, successes and failures in the 24 h before `now`,
        pending and paused backlog. Webhooks with nothing to show may be missing."""
        ...

    async def hourly_counts(self, since: float, until: float) -> list[HourCount]:
        """Attempts per hour in [since, until), oldest first, hours without any omitted."""
        ...

    # -- retention -------------------------------------------------------------------------
    async def prune(self, cutoff: float, limit: int = 1000) -> int:
        """Delete up to `limit` finished deliveries last updated before `cutoff` (with their
        attempts) and up to `limit` older events that no delivery needs; one small
        transaction. Call again while it returns `limit`."""
        ...

    # -- tracking (opens and clicks) --------------------------------------------------------
    def track_hits(self, hits: Sequence[TrackingHit], *, now: float) -> asyncio.Future[list[TrackingFacts]]:
        """For each hit, in one transaction: is its recipient opted out; is it the first
        with its `first_key` (remembering it from `now` if so, unless opted out); and the
        timestamp of the message's `delivered` event (for that recipient when given)."""
        ...

    def set_opt_out(self, opt_out_hash: str, *, opted_out: bool, now: float) -> asyncio.Future[bool]:
        """Add (or remove) a recipient's hash to the opt-outs; resolves to whether anything changed."""
        ...

    async def count_opt_outs(self) -> int: ...

    def prune_tracking(self, cutoff: float, limit: int = 1000) -> asyncio.Future[int]:
        """Forget up to `limit` first-hit marks made before `cutoff`; call again while it returns `limit`."""
        ...

    # -- scoped API tokens (webhookd/tokens.py) ---------------------------------------------
    def create_token(self, token: ApiToken) -> asyncio.Future[None]:
        """Store a new token (by its hash; `list_tokens` returns it equal). A hash already
        stored is refused (StoreError)."""
        ...

    async def list_tokens(self) -> list[ApiToken]:
        """Every token, revoked ones included, oldest first."""
        ...

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        """The token stored with this SHA-256 (revoked or not), or None."""
        ...

    def revoke_token(self, token_id: str, *, now: float) -> asyncio.Future[bool]:
        """Mark a token revoked at `now`; resolves to False if there is no such token or it
        was revoked already (its first revocation time is kept)."""
        ...

    def touch_tokens(self, used: Sequence[tuple[str, float]]) -> asyncio.Future[None]:
        """Set each (token id, last used at) in one write; the caller batches them (at most
        once a minute per token), never one write per request."""
        ...
