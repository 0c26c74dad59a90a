"""The SQLite backend's batchers: a run of submitted events, a run of attempt outcomes,
each written with a few executemany in the writer's transaction. They run on the writer
connection's thread (aiosqlite's), synchronously on the raw sqlite3 connection, inside
the one call that makes the whole transaction (`store/writer.py`): they touch only the
writer's own state there (ids, the runs, the counts' pending deltas); what is shared with
the event loop changes in `committed`, on the loop."""

from __future__ import annotations

import sqlite3
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import aiosqlite

from webhookd.events import Event
from webhookd.ids import new_id
from webhookd.store.model import PAUSED, PENDING, BatchOutcomeRecord, FreshEvent, OutcomeRecord, Subscriber
from webhookd.store.sqlite_fanout import Fanout, Split
from webhookd.store.sqlite_rows import HOUR, Counts

Conn = aiosqlite.Connection
RECHECK_EVERY = 32  # events of one run between two decisions of who lags (sqlite_fanout.py)
T = TypeVar("T")


async def in_thread(db: Conn, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn` with the raw sqlite3 connection on aiosqlite's own thread: a batch's many
    statements cost one hand-off between the threads instead of two or three each (each
    `await db.execute(...)`, `fetchall()` and cursor close is one). aiosqlite has no public
    call for this; `_execute` is what its own methods use (tests/test_storage_sqlite.py
    fails loudly if it goes away)."""
    return cast(T, await db._execute(lambda: fn(db._conn)))  # type: ignore[no-untyped-call]


def _select_in(conn: sqlite3.Connection, select: str, values: Sequence[Any]) -> dict[Any, Any]:
    """`{first: second}` of `select` + ` IN (values)`, 500 values a statement."""
    found: dict[Any, Any] = {}
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        found.update(conn.execute(f"{select} IN ({','.join('?' * len(chunk))})", chunk).fetchall())
    return found


def _known_keys(conn: sqlite3.Connection, keys: list[str]) -> dict[str, str]:
    return _select_in(conn, "SELECT idempotency_key, uid FROM events WHERE idempotency_key", keys)


def _statuses(conn: sqlite3.Connection, ids: list[int]) -> dict[int, str]:
    return _select_in(conn, "SELECT id, status FROM deliveries WHERE id", ids)


@dataclass
class Ids:
    """The next event and delivery ids (allocated in memory, from the largest stored at open)."""

    event: int = 1
    delivery: int = 1


@dataclass
class EventSink:
    """What the event batcher hands on after its commit."""

    on_fresh: Callable[[list[FreshEvent]], None]
    received: Counter[str] = field(default_factory=Counter)


class Events:
    """Inserts a run of submitted events and their deliveries with two executemany."""

    def __init__(self, clock: Callable[[], float], ids: Ids, counts: Counts, sink: EventSink,
                 fanout: Fanout) -> None:
        self._clock, self._ids, self._counts, self._sink = clock, ids, counts, sink
        self._fanout = fanout
        self._runs: deque[tuple[list[FreshEvent], list[str]]] = deque()  # this transaction's, in order

    def execute(self, conn: sqlite3.Connection, items: list[tuple[Event, Sequence[Subscriber]]]) -> list[str]:
        """On the database thread, inside the writer's transaction (as every batcher)."""
        now = self._clock()
        keys = [ev.idempotency_key for ev, _ in items if ev.idempotency_key is not None]
        known = _known_keys(conn, keys) if keys else {}
        event_rows: list[tuple[Any, ...]] = []
        delivery_rows: list[tuple[Any, ...]] = []
        results: list[str] = []
        fresh: list[FreshEvent] = []
        types: list[str] = []
        made: Counter[tuple[str, bool]] = Counter()
        event_id, delivery_id = self._ids.event, self._ids.delivery
        # deferred fan-out (sqlite_fanout.py): a lagging subscriber gets no row, only its key in
        # the event's `deferred` list
        fanout = self._fanout
        resync = fanout.start_batch()
        split = fanout.split
        deferred_runs: Counter[int] = Counter()
        deferred_first: dict[int, tuple[Split, int]] = {}  # holds each Split: its id() stays unique
        for n, (ev, all_subscribers) in enumerate(items, 1):
            if not n % RECHECK_EVERY:  # a long run: who lags is decided again with what it made
                resync += fanout.during_batch(made)
            key = ev.idempotency_key
            if key is not None and key in known:
                results.append(known[key])
                continue
            uid = new_id("evt")
            if key is not None:
                known[key] = uid
            s = split(all_subscribers)
            subscribers = s.eager
            if s.deferred:
                deferred_runs[id(s)] += 1
                deferred_first.setdefault(id(s), (s, event_id))
            event_rows.append((event_id, uid, key, ev.type, ev.body, now, ev.message_id, ev.recipient, s.text))
            types.append(ev.type)
            if subscribers:
                fresh.append(FreshEvent(delivery_id, subscribers, now, uid, ev.type, ev.body))
            for sub in subscribers:
                enabled = sub[1]
                delivery_rows.append(
                    (delivery_id, event_id, sub[0], PENDING if enabled else PAUSED, now if enabled else None, now, now)
                )
                made[sub] += 1
                delivery_id += 1
            event_id += 1
            results.append(uid)

        if deferred_runs:
            deferred_made: Counter[str] = Counter()
            first: dict[str, int] = {}
            for sid, (sp, first_event) in deferred_first.items():
                for w in sp.deferred:
                    deferred_made[w] += deferred_runs[sid]
                    first[w] = min(first.get(w, first_event), first_event)
            fanout.deferred_events(first, deferred_made)

        if event_rows:
            conn.executemany(
                "INSERT INTO events (id, uid, idempotency_key, type, body, created_at, message_id, recipient,"
                " deferred) VALUES (?,?,?,?,?,?,?,?,?)",
                event_rows,
            )
        fanout.flush(conn)
        if delivery_rows:
            conn.executemany(
                "INSERT INTO deliveries (id, event_id, webhook_id, status, next_attempt_at, created_at,"
                " updated_at) VALUES (?,?,?,?,?,?,?)",
                delivery_rows,
            )
        # Only now, with every statement done: a failed batch leaves the ids as they were. What
        # each run made is handed on at its own place after the commit (runs commit in the
        # order they ran); `reset`, at each transaction's start, forgets a rolled-back one's.
        self._ids.event, self._ids.delivery = event_id, delivery_id
        for (webhook_id, enabled), n in made.items():
            self._counts.move(webhook_id, None, PENDING if enabled else PAUSED, n)
        if resync:
            fresh.insert(0, FreshEvent(0, (), now, "", "", b"", resync=tuple(resync)))
        self._runs.append((fresh, types))
        return results

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
    """Writes a run of attempt outcomes: delivery rows, attempt rows, hour counts, last attempt."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts

    def execute(self, conn: sqlite3.Connection, items: list[OutcomeRecord]) -> list[None]:
        """All of a run's statements, on the database thread. The statuses the deliveries
        had (normally pending; paused if a disable came first; gone if the webhook was
        deleted) move the counts."""
        before = _statuses(conn, [r.delivery_id for r in items])
        conn.executemany(
            "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status_code = ?,"
            " last_error = ?, updated_at = ? WHERE id = ?",
            [(r.status, r.attempts, r.next_attempt_at, r.status_code, r.error, r.updated_at, r.delivery_id)
             for r in items if r.delivery_id in before],
        )
        conn.executemany(
            "INSERT INTO attempts (delivery_id, at, duration_ms, status_code, error, response_body, batch_id)"
            " VALUES (?,?,?,?,?,?,?)",
            [(r.delivery_id, r.at, round(r.duration_ms, 3), r.status_code, r.error, r.response_body, r.batch_id)
             for r in items if r.delivery_id in before],
        )
        hours: Counter[tuple[int, str, bool]] = Counter()
        last: dict[str, OutcomeRecord] = {}
        for r in items:
            old = before.get(r.delivery_id)
            if old is None:
                continue
            self._counts.move(r.webhook_id, old, r.status)
            hours[(int(r.at // HOUR) * HOUR, r.webhook_id, r.error is None)] += 1
            seen = last.get(r.webhook_id)
            if seen is None or r.at >= seen.at:
                last[r.webhook_id] = r
        _hours_and_last_attempts(conn, hours, last)
        return [None] * len(items)

    def committed(self, items: list[OutcomeRecord], results: list[None]) -> None:
        pass


def _hours_and_last_attempts(conn: sqlite3.Connection, hours: Counter[tuple[int, str, bool]],
                             last: Mapping[str, OutcomeRecord | BatchOutcomeRecord]) -> None:
    """An outcome batch's attempts per hour and each webhook's newest attempt (single or batch)."""
    conn.executemany(
        "INSERT INTO attempt_hours (hour, webhook_id, succeeded, failed) VALUES (?,?,?,?)"
        " ON CONFLICT (hour, webhook_id) DO UPDATE SET succeeded = succeeded + excluded.succeeded,"
        " failed = failed + excluded.failed",
        [(hour, wid, n if ok else 0, 0 if ok else n) for (hour, wid, ok), n in hours.items()],
    )
    conn.executemany(
        "UPDATE webhooks SET last_attempt_at = ?, last_status_code = ?, last_error = ?"
        " WHERE id = ? AND (last_attempt_at IS NULL OR last_attempt_at <= ?)",
        [(r.at, r.status_code, r.error, wid, r.at) for wid, r in last.items()],
    )


BATCH_UPDATE = ("UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status_code = ?,"
                " last_error = ?, updated_at = ? WHERE id IN (")


class BatchOutcomes:
    """Writes a run of batch attempts' outcomes (webhookd.batching): per batch, its deliveries'
    rows in one UPDATE per (status, attempts) (normally one), an attempt row each with the
    batch id, and the hour counts and last attempt once. Batch and single outcomes touch
    disjoint deliveries (a delivery is attempted in one way at a time)."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts

    def execute(self, conn: sqlite3.Connection, items: list[BatchOutcomeRecord]) -> list[None]:
        """On the database thread, inside the writer's transaction (as every batcher)."""
        before = _statuses(conn, [did for r in items for did in r.delivery_ids])
        attempt_rows: list[tuple[Any, ...]] = []
        hours: Counter[tuple[int, str, bool]] = Counter()
        last: dict[str, BatchOutcomeRecord] = {}
        for r in items:
            groups: dict[tuple[str, int], list[int]] = {}
            moves: Counter[tuple[str, str]] = Counter()
            for did, status, attempts in zip(r.delivery_ids, r.statuses, r.attempts, strict=True):
                old = before.get(did)
                if old is None:
                    continue  # its webhook was deleted meanwhile
                groups.setdefault((status, attempts), []).append(did)
                moves[(old, status)] += 1
            for (old, status), n in moves.items():
                self._counts.move(r.webhook_id, old, status, n)
            if not groups:
                continue
            for (status, attempts), ids in groups.items():
                next_at = r.next_attempt_at if status == PENDING else None
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    sql = BATCH_UPDATE + ",".join("?" * len(chunk)) + ")"
                    conn.execute(sql, (status, attempts, next_at, r.status_code, r.error, r.updated_at, *chunk))
            shared = (r.at, round(r.duration_ms, 3), r.status_code, r.error, r.response_body, r.batch_id)
            n = 0
            for ids in groups.values():
                attempt_rows.extend((did, *shared) for did in ids)
                n += len(ids)
            hours[(int(r.at // HOUR) * HOUR, r.webhook_id, r.error is None)] += n
            seen = last.get(r.webhook_id)
            if seen is None or r.at >= seen.at:
                last[r.webhook_id] = r
        conn.executemany(
            "INSERT INTO attempts (delivery_id, at, duration_ms, status_code, error, response_body, batch_id)"
            " VALUES (?,?,?,?,?,?,?)",
            attempt_rows,
        )
        _hours_and_last_attempts(conn, hours, last)
        return [None] * len(items)

    def committed(self, items: list[BatchOutcomeRecord], results: list[None]) -> None:
        pass
