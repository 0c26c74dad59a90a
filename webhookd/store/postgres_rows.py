"""The PostgreSQL backend's shared pieces: column lists, row shapes, the delivery filter as
SQL, how a failure is described (never with the DSN or a password in it), and the NOTIFY
channels of several daemons sharing a database (postgres_cluster.py)."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from webhookd.reasons import Lead
from webhookd.store.model import ApiToken, Delivery, DeliveryFilter, DueItem, StoreError, WebhookRecord
from webhookd.store.sqlite_rows import stored_batching, stored_filter

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
TOKEN_COLUMNS = "id, hash, domains, read_only, description, created_at, last_used_at, revoked_at"  # noqa: S105

# What a lost or refused connection looks like: the writer drops its connection and reconnects.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # "connection is closed", "cannot perform operation: another operation is in progress"
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ConnectionFailureError, ...
    asyncpg.exceptions.CannotConnectNowError,  # the server is starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # terminated by an administrator (a fast shutdown)
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InternalClientError,  # the client's state after a connection died under it
)

DB_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


def describe(exc: BaseException) -> str:
    """The one-line reason a caller is given for a failed commit or read. Server messages
    name tables and constraints, never the DSN; connection errors are summarised."""
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, CONNECTION_ERRORS):
        return Lead.STORAGE.text(f" unavailable: cannot reach PostgreSQL ({type(exc).__name__})")
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return Lead.STORAGE.text(" full: cannot commit (PostgreSQL's disk is full)")
    if isinstance(exc, asyncpg.PostgresError):
        return Lead.STORAGE.text(f" error: {exc.sqlstate}: {exc}")
    return Lead.STORAGE.text(f" error: {type(exc).__name__}: {exc}")


def count(status: str) -> int:
    """The row count of a command status such as 'UPDATE 3' or 'INSERT 0 1'."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def webhook_row(row: asyncpg.Record) -> WebhookRecord:
    return WebhookRecord(
        id=row[0], url=row[1], events=tuple(orjson.loads(row[2])), description=row[3], enabled=bool(row[4]),
        disabled_reason=row[5], consecutive_failures=int(row[6]), backoff_until=float(row[7]), secret=row[8],
        previous_secret=row[9], previous_secret_expires_at=row[10], created_at=float(row[11]),
        updated_at=float(row[12]), filter=stored_filter(row[0], row[13]), name=row[14], declared_in=row[15],
        batching=stored_batching(row[0], row[16], row[17], row[18]),
    )


def delivery_row(row: asyncpg.Record) -> Delivery:
    return Delivery(
        id=int(row[0]), event_uid=row[1], webhook_id=row[2], event_type=row[3], status=row[4],
        attempts=int(row[5]), next_attempt_at=row[6], last_status_code=row[7], last_error=row[8],
        created_at=float(row[9]), updated_at=float(row[10]), message_id=row[11], recipient=row[12],
    )


def due_row(row: asyncpg.Record) -> DueItem:
    return DueItem(int(row[0]), row[1], float(row[2] or 0.0), int(row[3]), row[4], row[5], bytes(row[6]))


def token_row(r: asyncpg.Record) -> ApiToken:
    return ApiToken(
        id=r[0], hash=r[1], domains=tuple(str(d) for d in orjson.loads(r[2])), read_only=bool(r[3]),
        description=r[4], created_at=float(r[5]), last_used_at=None if r[6] is None else float(r[6]),
        revoked_at=None if r[7] is None else float(r[7]),
    )


class Params:
    """Numbered parameters ($1, $2, ...) collected while a statement is built."""

    def __init__(self, *initial: Any) -> None:
        self.values: list[Any] = list(initial)

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def where_clause(f: DeliveryFilter, p: Params, before: int | None = None) -> str:
    """The filter (and the keyset cursor: ids below `before`) as SQL over `deliveries d` and
    `events e`; its parameters are added to `p`. Recipients compare case-insensitively."""
    clauses: list[str] = []
    if f.webhook_id is not None:
        clauses.append(f"d.webhook_id = {p(f.webhook_id)}")
    if f.statuses:
        clauses.append(f"d.status = ANY({p(list(f.statuses))}::text[])")
    if f.event_type is not None:
        clauses.append(f"e.type = {p(f.event_type)}")
    if f.message_id is not None:
        clauses.append(f"d.event_id IN (SELECT id FROM events WHERE message_id = {p(f.message_id)})")  # noqa: S608
    if f.recipient is not None:
        clauses.append(f"d.event_id IN (SELECT id FROM events WHERE lower(recipient) = lower({p(f.recipient)}))")  # noqa: S608
    if f.since is not None:
        clauses.append(f"d.created_at >= {p(f.since)}")
    if f.until is not None:
        clauses.append(f"d.created_at < {p(f.until)}")
    if f.batch_id is not None:
        clauses.append(f"d.id IN (SELECT delivery_id FROM attempts WHERE batch_id = {p(f.batch_id)})")  # noqa: S608
    if before is not None:
        clauses.append(f"d.id < {p(before)}")
    return " AND ".join(clauses)


# -- NOTIFY: what one daemon tells the others (delivered at COMMIT) ------------------------------
WEBHOOKS_CHANNEL = "webhookd_webhooks"  # payload: a webhook id that changed
WORK_CHANNEL = "webhookd_work"  # payload: webhook ids with pending rows nobody claims, or ALL
ALL = "*"
MAX_PAYLOAD = 7000  # NOTIFY payloads are limited to 8000 bytes


async def notify_webhook(conn: Any, webhook_id: str) -> None:
    """Tell the other daemons that this webhook changed."""
    await conn.execute("SELECT pg_notify($1, $2)", WEBHOOKS_CHANNEL, webhook_id)


async def notify_work(conn: Any, webhook_ids: list[str]) -> None:
    """Tell every daemon that these webhooks have pending rows nobody claims."""
    payload = ",".join(sorted(set(webhook_ids)))
    if not payload:
        return
    await conn.execute("SELECT pg_notify($1, $2)", WORK_CHANNEL, payload if len(payload) <= MAX_PAYLOAD else ALL)
