"""Retention: finished deliveries and old events are pruned in small batches; migrations."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from tests.conftest import db_rows, event, eventually
from webhookd.store import SqliteStorage
from webhookd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION


async def count(h: Any, table: str) -> int:
    rows = h.sql(f"SELECT count(*) FROM {table}")
    return int(rows[0][0])


async def test_prune_removes_only_what_is_finished_and_old(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon(storage={"retention": "200ms"})
    await h.create_webhook(receiver.url)
    parked = await h.create_webhook(receiver.url, ["bounced"])
    await h.api("POST", f"/v1/webhooks/{parked['id']}/disable")
    [first] = await h.submit({**event("delivered", 1), "id": "key-1"})
    await h.submit(event("bounced", 2))  # one delivery succeeds, one stays paused
    await receiver.wait_for(2)

    async def settled() -> bool:
        return len(await h.deliveries(status="succeeded")) == 2

    await eventually(settled)
    assert await h.daemon.prune_once() == 0  # nothing is old enough yet
    await asyncio.sleep(0.3)
    assert await h.daemon.prune_once() > 0
    remaining = await h.deliveries()
    assert [d["status"] for d in remaining] == ["paused"]
    assert await count(h, "events") == 1  # the bounce is still needed by its paused delivery
    assert await count(h, "attempts") == 0
    # the idempotency key is free again once its event has been pruned
    [again] = await h.submit({**event("delivered", 1), "id": "key-1"})
    assert again["ok"] and again["id"] != first["id"]


async def test_database_stops_growing_under_steady_load(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon(storage={"retention": "100ms"})
    await h.create_webhook(receiver.url)
    pages: list[int] = []
    rows: list[int] = []
    for round_ in range(8):
        await h.submit(*[event("delivered", round_ * 1000 + i, subject="s" * 500) for i in range(300)])
        await receiver.wait_for(300 * (round_ + 1), timeout=20)

        async def settled() -> bool:
            return not await h.deliveries(status="pending")

        await eventually(settled)
        await asyncio.sleep(0.15)
        await h.daemon.prune_once()
        page_count = h.sql("PRAGMA page_count")
        pages.append(int(page_count[0][0]))
        rows.append(await count(h, "deliveries"))
    assert max(rows) <= 300, rows  # each pass removes what the previous round left
    assert pages[-1] <= pages[2] * 1.2, pages  # freed pages are reused: the file plateaus


async def test_migrations_run_from_the_first_schema(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO webhooks (id, url, events, secret, created_at, updated_at)"
                     " VALUES ('wh_1', 'https://x.example/h', '[\"*\"]', 'whsec_x', 0, 0)")
        conn.execute("INSERT INTO events VALUES (1, 'evt_1', NULL, 'delivered', x'7b7d', 0)")
        conn.execute("INSERT INTO deliveries (id, event_id, webhook_id, status, created_at, updated_at)"
                     " VALUES (1, 1, 'wh_1', 'pending', 0, 0)")
    store = SqliteStorage(path)
    await store.open()
    try:
        assert db_rows(path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
        assert db_rows(path, "SELECT status FROM deliveries")[0][0] == "pending"
        indexes = {r[0] for r in db_rows(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"deliveries_finished", "deliveries_event", "events_message_id", "events_recipient"} <= indexes
    finally:
        await store.close()
