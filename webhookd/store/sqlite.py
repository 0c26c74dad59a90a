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
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import aiosqlite
import orjson
import structlog

from webhookd.batching import Batching
from webhookd.events import Event
from webhookd.filters import WebhookFilter
from webhookd.store.base import FreshSink
from webhookd.store.model import (
    FAILED,
    PAUSED,
    PENDING,
    ApiToken,
    BatchOutcomeRecord,
    Delivery,
    DeliveryFilter,
    DueItem,
    FreshEvent,
    OutcomeRecord,
    StoreError,
    Subscriber,
    TrackingFacts,
    TrackingHit,
    WebhookRecord,
    WebhookState,
)
from webhookd.store.sqlite_batch import BatchOutcomes, Conn, Events, EventSink, Ids, Outcomes, in_thread
from webhookd.store.sqlite_fanout import CHUNK, Fanout, status_of
from webhookd.store.sqlite_read import Reads
from webhookd.store.sqlite_rows import (
    DUE_SELECT,
    HOUR,
    WEBHOOK_COLUMNS,
    Counts,
    describe,
    due_row,
    filter_text,
    webhook_row,
    where_clause,
)
from webhookd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, split_sql
from webhookd.store.writer import Writer, WriterBacked

log = structlog.get_logger("webhookd.store")
class _Transactions:
    def __init__(self, backend: SqliteStorage) -> None:
        self._backend = backend

    async def begin(self) -> Conn:
        b = self._backend
        db = b._db
        assert db is not None
        b._counts.rollback()  # nothing of a failed transaction survives into this one
        b._events.reset()
        b._fanout.begin()
        await db.execute("BEGIN IMMEDIATE")
        return db

    async def commit(self, conn: Conn) -> None:
        await conn.execute("COMMIT")
        self._backend._counts.commit()
        self._backend._fanout.commit()

    async def rollback(self, conn: Conn) -> None:
        self._backend._counts.rollback()
        self._backend._fanout.rollback()
        await conn.execute("ROLLBACK")

    async def call(self, conn: Conn, fn: Callable[[sqlite3.Connection], None]) -> None:
        await in_thread(conn, fn)

    async def atomic(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        """The whole transaction on aiosqlite's thread: BEGIN, `fn`, COMMIT (ROLLBACK on any
        failure, COMMIT's included), one hand-off each way. The counts' deltas recorded meanwhile
        apply here, on the event loop, once it has committed."""
        b = self._backend
        db = b._db
        assert db is not None
        b._counts.rollback()
        b._events.reset()
        b._fanout.begin()

        def transaction(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                raise

        try:
            await in_thread(db, transaction)
        except BaseException:
            b._counts.rollback()
            b._fanout.rollback()
            raise
        b._counts.commit()
        b._fanout.commit()

    def describe(self, exc: BaseException) -> str:
        return describe(exc)

    def transient(self, exc: BaseException) -> bool:
        return False  # one writer per database: nobody else's transaction to collide with


class SqliteStorage(Reads, WriterBacked):
    """`Storage` on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        durability: str = "full",
        clock: Callable[[], float] = time.time,
        on_fresh: FreshSink | None = None,
        defer_after: int | None = None,
    ) -> None:
        self.path = path
        self.durability = durability
        self.clock = clock
        self._sink = EventSink(on_fresh or (lambda _events: None))
        self._db: Conn | None = None
        self._reader: Conn | None = None
        self._writer: Writer[Conn, sqlite3.Connection] = Writer(_Transactions(self))
        self._ids = Ids()
        self._counts = Counts()
        self._fanout = Fanout(self._counts) if defer_after is None else Fanout(self._counts, defer_after)
        self._events = Events(clock, self._ids, self._counts, self._sink, self._fanout)
        self._outcomes = Outcomes(self._counts)
        self._batch_outcomes = BatchOutcomes(self._counts)

    # -- lifecycle -----------------------------------------------------------------------

    def received(self) -> dict[str, int]:
        return self._sink.received

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._db)
            await self._migrate(self._db)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._reader)
            self._ids.event = await self._max_id(self._db, "events") + 1
            self._ids.delivery = await self._max_id(self._db, "deliveries") + 1
            async with self._db.execute("SELECT value FROM meta WHERE key = 'next_delivery_id'") as cur:
                kept = await cur.fetchone()
            if kept is not None:  # the newest ones may have been deleted: never reuse a dlv_N
                self._ids.delivery = max(self._ids.delivery, int(kept[0]))
            async with self._db.execute(
                "SELECT webhook_id, status, count(*) FROM deliveries GROUP BY webhook_id, status"
            ) as cur:
                self._counts.load(await cur.fetchall())
            await in_thread(self._db, self._fanout.load)
        except sqlite3.Error as exc:
            await self._close_connections()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)
        self._writer.start()

    async def _keep_next_delivery_id(self, db: Conn) -> None:
        """Before deleting deliveries (the newest may go too): where ids continue after a reopen."""
        await db.execute(
            "INSERT INTO meta (key, value) VALUES ('next_delivery_id', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(self._ids.delivery),),
        )

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
        rows = await self._read(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id")  # noqa: S608
        return [webhook_row(r) for r in rows]

    def take_due(
        self, webhook_id: str, after: tuple[float, int], limit: int, *,
        on_commit: Callable[[list[DueItem]], None] | None = None,
    ) -> asyncio.Future[list[DueItem]]:
        def read(conn: sqlite3.Connection) -> list[DueItem]:
            rows = [due_row(r) for r in conn.execute(_TAKE_DUE, (webhook_id, after[0], after[1], limit)).fetchall()]
            self._fanout.windows[webhook_id] = limit
            if len(rows) < limit and self._fanout.refills(webhook_id):  # sqlite_fanout.py
                rows = self._refill_deferred(conn, webhook_id, rows, limit)
            return rows

        return self._writer.call(read, on_commit=on_commit, internal=True)

    def record_outcome(self, record: OutcomeRecord, *, on_commit: Callable[[None], None] | None = None) -> None:
        self._writer.add(self._outcomes, record, on_commit=on_commit, internal=True)

    def record_batch_outcome(
        self, record: BatchOutcomeRecord, *, on_commit: Callable[[None], None] | None = None
    ) -> None:
        self._writer.add(self._batch_outcomes, record, on_commit=on_commit, internal=True)

    def set_webhook_state(
        self, webhook_id: str, state: WebhookState, *, pause_pending: bool = False,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE webhooks SET enabled = ?, consecutive_failures = ?, backoff_until = ?,"
                " disabled_reason = ?, updated_at = ? WHERE id = ?",
                (int(state.enabled), state.consecutive_failures, state.backoff_until, state.disabled_reason,
                 state.updated_at, webhook_id),
            )
            self._fanout.set_enabled(webhook_id, state.enabled)  # a disabled webhook's deliveries are deferred
            if pause_pending:
                cur = conn.execute(
                    "UPDATE deliveries SET status = 'paused', next_attempt_at = NULL, updated_at = ?"
                    " WHERE webhook_id = ? AND status = 'pending'",
                    (state.updated_at, webhook_id),
                )
                self._counts.move(webhook_id, PENDING, PAUSED, int(cur.rowcount))

        return self._writer.call(write, on_commit=on_commit, internal=True)

    # -- webhook administration ---------------------------------------------------------------
    def create_webhook(
        self, webhook: WebhookRecord, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        w = webhook

        async def write(db: Conn) -> None:
            await db.execute(
                f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (w.id, w.url, orjson.dumps(list(w.events)).decode(), w.description, int(w.enabled),
                 w.disabled_reason, w.consecutive_failures, w.backoff_until, w.secret, w.previous_secret,
                 w.previous_secret_expires_at, w.created_at, w.updated_at, filter_text(w.filter), w.name,
                 w.declared_in, w.batching.max_events, w.batching.max_bytes, w.batching.linger),
            )
            key = self._fanout.created(w.id, w.enabled)
            await db.execute("INSERT INTO fanout (webhook_id, key, cursor, deferred) VALUES (?, ?, NULL, 0)",
                             (w.id, key))

        return self._writer.run(write, on_commit=on_commit)

    def update_webhook(
        self, webhook_id: str, *, url: str, events: tuple[str, ...], description: str, filter: WebhookFilter,
        updated_at: float, batching: Batching | None = None, on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await db.execute(
                "UPDATE webhooks SET url = ?, events = ?, description = ?, filter = ?, updated_at = ? WHERE id = ?",
                (url, orjson.dumps(list(events)).decode(), description, filter_text(filter), updated_at, webhook_id),
            )
            if batching is not None:
                await db.execute(
                    "UPDATE webhooks SET batch_max_events = ?, batch_max_bytes = ?, batch_linger = ? WHERE id = ?",
                    (batching.max_events, batching.max_bytes, batching.linger, webhook_id),
                )

        return self._writer.run(write, on_commit=on_commit)

    def set_declared_in(
        self, webhook_id: str, declared_in: str | None, *, updated_at: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await db.execute("UPDATE webhooks SET declared_in = ?, updated_at = ? WHERE id = ?",
                             (declared_in, updated_at, webhook_id))

        return self._writer.run(write, on_commit=on_commit, internal=True)

    def delete_webhook(
        self, webhook_id: str, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        async def write(db: Conn) -> None:
            await self._keep_next_delivery_id(db)
            await db.execute(
                "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE webhook_id = ?)",
                (webhook_id,),
            )
            await db.execute("DELETE FROM deliveries WHERE webhook_id = ?", (webhook_id,))
            await db.execute("DELETE FROM attempt_hours WHERE webhook_id = ?", (webhook_id,))
            await db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
            await db.execute("DELETE FROM fanout WHERE webhook_id = ?", (webhook_id,))
            self._counts.drop_webhook(webhook_id)
            self._fanout.deleted(webhook_id)

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
            self._counts.move(webhook_id, PAUSED, FAILED if drop_backlog else PENDING, int(cur.rowcount))
            # its deferred deliveries: pending now, or made failed rows
            deferred = self._fanout.set_enabled(webhook_id, True)
            if drop_backlog:
                deferred = await in_thread(db, lambda conn: self._materialise_all(conn, webhook_id, status=FAILED,
                                                                                   now=now))
            return int(cur.rowcount) + deferred

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
            async with db.execute("SELECT webhook_id, status FROM deliveries WHERE id = ?", (delivery_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                return  # deleted meanwhile
            await db.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (status, next_attempt_at, now, delivery_id),
            )
            self._counts.move(str(row[0]), str(row[1]), status)

        return self._writer.run(write, on_commit=on_commit)

    def replay(
        self, webhook_id: str, *, since: float, statuses: Sequence[str], status: str,
        next_attempt_at: float | None, now: float, on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        async def write(db: Conn) -> int:
            total = 0
            if status_of(self._fanout.work.enabled.get(webhook_id, True)) in statuses:
                # its deferred deliveries are among those replayed: rows first
                made = await in_thread(db, lambda conn: self._materialise_all(conn, webhook_id, now=now))
                if made and PENDING in statuses:
                    resync.append(webhook_id)
            for old in dict.fromkeys(statuses):  # one statement per status: exact counts
                cur = await db.execute(
                    "UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ?"
                    " WHERE webhook_id = ? AND created_at >= ? AND status = ?",
                    (status, next_attempt_at, now, webhook_id, since, old),
                )
                self._counts.move(webhook_id, old, status, int(cur.rowcount))
                total += int(cur.rowcount)
            return total

        resync: list[str] = []
        return self._writer.run(write, on_commit=self._resyncing(resync, on_commit))

    def retry_failed(
        self, where: DeliveryFilter, webhooks: Sequence[Subscriber], *, now: float,
        on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        clause, params = where_clause(replace(where, statuses=(FAILED,)))

        async def write(db: Conn) -> int:
            total = 0
            for webhook_id, enabled in webhooks:
                new = PENDING if enabled else PAUSED
                cur = await db.execute(
                    "UPDATE deliveries SET status = ?, next_attempt_at = ?, updated_at = ? WHERE id IN"  # noqa: S608
                    f" (SELECT d.id FROM deliveries d JOIN events e ON e.id = d.event_id WHERE {clause}"
                    " AND d.webhook_id = ?)",
                    (new, now if enabled else None, now, *params, webhook_id),
                )
                self._counts.move(webhook_id, FAILED, new, int(cur.rowcount))
                total += int(cur.rowcount)
            return total

        return self._writer.run(write, on_commit=on_commit)

    async def due_item(self, delivery_id: int) -> tuple[DueItem, str] | None:
        rows = await self._read(DUE_SELECT + " WHERE d.id = ?", (delivery_id,))
        return (due_row(rows[0]), str(rows[0][7])) if rows else None

    # -- retention ---------------------------------------------------------------------------
    async def prune(self, cutoff: float, limit: int = 1000) -> int:
        async def run(db: Conn) -> int:
            async with db.execute(
                "SELECT id, webhook_id, status FROM deliveries WHERE status IN ('succeeded', 'failed')"
                " AND updated_at < ? ORDER BY updated_at LIMIT ?",
                (cutoff, limit),
            ) as cur:
                rows = await cur.fetchall()
            ids = [(row[0],) for row in rows]
            if ids:
                await self._keep_next_delivery_id(db)
            for _id, webhook_id, status in rows:
                self._counts.move(str(webhook_id), str(status), None)
            await db.executemany("DELETE FROM attempts WHERE delivery_id = ?", ids)
            await db.executemany("DELETE FROM deliveries WHERE id = ?", ids)
            cursor = self._fanout.min_cursor()  # no event a cursor still needs: deferred deliveries
            cur2 = await db.execute(
                "DELETE FROM events WHERE id IN (SELECT e.id FROM events e WHERE e.created_at < ? AND e.id < ?"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id) ORDER BY e.id LIMIT ?)",
                (cutoff, self._ids.event if cursor is None else cursor, limit),
            )
            await db.execute("DELETE FROM attempt_hours WHERE hour < ?", (int(cutoff // HOUR) * HOUR - HOUR,))
            return max(len(ids), cur2.rowcount)

        return await self._writer.run(run)

    # -- deferred fan-out (sqlite_fanout.py) -----------------------------------------------------
    def _refill_deferred(self, conn: sqlite3.Connection, webhook_id: str, rows: list[DueItem],
                         limit: int) -> list[DueItem]:
        """take_due found fewer than `limit` rows of an enabled webhook with deferred
        deliveries (`Fanout.refills`): add the next ones, made rows now, in key order with
        the others (all of them are returned: the window's boundary may lie above their
        keys). None left: it stops lagging."""
        f = self._fanout
        made, self._ids.delivery = f.materialise(conn, webhook_id, limit - len(rows), now=self.clock(),
                                                 next_id=self._ids.delivery, bodies=True)
        f.flush(conn)
        return sorted([*rows, *made], key=lambda d: d.key)

    def _materialise_all(self, conn: sqlite3.Connection, webhook_id: str, *, status: str | None = None,
                         limit: int | None = None, now: float | None = None) -> int:
        """Make rows of the webhook's deferred deliveries (all, or up to `limit`); how many."""
        total = 0
        at = self.clock() if now is None else now
        while self._fanout.has_deferred(webhook_id) and (limit is None or total < limit):
            chunk = CHUNK if limit is None else min(CHUNK, limit - total)
            made, self._ids.delivery = self._fanout.materialise(conn, webhook_id, chunk, now=at,
                                                                next_id=self._ids.delivery, status=status)
            total += len(made)
        self._fanout.flush(conn)
        return total

    def _resyncing(self, resync: list[str], on_commit: Callable[[int], None] | None) -> Callable[[int], None]:
        """An on_commit that first tells the scheduler which webhooks got pending rows outside a
        refill (their windows are read again), then runs the caller's."""
        def committed(n: int) -> None:
            if resync:
                self._sink.on_fresh([FreshEvent(0, (), self.clock(), "", "", b"", resync=tuple(resync))])
            if on_commit is not None:
                on_commit(n)

        return committed

    async def _materialise_for(self, where: DeliveryFilter) -> None:
        """Before a listing or count that may include deferred deliveries: make them rows, in
        chunks of CHUNK per transaction (a people read; the scheduler's verbs never need it)."""
        if where.statuses and not {PENDING, PAUSED} & set(where.statuses):
            return  # deferred deliveries are pending or paused
        webhooks = self._fanout.deferred_in(None if where.webhook_id is None else [where.webhook_id])
        for webhook_id in webhooks:
            while webhook_id in self._fanout.state.deferred:  # committed: no transaction is half-read
                resync: list[str] = []

                async def chunk(db: Conn, webhook_id: str = webhook_id, resync: list[str] = resync) -> int:
                    made = await in_thread(db, lambda conn: self._materialise_all(conn, webhook_id, limit=CHUNK))
                    if made and self._fanout.work.enabled.get(webhook_id, True):
                        resync.append(webhook_id)
                    return made

                if not await self._writer.run(chunk, on_commit=self._resyncing(resync, None)):
                    break

    async def materialise_deferred(self) -> None:
        """Make every deferred delivery of every webhook a row (`webhookd migrate-storage`
        does, before it copies the tables)."""
        await self._materialise_for(DeliveryFilter())

    async def list_deliveries(
        self, where: DeliveryFilter, *, before: int | None = None, limit: int = 100
    ) -> list[Delivery]:
        await self._materialise_for(where)
        return await super().list_deliveries(where, before=before, limit=limit)

    async def count_deliveries(self, where: DeliveryFilter) -> int:
        await self._materialise_for(where)
        return await super().count_deliveries(where)

    # -- tracking -------------------------------------------------------------------------------
    def track_hits(self, hits: Sequence[TrackingHit], *, now: float) -> asyncio.Future[list[TrackingFacts]]:
        return self._writer.call(lambda conn: [_track_one(conn, hit, now) for hit in hits])

    def set_opt_out(self, opt_out_hash: str, *, opted_out: bool, now: float) -> asyncio.Future[bool]:
        async def write(db: Conn) -> bool:
            if opted_out:
                cur = await db.execute(
                    "INSERT OR IGNORE INTO tracking_opt_outs (hash, created_at) VALUES (?, ?)", (opt_out_hash, now)
                )
            else:
                cur = await db.execute("DELETE FROM tracking_opt_outs WHERE hash = ?", (opt_out_hash,))
            return cur.rowcount > 0

        return self._writer.run(write)

    async def count_opt_outs(self) -> int:
        rows = await self._read("SELECT count(*) FROM tracking_opt_outs", ())
        return int(rows[0][0])

    def prune_tracking(self, cutoff: float, limit: int = 1000) -> asyncio.Future[int]:
        async def write(db: Conn) -> int:
            cur = await db.execute(
                "DELETE FROM tracking_firsts WHERE key IN"
                " (SELECT key FROM tracking_firsts WHERE at < ? ORDER BY at LIMIT ?)",
                (cutoff, limit),
            )
            return cur.rowcount

        return self._writer.run(write)


    # -- scoped API tokens ----------------------------------------------------------------------
    def create_token(self, token: ApiToken) -> asyncio.Future[None]:
        t = token

        async def write(db: Conn) -> None:
            await db.execute(
                "INSERT INTO api_tokens (id, hash, domains, read_only, description, created_at, last_used_at,"
                " revoked_at) VALUES (?,?,?,?,?,?,?,?)",
                (t.id, t.hash, orjson.dumps(list(t.domains)).decode(), int(t.read_only), t.description,
                 t.created_at, t.last_used_at, t.revoked_at),
            )

        return self._writer.run(write)

    async def list_tokens(self) -> list[ApiToken]:
        rows = await self._read(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id", ())  # noqa: S608
        return [_token_row(r) for r in rows]

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        rows = await self._read(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE hash = ?", (token_hash,))  # noqa: S608
        return _token_row(rows[0]) if rows else None

    def revoke_token(self, token_id: str, *, now: float) -> asyncio.Future[bool]:
        async def write(db: Conn) -> bool:
            cur = await db.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)
            )
            return cur.rowcount > 0

        return self._writer.run(write)

    def touch_tokens(self, used: Sequence[tuple[str, float]]) -> asyncio.Future[None]:
        pairs = [(at, token_id) for token_id, at in used]

        async def write(db: Conn) -> None:
            await db.executemany(
                "UPDATE api_tokens SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?", pairs
            )

        return self._writer.run(write)


_TAKE_DUE = (DUE_SELECT + " WHERE d.webhook_id = ? AND d.status = 'pending'"  # a webhook's next deliveries, in order
             " AND (d.next_attempt_at, d.id) > (?, ?) ORDER BY d.next_attempt_at, d.id LIMIT ?")
_TOKEN_COLUMNS = "id, hash, domains, read_only, description, created_at, last_used_at, revoked_at"  # noqa: S105 - column names


def _token_row(r: Sequence[object]) -> ApiToken:
    domains = orjson.loads(str(r[2]))
    return ApiToken(
        id=str(r[0]), hash=str(r[1]), domains=tuple(str(d) for d in domains), read_only=bool(r[3]),
        description=str(r[4]), created_at=float(r[5]),  # type: ignore[arg-type]
        last_used_at=None if r[6] is None else float(r[6]),  # type: ignore[arg-type]
        revoked_at=None if r[7] is None else float(r[7]),  # type: ignore[arg-type]
    )


def _track_one(conn: sqlite3.Connection, hit: TrackingHit, now: float) -> TrackingFacts:
    """One hit, on the writer's thread, inside the writer's transaction."""
    if hit.opt_out_hash and conn.execute(
        "SELECT 1 FROM tracking_opt_outs WHERE hash = ?", (hit.opt_out_hash,)
    ).fetchone():
        return TrackingFacts(opted_out=True, first=False, delivered_at=None)
    first = conn.execute(
        "INSERT OR IGNORE INTO tracking_firsts (key, at) VALUES (?, ?)", (hit.first_key, now)
    ).rowcount > 0
    row = None
    select = (
        "SELECT json_extract(CAST(body AS TEXT), '$.timestamp') FROM events"
        " WHERE message_id = ? AND type = 'delivered'"
    )
    if hit.recipient:
        row = conn.execute(
            select + " AND recipient = ? ORDER BY id LIMIT 1", (hit.message_id, hit.recipient)
        ).fetchone()
    if row is None:
        row = conn.execute(select + " ORDER BY id LIMIT 1", (hit.message_id,)).fetchone()
    return TrackingFacts(opted_out=False, first=first, delivered_at=str(row[0]) if row and row[0] else None)


def read_webhooks(path: Path) -> list[WebhookRecord]:
    """Every stored webhook, read from the database file without writing to it (no migration,
    no writer): what `webhookd check-config --plan` compares the config with, while the daemon
    may be running (WAL: a reader never blocks it). A missing database holds none; one older
    than v6 holds no declared webhook, so it counts as none too. Raises StoreError."""
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(f"database {path} has schema version {version}, newer than this webhookd "
                                 f"({SCHEMA_VERSION}); upgrade webhookd")
            if version < 6:
                return []
            rows = conn.execute(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id").fetchall()  # noqa: S608
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    return [webhook_row(r) for r in rows]
