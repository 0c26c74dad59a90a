"""The SQLite backend's statements shared by its modules: row shapes, filters, errors, and
the delivery counts it keeps in memory."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from webhookd.batching import OFF, Batching, BatchingError
from webhookd.filters import FilterError, WebhookFilter
from webhookd.reasons import Lead
from webhookd.store.model import (
    DELIVERY_STATUSES,
    Delivery,
    DeliveryFilter,
    DueItem,
    StoreError,
    WebhookRecord,
)

HOUR = 3600
DAY = 24 * HOUR

WEBHOOK_COLUMNS = (
    "id, url, events, description, enabled, disabled_reason, consecutive_failures, backoff_until,"
    " secret, previous_secret, previous_secret_expires_at, created_at, updated_at, filter, name, declared_in,"
    " batch_max_events, batch_max_bytes, batch_linger"
)
DELIVERY_SELECT = (
    "SELECT d.id, e.uid, d.webhook_id, e.type, d.status, d.attempts, d.next_attempt_at,"
    " d.last_status_code, d.last_error, d.created_at, d.updated_at, e.message_id, e.recipient"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
)
DUE_SELECT = (
    "SELECT d.id, d.webhook_id, d.next_attempt_at, d.attempts, e.uid, e.type, e.body, d.status"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
)


def describe(exc: BaseException) -> str:
    """The one-line reason a caller is given for a failed commit or read."""
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
        return Lead.STORAGE.text(" full: cannot commit (database or disk is full)")
    if isinstance(exc, sqlite3.Error):
        return Lead.STORAGE.text(f" error: {exc}")
    return Lead.STORAGE.text(f" error: {type(exc).__name__}: {exc}")


def webhook_row(row: Sequence[Any]) -> WebhookRecord:
    return WebhookRecord(
        id=row[0], url=row[1], events=tuple(orjson.loads(row[2])), description=row[3], enabled=bool(row[4]),
        disabled_reason=row[5], consecutive_failures=int(row[6]), backoff_until=float(row[7]), secret=row[8],
        previous_secret=row[9], previous_secret_expires_at=row[10], created_at=float(row[11]),
        updated_at=float(row[12]), filter=stored_filter(row[0], row[13]), name=row[14], declared_in=row[15],
        batching=stored_batching(row[0], row[16], row[17], row[18]),
    )


def stored_batching(webhook_id: str, max_events: object, max_bytes: object, linger: object) -> Batching:
    """Stored batch settings, read back as strictly as the API reads them."""
    try:
        return OFF.updated({"batch_max_events": max_events, "batch_max_bytes": max_bytes, "batch_linger": linger})
    except BatchingError as exc:
        raise StoreError(f"webhook {webhook_id}: its stored batch settings cannot be read ({exc})") from None


def stored_filter(webhook_id: str, text: str) -> WebhookFilter:
    """A stored filter, read back as strictly as the API reads one: a filter this webhookd
    cannot read must not widen into "every event" (the database was edited by hand)."""
    try:
        return WebhookFilter.parse(orjson.loads(text))
    except (orjson.JSONDecodeError, FilterError) as exc:
        raise StoreError(f"webhook {webhook_id}: its stored filter cannot be read ({exc})") from None


def filter_text(f: WebhookFilter) -> str:
    """A filter as stored: its JSON object, '{}' for the empty one."""
    return "{}" if f.empty else orjson.dumps(f.to_json()).decode()


def delivery_row(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=int(row[0]), event_uid=row[1], webhook_id=row[2], event_type=row[3], status=row[4],
        attempts=int(row[5]), next_attempt_at=row[6], last_status_code=row[7], last_error=row[8],
        created_at=float(row[9]), updated_at=float(row[10]), message_id=row[11], recipient=row[12],
    )


def due_row(row: Sequence[Any]) -> DueItem:
    return DueItem(int(row[0]), row[1], float(row[2] or 0.0), int(row[3]), row[4], row[5], bytes(row[6]))


def where_clause(f: DeliveryFilter, before: int | None = None) -> tuple[str, list[Any]]:
    """The filter (and the keyset cursor: ids below `before`) as SQL over `deliveries d` and
    `events e`, with its parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    if f.webhook_id is not None:
        clauses.append("d.webhook_id = ?")
        params.append(f.webhook_id)
    if f.statuses:
        clauses.append(f"d.status IN ({','.join('?' * len(f.statuses))})")
        params.extend(f.statuses)
    if f.event_type is not None:
        clauses.append("e.type = ?")
        params.append(f.event_type)
    if f.message_id is not None:
        clauses.append("d.event_id IN (SELECT id FROM events WHERE message_id = ?)")
        params.append(f.message_id)
    if f.recipient is not None:
        clauses.append("d.event_id IN (SELECT id FROM events WHERE recipient = ?)")
        params.append(f.recipient)
    if f.since is not None:
        clauses.append("d.created_at >= ?")
        params.append(f.since)
    if f.until is not None:
        clauses.append("d.created_at < ?")
        params.append(f.until)
    if f.batch_id is not None:
        clauses.append("d.id IN (SELECT delivery_id FROM attempts WHERE batch_id = ?)")
        params.append(f.batch_id)
    if before is not None:
        clauses.append("d.id < ?")
        params.append(before)
    return " AND ".join(clauses), params


class Counts:
    """Deliveries by (webhook, status), kept exactly in step with the database: loaded at open,
    then changed by the deltas each write records while its transaction runs, applied only
    when that transaction commits (a rolled-back batch changes nothing). Every statement that
    adds, removes or changes the status of deliveries records its delta; the contract tests
    compare these counts with a fresh count after every kind of write."""

    def __init__(self) -> None:
        self.by: Counter[tuple[str, str]] = Counter()
        self._delta: Counter[tuple[str, str]] = Counter()
        self._dropped: list[str] = []

    def load(self, rows: Iterable[Sequence[Any]]) -> None:
        self.by = Counter({(str(w), str(s)): int(n) for w, s, n in rows})

    def move(self, webhook_id: str, old: str | None, new: str | None, n: int = 1) -> None:
        """`n` deliveries of a webhook went from `old` to `new` (None: did not exist / removed)."""
        if n and old != new:
            if old is not None:
                self._delta[(webhook_id, old)] -= n
            if new is not None:
                self._delta[(webhook_id, new)] += n

    def drop_webhook(self, webhook_id: str) -> None:
        self._dropped.append(webhook_id)

    def commit(self) -> None:
        by = self.by
        for key, n in self._delta.items():
            by[key] += n
        for webhook_id in self._dropped:
            for key in [k for k in by if k[0] == webhook_id]:
                del by[key]
        self.rollback()

    def rollback(self) -> None:
        self._delta = Counter()
        self._dropped = []

    def by_status(self) -> dict[str, int]:
        out = dict.fromkeys(DELIVERY_STATUSES, 0)
        for (_webhook_id, status), n in self.by.items():
            out[status] = out.get(status, 0) + n
        return out
