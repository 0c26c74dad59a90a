"""A webhook in memory: its stored fields, its failure gate, and its due window.

The window holds the webhook's soonest pending deliveries. Its invariant: every
pending, not-in-flight delivery whose key (next_attempt_at, id) is <= `boundary` is in
memory; `boundary is None` means memory holds all of them. Rows beyond the boundary
stay in the database until the scheduler reads them back in order (a refill).
"""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass, field
from typing import Any

from webhookd.batching import OFF, Batching, array_size, element_size
from webhookd.events import format_timestamp
from webhookd.filters import EMPTY_FILTER, Matcher, WebhookFilter
from webhookd.policy import Gate
from webhookd.signing import Signer
from webhookd.store.model import DueItem, WebhookRecord, WebhookState

START: tuple[float, int] = (float("-inf"), -1)


@dataclass(eq=False)
class Webhook:
    """The scheduler's view of one webhook. Only the scheduler changes it."""

    id: str
    url: str
    events: tuple[str, ...]
    description: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: float | None
    created_at: float
    updated_at: float
    filter: WebhookFilter = EMPTY_FILTER  # change it with set_filter: fan-out runs `matcher`
    name: str | None = None  # a declared webhook's stable name (webhookd/declared.py)
    declared_in: str | None = None  # the file declaring it: url, events, filter, description, secret are its
    batching: Batching = OFF  # batched delivery (webhookd.batching); the scheduler reads it on each turn
    gate: Gate = field(default_factory=Gate)
    # runtime
    heap: list[tuple[float, int]] = field(default_factory=list)
    items: dict[int, DueItem] = field(default_factory=dict)
    boundary: tuple[float, int] | None = START
    inflight: set[int] = field(default_factory=set)
    active: int = 0
    refilling: bool = False
    # in a fleet: this instance holds the webhook's one probe until (monotonic), and whether that
    # probe was sent and its outcome is not yet committed (the next one waits for it)
    probe_held_until: float = 0.0
    probing: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # a batch being formed (batching on): due deliveries taken from the window, in order,
    # not yet attempted (still pending in storage); `forming_bytes` is its array's size
    forming: dict[int, DueItem] = field(default_factory=dict)
    forming_bytes: int = 0
    _signer: tuple[tuple[str, ...], Signer] | None = None  # (the secrets it signs with, the signer)
    matcher: Matcher | None = field(init=False, repr=False, default=None)  # the compiled filter; None: all

    def __post_init__(self) -> None:
        self.matcher = self.filter.compile()

    def set_filter(self, f: WebhookFilter) -> None:
        """Replace the filter and its compiled matcher (the scheduler's fan-out cache must be
        cleared after: `Scheduler.changed_subscriptions`)."""
        self.filter = f
        self.matcher = f.compile()

    @classmethod
    def from_record(cls, r: WebhookRecord) -> Webhook:
        return cls(
            id=r.id, url=r.url, events=r.events, description=r.description, secret=r.secret,
            previous_secret=r.previous_secret, previous_secret_expires_at=r.previous_secret_expires_at,
            created_at=r.created_at, updated_at=r.updated_at, filter=r.filter, name=r.name,
            declared_in=r.declared_in, batching=r.batching,
            gate=Gate(enabled=r.enabled, consecutive_failures=r.consecutive_failures,
                      backoff_until=r.backoff_until, disabled_reason=r.disabled_reason),
        )

    def record(self) -> WebhookRecord:
        g = self.gate
        return WebhookRecord(
            id=self.id, url=self.url, events=self.events, description=self.description, enabled=g.enabled,
            disabled_reason=g.disabled_reason, consecutive_failures=g.consecutive_failures,
            backoff_until=g.backoff_until, secret=self.secret, previous_secret=self.previous_secret,
            previous_secret_expires_at=self.previous_secret_expires_at, created_at=self.created_at,
            updated_at=self.updated_at, filter=self.filter, name=self.name, declared_in=self.declared_in,
            batching=self.batching,
        )

    def state(self) -> WebhookState:
        g = self.gate
        return WebhookState(g.enabled, g.disabled_reason, g.consecutive_failures, g.backoff_until, self.updated_at)

    # -- the stored fields, as the API shows them ------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.gate.enabled

    @property
    def disabled_reason(self) -> str | None:
        return self.gate.disabled_reason

    @property
    def consecutive_failures(self) -> int:
        return self.gate.consecutive_failures

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
            "filter": self.filter.to_json(),
            "name": self.name,
            "declared_in": self.declared_in,
            **self.batching.to_json(),
            "created_at": format_timestamp(self.created_at),
            "updated_at": format_timestamp(self.updated_at),
        }

    # -- the in-memory window ----------------------------------------------------------
    def push(self, item: DueItem) -> None:
        if self.boundary is not None and item.key > self.boundary:
            return  # stays in the database; a refill will bring it
        self.items[item.delivery_id] = item
        heapq.heappush(self.heap, item.key)

    def reschedule(self, item: DueItem, next_at: float) -> None:
        """Move a delivery that may already be in the window to `next_at`."""
        item.batch = None  # rescheduled alone: no longer kept with a batch
        if self.forming.pop(item.delivery_id, None) is not None:
            self.forming_bytes = (array_size([element_size(i.event_uid, i.body) for i in self.forming.values()])
                                  if self.forming else 0)
        known = self.items.get(item.delivery_id)
        if known is not None:
            known.batch = None
            known.next_at = next_at
            heapq.heappush(self.heap, known.key)  # the old entry goes stale
        else:
            item.next_at = next_at
            self.push(item)

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

    def trim(self, keep: int) -> list[int]:
        """Keep only the `keep` soonest deliveries in memory; the ids of those dropped."""
        if len(self.items) <= keep:
            return []
        ordered = sorted(self.items.values(), key=lambda i: i.key)
        kept = ordered[:keep]
        self.items = {i.delivery_id: i for i in kept}
        self.heap = [i.key for i in kept]
        heapq.heapify(self.heap)
        last = kept[-1].key if kept else START
        self.boundary = last if self.boundary is None else min(self.boundary, last)
        return [i.delivery_id for i in ordered[keep:]]

    def load(self, after: tuple[float, int], rows: list[DueItem], limit: int) -> None:
        """Take a refill's rows (read after `after`, at most `limit`)."""
        if self.boundary != after:
            return  # the window was reset meanwhile (disable/enable); the pump refills again
        for item in rows:
            if item.delivery_id in self.inflight or item.delivery_id in self.items or item.delivery_id in self.forming:
                continue
            self.items[item.delivery_id] = item
            heapq.heappush(self.heap, item.key)
        self.boundary = None if len(rows) < limit else rows[-1].key

    def forget_queue(self) -> None:
        self.items.clear()
        self.heap.clear()
        self.forming.clear()
        self.forming_bytes = 0
        self.boundary = START

    # -- a batch being formed (webhookd.batching) ----------------------------------------
    def form(self, item: DueItem) -> None:
        """Take the delivery just popped into the batch being formed."""
        self.forming[item.delivery_id] = item
        size = element_size(item.event_uid, item.body)
        self.forming_bytes += size + 1 if self.forming_bytes else size + 2

    def unform(self) -> None:
        """Put the batch being formed back into the window (batching was turned off)."""
        for item in self.forming.values():
            self.items[item.delivery_id] = item
            heapq.heappush(self.heap, item.key)
        self.forming.clear()
        self.forming_bytes = 0

    def take_formed(self) -> list[DueItem]:
        items = list(self.forming.values())
        self.forming.clear()
        self.forming_bytes = 0
        return items
