"""The PostgreSQL backend's reads for people: listings, search, one delivery, counts and stats.

They run on a small pool of their own connections (never the writer's) and see the last
commit. Counts are read from the database: with several daemons on one database no
instance's memory could know them.
"""

from __future__ import annotations

from typing import Any

import asyncpg

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
from webhookd.store.postgres_rows import (
    DB_ERRORS,
    DELIVERY_SELECT,
    Params,
    delivery_row,
    describe,
    where_clause,
)
from webhookd.store.sqlite_rows import DAY, HOUR


class Reads:
    """Mixed into PostgresStorage, which sets `_pool`."""

    _pool: asyncpg.Pool | None

    async def list_deliveries(
        self, where: DeliveryFilter, *, before: int | None = None, limit: int = 100
    ) -> list[Delivery]:
        p = Params()
        clause = where_clause(where, p, before)
        sql = DELIVERY_SELECT + (f" WHERE {clause}" if clause else "") + f" ORDER BY d.id DESC LIMIT {p(limit)}"
        return [delivery_row(r) for r in await self._fetch(sql, *p.values)]

    async def count_deliveries(self, where: DeliveryFilter) -> int:
        p = Params()
        clause = where_clause(where, p)
        join = " JOIN events e ON e.id = d.event_id" if where.event_type is not None else ""
        sql = f"SELECT count(*) FROM deliveries d{join}" + (f" WHERE {clause}" if clause else "")  # noqa: S608
        return int((await self._fetch(sql, *p.values))[0][0])

    async def delivery(self, delivery_id: int) -> DeliveryDetail | None:
        rows = await self._fetch(DELIVERY_SELECT.replace(" FROM", ", e.body FROM", 1) + " WHERE d.id = $1",
                                 delivery_id)
        if not rows:
            return None
        attempts = await self._fetch(
            "SELECT at, duration_ms, status_code, error, response_body, batch_id FROM attempts"
            " WHERE delivery_id = $1 ORDER BY id", delivery_id,
        )
        return DeliveryDetail(
            delivery_row(rows[0]), bytes(rows[0][13]),
            tuple(Attempt(float(a[0]), float(a[1]), a[2], a[3], a[4], a[5]) for a in attempts),
        )

    async def count_by_status(self) -> dict[str, int]:
        out = dict.fromkeys(DELIVERY_STATUSES, 0)
        for status, n in await self._fetch("SELECT status, count(*) FROM deliveries GROUP BY status"):
            out[status] = int(n)
        return out

    async def oldest_pending(self) -> float | None:
        # one seek of the partial index deliveries_pending_age
        value = (await self._fetch("SELECT min(created_at) FROM deliveries WHERE status = 'pending'"))[0][0]
        return None if value is None else float(value)

    async def webhook_stats(self, now: float) -> dict[str, WebhookStats]:
        fields: dict[str, dict[str, Any]] = {}
        for wid, at, code, error in await self._fetch(
            "SELECT id, last_attempt_at, last_status_code, last_error FROM webhooks"
        ):
            fields[wid] = {"last_attempt_at": at, "last_status_code": code, "last_error": error}
        for wid, ok, bad in await self._fetch(
            "SELECT webhook_id, sum(succeeded), sum(failed) FROM attempt_hours WHERE hour > $1::float8"
            " GROUP BY webhook_id",
            now - DAY - HOUR,
        ):
            fields.setdefault(wid, {}).update(succeeded_24h=int(ok), failed_24h=int(bad))
        for wid, status, n in await self._fetch(
            "SELECT webhook_id, status, count(*) FROM deliveries WHERE status = ANY($1::text[])"
            " GROUP BY webhook_id, status", [PENDING, PAUSED],
        ):
            fields.setdefault(wid, {})[status] = int(n)
        return {wid: WebhookStats(wid, **f) for wid, f in fields.items()}

    async def hourly_counts(self, since: float, until: float) -> list[HourCount]:
        rows = await self._fetch(
            "SELECT hour, sum(succeeded), sum(failed) FROM attempt_hours WHERE hour >= $1 AND hour < $2::float8"
            " GROUP BY hour ORDER BY hour",
            int(since // HOUR) * HOUR, until,
        )
        return [HourCount(int(h), int(ok), int(bad)) for h, ok, bad in rows]

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """`sql` on a pooled reader connection; errors as StoreError."""
        pool = self._pool
        if pool is None:
            raise StoreError("store is closed", Reason.UNAVAILABLE)
        try:
            return list(await pool.fetch(sql, *args))
        except DB_ERRORS as exc:
            raise StoreError(describe(exc)) from exc
