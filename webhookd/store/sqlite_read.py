"""The SQLite backend's reads for people: listings, search, one delivery, counts and stats.

They run on the reader connection (WAL: they never block the writer) and see the last
commit; counts come from the backend's in-memory `Counts`, which move with each commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import aiosqlite

from webhookd.reasons import Reason
from webhookd.store.model import (
    DELIVERY_STATUSES,
    PAUSED,
    PENDING,
    Attempt,
    Delivery,
    DeliveryDetail,
    DeliveryFilter,
    HourCount,
    StoreError,
    WebhookStats,
)
from webhookd.store.sqlite_batch import in_thread
from webhookd.store.sqlite_fanout import oldest_deferred
from webhookd.store.sqlite_rows import DAY, DELIVERY_SELECT, HOUR, Counts, delivery_row, describe, where_clause

T = TypeVar("T")


class Reads:
    """Mixed into SqliteStorage, which sets `_reader` and `_counts`."""

    _reader: aiosqlite.Connection | None
    _counts: Counts

    async def list_deliveries(
        self, where: DeliveryFilter, *, before: int | None = None, limit: int = 100
    ) -> list[Delivery]:
        walks = where.message_id is None and where.recipient is None and where.batch_id is None and (
            bool(where.statuses) or where.webhook_id is not None)
        if walks:
            rows = await self._on_reader(lambda conn: _walks(conn, where, before, limit))
        else:
            rows = await self._on_reader(lambda conn: _plain(conn, where, before, limit))
        return [delivery_row(r) for r in rows]

    async def count_deliveries(self, where: DeliveryFilter) -> int:
        clause, params = where_clause(where)
        join = " JOIN events e ON e.id = d.event_id" if where.event_type is not None else ""
        sql = f"SELECT count(*) FROM deliveries d{join}" + (f" WHERE {clause}" if clause else "")  # noqa: S608
        return int((await self._read(sql, params))[0][0])

    async def delivery(self, delivery_id: int) -> DeliveryDetail | None:
        rows = await self._read(
            DELIVERY_SELECT.replace(" FROM", ", e.body FROM", 1) + " WHERE d.id = ?", (delivery_id,)
        )
        if not rows:
            return None
        attempts = await self._read(
            "SELECT at, duration_ms, status_code, error, response_body, batch_id FROM attempts WHERE delivery_id = ?"
            " ORDER BY id",
            (delivery_id,),
        )
        return DeliveryDetail(
            delivery_row(rows[0]), bytes(rows[0][13]),
            tuple(Attempt(float(a[0]), float(a[1]), a[2], a[3], a[4], a[5]) for a in attempts),
        )

    async def count_by_status(self) -> dict[str, int]:
        return self._counts.by_status()  # kept in step with every commit: no scan of a large table

    async def oldest_pending(self) -> float | None:
        webhooks = sorted({w for (w, status), n in self._counts.by.items() if status == PENDING and n > 0})
        if not webhooks:
            return None
        return await self._on_reader(lambda conn: _oldest_pending(conn, webhooks))

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
        for (wid, status), n in self._counts.by.items():
            if status in (PENDING, PAUSED) and n:
                fields.setdefault(wid, {})[status] = n
        return {wid: WebhookStats(wid, **f) for wid, f in fields.items()}

    async def hourly_counts(self, since: float, until: float) -> list[HourCount]:
        rows = await self._read(
            "SELECT hour, sum(succeeded), sum(failed) FROM attempt_hours WHERE hour >= ? AND hour < ?"
            " GROUP BY hour ORDER BY hour",
            (int(since // HOUR) * HOUR, until),
        )
        return [HourCount(int(h), int(ok), int(bad)) for h, ok, bad in rows]

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._on_reader(lambda conn: conn.execute(sql, params).fetchall())

    async def _on_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` on the reader connection's thread, in one hand-off; errors as StoreError."""
        reader = self._reader
        if reader is None:
            raise StoreError("store is closed", Reason.UNAVAILABLE)
        try:
            return await in_thread(reader, fn)
        except sqlite3.Error as exc:
            raise StoreError(describe(exc)) from exc


def _plain(conn: sqlite3.Connection, where: DeliveryFilter, before: int | None, limit: int) -> list[Any]:
    """The filter as one query, newest first (the message-id and recipient searches use their
    own indexes; no filter walks the table itself)."""
    clause, params = where_clause(where, before)
    sql = DELIVERY_SELECT + (f" WHERE {clause}" if clause else "") + " ORDER BY d.id DESC LIMIT ?"
    return list(conn.execute(sql, [*params, limit]).fetchall())


def _oldest_pending(conn: sqlite3.Connection, webhooks: Sequence[str]) -> float | None:
    """The created_at of the first pending delivery of each webhook that has some (ids are
    allocated in creation order: the lowest id is the oldest; its deferred deliveries, made
    rows later, are younger than its rows: the event at its cursor), each one seek of the
    (status, webhook_id, id) index instead of a scan of the whole backlog; in one read
    transaction."""
    conn.execute("BEGIN")
    try:
        oldest: float | None = None
        for webhook_id in webhooks:
            row = conn.execute(
                "SELECT created_at FROM deliveries WHERE status = ? AND webhook_id = ? ORDER BY id LIMIT 1",
                (PENDING, webhook_id),
            ).fetchone()
            at = float(row[0]) if row is not None else oldest_deferred(conn, webhook_id)  # older rows first
            if at is not None and (oldest is None or at < oldest):
                oldest = at
        return oldest
    finally:
        conn.execute("COMMIT")


def _walks(conn: sqlite3.Connection, where: DeliveryFilter, before: int | None, limit: int) -> list[Any]:
    """A status or webhook filter, newest first, without sorting every matching row: one
    keyset walk of the (status, webhook_id, id) index per (status, webhook) pair, each at
    most `limit`, merged. The webhooks are read in the same read transaction as the walks,
    so a delivery that changes status or a webhook created meanwhile cannot fall between
    them. More than 64 pairs (many webhooks): the plain query."""
    conn.execute("BEGIN")
    try:
        if where.webhook_id is not None:
            webhooks = [where.webhook_id]
        else:
            webhooks = [str(r[0]) for r in conn.execute("SELECT id FROM webhooks ORDER BY id")]
        statuses = where.statuses or DELIVERY_STATUSES  # one webhook's deliveries: all four walks
        pairs = [(s, w) for s in statuses for w in webhooks]
        if len(pairs) > 64 or not pairs:
            return _plain(conn, where, before, limit)
        rest, rest_params = where_clause(replace(where, statuses=(), webhook_id=None), before)
        join = " JOIN events e ON e.id = d.event_id" if where.event_type is not None else ""
        cond = f" AND {rest}" if rest else ""
        parts: list[str] = []
        params: list[Any] = []
        for status, webhook_id in pairs:
            sub = f"SELECT d.id FROM deliveries d{join} WHERE d.status = ? AND d.webhook_id = ?{cond}"  # noqa: S608
            parts.append(f"SELECT id FROM ({sub} ORDER BY d.id DESC LIMIT ?)")  # noqa: S608
            params.extend([status, webhook_id, *rest_params, limit])
        sql = DELIVERY_SELECT + f" WHERE d.id IN ({' UNION ALL '.join(parts)})"
        return list(conn.execute(sql + " ORDER BY d.id DESC LIMIT ?", [*params, limit]).fetchall())
    finally:
        conn.execute("COMMIT")
