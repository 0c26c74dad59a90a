"""Typed rows and values that cross the storage boundary. No SQL, no I/O."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from webhookd.batching import OFF, Batching
from webhookd.filters import EMPTY_FILTER, WebhookFilter
from webhookd.reasons import Reason

PENDING = "pending"
SUCCEEDED = "succeeded"
FAILED = "failed"
PAUSED = "paused"
DELIVERY_STATUSES = (PENDING, PAUSED, SUCCEEDED, FAILED)

Subscriber = tuple[str, bool]
"""(webhook id, enabled): one webhook an event fans out to; a disabled one gets a paused delivery."""


class StoreError(Exception):
    """The store could not commit or read; the caller should answer 'try later'."""

    def __init__(self, message: str, reason: Reason = Reason.STORAGE) -> None:
        super().__init__(message)
        self.reason = reason


class NotFound(LookupError):
    """A webhook or delivery named by id does not exist (a domain error, not a KeyError)."""


class Conflict(Exception):
    """The operation cannot be done in the object's current state."""


@dataclass(slots=True)
class WebhookRecord:
    """A webhook as stored."""

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
    filter: WebhookFilter = EMPTY_FILTER  # which of its types' events it gets (webhookd.filters)
    name: str | None = None  # a declared webhook's stable name (webhookd.declared); unique when set
    declared_in: str | None = None  # the file that declares it (then read-only through the API)
    batching: Batching = OFF  # batched delivery (webhookd.batching); off by default


@dataclass(frozen=True, slots=True)
class WebhookState:
    """The fields of a webhook that its failure gate changes."""

    enabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    backoff_until: float
    updated_at: float


@dataclass(slots=True)
class DueItem:
    """A pending delivery with everything needed to attempt it."""

    delivery_id: int
    webhook_id: str
    next_at: float
    attempts: int
    event_uid: str
    event_type: str
    body: bytes
    batch: str | None = None  # in memory: the id of the failed batch it is retried with (kept together)

    @property
    def key(self) -> tuple[float, int]:
        return (self.next_at, self.delivery_id)


@dataclass(slots=True)
class FreshEvent:
    """A committed event's new deliveries, one per entry of `subscribers` (the list it was
    submitted with), pending for the enabled subscribers and paused for the others. The
    storage allocates their ids as one contiguous range; `delivery_id(i)` names the i-th.
    A backend may leave out the subscribers whose deliveries it defers (a disabled webhook,
    one with a long backlog): their deliveries get ids later, when made rows.
    Handed downstream as one object per event, not one per delivery, so a webhook that
    cannot take new work into memory (its window is full) costs nothing per event."""

    first_delivery_id: int
    subscribers: Sequence[Subscriber]
    next_at: float
    event_uid: str
    event_type: str
    body: bytes
    resync: tuple[str, ...] = ()
    """Not an event but a notice (empty `subscribers`): these webhooks' deliveries are now
    deferred, or were made rows outside a refill, so what the scheduler holds of them is
    not all it may hold: it reads their windows again (`Scheduler.reload_window`)."""

    def delivery_id(self, i: int) -> int:
        return self.first_delivery_id + i

    def item(self, i: int) -> DueItem:
        webhook_id = self.subscribers[i][0]
        return DueItem(self.first_delivery_id + i, webhook_id, self.next_at, 0, self.event_uid, self.event_type,
                       self.body)

    def items(self) -> Iterator[DueItem]:
        """The pending deliveries, for the enabled subscribers."""
        for i, (_webhook_id, enabled) in enumerate(self.subscribers):
            if enabled:
                yield self.item(i)


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One attempt's result and the delivery's state after it."""

    delivery_id: int
    webhook_id: str
    status: str  # the delivery's new status
    attempts: int  # the delivery's attempt count, this one included
    next_attempt_at: float | None  # for pending
    at: float  # when the attempt started
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str  # the stored start of the receiver's answer
    updated_at: float
    batch_id: str | None = None  # the batch this attempt was part of (webhookd.batching)


@dataclass(frozen=True, slots=True)
class BatchOutcomeRecord:
    """One batch attempt's result (webhookd.batching) and each of its deliveries' state after
    it: one attempt row per delivery, all carrying `batch_id`."""

    webhook_id: str
    batch_id: str
    delivery_ids: tuple[int, ...]
    statuses: tuple[str, ...]  # each delivery's new status
    attempts: tuple[int, ...]  # each delivery's attempt count, this one included
    next_attempt_at: float | None  # for the pending ones
    at: float
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery as listed."""

    id: int
    event_uid: str
    webhook_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: float | None
    last_status_code: int | None
    last_error: str | None
    created_at: float
    updated_at: float
    message_id: str
    recipient: str


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str | None
    batch_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    delivery: Delivery
    body: bytes  # the event payload that is POSTed
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    """What a delivery listing or count selects; every field narrows it, empty ones don't."""

    webhook_id: str | None = None
    statuses: tuple[str, ...] = ()
    event_type: str | None = None
    message_id: str | None = None
    recipient: str | None = None
    since: float | None = None  # created_at >= since
    until: float | None = None  # created_at < until
    batch_id: str | None = None  # deliveries with an attempt in this batch


@dataclass(frozen=True, slots=True)
class WebhookStats:
    webhook_id: str
    last_attempt_at: float | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    succeeded_24h: int = 0
    failed_24h: int = 0
    pending: int = 0
    paused: int = 0


@dataclass(frozen=True, slots=True)
class HourCount:
    """Attempts that succeeded and failed in the hour starting at `hour` (epoch seconds)."""

    hour: int
    succeeded: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class TrackingHit:
    """What storage needs of one tracking hit: who (hashed, for opt-outs), which first-hit
    key to mark, and which message's `delivered` event to look for."""

    first_key: bytes  # what makes a hit "first": kind, message, recipient (and the link for clicks)
    message_id: str
    recipient: str = ""  # the address when the token carries it, for the delivered lookup
    opt_out_hash: str = ""  # the recipient's keyed hash; "" when the token names no recipient


@dataclass(frozen=True, slots=True)
class TrackingFacts:
    opted_out: bool  # an opted-out recipient: nothing is marked or recorded
    first: bool  # no earlier hit with the same first_key is remembered
    delivered_at: str | None  # the timestamp of webhookd's `delivered` event for the message, if any


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A scoped API token as stored: never the token itself, only its SHA-256 (hex)."""

    id: str
    hash: str
    domains: tuple[str, ...]
    read_only: bool
    description: str
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None
