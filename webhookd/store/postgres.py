"""The PostgreSQL backend of `Storage` (asyncpg): every statement it runs is here, one place
per verb (batched writes in postgres_batch.py, reads for people in postgres_read.py, the
schema in postgres_schema.py).

One connection writes, through the same group-committing `Writer` as SQLite: everything
queued runs in one transaction, events and outcomes as multi-row statements, and nothing
is acknowledged before COMMIT returns. Reads for people use a small pool of their own.

When PostgreSQL cannot be reached the writer's connection is dropped and reconnected with
a backoff (`RECONNECT_MIN` doubling to `RECONNECT_MAX`); meanwhile intake and admin writes
fail at once with a "storage unavailable" StoreError (intake answers ok:false / 503, which
MTAs retry) and internal writes (outcomes, state) wait in the writer's queue until a
commit succeeds. Losing, retrying and regaining the connection are logged, and counted in
`reconnects` / `connected` (metrics: webhookd_store_reconnects_total, webhookd_store_connected).

The password is never part of the DSN (the config refuses one there): it comes from
`password_file`, read at each connection, or from libpq's environment (PGPASSWORD,
PGPASSFILE / ~/.pgpass), which asyncpg reads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import orjson
import structlog

from webhookd.batching import Batching
from webhookd.events import Event
from webhookd.filters import WebhookFilter
from webhookd.reasons import Lead
from webhookd.store.base import FreshSink
from webhookd.store.model import (
    FAILED,
    PAUSED,
    PENDING,
    ApiToken,
    BatchOutcomeRecord,
    DeliveryFilter,
    DueItem,
    OutcomeRecord,
    StoreError,
    Subscriber,
    TrackingFacts,
    TrackingHit,
    WebhookRecord,
    WebhookState,
)
from webhookd.store.postgres_batch import BatchOutcomes, Conn, Events, EventSink, Outcomes
from webhookd.store.postgres_cluster import Fleet
from webhookd.store.postgres_read import Reads
from webhookd.store.postgres_rows import (
    CONNECTION_ERRORS,
    DB_ERRORS,
    DUE_SELECT,
    TOKEN_COLUMNS,
    WEBHOOK_COLUMNS,
    Params,
    count,
    describe,
    due_row,
    notify_webhook,
    notify_work,
    token_row,
    webhook_row,
    where_clause,
)
from webhookd.store.postgres_schema import INSTANCE_LOCK, SCHEMA_VERSION, migrate, schema_version
from webhookd.store.sqlite_rows import HOUR, filter_text
from webhookd.store.writer import Writer, WriterBacked

log = structlog.get_logger("webhookd.store")
T = TypeVar("T")

RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0  # a statement that hangs this long (a partition) drops the connection


def redact_dsn(dsn: str) -> str:
    """The DSN as logged: scheme, user, hosts (with ports) and database; never a password or
    the query (the config refuses a DSN with a password; this holds even if one slipped by)."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return f"{parts.scheme}://{user + '@' if user else ''}{hosts}{parts.path}"


class _Transactions:
    def __init__(self, backend: PostgresStorage) -> None:
        self._backend = backend
        self._tr: Any = None

    async def begin(self) -> Conn:
        b = self._backend
        b._events.reset()
        conn = await b._writer_connection()
        tr = conn.transaction()
        try:
            await tr.start()
        except CONNECTION_ERRORS:
            b._drop_connection()
            raise
        self._tr = tr
        return conn

    async def commit(self, conn: Conn) -> None:
        tr, self._tr = self._tr, None
        await tr.commit()

    async def rollback(self, conn: Conn) -> None:
        tr, self._tr = self._tr, None
        try:
            if tr is not None:
                await tr.rollback()
        except BaseException:
            self._backend._drop_connection()  # cannot tell what state it is in: start afresh
            raise
        if conn.is_closed():
            self._backend._drop_connection()

    async def call(self, conn: Conn, fn: Callable[[Conn], None]) -> None:
        """asyncpg has no database thread to hand off to: every batcher and operation of this
        backend is asynchronous, so a synchronous function here touches memory only."""
        fn(conn)

    async def atomic(self, fn: Callable[[Conn], None]) -> None:
        conn = await self.begin()
        try:
            fn(conn)
            await self.commit(conn)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.rollback(conn)
            raise

    def describe(self, exc: BaseException) -> str:
        return describe(exc)

    def transient(self, exc: BaseException) -> bool:
        """A deadlock with another daemon's transaction (or a serialization failure): run it again."""
        return isinstance(exc, asyncpg.exceptions.DeadlockDetectedError | asyncpg.exceptions.SerializationError)


