"""The SQLite backend: the whole Storage contract (tests/storage_contract.py) on a real file,
then what only SQLite has: failed commits, a full disk, a corrupt file, schema versions."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from tests.conftest import db_rows
from webhookd.events import parse_event
from webhookd.filters import WebhookFilter
from webhookd.reasons import Reason
from webhookd.store import DeliveryFilter, FreshEvent, FreshSink, SqliteStorage, Storage, StoreError, WebhookState
from webhookd.store.sqlite_schema import SCHEMA_VERSION

pytest.register_assert_rewrite("tests.storage_contract")  # not a test_*.py: its asserts explain themselves too

from tests.storage_contract import *  # noqa: E402, F403 - the contract's tests and fixtures, run on SQLite
from tests.storage_contract import START, T0, FakeClock, MakeStorage, ev, outcome, record, webhook  # noqa: E402


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "webhookd.db"


async def open_sqlite(path: Path, *, clock: Callable[[], float] | None = None,
                      on_fresh: FreshSink | None = None) -> SqliteStorage:
    s = SqliteStorage(path, clock=clock or FakeClock(), on_fresh=on_fresh)
    s.retry_delay = 0.01
    await s.open()
    return s


@pytest.fixture
async def make_storage(tmp_path: Path) -> AsyncIterator[MakeStorage]:
    opened: list[SqliteStorage] = []

    async def make(*, clock: Callable[[], float] | None = None, on_fresh: FreshSink | None = None) -> Storage:
        s = await open_sqlite(db_path(tmp_path), clock=clock, on_fresh=on_fresh)
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


@pytest.fixture
async def sqlite_storage(tmp_path: Path, fresh: list[FreshEvent]) -> AsyncIterator[SqliteStorage]:
    s = await open_sqlite(db_path(tmp_path), on_fresh=fresh.extend)
    yield s
    await s.close()


async def test_failed_commit_fails_intake_and_retries_internal_ops(sqlite_storage: SqliteStorage, tmp_path: Path,
                                                                  fresh: list[FreshEvent]) -> None:
    s = sqlite_storage
    calls = 0

    async def flaky(db: aiosqlite.Connection) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        await db.execute("INSERT INTO meta (key, value) VALUES ('probe', 'x')")
        return "done"

    committed: list[str] = []
    paused: list[None] = []
    await s.create_webhook(webhook("wh_a"))
    intake = s.submit(ev(1), [("wh_a", True)])  # runs first in the batch that fails
    internal = s._writer.run(flaky, on_commit=committed.append, internal=True)
    state = s.set_webhook_state("wh_a", WebhookState(False, "by hand", 0, 0.0, 5.0), on_commit=paused.append)
    with pytest.raises(StoreError, match="storage error: disk I/O error") as failed:
        await intake
    assert failed.value.reason is Reason.STORAGE
    assert await internal == "done"
    await state
    assert committed == ["done"] and paused == [None] and calls == 2
    assert s.failed_commits == 1  # webhookd_store_commit_failures_total
    path = db_path(tmp_path)
    assert db_rows(path, "SELECT count(*) FROM events") == [(0,)]  # the failed batch left nothing behind
    assert db_rows(path, "SELECT value FROM meta WHERE key = 'probe'") == [("x",)]
    assert db_rows(path, "SELECT enabled, disabled_reason FROM webhooks") == [(0, "by hand")]
    # what the failed batch made never reaches the sink nor the counts, not even with the next commit
    assert fresh == [] and s.received() == {}
    uid = await s.submit(ev(2), [("wh_b", True)])  # wh_a is disabled now: its deliveries would be deferred
    assert [fe.event_uid for fe in fresh] == [uid]
    assert s.received() == {"delivered": 1}
    [(delivery_id,)] = db_rows(path, "SELECT id FROM deliveries")
    assert fresh[0].delivery_id(0) == delivery_id


async def test_disk_full_is_a_clear_error_and_recovers(sqlite_storage: SqliteStorage, tmp_path: Path) -> None:
    s = sqlite_storage
    acked = [await s.submit(ev(i), [("wh_a", True)]) for i in range(5)]
    db = s._db
    assert db is not None
    async with db.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await db.execute(f"PRAGMA max_page_count = {row[0]}")
    big = parse_event(b'{"event": "delivered", "data": {"message_id": "m", "subject": "' + b"x" * 100_000 + b'"}}',
                      now=0)
    with pytest.raises(StoreError, match=r"^storage full: cannot commit") as full:
        await s.submit(big, [("wh_a", True)])
    assert full.value.reason is Reason.STORAGE
    await db.execute("PRAGMA max_page_count = 1073741823")
    assert await s.submit(big, [("wh_a", True)])
    rows = db_rows(db_path(tmp_path), "SELECT uid FROM events ORDER BY id")
    assert [r[0] for r in rows][:5] == acked and len(rows) == 6


async def test_schema_is_versioned_and_the_file_private(sqlite_storage: SqliteStorage, tmp_path: Path) -> None:
    path = db_path(tmp_path)
    assert db_rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert db_rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this webhookd"):
        await SqliteStorage(path).open()


async def test_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open database"):
        await SqliteStorage(path).open()


async def test_filters_are_stored_as_json_and_an_unreadable_one_is_refused(tmp_path: Path) -> None:
    """The column holds the API's JSON object ('{}' for none). A filter this webhookd cannot
    read (edited by hand, or written by a newer one) must not widen to every event: loading
    the webhooks fails, naming the webhook."""
    path = db_path(tmp_path)
    s = await open_sqlite(path)
    await s.create_webhook(webhook("wh_a", filter=WebhookFilter.parse({"from_domains": ["Shop.Example"]})))
    await s.create_webhook(webhook("wh_b", created_at=2.0))
    assert db_rows(path, "SELECT id, filter FROM webhooks ORDER BY id") == [
        ("wh_a", '{"from_domains":["shop.example"],"to_domains":[],"tags":[],"metadata":{}}'), ("wh_b", "{}"),
    ]
    for stored in ('{"from_domain": ["shop.example"]}', '{"tags": "vip"}', "not json"):
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE webhooks SET filter = ? WHERE id = 'wh_a'", (stored,))
        conn.close()
        with pytest.raises(StoreError, match="webhook wh_a: its stored filter cannot be read"):
            await s.load_webhooks()
    await s.close()


async def test_close_gives_up_on_ops_that_can_never_commit(tmp_path: Path) -> None:
    s = await open_sqlite(db_path(tmp_path))

    async def broken(db: aiosqlite.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    fut = s._writer.run(broken, internal=True)
    await asyncio.wait_for(s.close(), 5)
    with pytest.raises(StoreError, match="disk I/O error"):
        fut.result()
    assert s._db is None and s._reader is None



async def test_a_batch_of_intake_outcomes_and_refills_is_one_hand_off(sqlite_storage: SqliteStorage,
                                                                      tmp_path: Path) -> None:
    """The hot path's transaction (events, outcomes, a refill, a webhook's state) is one call on
    the database thread, BEGIN to COMMIT, and behaves as the stepwise one did: in queue order,
    the refill sees the events queued before it, the counts move only at the commit."""
    s = sqlite_storage
    await s.create_webhook(webhook("wh_a"))
    [first] = [await s.submit(ev(0), [("wh_a", True)])]
    db = s._db
    assert db is not None
    hand_offs = 0
    real = db._execute

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal hand_offs
        hand_offs += 1
        return await real(fn, *args, **kwargs)

    db._execute = counting  # type: ignore[method-assign]
    try:
        events = [s.submit(ev(i), [("wh_a", True)]) for i in range(1, 4)]
        s.record_outcome(outcome(1, "wh_a", ok=True, at=T0))
        due = s.take_due("wh_a", (0.0, 0), 10)
        state = s.set_webhook_state("wh_a", WebhookState(True, None, 0, 0.0, 5.0))
        uids = await asyncio.gather(*events)
        items = await due
        await state
    finally:
        del db._execute
    assert hand_offs == 1
    assert [item.event_uid for item in items] == uids  # the three new ones; the first has succeeded
    assert first not in uids
    assert (await s.count_by_status()) == {"pending": 3, "paused": 0, "succeeded": 1, "failed": 0}
    assert db_rows(db_path(tmp_path), "SELECT count(*) FROM attempts") == [(1,)]
# -- deferred fan-out (webhookd/store/sqlite_fanout.py) ----------------------------------------------
async def test_a_lagging_webhook_gets_no_rows_until_it_is_read(sqlite_storage: SqliteStorage, tmp_path: Path,
                                                               fresh: list[FreshEvent]) -> None:
    s = sqlite_storage
    path = db_path(tmp_path)
    await s.create_webhook(webhook("wh_a"))
    await s.create_webhook(webhook("wh_off", enabled=False))
    await asyncio.gather(*(s.submit(ev(i), [("wh_a", True), ("wh_off", False)]) for i in range(10)))
    assert db_rows(path, "SELECT webhook_id, count(*) FROM deliveries GROUP BY webhook_id") == [("wh_a", 10)]
    assert {tuple(fe.subscribers) for fe in fresh} == {(("wh_a", True),)}  # the disabled one is left out
    [(key,)] = db_rows(path, "SELECT key FROM fanout WHERE webhook_id = 'wh_off'")
    assert db_rows(path, "SELECT DISTINCT deferred FROM events") == [(f",{key},",)]
    assert db_rows(path, "SELECT cursor, deferred FROM fanout WHERE webhook_id = 'wh_off'") == [(1, 10)]
    assert (await s.count_by_status())["paused"] == 10  # counted without a row
    assert await s.count_deliveries(DeliveryFilter(webhook_id="wh_off", statuses=("failed",))) == 0
    assert db_rows(path, "SELECT count(*) FROM deliveries WHERE webhook_id = 'wh_off'") == [(0,)]  # not read
    assert await s.count_deliveries(DeliveryFilter(webhook_id="wh_off")) == 10  # a read of its rows: made now
    assert db_rows(path, "SELECT count(*) FROM deliveries WHERE webhook_id = 'wh_off'") == [(10,)]
    assert db_rows(path, "SELECT cursor, deferred FROM fanout WHERE webhook_id = 'wh_off'") == [(None, 0)]
    assert (await s.count_by_status())["paused"] == 10


async def test_a_backlog_past_the_threshold_defers_and_tells_the_scheduler(tmp_path: Path) -> None:
    got: list[FreshEvent] = []
    s = SqliteStorage(db_path(tmp_path), clock=FakeClock(), on_fresh=got.extend, defer_after=5)
    await s.open()
    try:
        path = db_path(tmp_path)
        await s.create_webhook(webhook("wh_a"))
        for i in range(6):
            await s.submit(ev(i), [("wh_a", True)])
        assert [fe.resync for fe in got] == [()] * 6
        await s.submit(ev(6), [("wh_a", True)])  # 6 pending rows > 5: from this event on, deferred
        assert got[-1].resync == ("wh_a",) and not got[-1].subscribers
        await s.submit(ev(7), [("wh_a", True)])
        assert len(got) == 7  # nothing for the scheduler: deferred
        assert db_rows(path, "SELECT count(*) FROM deliveries") == [(6,)]
        assert db_rows(path, "SELECT cursor, deferred FROM fanout") == [(7, 2)]
        due = await s.take_due("wh_a", START, 7)  # six rows, and one deferred made a row
        assert [d.delivery_id for d in due] == [1, 2, 3, 4, 5, 6, 7]
        assert db_rows(path, "SELECT cursor, deferred FROM fanout") == [(8, 1)]
        due = await s.take_due("wh_a", due[-1].key, 7)  # the last one: the cursor reaches the head
        assert [d.delivery_id for d in due] == [8]
        assert db_rows(path, "SELECT cursor, deferred FROM fanout") == [(None, 0)]
        await record(s, *(outcome(d, "wh_a", ok=True, at=T0) for d in range(1, 9)))
        await s.submit(ev(8), [("wh_a", True)])
        assert got[-1].subscribers == [("wh_a", True)]  # eager again
    finally:
        await s.close()


async def test_a_failed_batch_leaves_the_deferred_state_as_it_was(sqlite_storage: SqliteStorage,
                                                                  tmp_path: Path) -> None:
    s = sqlite_storage
    await s.create_webhook(webhook("wh_off", enabled=False))
    await s.submit(ev(0), [("wh_off", False)])

    async def broken(db: aiosqlite.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    intake = s.submit(ev(1), [("wh_off", False)])
    failing = s._writer.run(broken)
    with pytest.raises(StoreError):
        await intake
    with pytest.raises(StoreError):
        await failing
    assert db_rows(db_path(tmp_path), "SELECT cursor, deferred FROM fanout") == [(1, 1)]
    assert s._fanout.state.deferred == {"wh_off": 1} and (await s.count_by_status())["paused"] == 1
    await s.submit(ev(2), [("wh_off", False)])
    assert db_rows(db_path(tmp_path), "SELECT cursor, deferred FROM fanout") == [(1, 2)]
    assert (await s.count_by_status())["paused"] == 2


async def test_a_long_intake_run_stops_making_rows_for_a_webhook_past_the_threshold(
        sqlite_storage: SqliteStorage, tmp_path: Path, fresh: list[FreshEvent]) -> None:
    s = sqlite_storage
    await s.create_webhook(webhook("wh_a"))
    uids = await asyncio.gather(*(s.submit(ev(i), [("wh_a", True)]) for i in range(1000)))  # one run
    assert s.commits <= 3
    [(rows,)] = db_rows(db_path(tmp_path), "SELECT count(*) FROM deliveries")
    assert 256 < rows <= 256 + 32  # decided again every 32 events of the run, not once for all 1000
    assert [fe.resync for fe in fresh if fe.resync] == [("wh_a",)]
    assert (await s.count_by_status())["pending"] == 1000
    got: list[str] = []
    after = START
    while due := await s.take_due("wh_a", after, 128):
        got += [d.event_uid for d in due]
        after = due[-1].key
    assert got == list(uids)
