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
from webhookd.reasons import Reason
from webhookd.store import DeliveryFilter, FreshEvent, FreshSink, Storage, StoreError, Subscriber
from webhookd.store.postgres import PostgresStorage
from webhookd.store.postgres_schema import SCHEMA_VERSION

pytest.register_assert_rewrite("tests.storage_contract")  # not a test_*.py: its asserts explain themselves too

from tests.storage_contract import *  # noqa: E402, F403 - the contract's tests and fixtures, run on PostgreSQL
from tests.storage_contract import T0, FakeClock, MakeStorage, ev, outcome, webhook  # noqa: E402


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


async def test_an_exclusive_instance_keeps_a_second_one_out(pg_dsn: str) -> None:  # noqa: F811
    """What the daemon opens (exclusive=True): one delivering webhookd per database until several
    can share the queue; the lock goes with the connection, so the next one may start then."""
    first = PostgresStorage(pg_dsn, exclusive=True)
    await first.open()
    with pytest.raises(StoreError, match="another webhookd is using"):
        await PostgresStorage(pg_dsn, exclusive=True).open()
    await first.close()
    second = PostgresStorage(pg_dsn, exclusive=True)
    await second.open()
    await second.close()


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
