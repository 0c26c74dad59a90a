"""SQLite storage: schema, migrations and the group-committing writer.

One connection writes. Every change to the database goes through `Store.run`
(or `Store.submit_event` for intake), which appends an operation to the
writer's queue. The writer task takes *everything* queued, runs it in one
transaction and commits once, so throughput grows with load instead of being
capped by fsyncs (group commit). After the commit it resolves each operation's
future and runs its `on_commit` callback synchronously, before it builds the
next batch: the in-memory scheduler therefore sees changes in exactly the
order the database does.

Internal operations (delivery outcomes, webhook state) are retried until they
commit; intake operations fail fast with `StoreError` so the client hears
about it (``ok: false`` / HTTP 503) instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite
import structlog

from webhookd.events import Event
from webhookd.ids import new_id

log = structlog.get_logger("webhookd.store")

T = TypeVar("T")

PENDING = "pending"
SUCCEEDED = "succeeded"
FAILED = "failed"
PAUSED = "paused"
DELIVERY_STATUSES = (PENDING, PAUSED, SUCCEEDED, FAILED)

# Each entry upgrades the schema by one version; never edit a released entry,
# append a new one. Version N is reached after running MIGRATIONS[:N].
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        enabled INTEGER NOT NULL DEFAULT 1,
        disabled_reason TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        backoff_until REAL NOT NULL DEFAULT 0,
        secret TEXT NOT NULL,
        previous_secret TEXT,
        previous_secret_expires_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        uid TEXT NOT NULL,
        idempotency_key TEXT,
        type TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX events_idempotency ON events (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        event_id INTEGER NOT NULL,
        webhook_id TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_status_code INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (webhook_id, next_attempt_at, id)
        WHERE status = 'pending';
    CREATE INDEX deliveries_status ON deliveries (status, webhook_id);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery_id INTEGER NOT NULL,
        at REAL NOT NULL,
        duration_ms REAL NOT NULL,
        status_code INTEGER,
        error TEXT,
        response_body TEXT
    );
    CREATE INDEX attempts_delivery ON attempts (delivery_id);
    """,
    # v2: retention pruning finds finished deliveries by age, and events by their deliveries.
    """
    CREATE INDEX deliveries_finished ON deliveries (updated_at) WHERE status IN ('succeeded', 'failed');
    CREATE INDEX deliveries_event ON deliveries (event_id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
CLOSE_RETRIES = 3  # failed commits of internal operations tolerated while closing


class StoreError(Exception):
    """The store could not commit; the caller should answer 'try later'."""


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

    @property
    def key(self) -> tuple[float, int]:
        return (self.next_at, self.delivery_id)


Subscribers = Callable[[str], Sequence[tuple[str, bool]]]
"""Maps an event type to (webhook id, enabled) pairs at batch-build time."""


@dataclass(slots=True)
class FreshEvent:
    """A committed event's new deliveries, one per entry of `subscribers` (the list the
    batch was built with): the i-th has delivery id `first_delivery_id + i`, and is
    pending if that subscriber was enabled (paused otherwise). Handed to the scheduler
    as one object per event, not one per delivery: a webhook that cannot take new work
    into memory (its window is full) then costs nothing per event."""

    first_delivery_id: int
    subscribers: Sequence[tuple[str, bool]]
    next_at: float
    event_uid: str
    event_type: str
    body: bytes

    def items(self) -> Iterator[DueItem]:
        """The pending deliveries, for the enabled subscribers."""
        for i, (webhook_id, enabled) in enumerate(self.subscribers):
            if enabled:
                yield self.item(i, webhook_id)

    def item(self, i: int, webhook_id: str) -> DueItem:
        return DueItem(self.first_delivery_id + i, webhook_id, self.next_at, 0, self.event_uid, self.event_type,
                       self.body)


@dataclass(slots=True)
class _EventOp:
    event: Event
    future: asyncio.Future[str]


@dataclass(slots=True)
class _Op(Generic[T]):
    fn: Callable[[aiosqlite.Connection], Awaitable[T]]
    future: asyncio.Future[T]
    on_commit: Callable[[T], None] | None
    internal: bool
    result: Any = None


@dataclass
class _Batch:
    ops: list[_EventOp | _Op[Any]] = field(default_factory=list)
    fresh: list[FreshEvent] = field(default_factory=list)
    event_results: list[tuple[_EventOp, str]] = field(default_factory=list)
    new_types: list[str] = field(default_factory=list)


class Store:
    """The one writer of the database, plus a reader connection for the admin API."""

    def __init__(
        self,
        path: Path,
        *,
        durability: str = "full",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.durability = durability
        self.clock = clock
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: list[_EventOp | _Op[Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._next_event_id = 1
        self._next_delivery_id = 1
        self.subscribers: Subscribers = lambda _type: ()
        self.on_fresh: Callable[[list[FreshEvent]], None] = lambda _events: None
        self.commits = 0
        self.received: Counter[str] = Counter()  # new events committed, by type (for /metrics)
        self.retry_delay = 0.05

    # -- lifecycle -----------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._db)
            await self._migrate(self._db)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._reader)
            async with self._db.execute("SELECT coalesce(max(id), 0) FROM events") as cur:
                row = await cur.fetchone()
                self._next_event_id = int(row[0]) + 1 if row else 1
            async with self._db.execute("SELECT coalesce(max(id), 0) FROM deliveries") as cur:
                row = await cur.fetchone()
                self._next_delivery_id = int(row[0]) + 1 if row else 1
        except sqlite3.Error as exc:
            await self._close_connections()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)
        self._task = asyncio.create_task(self._writer(), name="webhookd-writer")

    async def _configure(self, db: aiosqlite.Connection) -> None:
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA journal_mode = WAL")
        sync = "FULL" if self.durability == "full" else "NORMAL"
        await db.execute(f"PRAGMA synchronous = {sync}")
        await db.execute("PRAGMA foreign_keys = OFF")

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this webhookd "
                f"({SCHEMA_VERSION}); upgrade webhookd"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            script = MIGRATIONS[target - 1]
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(script):
                    await db.execute(statement)
                if target == 1:
                    await db.execute(
                        "INSERT INTO meta (key, value) VALUES ('created_at', ?)", (str(self.clock()),)
                    )
                await db.execute(f"PRAGMA user_version = {target}")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            log.info("schema migrated", version=target)

    async def close(self) -> None:
        """Commit what is queued, then close. Safe to call twice."""
        if self._closing:
            if self._task is not None:
                await asyncio.shield(self._task)
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._db, self._reader):
            if conn is not None:
                await conn.close()
        self._db = self._reader = None

    # -- submitting work -----------------------------------------------------
    def submit_event(self, event: Event) -> asyncio.Future[str]:
        """Queue an event for the next commit; resolves to its event id."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(StoreError("temporarily unavailable: daemon is shutting down"))
            return fut
        self._queue.append(_EventOp(event, fut))
        self._wake.set()
        return fut

    def run(
        self,
        fn: Callable[[aiosqlite.Connection], Awaitable[T]],
        *,
        on_commit: Callable[[T], None] | None = None,
        internal: bool = False,
    ) -> asyncio.Future[T]:
        """Queue `fn` to run inside the next write transaction.

        `on_commit(result)` runs synchronously right after the commit, before any
        later operation is built. `internal` operations are retried until they
        commit (they record facts the daemon already acted on).
        """
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._closing and not internal:
            fut.set_exception(StoreError("temporarily unavailable: daemon is shutting down"))
            return fut
        self._queue.append(_Op(fn, fut, on_commit, internal))
        self._wake.set()
        return fut

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the writer ------------------------------------------------------------
    async def _writer(self) -> None:
        delay = self.retry_delay
        failures_while_closing = 0
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            ops, self._queue = self._queue, []
            batch = _Batch(ops)
            try:
                await self._execute(batch)
            except Exception as exc:
                retry = self._fail(batch, exc)
                if retry and self._closing:
                    failures_while_closing += 1
                    if failures_while_closing >= CLOSE_RETRIES:
                        # Shutting down and still unable to commit: give up on them. Each is
                        # a recorded outcome; the database still says "pending", so the
                        # delivery is sent again after a restart (at-least-once).
                        log.error("giving up on uncommitted outcomes at shutdown", ops=len(retry))
                        for op in retry:
                            if not op.future.done():
                                op.future.set_exception(StoreError(_describe(exc)))
                        retry = []
                if retry:
                    self._queue[:0] = retry
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                continue
            delay = self.retry_delay
            self.commits += 1
            self._succeed(batch)

    async def _execute(self, batch: _Batch) -> None:
        db = self._db
        assert db is not None
        await db.execute("BEGIN IMMEDIATE")
        try:
            run: list[_EventOp] = []
            for op in batch.ops:
                if isinstance(op, _EventOp):
                    run.append(op)
                    continue
                if run:
                    await self._insert_events(db, run, batch)
                    run = []
                op.result = await op.fn(db)
            if run:
                await self._insert_events(db, run, batch)
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise

    async def _insert_events(self, db: aiosqlite.Connection, run: list[_EventOp], batch: _Batch) -> None:
        now = self.clock()
        keys = [op.event.idempotency_key for op in run if op.event.idempotency_key is not None]
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
        event_id = self._next_event_id
        delivery_id = self._next_delivery_id
        for op in run:
            ev = op.event
            key = ev.idempotency_key
            if key is not None and key in known:
                batch.event_results.append((op, known[key]))
                continue
            uid = new_id("evt")
            if key is not None:
                known[key] = uid
            event_rows.append((event_id, uid, key, ev.type, ev.body, now))
            batch.new_types.append(ev.type)
            subscribers = self.subscribers(ev.type)
            if subscribers:
                batch.fresh.append(FreshEvent(delivery_id, subscribers, now, uid, ev.type, ev.body))
            for webhook_id, enabled in subscribers:
                status = PENDING if enabled else PAUSED
                delivery_rows.append(
                    (delivery_id, event_id, webhook_id, status, now if enabled else None, now, now)
                )
                delivery_id += 1
            event_id += 1
            batch.event_results.append((op, uid))
        self._next_event_id = event_id
        self._next_delivery_id = delivery_id
        if event_rows:
            await db.executemany(
                "INSERT INTO events (id, uid, idempotency_key, type, body, created_at) VALUES (?,?,?,?,?,?)",
                event_rows,
            )
        if delivery_rows:
            await db.executemany(
                "INSERT INTO deliveries (id, event_id, webhook_id, status, next_attempt_at, created_at,"
                " updated_at) VALUES (?,?,?,?,?,?,?)",
                delivery_rows,
            )

    def _succeed(self, batch: _Batch) -> None:
        received = self.received
        for event_type in batch.new_types:
            received[event_type] += 1
        for event_op, uid in batch.event_results:
            if not event_op.future.done():
                event_op.future.set_result(uid)
        for op in batch.ops:
            if isinstance(op, _Op):
                if op.on_commit is not None:
                    try:
                        op.on_commit(op.result)
                    except Exception:
                        log.exception("on_commit callback failed")
                if not op.future.done():
                    op.future.set_result(op.result)
        if batch.fresh:
            try:
                self.on_fresh(batch.fresh)
            except Exception:
                log.exception("scheduling fresh deliveries failed")

    def _fail(self, batch: _Batch, exc: Exception) -> list[_EventOp | _Op[Any]]:
        """Fail intake and admin operations; return internal ones to retry."""
        reason = _describe(exc)
        retry: list[_EventOp | _Op[Any]] = []
        failed = 0
        for op in batch.ops:
            if isinstance(op, _Op) and op.internal:
                op.result = None
                retry.append(op)
            elif not op.future.done():
                failed += 1
                op.future.set_exception(StoreError(reason))
        log.error("commit failed", error=reason, failed_ops=failed, retrying_ops=len(retry))
        return retry

    # -- retention -------------------------------------------------------------------
    async def prune(self, cutoff: float, limit: int = 1000) -> int:
        """Delete up to `limit` finished deliveries (with their attempts) last updated
        before `cutoff`, and up to `limit` events older than it that no delivery needs.

        One small transaction through the writer, so intake never waits long; call it
        again while it returns `limit`."""

        async def run(db: aiosqlite.Connection) -> int:
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
            return max(len(ids), cur2.rowcount)

        return await self.run(run, internal=False)

    # -- reads for the admin API --------------------------------------------------
    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        reader = self._reader
        if reader is None:
            raise StoreError("store is closed")
        reader.row_factory = sqlite3.Row
        try:
            async with reader.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(_describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
        return "storage full: cannot commit (database or disk is full)"
    if isinstance(exc, sqlite3.Error):
        return f"storage error: {exc}"
    return f"storage error: {type(exc).__name__}: {exc}"


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
