"""The PostgreSQL backend: the whole Storage contract (tests/storage_contract.py) on a real
PostgreSQL (a private cluster, tests/pg.py), then what only it has: several instances on
one database (migrations under an advisory lock, ids from sequences, idempotency across
instances), a lost connection, passwords."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from tests.pg import SECRET_PASSWORD, SECRET_USER, SUPERUSER, Cluster, new_schema, pg_dsn  # noqa: F401
from webhookd.batching import OFF, Batching
from webhookd.filters import EMPTY_FILTER
from webhookd.reasons import Reason
from webhookd.store import (
    FAILED,
    PENDING,
    SUCCEEDED,
    BatchOutcomeRecord,
    DeliveryFilter,
    FreshEvent,
    FreshSink,
    Storage,
    StoreError,
    Subscriber,
)
from webhookd.store.postgres import PostgresStorage
from webhookd.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION

pytest.register_assert_rewrite("tests.storage_contract")  # not a test_*.py: its asserts explain themselves too

from tests.storage_contract import *  # noqa: E402, F403 - the contract's tests and fixtures, run on PostgreSQL
from tests.storage_contract import T0, FakeClock, MakeStorage, ev, outcome, record_batch, webhook  # noqa: E402


async def open_pg(dsn: str, *, clock: Callable[[], float] | None = None,
                  on_fresh: FreshSink | None = None) -> PostgresStorage:
    s = PostgresStorage(dsn, clock=clock or FakeClock(), on_fresh=on_fresh)
    s.retry_delay = 0.01
    s.reconnect_min = s.reconnect_max = 0.01
    await s.open()
    return s


@pytest.fixture
async def make_storage(pg_dsn: str) -> AsyncIterator[MakeStorage]:  # noqa: F811
    opened: list[PostgresStorage] = []

    async def make(*, clock: Callable[[], float] | None = None, on_fresh: FreshSink | None = None) -> Storage:
        s = await open_pg(pg_dsn, clock=clock, on_fresh=on_fresh)
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


# -- what only PostgreSQL has -----------------------------------------------------------------------
async def _raw(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def test_instances_starting_together_migrate_once_under_the_lock(pg_dsn: str) -> None:  # noqa: F811
    """Four instances open one empty database at the same moment: each migration runs once (in
    its transaction, under the advisory lock); without the lock they would all find version 0
    and three would fail on CREATE TABLE."""
    opened = await asyncio.gather(*(open_pg(pg_dsn) for _ in range(4)))
    conn = await _raw(pg_dsn)
    try:
        rows = await conn.fetch("SELECT version FROM webhookd_schema ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert await conn.fetchval("SELECT count(*) FROM meta WHERE key = 'created_at'") == 1
    finally:
        await conn.close()
    for s in opened:
        await s.close()


async def test_a_newer_schema_is_refused(pg_dsn: str) -> None:  # noqa: F811
    s = await open_pg(pg_dsn)
    await s.close()
    conn = await _raw(pg_dsn)
    await conn.execute("INSERT INTO webhookd_schema VALUES ($1, 0)", SCHEMA_VERSION + 1)
    await conn.close()
    with pytest.raises(StoreError, match="newer than this webhookd"):
        await open_pg(pg_dsn)


async def test_ids_never_collide_across_instances(pg_dsn: str) -> None:  # noqa: F811
    """Two daemons on one database submit at once: every event and delivery id is distinct,
    each event's deliveries are numbered contiguously and name the right rows."""
    seen_a: list[FreshEvent] = []
    seen_b: list[FreshEvent] = []
    a = await open_pg(pg_dsn, on_fresh=seen_a.extend)
    b = await open_pg(pg_dsn, on_fresh=seen_b.extend)
    subs: list[Subscriber] = [("wh_1", True), ("wh_2", False), ("wh_3", True)]
    for _ in range(3):
        await asyncio.gather(*(s.submit(ev(i), subs) for i in range(150) for s in (a, b)))
    fresh = seen_a + seen_b
    assert len(fresh) == 900
    made = {fe.delivery_id(i): (fe.event_uid, wid) for fe in fresh for i, (wid, _) in enumerate(fe.subscribers)}
    assert len(made) == 2700
    listed = await a.list_deliveries(DeliveryFilter(), limit=10_000)
    assert {d.id: (d.event_uid, d.webhook_id) for d in listed} == made
    await a.close()
    await b.close()


