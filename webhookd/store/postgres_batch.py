"""The PostgreSQL backend's batchers: a run of submitted events, a run of attempt outcomes,
a run of batch attempts' outcomes (webhookd.batching), each written with a few multi-row
statements (`unnest` of arrays) in the writer's transaction, and the id blocks that number
their rows."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from webhookd.events import Event
from webhookd.ids import new_id
from webhookd.store.model import (
    PAUSED,
    PENDING,
    SUCCEEDED,
    BatchOutcomeRecord,
    FreshEvent,
    OutcomeRecord,
    StoreError,
    Subscriber,
)
from webhookd.store.postgres_rows import notify_webhook
from webhookd.store.postgres_schema import BLOCK_LOCK, ID_BLOCK
from webhookd.store.sqlite_rows import HOUR

Conn = asyncpg.Connection


class IdBlocks:
    """Ids from one of the schema's block sequences (`INCREMENT BY ID_BLOCK`): a `nextval`
    gives this instance the block [v, v + ID_BLOCK), numbered in memory. Sequences are not
    transactional, so no other instance ever gets the same block, and a block is never
    handed out twice even when the transaction that took it rolls back (the ids of a
    rolled-back batch are simply never used).

    An event with more subscribers than a block holds needs consecutive blocks: every
    instance takes its blocks in a short transaction of its own (a reader connection, not
    the writer's) holding `BLOCK_LOCK`, so nobody's nextval falls between them."""

    def __init__(self, sequence: str, size: int = ID_BLOCK) -> None:
        self.sequence = sequence
        self.size = size
        self._next = 0
        self._end = 0

    async def load(self, conn: Conn) -> None:
        """The block size is the sequence's increment (as the schema made it)."""
        self.size = int(await conn.fetchval("SELECT seqincrement FROM pg_sequence WHERE seqrelid = $1::regclass",
                                            self.sequence))

    async def take(self, pool: asyncpg.Pool, n: int) -> int:
        """The first of `n` contiguous ids (one event's deliveries are numbered contiguously)."""
        if n <= self._end - self._next:
            first = self._next
            self._next += n
            return first
        blocks = -(-n // self.size)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", BLOCK_LOCK)
            starts = [int(r[0]) for r in await conn.fetch(
                "SELECT nextval($1::regclass) FROM generate_series(1, $2)", self.sequence, blocks)]
        if sorted(starts) != [starts[0] + i * self.size for i in range(blocks)]:
            raise StoreError(f"storage error: {self.sequence} handed out blocks that are not consecutive")
        self._next, self._end = starts[0] + n, starts[0] + blocks * self.size
        return starts[0]


@dataclass
class EventSink:
    """What the event batcher hands on after its commit."""

    on_fresh: Callable[[list[FreshEvent]], None]
    received: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _New:
    event: Event
    subscribers: Sequence[Subscriber]
    event_id: int
    uid: str
    first_delivery: int


class Events:
    """Inserts a run of submitted events and their deliveries with two multi-row INSERTs."""

    def __init__(self, clock: Callable[[], float], sink: EventSink) -> None:
        self._clock, self._sink = clock, sink
        self.pool: asyncpg.Pool | None = None  # where id blocks are taken (set at open)
        self.event_ids = IdBlocks("event_ids")
        self.delivery_ids = IdBlocks("delivery_ids")
        self._runs: deque[tuple[list[FreshEvent], list[str]]] = deque()  # this transaction's, in order
        self.claimer: str | None = None  # the instance whose window takes the new rows (a fleet's member)

    async def execute(self, conn: Conn, items: list[tuple[Event, Sequence[Subscriber]]]) -> list[str]:
        now = self._clock()
        keys = [ev.idempotency_key for ev, _ in items if ev.idempotency_key is not None]
        known: dict[str, str] = {}
        if keys:
            rows = await conn.fetch(
                "SELECT idempotency_key, uid FROM events WHERE idempotency_key = ANY($1::text[])", keys
            )
            known = {r[0]: r[1] for r in rows}
        results: list[str | _New] = []
        new: list[_New] = []
        for ev, subscribers in items:
            key = ev.idempotency_key
            if key is not None and key in known:
                results.append(known[key])
                continue
            uid = new_id("evt")
            if key is not None:
                known[key] = uid
            pool = self.pool
            assert pool is not None, "opened"
            entry = _New(ev, subscribers, await self.event_ids.take(pool, 1), uid,
                         await self.delivery_ids.take(pool, len(subscribers)) if subscribers else 0)
            new.append(entry)
            results.append(entry)
        if new:
            inserted = {int(r[0]) for r in await conn.fetch(
                "INSERT INTO events (id, uid, idempotency_key, type, body, created_at, message_id, recipient)"
                " SELECT u.id, u.uid, u.key, u.type, u.body, $6, u.message_id, u.recipient FROM unnest("
                "$1::bigint[], $2::text[], $3::text[], $4::text[], $5::bytea[], $7::text[], $8::text[])"
                " AS u(id, uid, key, type, body, message_id, recipient)"
                " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
                [n.event_id for n in new], [n.uid for n in new], [n.event.idempotency_key for n in new],
                [n.event.type for n in new], [n.event.body for n in new], now,
                [n.event.message_id for n in new], [n.event.recipient for n in new],
            )}
            if len(inserted) < len(new):
                # Another instance committed the same idempotency key meanwhile (it waited for that
                # transaction): these are repeats, answered with the first one's id.
                lost = [n for n in new if n.event_id not in inserted]
                rows = await conn.fetch(
                    "SELECT idempotency_key, uid FROM events WHERE idempotency_key = ANY($1::text[])",
                    [n.event.idempotency_key for n in lost],
                )
                first = {r[0]: r[1] for r in rows}
                gone = {n.event_id for n in lost}
                results = [first[r.event.idempotency_key]
                           if isinstance(r, _New) and r.event_id in gone else r for r in results]
                new = [n for n in new if n.event_id not in gone]
        fresh: list[FreshEvent] = []
        d_ids: list[int] = []
        d_events: list[int] = []
        d_webhooks: list[str] = []
        d_statuses: list[str] = []
        d_next: list[float | None] = []
        for n in new:
            if n.subscribers:
                fresh.append(FreshEvent(n.first_delivery, n.subscribers, now, n.uid, n.event.type, n.event.body))
            for i, (webhook_id, enabled) in enumerate(n.subscribers):
                d_ids.append(n.first_delivery + i)
                d_events.append(n.event_id)
                d_webhooks.append(webhook_id)
                d_statuses.append(PENDING if enabled else PAUSED)
                d_next.append(now if enabled else None)
        if d_ids:
            await conn.execute(
                "INSERT INTO deliveries (id, event_id, webhook_id, status, next_attempt_at, created_at, updated_at,"
                " claimed_by) SELECT u.id, u.event_id, u.webhook_id, u.status, u.next_at, $6, $6, $7 FROM unnest("
                "$1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::float8[])"
                " AS u(id, event_id, webhook_id, status, next_at)",
                d_ids, d_events, d_webhooks, d_statuses, d_next, now, self.claimer,
            )
        self._runs.append((fresh, [n.event.type for n in new]))
        return [r.uid if isinstance(r, _New) else r for r in results]

    def reset(self) -> None:
        self._runs.clear()

    def committed(self, items: list[tuple[Event, Sequence[Subscriber]]], results: list[str]) -> None:
        fresh, types = self._runs.popleft()
        received = self._sink.received
        for event_type in types:
            received[event_type] += 1
        if fresh:
            self._sink.on_fresh(fresh)


class Outcomes:
    """Writes a run of attempt outcomes: delivery rows, attempt rows, hour counts, last attempt.
    In a fleet (`fleet=True`), a success also closes a failure episode another instance
    stored that this one had not heard of yet (its gate looked healthy here)."""

    def __init__(self, *, fleet: bool = False) -> None:
        self.fleet = fleet

    async def execute(self, conn: Conn, items: list[OutcomeRecord]) -> list[None]:
        # Rows are locked in id order (several instances never deadlock on each other's runs),
        # webhooks first in a fleet (as Fleet.settle does); deliveries deleted meanwhile (their
        # webhook went) record nothing.
        if self.fleet:
            await lock_webhooks(conn, {r.webhook_id for r in items})
        ids = sorted({r.delivery_id for r in items})
        present = {int(r[0]) for r in await conn.fetch(
            "SELECT id FROM deliveries WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", ids
        )}
        kept = [r for r in items if r.delivery_id in present]
        if not kept:
            return [None] * len(items)
        last_of: dict[int, OutcomeRecord] = {}
        for r in kept:  # several outcomes of one delivery in a run: the last one is its state
            last_of[r.delivery_id] = r
        rows = sorted(last_of.values(), key=lambda r: r.delivery_id)
        await conn.execute(
            "UPDATE deliveries d SET status = u.status, attempts = u.attempts, next_attempt_at = u.next_at,"
            " last_status_code = u.code, last_error = u.error, updated_at = u.updated_at FROM unnest("
            "$1::bigint[], $2::text[], $3::int[], $4::float8[], $5::int[], $6::text[], $7::float8[])"
            " AS u(id, status, attempts, next_at, code, error, updated_at) WHERE d.id = u.id",
            [r.delivery_id for r in rows], [r.status for r in rows], [r.attempts for r in rows],
            [r.next_attempt_at for r in rows], [r.status_code for r in rows], [r.error for r in rows],
            [r.updated_at for r in rows],
        )
        await _insert_attempts(conn, [_AttemptRow(r.delivery_id, r) for r in kept])
        if self.fleet:
            await close_episodes(conn, {r.webhook_id for r in kept if r.status == SUCCEEDED})
        hours: Counter[tuple[int, str, bool]] = Counter()
        last: dict[str, _Attempted] = {}
        for r in kept:
            hours[(int(r.at // HOUR) * HOUR, r.webhook_id, r.error is None)] += 1
            _note_last(last, r.webhook_id, r)
        await _add_hours_and_last(conn, hours, last)
        return [None] * len(items)

    def committed(self, items: list[OutcomeRecord], results: list[None]) -> None:
        pass


class BatchOutcomes:
    """Writes a run of batch attempts' outcomes (webhookd.batching), as SQLite's does: each
    batch's deliveries get their new state (next_attempt_at for the pending ones only), an
    attempt row each carrying the batch id, and the hour counts and the webhook's last
    attempt once per batch; deliveries deleted meanwhile (their webhook went) record nothing.
    The whole run is one UPDATE and one INSERT (`unnest` of arrays), whatever its size."""

    def __init__(self, *, fleet: bool = False) -> None:
        self.fleet = fleet

    async def execute(self, conn: Conn, items: list[BatchOutcomeRecord]) -> list[None]:
        if self.fleet:
            await lock_webhooks(conn, {r.webhook_id for r in items})
        ids = sorted({did for r in items for did in r.delivery_ids})
        present = {int(r[0]) for r in await conn.fetch(  # locked in id order, as Outcomes does
            "SELECT id FROM deliveries WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", ids
        )}
        state: dict[int, tuple[str, int, float | None, BatchOutcomeRecord]] = {}
        rows: list[_AttemptRow] = []
        hours: Counter[tuple[int, str, bool]] = Counter()
        last: dict[str, _Attempted] = {}
        for r in items:
            n = 0
            for did, status, attempts in zip(r.delivery_ids, r.statuses, r.attempts, strict=True):
                if did not in present:
                    continue
                state[did] = (status, attempts, r.next_attempt_at if status == PENDING else None, r)  # the last wins
                rows.append(_AttemptRow(did, r))
                n += 1
            if n:
                hours[(int(r.at // HOUR) * HOUR, r.webhook_id, r.error is None)] += n
                _note_last(last, r.webhook_id, r)
        if not rows:
            return [None] * len(items)
        order = sorted(state)
        await conn.execute(
            "UPDATE deliveries d SET status = u.status, attempts = u.attempts, next_attempt_at = u.next_at,"
            " last_status_code = u.code, last_error = u.error, updated_at = u.updated_at FROM unnest("
            "$1::bigint[], $2::text[], $3::int[], $4::float8[], $5::int[], $6::text[], $7::float8[])"
            " AS u(id, status, attempts, next_at, code, error, updated_at) WHERE d.id = u.id",
            order, [state[i][0] for i in order], [state[i][1] for i in order], [state[i][2] for i in order],
            [state[i][3].status_code for i in order], [state[i][3].error for i in order],
            [state[i][3].updated_at for i in order],
        )
        await _insert_attempts(conn, rows)
        if self.fleet:
            await close_episodes(conn, {r.webhook_id for r in items if SUCCEEDED in r.statuses})
        await _add_hours_and_last(conn, hours, last)
        return [None] * len(items)

    def committed(self, items: list[BatchOutcomeRecord], results: list[None]) -> None:
        pass


_Attempted = OutcomeRecord | BatchOutcomeRecord


async def close_episodes(conn: Conn, webhook_ids: set[str]) -> None:
    """In a fleet, a success closes a failure episode another daemon stored that this one had
    not heard of yet (its gate looked healthy here, so the outcome was not settled under the
    gate's lock): reset the stored gate and tell the others."""
    if not webhook_ids:
        return
    for row in await conn.fetch(
        "UPDATE webhooks SET consecutive_failures = 0, backoff_until = 0, gate_epoch = gate_epoch + 1"
        " WHERE id = ANY($1::text[]) AND enabled AND (consecutive_failures > 0 OR backoff_until > 0) RETURNING id",
        sorted(webhook_ids),
    ):
        await notify_webhook(conn, str(row[0]))


async def lock_webhooks(conn: Conn, webhook_ids: set[str]) -> None:
    """Lock the webhooks' rows, in id order, before anything else an outcome writes: every
    daemon takes the webhook first and then its deliveries, hour counts and last attempt,
    so two daemons' outcome transactions wait for each other instead of deadlocking."""
    await conn.execute("SELECT 1 FROM webhooks WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                       sorted(webhook_ids))


@dataclass(frozen=True, slots=True)
class _AttemptRow:
    delivery_id: int
    of: _Attempted  # what it shares with its outcome (a batch's rows share all but the delivery)


def _note_last(last: dict[str, _Attempted], webhook_id: str, r: _Attempted) -> None:
    seen = last.get(webhook_id)
    if seen is None or r.at >= seen.at:
        last[webhook_id] = r


async def _insert_attempts(conn: Conn, rows: list[_AttemptRow]) -> None:
    """One row per attempted delivery, in queue order (the attempts' ids are their order)."""
    await conn.execute(
        "INSERT INTO attempts (delivery_id, at, duration_ms, status_code, error, response_body, batch_id)"
        " SELECT u.delivery_id, u.at, u.duration_ms, u.code, u.error, u.body, u.batch_id FROM unnest("
        "$1::bigint[], $2::float8[], $3::float8[], $4::int[], $5::text[], $6::text[], $7::text[])"
        " WITH ORDINALITY AS u(delivery_id, at, duration_ms, code, error, body, batch_id, n) ORDER BY u.n",
        [a.delivery_id for a in rows], [a.of.at for a in rows], [round(a.of.duration_ms, 3) for a in rows],
        [a.of.status_code for a in rows], [a.of.error for a in rows], [a.of.response_body for a in rows],
        [a.of.batch_id for a in rows],
    )


async def _add_hours_and_last(conn: Conn, hours: Counter[tuple[int, str, bool]], last: dict[str, _Attempted]) -> None:
    """The attempts per hour and webhook, and each webhook's last attempt (never an older one)."""
    merged: Counter[tuple[int, str]] = Counter()
    failed: Counter[tuple[int, str]] = Counter()
    for (hour, wid, ok), n in hours.items():
        (merged if ok else failed)[(hour, wid)] += n
    hour_keys = sorted(set(merged) | set(failed))
    await conn.execute(
        "INSERT INTO attempt_hours (hour, webhook_id, succeeded, failed)"
        " SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[])"
        " ON CONFLICT (hour, webhook_id) DO UPDATE SET succeeded = attempt_hours.succeeded + excluded.succeeded,"
        " failed = attempt_hours.failed + excluded.failed",
        [h for h, _ in hour_keys], [w for _, w in hour_keys], [merged[k] for k in hour_keys],
        [failed[k] for k in hour_keys],
    )
    webhooks = sorted(last)
    await conn.execute(
        "UPDATE webhooks w SET last_attempt_at = u.at, last_status_code = u.code, last_error = u.error"
        " FROM unnest($1::text[], $2::float8[], $3::int[], $4::text[]) AS u(id, at, code, error)"
        " WHERE w.id = u.id AND (w.last_attempt_at IS NULL OR w.last_attempt_at <= u.at)",
        webhooks, [last[w].at for w in webhooks], [last[w].status_code for w in webhooks],
        [last[w].error for w in webhooks],
    )