class PostgresStorage(Reads, WriterBacked):
    """`Storage` on one PostgreSQL database (several daemons may share it: ids never collide)."""

    def __init__(
        self,
        dsn: str,
        *,
        password_file: Path | None = None,
        clock: Callable[[], float] = time.time,
        on_fresh: FreshSink | None = None,
        pool_size: int = 4,
        exclusive: bool = False,
        lease: float | None = None,
        home: str = "",
    ) -> None:
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self.password_file = password_file
        self.clock = clock
        self.pool_size = pool_size
        # INSTANCE_LOCK, held exclusively (migrate-storage: nobody else may use the database) or
        # shared (a daemon: several share the database, none while a copy runs)
        self.exclusive = exclusive
        # with a lease: a daemon in a fleet sharing this database's queue (postgres_cluster.py)
        self.fleet: Fleet | None = Fleet(self, lease=lease, home=home) if lease is not None else None
        self.reconnect_min = RECONNECT_MIN
        self.reconnect_max = RECONNECT_MAX
        self.reconnects = 0  # connections regained after a loss
        self._sink = EventSink(on_fresh or (lambda _events: None))
        self._conn: Conn | None = None
        self._pool: asyncpg.Pool | None = None
        self._writer: Writer[Conn, Conn] = Writer(_Transactions(self))
        self._events = Events(clock, self._sink)
        self._events.claimer = self.fleet.instance_id if self.fleet is not None else None
        self._outcomes = Outcomes(fleet=self.fleet is not None)
        self._batch_outcomes = BatchOutcomes(fleet=self.fleet is not None)
        self._lost_at: float | None = None  # monotonic time the writer's connection was found lost
        self._retry_at = 0.0
        self._retry_in = RECONNECT_MIN

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the writer holds a connection that was not found lost."""
        return self._conn is not None and not self._conn.is_closed()

    def received(self) -> dict[str, int]:
        return self._sink.received

    @property
    def writer_pid(self) -> int | None:
        """The server process of the writer's connection (its own notifications come from it)."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    def _connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "dsn": self.dsn, "timeout": CONNECT_TIMEOUT, "command_timeout": COMMAND_TIMEOUT,
            "server_settings": {"application_name": "webhookd"},
        }
        if self.password_file is not None:
            try:
                args["password"] = self.password_file.read_text(encoding="utf-8").strip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                raise StoreError(Lead.STORAGE.text(
                    f" unavailable: cannot read storage.password_file {self.password_file}: {reason}")) from None
        return args

    async def _connect(self) -> Conn:
        conn: Conn = await asyncpg.connect(**self._connect_args())
        how = "pg_try_advisory_lock" if self.exclusive else "pg_try_advisory_lock_shared"
        try:
            held = await conn.fetchval(f"SELECT {how}($1, hashtext(current_schema()))", INSTANCE_LOCK)
        except BaseException:
            conn.terminate()
            raise
        if not held:
            conn.terminate()
            raise StoreError(Lead.STORAGE.text(
                f" unavailable: a webhookd is running on {self.where}; stop every daemon using it first"
                if self.exclusive else
                f" unavailable: webhookd migrate-storage is copying into {self.where}; start the daemon"
                " when it is done"))
        return conn

    async def open(self) -> None:
        try:
            conn = await self._connect()
            self._conn = conn
            await migrate(conn, now=self.clock(), where=self.where)
            await self._events.event_ids.load(conn)
            await self._events.delivery_ids.load(conn)
            args = self._connect_args()
            self._pool = await asyncpg.create_pool(min_size=0, max_size=self.pool_size, **args)
            self._events.pool = self._pool
        except StoreError:
            await self._close_connections()
            raise
        except DB_ERRORS as exc:
            await self._close_connections()
            raise StoreError(f"cannot open database {self.where}: {describe(exc)}") from None
        except BaseException:
            await self._close_connections()
            raise
        self._writer.start()
        if self.fleet is not None:
            try:
                await self.fleet.start()
            except DB_ERRORS as exc:
                await self.close()
                raise StoreError(f"cannot join the daemons on {self.where}: {describe(exc)}") from None

    async def close(self) -> None:
        await self._writer.close()
        if self.fleet is not None and self._pool is not None:
            await self.fleet.stop()
            await self.fleet.release()  # after the last outcome committed: the others take the rest now
        await self._close_connections()

    async def _close_connections(self) -> None:
        conn, self._conn = self._conn, None
        pool, self._pool = self._pool, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()

    # -- the writer's connection: lost, retried with a backoff, regained -----------------------
    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
            if self._lost_at is None:
                self._lost_at = time.monotonic()
                self._retry_in = self.reconnect_min
                log.warning("storage connection lost; reconnecting", backend="postgresql", database=self.where)

    def _reconnect_failed(self, error: str) -> None:
        self._retry_at = time.monotonic() + self._retry_in
        log.warning("storage reconnect failed", backend="postgresql", database=self.where, error=error,
                    retry_in_s=round(self._retry_in, 2))
        self._retry_in = min(self._retry_in * 2, self.reconnect_max)

    async def _writer_connection(self) -> Conn:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        self._drop_connection()
        now = time.monotonic()
        if now < self._retry_at:
            raise StoreError(Lead.STORAGE.text(
                f" unavailable: cannot reach PostgreSQL (next try in {self._retry_at - now:.1f}s)"))
        try:
            conn = await self._connect()
        except StoreError as exc:
            self._reconnect_failed(str(exc))
            raise
        except DB_ERRORS as exc:
            self._reconnect_failed(type(exc).__name__)
            raise StoreError(describe(exc)) from None
        self._conn = conn
        self._retry_in, self._retry_at = self.reconnect_min, 0.0
        if self._lost_at is not None:
            self.reconnects += 1
            log.info("storage reconnected", backend="postgresql", database=self.where,
                     down_s=round(time.monotonic() - self._lost_at, 2))
            self._lost_at = None
        return conn

    async def in_transaction(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """`fn` in one of the writer's transactions, after everything queued before it
        (`webhookd migrate-storage` copies a whole database in one)."""
        return await self._writer.run(fn)

    # -- intake ------------------------------------------------------------------------------
    def submit(self, event: Event, subscribers: Sequence[Subscriber]) -> asyncio.Future[str]:
        wait = self._retry_at - time.monotonic()
        if self._conn is None and self._lost_at is not None and wait > 0:
            # Known unreachable, and not yet time to try again: refuse at once (the MTA defers
            # and retries) rather than wait behind the writer's retries of internal writes.
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            fut.set_exception(StoreError(Lead.STORAGE.text(
                f" unavailable: cannot reach PostgreSQL (next try in {wait:.1f}s)")))
            return fut
        return self._writer.add(self._events, (event, subscribers))

    # -- the scheduler's verbs --------------------------------------------------------------
    async def load_webhooks(self) -> list[WebhookRecord]:
        rows = await self._fetch(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id")  # noqa: S608
        return [webhook_row(r) for r in rows]

    def take_due(
        self, webhook_id: str, after: tuple[float, int], limit: int, *,
        on_commit: Callable[[list[DueItem]], None] | None = None,
    ) -> asyncio.Future[list[DueItem]]:
        fleet = self.fleet

        async def read(conn: Conn) -> list[DueItem]:
            if fleet is None:
                rows = await conn.fetch(
                    DUE_SELECT + " WHERE d.webhook_id = $1 AND d.status = 'pending'"
                    " AND (d.next_attempt_at, d.id) > ($2::float8, $3::bigint) ORDER BY d.next_attempt_at, d.id"
                    " LIMIT $4",
                    webhook_id, after[0], after[1], limit,
                )
                return [due_row(r) for r in rows]
            # Claim them: rows nobody holds, this instance's own, and those of an instance whose
            # lease ended; rows another transaction has locked (another instance claiming or
            # recording them) are skipped, never waited for.
            rows = await conn.fetch(
                "WITH c AS (SELECT d.id FROM deliveries d WHERE d.webhook_id = $1 AND d.status = 'pending'"
                " AND (d.next_attempt_at, d.id) > ($2::float8, $3::bigint) AND (d.claimed_by IS NULL"
                " OR d.claimed_by = $5 OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = d.claimed_by"
                " AND i.lease_until >= extract(epoch from clock_timestamp())))"
                " ORDER BY d.next_attempt_at, d.id LIMIT $4 FOR UPDATE OF d SKIP LOCKED),"
                " u AS (UPDATE deliveries d SET claimed_by = $5, lease_until = extract(epoch from clock_timestamp())"
                " + $6 FROM c WHERE d.id = c.id RETURNING d.id, d.webhook_id, d.next_attempt_at, d.attempts,"
                " d.event_id, d.status)"
                " SELECT u.id, u.webhook_id, u.next_attempt_at, u.attempts, e.uid, e.type, e.body, u.status"
                " FROM u JOIN events e ON e.id = u.event_id ORDER BY u.next_attempt_at, u.id",
                webhook_id, after[0], after[1], limit, fleet.instance_id, fleet.lease,
            )
            return [due_row(r) for r in rows]

        return self._writer.run(read, on_commit=on_commit, internal=True)

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
        async def write(conn: Conn) -> None:
            # a new epoch: attempts started before this change no longer count (as in memory)
            await conn.execute(
                "UPDATE webhooks SET enabled = $1, consecutive_failures = $2, backoff_until = $3,"
                " disabled_reason = $4, updated_at = $5, gate_epoch = gate_epoch + 1 WHERE id = $6",
                state.enabled, state.consecutive_failures, state.backoff_until, state.disabled_reason,
                state.updated_at, webhook_id,
            )
            await notify_webhook(conn, webhook_id)
            if pause_pending:
                await conn.execute(
                    "UPDATE deliveries SET status = 'paused', next_attempt_at = NULL, updated_at = $1"
                    " WHERE webhook_id = $2 AND status = 'pending'",
                    state.updated_at, webhook_id,
                )

        return self._writer.run(write, on_commit=on_commit, internal=True)

    # -- webhook administration ---------------------------------------------------------------
    def create_webhook(
        self, webhook: WebhookRecord, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        w = webhook

        async def write(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES"  # noqa: S608
                " ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19)",
                w.id, w.url, orjson.dumps(list(w.events)).decode(), w.description, w.enabled,
                w.disabled_reason, w.consecutive_failures, w.backoff_until, w.secret, w.previous_secret,
                w.previous_secret_expires_at, w.created_at, w.updated_at, filter_text(w.filter), w.name,
                w.declared_in, w.batching.max_events, w.batching.max_bytes, w.batching.linger,
            )
            await notify_webhook(conn, w.id)

        return self._writer.run(write, on_commit=on_commit)

    def update_webhook(
        self, webhook_id: str, *, url: str, events: tuple[str, ...], description: str, filter: WebhookFilter,
        updated_at: float, batching: Batching | None = None, on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "UPDATE webhooks SET url = $1, events = $2, description = $3, filter = $4, updated_at = $5"
                " WHERE id = $6",
                url, orjson.dumps(list(events)).decode(), description, filter_text(filter), updated_at, webhook_id,
            )
            if batching is not None:  # None: the settings stay as they are
                await conn.execute(
                    "UPDATE webhooks SET batch_max_events = $1, batch_max_bytes = $2, batch_linger = $3 WHERE id = $4",
                    batching.max_events, batching.max_bytes, batching.linger, webhook_id,
                )
            await notify_webhook(conn, webhook_id)

        return self._writer.run(write, on_commit=on_commit)

    def set_declared_in(
        self, webhook_id: str, declared_in: str | None, *, updated_at: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(conn: Conn) -> None:
            await conn.execute("UPDATE webhooks SET declared_in = $1, updated_at = $2 WHERE id = $3",
                               declared_in, updated_at, webhook_id)
            await notify_webhook(conn, webhook_id)

        return self._writer.run(write, on_commit=on_commit, internal=True)

    def delete_webhook(
        self, webhook_id: str, *, on_commit: Callable[[None], None] | None = None
    ) -> asyncio.Future[None]:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE webhook_id = $1)",
                webhook_id,
            )
            await conn.execute("DELETE FROM deliveries WHERE webhook_id = $1", webhook_id)
            await conn.execute("DELETE FROM attempt_hours WHERE webhook_id = $1", webhook_id)
            await conn.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)
            await notify_webhook(conn, webhook_id)

        return self._writer.run(write, on_commit=on_commit, internal=True)

    def enable_webhook(
        self, webhook_id: str, *, now: float, drop_backlog: bool, on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        async def write(conn: Conn) -> int:
            await conn.execute(
                "UPDATE webhooks SET enabled = true, disabled_reason = NULL, consecutive_failures = 0,"
                " backoff_until = 0, updated_at = $1, gate_epoch = gate_epoch + 1, probe_by = NULL,"
                " probe_until = NULL WHERE id = $2",
                now, webhook_id,
            )
            await notify_webhook(conn, webhook_id)
            if drop_backlog:
                status = await conn.execute(
                    "UPDATE deliveries SET status = 'failed', next_attempt_at = NULL,"
                    " last_error = 'backlog dropped when the webhook was re-enabled', updated_at = $1"
                    " WHERE webhook_id = $2 AND status = 'paused'",
                    now, webhook_id,
                )
            else:
                status = await conn.execute(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, updated_at = $1,"
                    " claimed_by = NULL WHERE webhook_id = $2 AND status = 'paused'",
                    now, webhook_id,
                )
                if count(status):
                    await notify_work(conn, [webhook_id])
            return count(status)

        return self._writer.run(write, on_commit=on_commit, internal=True)

    def rotate_secret(
        self, webhook_id: str, *, secret: str, previous_secret: str, previous_expires_at: float, now: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "UPDATE webhooks SET secret = $1, previous_secret = $2, previous_secret_expires_at = $3,"
                " updated_at = $4 WHERE id = $5",
                secret, previous_secret, previous_expires_at, now, webhook_id,
            )
            await notify_webhook(conn, webhook_id)

        return self._writer.run(write, on_commit=on_commit)

    # -- deliveries -------------------------------------------------------------------------
    def reschedule(
        self, delivery_id: int, *, status: str, next_attempt_at: float | None, now: float,
        on_commit: Callable[[None], None] | None = None,
    ) -> asyncio.Future[None]:
        async def write(conn: Conn) -> None:
            webhook_id = await conn.fetchval(
                "UPDATE deliveries SET status = $1, next_attempt_at = $2, updated_at = $3, claimed_by = NULL"
                " WHERE id = $4 RETURNING webhook_id",
                status, next_attempt_at, now, delivery_id,
            )
            if webhook_id is not None and status == PENDING:
                await notify_work(conn, [str(webhook_id)])

        return self._writer.run(write, on_commit=on_commit)

    def replay(
        self, webhook_id: str, *, since: float, statuses: Sequence[str], status: str,
        next_attempt_at: float | None, now: float, on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        async def write(conn: Conn) -> int:
            done = await conn.execute(
                "UPDATE deliveries SET status = $1, next_attempt_at = $2, updated_at = $3, claimed_by = NULL"
                " WHERE webhook_id = $4 AND created_at >= $5 AND status = ANY($6::text[])",
                status, next_attempt_at, now, webhook_id, since, list(dict.fromkeys(statuses)),
            )
            if count(done) and status == PENDING:
                await notify_work(conn, [webhook_id])
            return count(done)

        return self._writer.run(write, on_commit=on_commit)

    def retry_failed(
        self, where: DeliveryFilter, webhooks: Sequence[Subscriber], *, now: float,
        on_commit: Callable[[int], None] | None = None,
    ) -> asyncio.Future[int]:
        async def write(conn: Conn) -> int:
            total = 0
            for webhook_id, enabled in webhooks:
                p = Params(PENDING if enabled else PAUSED, now if enabled else None, now)
                clause = where_clause(replace(where, statuses=(FAILED,)), p)
                done = await conn.execute(
                    "UPDATE deliveries SET status = $1, next_attempt_at = $2, updated_at = $3, claimed_by = NULL"  # noqa: S608
                    " WHERE id IN"
                    f" (SELECT d.id FROM deliveries d JOIN events e ON e.id = d.event_id WHERE {clause}"
                    f" AND d.webhook_id = {p(webhook_id)})",
                    *p.values,
                )
                total += count(done)
                if count(done) and enabled:
                    await notify_work(conn, [webhook_id])
            return total

        return self._writer.run(write, on_commit=on_commit)

    async def due_item(self, delivery_id: int) -> tuple[DueItem, str] | None:
        rows = await self._fetch(DUE_SELECT + " WHERE d.id = $1", delivery_id)
        return (due_row(rows[0]), str(rows[0][7])) if rows else None

    # -- retention ---------------------------------------------------------------------------
    async def prune(self, cutoff: float, limit: int = 1000) -> int:
        async def run(conn: Conn) -> int:
            ids = [int(r[0]) for r in await conn.fetch(
                "SELECT id FROM deliveries WHERE status IN ('succeeded', 'failed') AND updated_at < $1"
                " ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                cutoff, limit,
            )]
            if ids:
                await conn.execute("DELETE FROM attempts WHERE delivery_id = ANY($1::bigint[])", ids)
                await conn.execute("DELETE FROM deliveries WHERE id = ANY($1::bigint[])", ids)
            events = await conn.execute(
                "DELETE FROM events WHERE id IN (SELECT e.id FROM events e WHERE e.created_at < $1"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id) ORDER BY e.id LIMIT $2)",
                cutoff, limit,
            )
            await conn.execute("DELETE FROM attempt_hours WHERE hour < $1", int(cutoff // HOUR) * HOUR - HOUR)
            return max(len(ids), count(events))

        return await self._writer.run(run)

    # -- tracking -------------------------------------------------------------------------------
    def track_hits(self, hits: Sequence[TrackingHit], *, now: float) -> asyncio.Future[list[TrackingFacts]]:
        async def write(conn: Conn) -> list[TrackingFacts]:
            return [await _track_one(conn, hit, now) for hit in hits]

        return self._writer.run(write)

    def set_opt_out(self, opt_out_hash: str, *, opted_out: bool, now: float) -> asyncio.Future[bool]:
        async def write(conn: Conn) -> bool:
            if opted_out:
                done = await conn.execute(
                    "INSERT INTO tracking_opt_outs (hash, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    opt_out_hash, now,
                )
            else:
                done = await conn.execute("DELETE FROM tracking_opt_outs WHERE hash = $1", opt_out_hash)
            return count(done) > 0

        return self._writer.run(write)

    async def count_opt_outs(self) -> int:
        return int((await self._fetch("SELECT count(*) FROM tracking_opt_outs"))[0][0])

    def prune_tracking(self, cutoff: float, limit: int = 1000) -> asyncio.Future[int]:
        async def write(conn: Conn) -> int:
            return count(await conn.execute(
                "DELETE FROM tracking_firsts WHERE key IN"
                " (SELECT key FROM tracking_firsts WHERE at < $1 ORDER BY at LIMIT $2)",
                cutoff, limit,
            ))

        return self._writer.run(write)

    # -- scoped API tokens ----------------------------------------------------------------------
    def create_token(self, token: ApiToken) -> asyncio.Future[None]:
        t = token

        async def write(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",  # noqa: S608
                t.id, t.hash, orjson.dumps(list(t.domains)).decode(), t.read_only, t.description,
                t.created_at, t.last_used_at, t.revoked_at,
            )

        return self._writer.run(write)

    async def list_tokens(self) -> list[ApiToken]:
        rows = await self._fetch(f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id")  # noqa: S608
        return [token_row(r) for r in rows]

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        rows = await self._fetch(f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE hash = $1", token_hash)  # noqa: S608
        return token_row(rows[0]) if rows else None

    def revoke_token(self, token_id: str, *, now: float) -> asyncio.Future[bool]:
        async def write(conn: Conn) -> bool:
            return count(await conn.execute(
                "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL", now, token_id
            )) > 0

        return self._writer.run(write)

    def touch_tokens(self, used: Sequence[tuple[str, float]]) -> asyncio.Future[None]:
        latest: dict[str, float] = {}
        for token_id, at in used:
            latest[token_id] = max(at, latest.get(token_id, at))
        token_ids = sorted(latest)

        async def write(conn: Conn) -> None:
            await conn.execute(
                "UPDATE api_tokens t SET last_used_at = greatest(coalesce(t.last_used_at, 0), u.at)"
                " FROM unnest($1::text[], $2::float8[]) AS u(id, at) WHERE t.id = u.id",
                token_ids, [latest[t] for t in token_ids],
            )

        return self._writer.run(write)


async def read_webhooks(dsn: str, *, password_file: Path | None = None) -> list[WebhookRecord]:
    """Every stored webhook, read without migrating or writing anything (what `webhookd
    check-config --plan` compares the config with while the daemon may be running). A
    database webhookd never touched holds none. Raises StoreError."""
    storage = PostgresStorage(dsn, password_file=password_file)
    try:
        conn = await storage._connect()
    except DB_ERRORS as exc:
        raise StoreError(f"cannot read {storage.where}: {describe(exc)}") from None
    try:
        version = await schema_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(f"database {storage.where} has schema version {version}, newer than this webhookd "
                             f"({SCHEMA_VERSION}); upgrade webhookd")
        if version == 0:
            return []
        rows = await conn.fetch(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id")  # noqa: S608
        return [webhook_row(r) for r in rows]
    except DB_ERRORS as exc:
        raise StoreError(f"cannot read {storage.where}: {describe(exc)}") from None
    finally:
        await conn.close()


async def _track_one(conn: Conn, hit: TrackingHit, now: float) -> TrackingFacts:
    """One hit, inside the writer's transaction."""
    if hit.opt_out_hash and await conn.fetchval(
        "SELECT 1 FROM tracking_opt_outs WHERE hash = $1", hit.opt_out_hash
    ):
        return TrackingFacts(opted_out=True, first=False, delivered_at=None)
    first = count(await conn.execute(
        "INSERT INTO tracking_firsts (key, at) VALUES ($1, $2) ON CONFLICT DO NOTHING", hit.first_key, now
    )) > 0
    select = (
        "SELECT convert_from(body, 'UTF8')::jsonb ->> 'timestamp' FROM events"
        " WHERE message_id = $1 AND type = 'delivered'"
    )
    found = None
    if hit.recipient:
        found = await conn.fetchrow(select + " AND lower(recipient) = lower($2) ORDER BY id LIMIT 1",
                                    hit.message_id, hit.recipient)
    if found is None:
        found = await conn.fetchrow(select + " ORDER BY id LIMIT 1", hit.message_id)
    return TrackingFacts(opted_out=False, first=first, delivered_at=str(found[0]) if found and found[0] else None)