async def test_an_event_with_more_subscribers_than_an_id_block(pg_dsn: str) -> None:  # noqa: F811
    first = await open_pg(pg_dsn)
    await first.close()
    conn = await _raw(pg_dsn)
    await conn.execute("ALTER SEQUENCE delivery_ids INCREMENT BY 4")
    await conn.close()
    seen: list[FreshEvent] = []
    a = await open_pg(pg_dsn, on_fresh=seen.extend)
    b = await open_pg(pg_dsn, on_fresh=seen.extend)
    subs: list[Subscriber] = [(f"wh_{n}", True) for n in range(10)]  # 10 ids: three consecutive blocks
    await asyncio.gather(*(s.submit(ev(i), subs[: 1 + i % 10]) for i in range(40) for s in (a, b)))
    made = {fe.delivery_id(i): (fe.event_uid, wid) for fe in seen for i, (wid, _) in enumerate(fe.subscribers)}
    assert len(made) == sum(1 + i % 10 for i in range(40)) * 2
    listed = await a.list_deliveries(DeliveryFilter(), limit=10_000)
    assert {d.id: (d.event_uid, d.webhook_id) for d in listed} == made
    await a.close()
    await b.close()


async def test_an_idempotency_key_committed_meanwhile_by_another_instance(pg_dsn: str) -> None:  # noqa: F811
    """Another instance inserts the same key in a transaction still open when this one's batch
    runs: the batch waits for it, then answers with that event's id and creates nothing."""
    seen: list[FreshEvent] = []
    s = await open_pg(pg_dsn, on_fresh=seen.extend)
    other = await _raw(pg_dsn)
    tr = other.transaction()
    await tr.start()
    await other.execute("INSERT INTO events (id, uid, idempotency_key, type, body, created_at)"
                        " VALUES (-1, 'evt_other', 'k1', 'delivered', '\\x7b7d', 0)")
    both = asyncio.gather(s.submit(ev(1, key="k1"), [("wh_a", True)]), s.submit(ev(2), [("wh_a", True)]))
    for _ in range(200):  # the batch is waiting on the other transaction's row
        if await other.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted") > 0:
            break
        await asyncio.sleep(0.01)
    await tr.commit()
    repeat, new = await both
    assert repeat == "evt_other" and new != repeat
    assert [fe.event_uid for fe in seen] == [new]
    assert s.received() == {"delivered": 1}
    assert await s.count_deliveries(DeliveryFilter()) == 1
    await other.close()
    await s.close()


