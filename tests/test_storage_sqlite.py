"""The store on a real SQLite file: group commit, idempotency, failures, migrations."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from webhookd.events import parse_event
from webhookd.store import SCHEMA_VERSION, DueItem, Store, StoreError


def ev(n: int, key: str | None = None) -> Any:
    idem = f', "id": "{key}"' if key else ""
    return parse_event(f'{{"event": "delivered", "data": {{"message_id": "m{n}"}}{idem}}}'.encode(), now=0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "db" / "webhookd.db")
    s.retry_delay = 0.01
    await s.open()
    yield s
    await s.close()


async def test_concurrent_events_share_commits(store: Store) -> None:
    futures = [store.submit_event(ev(i)) for i in range(1000)]
    ids = await asyncio.gather(*futures)
    assert len(set(ids)) == 1000
    assert store.commits <= 3
    rows = await store.read("SELECT count(*) FROM events")
    assert rows[0][0] == 1000


async def test_deliveries_are_created_per_subscriber(store: Store) -> None:
    store.subscribers = lambda t: [("wh_a", True), ("wh_b", False)]
    fresh: list[DueItem] = []
    store.on_fresh = lambda events: fresh.extend(i for e in events for i in e.items())
    await store.submit_event(ev(1))
    rows = await store.read("SELECT webhook_id, status FROM deliveries ORDER BY webhook_id")
    assert [tuple(r) for r in rows] == [("wh_a", "pending"), ("wh_b", "paused")]
    assert [i.webhook_id for i in fresh] == ["wh_a"]  # only pending ones go to the scheduler
    assert fresh[0].body == ev(1).body


async def test_idempotency_within_and_across_batches(store: Store) -> None:
    a, b = await asyncio.gather(store.submit_event(ev(1, "k1")), store.submit_event(ev(2, "k1")))
    c = await store.submit_event(ev(3, "k1"))
    d = await store.submit_event(ev(4, "k2"))
    assert a == b == c != d
    rows = await store.read("SELECT count(*) FROM events")
    assert rows[0][0] == 2


async def test_ids_continue_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    s = Store(path)
    await s.open()
    store_fresh: list[DueItem] = []
    s.subscribers = lambda t: [("wh_a", True)]
    s.on_fresh = lambda events: store_fresh.extend(i for e in events for i in e.items())
    await s.submit_event(ev(1))
    await s.close()
    s2 = Store(path)
    await s2.open()
    s2.subscribers = lambda t: [("wh_a", True)]
    s2.on_fresh = lambda events: store_fresh.extend(i for e in events for i in e.items())
    await s2.submit_event(ev(2))
    await s2.close()
    assert [i.delivery_id for i in store_fresh] == [1, 2]


async def test_failed_commit_fails_intake_and_retries_internal_ops(store: Store) -> None:
    calls = 0

    async def flaky(db: aiosqlite.Connection) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        await db.execute("INSERT INTO meta (key, value) VALUES ('probe', 'x')")
        return "done"

    committed: list[str] = []
    intake = store.submit_event(ev(1))
    internal = store.run(flaky, on_commit=committed.append, internal=True)
    with pytest.raises(StoreError, match="storage error: disk I/O error"):
        await intake
    assert await internal == "done"
    assert committed == ["done"] and calls == 2
    rows = await store.read("SELECT count(*) FROM events")
    assert rows[0][0] == 0  # the failed batch left nothing behind


async def test_disk_full_is_a_clear_error_and_recovers(store: Store) -> None:
    acked = [await store.submit_event(ev(i)) for i in range(5)]
    db = store._db
    assert db is not None
    async with db.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await db.execute(f"PRAGMA max_page_count = {row[0]}")
    big = parse_event(b'{"event": "delivered", "data": {"message_id": "m", "pad": "' + b"x" * 100_000 + b'"}}', now=0)
    with pytest.raises(StoreError, match="storage full"):
        await store.submit_event(big)
    await db.execute("PRAGMA max_page_count = 1073741823")
    assert await store.submit_event(big)
    rows = await store.read("SELECT uid FROM events ORDER BY id")
    assert [r[0] for r in rows][:5] == acked


async def test_schema_is_versioned(store: Store, tmp_path: Path) -> None:
    rows = await store.read("PRAGMA user_version")
    assert rows[0][0] == SCHEMA_VERSION


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this webhookd"):
        await Store(path).open()


async def test_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open database"):
        await Store(path).open()


async def test_close_commits_what_is_queued_and_is_idempotent(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    await s.open()
    fut = s.submit_event(ev(1))
    await s.close()
    assert fut.result().startswith("evt_")
    await s.close()
    with pytest.raises(StoreError):
        await s.submit_event(ev(2))


async def test_close_gives_up_on_ops_that_can_never_commit(tmp_path: Path) -> None:
    s = Store(tmp_path / "g.db")
    s.retry_delay = 0.01
    await s.open()

    async def broken(db: aiosqlite.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    fut = s.run(broken, internal=True)
    await asyncio.wait_for(s.close(), 5)
    with pytest.raises(StoreError):
        fut.result()
