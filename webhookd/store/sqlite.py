"""The SQLite backend of `Storage`: every SQL statement webhookd runs is in this module
(and the schema in sqlite_schema.py).

One connection writes, through the group-committing `Writer`; a second one reads for
the admin API and the dashboard (WAL mode: readers never block the writer). Event and
delivery ids are allocated here, in memory, from the largest ones stored at open.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
import structlog

from webhookd.events import Event
from webhookd.ids import new_id
from webhookd.reasons import Reason
from webhookd.store.base import FreshSink
from webhookd.store.model import (
    DELIVERY_STATUSES,
    FAILED,
    PAUSED,
    PENDING,
    Attempt,
    Delivery,
    DeliveryDetail,
    DeliveryFilter,
    DueItem,
    FreshEvent,
    HourCount,
    OutcomeRecord,
    StoreError,
    Subscriber,
    WebhookRecord,
    WebhookState,
    WebhookStats,
)
from webhookd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, split_sql
from webhookd.store.writer import Writer

log = structlog.get_logger("webhookd.store")

Conn = aiosqlite.Connection
HOUR = 3600
DAY = 24 * HOUR

_WEBHOOK_COLUMNS = (
    "id, url, events, description, enabled, disabled_reason, consecutive_failures, backoff_until,"
    " secret, previous_secret, previous_secret_expires_at, created_at, updated_at"
)
_DELIVERY_SELECT = (
    "SELECT d.id, e.uid, d.webhook_id, e.type, d.status, d.attempts, d.next_attempt_at,"
    " d.last_status_code, d.last_error, d.created_at, d.updated_at, e.message_id, e.recipient"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
)
_DUE_SELECT = (
    "SELECT d.id, d.webhook_id, d.next_attempt_at, d.attempts, e.uid, e.type, e.body, d.status"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
)


def describe(exc: BaseException) -> str:
    """The one-line reason a caller is given for a failed commit or read."""
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
        return "storage full: cannot commit (database or disk is full)"
    if isinstance(exc, sqlite3.Error):
        return f"storage error: {exc}"
    return f"storage error: {type(exc).__name__}: {exc}"


class _Transactions:
    def __init__(self, backend: SqliteStorage) -> None:
        self._backend = backend

    async def begin(self) -> Conn:
        db = self._backend._db
        assert db is not None
        await db.execute("BEGIN IMMEDIATE")
        return db

    async def commit(self, conn: Conn) -> None:
        await conn.execute("COMMIT")

    async def rollback(self, conn: Conn) -> None:
        await conn.execute("ROLLBACK")

    def describe(self, exc: BaseException) -> str:
        return describe(exc)


class _Events:
    """Inserts a run of submitted events and their deliveries with two executemany."""

    def __init__(self, backend: SqliteStorage) -> None:
        self._b = backend

    async def execute(self, db: Conn, items: list[tuple[Event, Sequence[Subscriber]]]) -> list[str]:
        b = self._b
        now = b.clock()
        keys = [ev.idempotency_key for ev, _ in items if ev.idempotency_key is not None]
        known: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT idempotency_key, uid FROM events WHERE idempotency_key IN ({marks})"  # noqa: S608
            async with db.execute(sql, chunk) as cur:
                for key, uid in await cur.fetchall():
                    known[key] = uid
        event_rows: list[tuple[Any, ...]] = []
        delivery_rows: list[tuple[Any, ...]] = []
        results: list[str] = []
        fresh: list[FreshEvent] = []
        new_types: list[str] = []
        event_id, delivery_id = b._next_event_id, b._next_delivery_id
        for ev, subscribers in items:
            key = ev.idempotency_key
            if key is not None and key in known:
                results.append(known[key])
                continue
            uid = new_id("evt")
            if key is not None:
                known[key] = uid
            event_rows.append((event_id, uid, key, ev.type, ev.body, now, ev.message_id, ev.recipient))
            new_types.append(ev.type)
            if subscribers:
                fresh.append(FreshEvent(delivery_id, subscribers, now, uid, ev.type, ev.body))
            for webhook_id, enabled in subscribers:
                delivery_rows.append(
                    (delivery_id, event_id, webhook_id, PENDING if enabled else PAUSED, now if enabled else None,
                     now, now)
                )
                delivery_id += 1
            event_id += 1
            results.append(uid)
        if event_rows:
            await db.executemany(
                "INSERT INTO events (id, uid, idempotency_key, type, body, created_at, message_id, recipient)"
                " VALUES (?,?,?,?,?,?,?,?)",
                event_rows,
            )
        if delivery_rows:
            await db.executemany(
                "INSERT INTO deliveries (id, event_id, webhook_id, status, next_attempt_at, created_at,"
                " updated_at) VALUES (?,?,?,?,?,?,?)",
                delivery_rows,
            )
        # Only now, with every statement done: a failed batch leaves the counters as they were.
        b._next_event_id, b._next_delivery_id = event_id, delivery_id
        b._pending_fresh.extend(fresh)
        b._pending_types.extend(new_types)
        return results

    def committed(self, items: list[tuple[Event, Sequence[Subscriber]]], results: list[str]) -> None:
        b = self._b
        fresh, b._pending_fresh = b._pending_fresh, []
        types, b._pending_types = b._pending_types, []
        received = b._received
        for event_type in types:
            received[event_type] += 1
        if fresh:
            b._on_fresh(fresh)


class _Outcomes:
    """Writes a run of attempt outcomes: delivery rows, attempt rows, hour counts, last attempt."""

    async def execute(self, db: Conn, items: list[OutcomeRecord]) -> list[None]:
        await db.executemany(
            "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status_code = ?,"
            " last_error = ?, updated_at = ? WHERE id = ?",
            [(r.status, r.attempts, r.next_attempt_at, r.status_code, r.error, r.updated_at, r.delivery_id)
             for r in items],
        )
        await db.executemany(
            "INSERT INTO attempts (delivery_id, at, duration_ms, status_code, error, response_body)"
            " VALUES (?,?,?,?,?,?)",
            [(r.delivery_id, r.at, round(r.duration_ms, 3), r.status_code, r.error, r.response_body)
             for r in items],
        )
        hours: Counter[tuple[int, str, bool]] = Counter()
        last: dict[str, OutcomeRecord] = {}
        for r in items:
            hours[(int(r.at // HOUR) * HOUR, r.webhook_id, r.error is None)] += 1
            seen = last.get(r.webhook_id)
            if seen is None or r.at >= seen.at:
                last[r.webhook_id] = r
        await db.executemany(
            "INSERT INTO attempt_hours (hour, webhook_id, succeeded, failed) VALUES (?,?,?,?)"
            " ON CONFLICT (hour, webhook_id) DO UPDATE SET succeeded = succeeded + excluded.succeeded,"
            " failed = failed + excluded.failed",
            [(hour, wid, n if ok else 0, 0 if ok else n) for (hour, wid, ok), n in hours.items()],
        )
        await db.executemany(
            "UPDATE webhooks SET last_attempt_at = ?, last_status_code = ?, last_error = ?"
            " WHERE id = ? AND (last_attempt_at IS NULL OR last_attempt_at <= ?)",
            [(r.at, r.status_code, r.error, wid, r.at) for wid, r in last.items()],
        )
        return [None] * len(items)

    def committed(self, items: list[OutcomeRecord], results: list[None]) -> None:
        pass


def _webhook(row: Sequence[Any]) -> WebhookRecord:
    return WebhookRecord(
        id=row[0], url=row[1], events=tuple(orjson.loads(row[2])), description=row[3], enabled=bool(row[4]),
        disabled_reason=row[5], consecutive_failures=int(row[6]), backoff_until=float(row[7]), secret=row[8],
        previous_secret=row[9], previous_secret_expires_at=row[10], created_at=float(row[11]),
        updated_at=float(row[12]),
    )


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=int(row[0]), event_uid=row[1], webhook_id=row[2], event_type=row[3], status=row[4],
        attempts=int(row[5]), next_attempt_at=row[6], last_status_code=row[7], last_error=row[8],
        created_at=float(row[9]), updated_at=float(row[10]), message_id=row[11], recipient=row[12],
    )


def _due(row: Sequence[Any]) -> DueItem:
    return DueItem(int(row[0]), row[1], float(row[2] or 0.0), int(row[3]), row[4], row[5], bytes(row[6]))


def _where(f: DeliveryFilter) -> tuple[str, list[Any]]:
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
    return " AND ".join(clauses), params


class SqliteStorage:
    """`Storage` on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        durability: str = "full",
        clock: Callable[[], float] = time.time,
        on_fresh: FreshSink | None = None,
    ) -> None:
        self.path = path
        self.durability = durability
        self.clock = clock
        self._on_fresh: FreshSink = on_fresh or (lambda _events: None)
        self._db: Conn | None = None
        self._reader: Conn | None = None
        self._writer: Writer[Conn] = Writer(_Transactions(self))
        self._events = _Events(self)
        self._outcomes = _Outcomes()
        self._next_event_id = 1
        self._next_delivery_id = 1
        self._pending_fresh: list[FreshEvent] = []
        self._pending_types: list[str] = []
        self._received: Counter[str] = Counter()

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def commits(self) -> int:
        return self._writer.commits

    @property
    def queued(self) -> int:
        return self._writer.queued

    @property
    def retry_delay(self) -> float:
        return self._writer.retry_delay

    @retry_delay.setter
    def retry_delay(self, value: float) -> None:
        self._writer.retry_delay = value

    def received(self) -> dict[str, int]:
        return self._received

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._db)
            await self._migrate(self._db)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._reader)
            self._next_event_id = await self._max_id(self._db, "events") + 1
            self._next_delivery_id = await self._max_id(self._db, "deliveries") + 1
        except sqlite3.Error as exc:
            await self._close_connections()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)
        self._writer.start()

    @staticmethod
    async def _max_id(db: Conn, table: str) -> int:
        async with db.execute(f"SELECT coalesce(max(id), 0) FROM {table}") as cur:  # noqa: S608
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _configure(self, db: Conn) -> None:
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute(f"PRAGMA synchronous = {'FULL' if self.durability == 'full' else 'NORMAL'}")
        await db.execute("PRAGMA foreign_keys = OFF")

    async def _migrate(self, db: Conn) -> None:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this webhookd "
                f"({SCHEMA_VERSION}); upgrade webhookd"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in split_sql(MIGRATIONS[target - 1]):
                    await db.execute(statement)
                if target == 1:
                    await db.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (str(self.clock()),))
                await db.execute(f"PRAGMA user_version = {target}")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            log.info("schema migrated", version=target)

    async def close(self) -> None:
        await self._writer.close()
        await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._db, self._reader):
            if conn is not None:
                await conn.close()
        self._db = self._reader = None

    # -- intake ------------------------------------------------------------------------------
    def submit(self, event: Event, subscribers: Sequence[Subscriber]) -> asyncio.Future[str]:
        return self._writer.add(self._events, (event, subscribers))

    # -- the scheduler's verbs --------------------------------------------------------------
    async def load_webhooks(self) -> list[WebhookRecord]:
        rows = await self._read(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id")  # noqa: S608
        return [_webhook(r) for r in rows]

    def take_due(
        self, webhook_id: str, after: tuple[float, int], limit: int, *,
        on_commit: Callable[[list[DueItem]], None] | None = None,
    ) -> asyncio.Future[list[DueItem]]:
        async def read(db: Conn) -> list[DueItem]:
            sql = (_DUE_SELECT + " WHERE d.webhook_id = ? AND d.status = 'pending'"
                   " AND (d.next_attempt_at, d.id) > (?, ?) ORDER BY d.next_attempt_at, d.id LIMIT ?")
            async with db.execute(sql, (webhook_id, after[0], after[1], limit)) as cur:
                return [_due(r) for r in await cur.fetchall()]

        return self._writer.run(read, on_commit=on_commit, internal=True)

    def record_outcome(self, record: OutcomeRecord, *, on_commit: Callable[[None], None] | None = None) -> None:
        self._writer.add(self._outcomes, record, on_commit=on_commit, internal=True)

    def set_webhook_state(
        self, webhook_id: str, state: WebhookState, *, pause_pending: bool = False,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await db.execute(
                "UPDATE webhooks SET enabled = ?, consecutive_failures = ?, backoff_until = ?,"
                " disabled_reason = ?, updated_at = ? WHERE id = ?",
                (int(state.enabled), state.consecutive_failures, state.backoff_until, state.disabled_reason,
                 state.updated_at, webhook_id),
            )
            if pause_pending:
                await db.execute(
                    "UPDATE deliveries SET status = 'paused', next_attempt_at = NULL, updated_at = ?"
                    " WHERE webhook_id = ? AND status = 'pending'",
                    (state.updated_at, webhook_id),
                )

        return self._writer.run(write, on_commit=on_commit, internal=True)

    # -- webhook administration ---------------------------------------------------------------
    def create_webhook(
        self, webhook: WebhookRecord, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        w = webhook

        async def write(db: Conn) -> None:
            await db.execute(
                f"INSERT INTO webhooks ({_WEBHOOK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (w.id, w.url, orjson.dumps(list(w.events)).decode(), w.description, int(w.enabled),
                 w.disabled_reason, w.consecutive_failures, w.backoff_until, w.secret, w.previous_secret,
                 w.previous_secret_expires_at, w.created_at, w.updated_at),
            )

        return self._writer.run(write, on_commit=on_commit)

    def update_webhook(
        self, webhook_id: str, *, url: str, events: tuple[str, ...], description: str, updated_at: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await db.execute(
                "UPDATE webhooks SET url = ?, events = ?, description = ?, updated_at = ? WHERE id = ?",
                (url, orjson.dumps(list(events)).decode(), description, updated_at, webhook_id),
            )

        return self._writer.run(write, on_commit=on_commit)

    def delete_webhook(
        self, webhook_id: str, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await db.execute(
                "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE webhook_id = ?)",
                (webhook_id,),
            )
            await db.execute("DELETE FROM deliveries WHERE webhook_id = ?", (webhook_id,))
            await db.execute("DELETE FROM attempt_hours WHERE webhook_id = ?", (webhook_id,))
            await db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))

        return self._writer.run(write, on_commit=on_commit, internal=True)

    def enable_webhook(
        self, webhook_id: str, *, now: float, drop_backlog: bool, on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        async def write(db: Conn) -> int:
            await db.execute(
                "UPDATE webhooks SET enabled = 1, disabled_reason = NULL, consecutive_failures = 0,"
                " backoff_until = 0, updated_at = ? WHERE id = ?",
                (now, webhook_id),
            )
            if drop_backlog:
                cur = await db.execute(
                    "UPDATE deliveries SET status = 'failed', next_attempt_at = NULL,"
                    " last_error = 'backlog dropped when the webhook was re-enabled', updated_at = ?"
                    " WHERE webhook_id = ? AND status = 'paused'",
                    (now, webhook_id),
                )
            else:
                cur = await db.execute(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = ?, updated_at = ?"
                    " WHERE webhook_id = ? AND status = 'paused'",
                    (now, now, webhook_id),
                )
            return int(cur.rowcount)

        return self._writer.run(write, on_commit=on_commit, internal=True)

    def rotate_secret(
        self, webhook_id: str, *, secret: str, previous_secret: str, previous_expires_at: float, now: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await db.execute(
                "UPDATE webhooks SET secret = ?, previous_secret = ?, previous_secret_expires_at = ?,"
                " updated_at = ? WHERE id = ?",
                (secret, previous_secret, previous_expires_at, now, webhook_id),
            )

        return self._writer.run(write, on_commit=on_commit)

    # -- deliveries -------------------------------------------------------------------------
    def reschedule(
        self, delivery_id: int, *, status: str, next_attempt_at: float | None, now: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await db.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (status, next_attempt_at, now, delivery_id),
            )

        return self._writer.run(write, on_commit=on_commit)

    def replay(
        self, webhook_id: str, *, since: float, statuses: Sequence[str], status: str,
        next_attempt_at: float | None, now: float, on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        marks = ",".join("?" * len(statuses))

        async def write(db: Conn) -> int:
            cur = await db.execute(
                f"UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ?"  # noqa: S608
                f" WHERE webhook_id = ? AND created_at >= ? AND status IN ({marks})",
                (status, next_attempt_at, now, webhook_id, since, *statuses),
            )
            return int(cur.rowcount)

        return self._writer.run(write, on_commit=on_commit)

    def retry_failed(
        self, where: DeliveryFilter, webhooks: Sequence[Subscriber], *, now: float,
        on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        clause, params = _where(replace(where, statuses=(FAILED,)))

        async def write(db: Conn) -> int:
            total = 0
            for webhook_id, enabled in webhooks:
                cur = await db.execute(
                    "UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ? WHERE id IN"  # noqa: S608
                    f" (SELECT d.id FROM deliveries d JOIN events e ON e.id = d.event_id WHERE {clause}"
                    " AND d.webhook_id = ?)",
                    (PENDING if enabled else PAUSED, now if enabled else None, now, *params, webhook_id),
                )
                total += int(cur.rowcount)
            return total

        return self._writer.run(write, on_commit=on_commit)

    async def due_item(self, delivery_id: int) -> tuple[DueItem, str] | None:
        rows = await self._read(_DUE_SELECT + " WHERE d.id = ?", (delivery_id,))
        return (_due(rows[0]), str(rows[0][7])) if rows else None

    # -- queries for people ---------------------------------------------------------------------
    async def list_deliveries(
        self, where: DeliveryFilter, *, before: int | None = None, limit: int = 100
    ) -> list[Delivery]:
        clause, params = _where(where)
        if before is not None:
            clause = f"{clause} AND d.id < ?" if clause else "d.id < ?"
            params.append(before)
        sql = _DELIVERY_SELECT + (f" WHERE {clause}" if clause else "") + " ORDER BY d.id DESC LIMIT ?"
        return [_delivery(r) for r in await self._read(sql, [*params, limit])]

    async def count_deliveries(self, where: DeliveryFilter) -> int:
        clause, params = _where(where)
        join = " JOIN events e ON e.id = d.event_id" if where.event_type is not None else ""
        sql = f"SELECT count(*) FROM deliveries d{join}" + (f" WHERE {clause}" if clause else "")  # noqa: S608
        return int((await self._read(sql, params))[0][0])

    async def delivery(self, delivery_id: int) -> DeliveryDetail | None:
        rows = await self._read(
            _DELIVERY_SELECT.replace(" FROM", ", e.body FROM", 1) + " WHERE d.id = ?", (delivery_id,)
        )
        if not rows:
            return None
        attempts = await self._read(
            "SELECT at, duration_ms, status_code, error, response_body FROM attempts WHERE delivery_id = ?"
            " ORDER BY id",
            (delivery_id,),
        )
        return DeliveryDetail(
            _delivery(rows[0]), bytes(rows[0][13]),
            tuple(Attempt(float(a[0]), float(a[1]), a[2], a[3], a[4]) for a in attempts),
        )

    async def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(DELIVERY_STATUSES, 0)
        for status, n in await self._read("SELECT status, count(*) FROM deliveries GROUP BY status"):
            counts[status] = int(n)
        return counts

    async def webhook_stats(self, now: float) -> dict[str, WebhookStats]:
        fields: dict[str, dict[str, Any]] = {}
        for wid, at, code, error in await self._read(
            "SELECT id, last_attempt_at, last_status_code, last_error FROM webhooks"
        ):
            fields[wid] = {"last_attempt_at": at, "last_status_code": code, "last_error": error}
        for wid, ok, bad in await self._read(
            "SELECT webhook_id, sum(succeeded), sum(failed) FROM attempt_hours WHERE hour > ? GROUP BY webhook_id",
            (now - DAY - HOUR,),
        ):
            fields.setdefault(wid, {}).update(succeeded_24h=int(ok), failed_24h=int(bad))
        for wid, status, n in await self._read(
            "SELECT webhook_id, status, count(*) FROM deliveries WHERE status IN ('pending', 'paused')"
            " GROUP BY webhook_id, status"
        ):
            fields.setdefault(wid, {})[status] = int(n)
        return {wid: WebhookStats(wid, **f) for wid, f in fields.items()}

    async def hourly_counts(self, since: float, until: float) -> list[HourCount]:
        rows = await self._read(
            "SELECT hour, sum(succeeded), sum(failed) FROM attempt_hours WHERE hour >= ? AND hour < ?"
            " GROUP BY hour ORDER BY hour",
            (int(since // HOUR) * HOUR, until),
        )
        return [HourCount(int(h), int(ok), int(bad)) for h, ok, bad in rows]

    # -- retention ---------------------------------------------------------------------------
    async def prune(self, cutoff: float, limit: int = 1000) -> int:
        async def run(db: Conn) -> int:
            async with db.execute(
                "SELECT id FROM deliveries WHERE status IN ('succeeded', 'failed') AND updated_at < ?"
                " ORDER BY updated_at LIMIT ?",
                (cutoff, limit),
            ) as cur:
                ids = [(row[0],) for row in await cur.fetchall()]
            await db.executemany("DELETE FROM attempts WHERE delivery_id = ?", ids)
            await db.executemany("DELETE FROM deliveries WHERE id = ?", ids)
            cur2 = await db.execute(
                "DELETE FROM events WHERE id IN (SELECT e.id FROM events e WHERE e.created_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id) ORDER BY e.id LIMIT ?)",
                (cutoff, limit),
            )
            await db.execute("DELETE FROM attempt_hours WHERE hour < ?", (int(cutoff // HOUR) * HOUR - HOUR,))
            return max(len(ids), cur2.rowcount)

        return await self._writer.run(run)

    # -- reads ------------------------------------------------------------------------------
    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        reader = self._reader
        if reader is None:
            raise StoreError("store is closed", Reason.UNAVAILABLE)
        try:
            async with reader.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(describe(exc)) from exc