async def test_a_lost_connection_fails_intake_keeps_internal_writes_and_reconnects(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    seen: list[FreshEvent] = []
    s = await open_pg(pg_dsn, on_fresh=seen.extend)
    [d] = ids_of(await s.submit(ev(1), [("wh_a", True)]), seen)
    real_connect = s._connect

    async def unreachable() -> asyncpg.Connection:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(s, "_connect", unreachable)
    conn = await _raw(pg_dsn)
    assert s._conn is not None
    pid = s._conn.get_server_pid()
    await conn.execute("SELECT pg_terminate_backend($1)", pid)
    for _ in range(500):  # it returns once signalled: wait until that backend is gone
        if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            break
        await asyncio.sleep(0.01)
    committed: list[None] = []
    s.record_outcome(outcome(d, "wh_a", ok=True, at=T0), on_commit=committed.append)
    with pytest.raises(StoreError):  # the batch that finds the connection gone (whatever asyncpg says then)
        await s.submit(ev(2), [("wh_a", True)])
    for _ in range(3):
        with pytest.raises(StoreError, match=r"^storage unavailable: cannot reach PostgreSQL") as refused:
            await s.submit(ev(2), [("wh_a", True)])
        assert refused.value.reason is Reason.STORAGE  # intake: ok:false, HTTP 503, `webhookd submit` exits 75
    assert not s.connected and committed == [] and s.failed_commits >= 1
    monkeypatch.setattr(s, "_connect", real_connect)
    for _ in range(500):  # intake is refused at once until the next try is due (a few ms here)
        try:
            uid = await asyncio.wait_for(s.submit(ev(3), [("wh_a", True)]), 10)
            break
        except StoreError:
            await asyncio.sleep(0.01)
    assert committed == [None]  # the internal write waited and committed after the reconnect
    assert s.connected and s.reconnects == 1
    assert await conn.fetchval("SELECT status FROM deliveries WHERE id = $1", d) == "succeeded"
    assert await conn.fetchval("SELECT count(*) FROM events WHERE uid = $1", uid) == 1
    await conn.close()
    await s.close()


def ids_of(uid: str, seen: list[FreshEvent]) -> list[int]:
    [fe] = [fe for fe in seen if fe.event_uid == uid]
    return [fe.delivery_id(i) for i in range(len(fe.subscribers))]


async def test_the_password_comes_from_the_password_file_and_is_never_shown(
    pg_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = (await new_schema(pg_cluster, owner=SECRET_USER)).replace(f"{SUPERUSER}@", f"{SECRET_USER}@")
    good = tmp_path / "pw"
    good.write_text(SECRET_PASSWORD + "\n")
    s = PostgresStorage(dsn, password_file=good)
    await s.open()
    assert await s.submit(ev(1), [])
    await s.close()

    bad = tmp_path / "bad"
    bad.write_text("not-" + SECRET_PASSWORD)
    for password_file in (bad, None, tmp_path / "missing"):
        with pytest.raises(StoreError) as refused:
            await PostgresStorage(dsn, password_file=password_file).open()
        assert SECRET_PASSWORD not in str(refused.value)
        assert "cannot" in str(refused.value)
    out = capsys.readouterr()
    assert SECRET_PASSWORD not in out.out + out.err


def test_without_postgresql_the_tests_skip_unless_it_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.pg

    monkeypatch.setattr(tests.pg, "_bindir", lambda: None)
    monkeypatch.delenv("WEBHOOKD_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception):
        tests.pg.require_postgres()
    monkeypatch.setenv("WEBHOOKD_REQUIRE_POSTGRES", "1")  # what .ci/run sets once it installed postgresql
    with pytest.raises(pytest.fail.Exception, match="WEBHOOKD_REQUIRE_POSTGRES"):
        tests.pg.require_postgres()


async def test_daemons_share_the_database_and_a_copy_needs_it_alone(pg_dsn: str) -> None:  # noqa: F811
    """Daemons hold the instance lock shared (several share one queue); `migrate-storage` takes it
    exclusively (exclusive=True): it never copies into a database daemons use, and no daemon starts
    while it copies. The lock goes with the connection."""
    first, second = PostgresStorage(pg_dsn), PostgresStorage(pg_dsn)
    await first.open()
    await second.open()
    with pytest.raises(StoreError, match="a webhookd is running on"):
        await PostgresStorage(pg_dsn, exclusive=True).open()
    await first.close()
    await second.close()
    copy = PostgresStorage(pg_dsn, exclusive=True)
    await copy.open()
    with pytest.raises(StoreError, match="migrate-storage is copying into"):
        await PostgresStorage(pg_dsn).open()
    with pytest.raises(StoreError, match="a webhookd is running on"):
        await PostgresStorage(pg_dsn, exclusive=True).open()
    await copy.close()
    daemon = PostgresStorage(pg_dsn)
    await daemon.open()
    await daemon.close()


async def test_read_webhooks_reads_without_migrating(pg_dsn: str) -> None:  # noqa: F811
    from webhookd.store.postgres import read_webhooks

    assert await read_webhooks(pg_dsn) == []  # untouched: nothing created either
    conn = await _raw(pg_dsn)
    assert await conn.fetchval("SELECT to_regclass('webhooks')") is None
    await conn.close()
    s = await open_pg(pg_dsn)
    await s.create_webhook(webhook("wh_a"))
    await s.close()
    assert await read_webhooks(pg_dsn) == [webhook("wh_a")]


# -- batched delivery on PostgreSQL (its schema v2) -----------------------------------------------
BATCH = "batch_" + "p" * 26


async def _at_v1(dsn: str) -> asyncpg.Connection:
    """A database as a webhookd with only schema v1 left it (before batched delivery)."""
    conn = await _raw(dsn)
    await conn.execute("CREATE TABLE webhookd_schema (version integer PRIMARY KEY,"
                       " applied_at double precision NOT NULL)")
    await conn.execute(MIGRATIONS[0])
    await conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', '0')")
    await conn.execute("INSERT INTO webhookd_schema VALUES (1, 0)")
    return conn


async def test_a_v1_database_with_data_migrates_to_v2_and_keeps_every_row(pg_dsn: str) -> None:  # noqa: F811
    assert SCHEMA_VERSION >= 2
    conn = await _at_v1(pg_dsn)
    await conn.execute(
        "INSERT INTO webhooks (id, url, events, secret, created_at, updated_at, filter, name)"
        " VALUES ('wh_1', 'https://wh_1.example/h', '[\"*\"]', 'whsec_1', $1, $1, '{}', 'one'),"
        " ('wh_2', 'https://wh_2.example/h', '[\"delivered\"]', 'whsec_2', $1, $1, '{}', NULL)", T0)
    await conn.execute("INSERT INTO events (id, uid, type, body, created_at, message_id) VALUES"
                       " (1, 'evt_1', 'delivered', '\\x7b7d', $1, '<m1@x>')", T0)
    await conn.execute("INSERT INTO deliveries (id, event_id, webhook_id, status, attempts, next_attempt_at,"
                       " last_status_code, created_at, updated_at) VALUES"
                       " (1, 1, 'wh_1', 'pending', 2, $1, 500, $1, $1),"
                       " (2, 1, 'wh_2', 'succeeded', 1, NULL, 200, $1, $1)", T0)
    await conn.execute("INSERT INTO attempts (delivery_id, at, duration_ms, status_code, error, response_body) VALUES"
                       " (1, $1, 5, 500, 'HTTP 500', 'no'), (1, $1 + 1, 6, 500, 'HTTP 500', 'no'),"
                       " (2, $1, 4, 200, NULL, 'ok')", T0)
    tables = ("webhooks", "events", "deliveries", "attempts", "meta")
    before = {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY 1")] for t in tables}

    s = await open_pg(pg_dsn)
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM webhookd_schema ORDER BY version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        after = {t: [tuple(r)[: len(before[t][0])] for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY 1")]
                 for t in tables}
        assert after == before  # the new columns come last; nothing old is lost or changed
        assert await conn.fetchval("SELECT to_regclass('attempts_batch') IS NOT NULL")
        assert [(w.id, w.batching) for w in await s.load_webhooks()] == [("wh_1", OFF), ("wh_2", OFF)]
        assert Batching(0, 1048576, 0.0) == OFF  # the columns' defaults are SQLite v8's
        detail = await s.delivery(1)
        assert detail is not None and [a.batch_id for a in detail.attempts] == [None, None]
        # and the new columns work on the migrated database
        await s.update_webhook("wh_1", url="https://wh_1.example/h", events=("*",), description="",
                               filter=EMPTY_FILTER, updated_at=T0, batching=Batching(100, 65536, 0.05))
        await s.update_webhook("wh_2", url="https://wh_2.example/h", events=("*",), description="x",
                               filter=EMPTY_FILTER, updated_at=T0)  # no batching given: left as it is
        assert [(w.id, w.batching) for w in await s.load_webhooks()] == [
            ("wh_1", Batching(100, 65536, 0.05)), ("wh_2", OFF)]
        await record_batch(s, BatchOutcomeRecord(
            webhook_id="wh_1", batch_id=BATCH, delivery_ids=(1,), statuses=(SUCCEEDED,), attempts=(3,),
            next_attempt_at=None, at=T0 + 2, duration_ms=1.0, status_code=200, error=None, response_body="ok",
            updated_at=T0 + 2))
        assert [d.id for d in await s.list_deliveries(DeliveryFilter(batch_id=BATCH))] == [1]
        detail = await s.delivery(1)
        assert detail is not None and [a.batch_id for a in detail.attempts] == [None, None, BATCH]
    finally:
        await conn.close()
        await s.close()


async def test_a_run_of_batch_outcomes_is_written_in_one_call_and_the_last_state_wins(
        pg_dsn: str) -> None:  # noqa: F811
    """Batch outcomes queued together run as one BatchOutcomes call (one UPDATE, one INSERT of
    attempts, one of hours): a delivery in two of them (a batch retried before the commit) ends
    in the later state with both attempts; single outcomes beside them write NULL batch ids."""
    seen: list[FreshEvent] = []
    s = await open_pg(pg_dsn, on_fresh=seen.extend)
    calls: list[int] = []
    real = s._batch_outcomes.execute

    async def counting(conn: asyncpg.Connection, items: list[BatchOutcomeRecord]) -> list[None]:
        calls.append(len(items))
        return await real(conn, items)

    s._batch_outcomes.execute = counting  # type: ignore[method-assign]
    try:
        await s.create_webhook(webhook("wh_a"))
        ds = [ids_of(await s.submit(ev(i), [("wh_a", True)]), seen)[0] for i in range(5)]
        loop = asyncio.get_running_loop()
        done: list[asyncio.Future[None]] = [loop.create_future() for _ in range(3)]

        def batch(bid: str, dids: tuple[int, ...], status: str, attempts: int, next_at: float | None, at: float,
                  code: int | None, error: str | None) -> BatchOutcomeRecord:
            return BatchOutcomeRecord(
                webhook_id="wh_a", batch_id=bid, delivery_ids=dids, statuses=(status,) * len(dids),
                attempts=(attempts,) * len(dids), next_attempt_at=next_at, at=at, duration_ms=2.0, status_code=code,
                error=error, response_body="", updated_at=at)

        s.record_batch_outcome(batch(BATCH, (ds[0], ds[1], ds[2]), PENDING, 1, T0 + 60, T0, 503, "HTTP 503"),
                               on_commit=done[0].set_result)
        s.record_batch_outcome(batch(BATCH, (ds[0], ds[1], ds[2]), SUCCEEDED, 2, None, T0 + 61, 200, None),
                               on_commit=done[1].set_result)
        s.record_batch_outcome(batch("batch_" + "q" * 26, (ds[3],), PENDING, 1, T0 + 90, T0 + 30, None, "timed out"),
                               on_commit=done[2].set_result)
        s.record_outcome(outcome(ds[4], "wh_a", ok=True, at=T0 + 5))
        await asyncio.gather(*done)
        assert calls == [3]
        rows = [await s.delivery(d) for d in ds]
        assert [(r.delivery.status, r.delivery.attempts, r.delivery.next_attempt_at, r.delivery.last_status_code)
                for r in rows if r is not None] == [(SUCCEEDED, 2, None, 200)] * 3 + [
            (PENDING, 1, T0 + 90, None), (SUCCEEDED, 1, None, 200)]
        assert [[(a.status_code, a.batch_id) for a in r.attempts] for r in rows if r is not None] == [
            [(503, BATCH), (200, BATCH)]] * 3 + [[(None, "batch_" + "q" * 26)], [(200, None)]]
        stats = (await s.webhook_stats(T0))["wh_a"]
        assert (stats.succeeded_24h, stats.failed_24h, stats.last_attempt_at) == (4, 4, T0 + 61)
        assert await s.count_deliveries(DeliveryFilter(batch_id=BATCH, statuses=(SUCCEEDED,))) == 3
        # a retry of failed deliveries may be narrowed to one batch
        await s.reschedule(ds[0], status=FAILED, next_attempt_at=None, now=T0 + 70)
        await s.reschedule(ds[4], status=FAILED, next_attempt_at=None, now=T0 + 70)
        assert await s.retry_failed(DeliveryFilter(batch_id=BATCH), [("wh_a", True)], now=T0 + 80) == 1
        assert [d.id for d in await s.list_deliveries(DeliveryFilter(statuses=(FAILED,)))] == [ds[4]]
    finally:
        await s.close()
