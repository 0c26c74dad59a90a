"""Schema migrations on databases that hold data: v2 (and v1) → v3 backfills the message id and
recipient columns, each webhook's last attempt and the attempts per hour, adds the search
indexes, and loses nothing; v4 → v5 gives every webhook the empty filter; v5 → v6 leaves every
webhook undeclared (no name, no file) and makes names unique; v6 → v7 adds the (empty) table
of scoped API tokens; v7 → v8 turns batching off for every webhook and leaves every old attempt
outside any batch; the deferred fan-out migration (FANOUT_SCHEMA_VERSION, v9) gives every webhook
its fan-out key, no cursor and nothing deferred."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import db_rows
from webhookd.batching import OFF, Batching
from webhookd.events import parse_event
from webhookd.filters import EMPTY_FILTER
from webhookd.store import (
    FAILED,
    PAUSED,
    PENDING,
    SUCCEEDED,
    DeliveryFilter,
    HourCount,
    OutcomeRecord,
    SqliteStorage,
    StoreError,
    WebhookStats,
)
from webhookd.store.sqlite_schema import FANOUT_SCHEMA_VERSION, MIGRATIONS, SCHEMA_VERSION, split_sql

HOUR = 3600.0
T = 1_700_001_000.0  # "now": half past an hour
H = T - 1800  # the start of that hour

WEBHOOKS = [  # id, created_at
    ("wh_1", T - 10 * HOUR), ("wh_2", T - 9 * HOUR), ("wh_3", T - 8 * HOUR),
]


def body(kind: str, message_id: str, to: str | None = None) -> bytes:
    data: dict[str, Any] = {"message_id": message_id, "subject": "Order"}
    if to is not None:
        data["to"] = to
    if kind == "bounced":
        data["bounce_type"] = "hard"
    return orjson.dumps({"event": kind, "timestamp": "2023-11-14T22:00:00Z", "data": data})


EVENTS = [  # id, uid, idempotency key, type, body, created_at
    (1, "evt_1", None, "delivered", body("delivered", "<a@mail.example>", "Alice@Example.org"), T - 6 * HOUR),
    (2, "evt_2", "key-2", "bounced", body("bounced", "<b@mail.example>", "bob@example.org"), T - 5 * HOUR),
    (3, "evt_3", None, "opened", body("opened", "<c@mail.example>"), T - 4 * HOUR),  # without "to"
    (4, "evt_4", None, "opened", body("opened", "<a@mail.example>", "alice@example.org"), T - 3 * HOUR),
]
DELIVERIES = [  # id, event_id, webhook_id, status, attempts, next_attempt_at, last code, last error, created, updated
    (1, 1, "wh_1", SUCCEEDED, 1, None, 200, None, T - 6 * HOUR, T - 2 * HOUR),
    (2, 1, "wh_2", FAILED, 3, None, None, "timeout", T - 6 * HOUR, T - HOUR),
    (3, 2, "wh_1", PENDING, 1, T + 60, 500, "HTTP 500", T - 5 * HOUR, T - 1800),
    (4, 3, "wh_2", PAUSED, 0, None, None, None, T - 4 * HOUR, T - 4 * HOUR),
    (5, 4, "wh_1", PENDING, 0, T - 3 * HOUR, None, None, T - 3 * HOUR, T - 3 * HOUR),
    (6, 3, "wh_3", PENDING, 0, T - 4 * HOUR, None, None, T - 4 * HOUR, T - 4 * HOUR),
]
ATTEMPTS = [  # id, delivery_id, at, duration_ms, status_code, error, response_body
    (1, 1, T - 2 * HOUR, 10.0, 200, None, "ok"),  # wh_1
    (2, 3, T - 1800, 20.0, 500, "HTTP 500", "oops"),  # wh_1: its last
    (3, 2, T - 30 * HOUR, 30.0, 503, "HTTP 503", ""),  # wh_2, a day and more ago
    (4, 2, T - HOUR, 1000.0, None, "connection failed", None),  # wh_2, at the same time as the next
    (5, 2, T - HOUR, 2000.0, None, "timeout", None),  # wh_2: its last (the later id)
]
WEBHOOK_COLUMNS = ("id, url, events, description, enabled, disabled_reason, consecutive_failures, backoff_until,"
                   " secret, previous_secret, previous_secret_expires_at, created_at, updated_at")
BEFORE = {  # what every table held, column by column, to compare after the migration
    "webhooks": f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY id",
    "events": "SELECT id, uid, idempotency_key, type, body, created_at FROM events ORDER BY id",
    "deliveries": "SELECT * FROM deliveries ORDER BY id",
    "attempts": "SELECT id, delivery_id, at, duration_ms, status_code, error, response_body FROM attempts ORDER BY id",
    "meta": "SELECT * FROM meta ORDER BY key",
}


def build(path: Path, version: int) -> None:
    """A database at schema `version`, as an older webhookd left it, with data in every table:
    the data is written at v2 (or v1), and the migrations up to `version` ran on it then."""
    written_at = min(version, 2)
    with sqlite3.connect(path) as conn:
        for script in MIGRATIONS[:written_at]:
            for statement in split_sql(script):
                conn.execute(statement)
        conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (str(T - 100 * HOUR),))
        for wid, created in WEBHOOKS:
            conn.execute(
                f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (wid, f"https://{wid}.example/h", '["*"]', f"the {wid} hook", int(wid != "wh_2"),
                 None if wid != "wh_2" else "disabled by hand", 0, 0.0, f"whsec_{wid}", None, None, created, created),
            )
        conn.executemany("INSERT INTO events VALUES (?,?,?,?,?,?)", EVENTS)
        conn.executemany("INSERT INTO deliveries VALUES (?,?,?,?,?,?,?,?,?,?)", DELIVERIES)
        conn.executemany("INSERT INTO attempts VALUES (?,?,?,?,?,?,?)", ATTEMPTS)
        for script in MIGRATIONS[written_at:version]:
            for statement in split_sql(script):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    return {table: db_rows(path, sql) for table, sql in BEFORE.items()}


@pytest.fixture(params=[7, 6, 5, 4, 2, 1], ids=["from-v7", "from-v6", "from-v5", "from-v4", "from-v2", "from-v1"])
async def migrated(request: pytest.FixtureRequest,
                   tmp_path: Path) -> AsyncIterator[tuple[SqliteStorage, dict[str, Any]]]:
    path = tmp_path / "old.db"
    build(path, int(request.param))
    before = snapshot(path)
    storage = SqliteStorage(path, clock=lambda: T)
    await storage.open()
    yield storage, before
    await storage.close()


async def test_schema_reaches_the_current_version_and_keeps_every_row(
    migrated: tuple[SqliteStorage, dict[str, Any]],
) -> None:
    storage, before = migrated
    path = storage.path
    assert SCHEMA_VERSION == 9
    assert db_rows(path, "PRAGMA user_version") == [(9,)]
    assert snapshot(path) == before  # nothing pre-existing is lost or changed
    assert [len(before[t]) for t in ("webhooks", "events", "deliveries", "attempts")] == [3, 4, 6, 5]
    names = {r[0] for r in db_rows(path, "SELECT name FROM sqlite_master WHERE type IN ('index', 'table')")}
    assert {"deliveries_finished", "deliveries_event", "events_message_id", "events_recipient",
            "attempt_hours", "api_tokens", "attempts_batch"} <= names
    assert db_rows(path, "SELECT count(*) FROM api_tokens") == [(0,)]
    assert await storage.list_tokens() == []
    assert db_rows(path, "PRAGMA integrity_check") == [("ok",)]


async def test_message_id_and_recipient_are_backfilled(migrated: tuple[SqliteStorage, dict[str, Any]]) -> None:
    storage, _ = migrated
    assert db_rows(storage.path, "SELECT id, message_id, recipient FROM events ORDER BY id") == [
        (1, "<a@mail.example>", "Alice@Example.org"), (2, "<b@mail.example>", "bob@example.org"),
        (3, "<c@mail.example>", ""), (4, "<a@mail.example>", "alice@example.org"),
    ]
    found = await storage.list_deliveries(DeliveryFilter(message_id="<a@mail.example>"))
    assert [(d.id, d.event_uid, d.event_type, d.webhook_id, d.status) for d in found] == [
        (5, "evt_4", "opened", "wh_1", PENDING), (2, "evt_1", "delivered", "wh_2", FAILED),
        (1, "evt_1", "delivered", "wh_1", SUCCEEDED),
    ]
    assert {(d.message_id, d.recipient) for d in found} == {
        ("<a@mail.example>", "Alice@Example.org"), ("<a@mail.example>", "alice@example.org"),
    }
    assert await storage.count_deliveries(DeliveryFilter(message_id="<a@mail.example>")) == 3
    assert [d.id for d in await storage.list_deliveries(DeliveryFilter(recipient="ALICE@example.org"))] == [5, 2, 1]
    assert [d.id for d in await storage.list_deliveries(DeliveryFilter(recipient="bob@example.org"))] == [3]
    assert [d.id for d in await storage.list_deliveries(DeliveryFilter(message_id="<c@mail.example>"))] == [6, 4]
    [old] = await storage.list_deliveries(DeliveryFilter(message_id="<c@mail.example>", webhook_id="wh_2"))
    assert old.recipient == ""


async def test_searches_use_the_new_indexes(migrated: tuple[SqliteStorage, dict[str, Any]]) -> None:
    storage, _ = migrated
    reader = storage._reader
    assert reader is not None
    statements: list[str] = []
    await reader.set_trace_callback(statements.append)  # the SQL it runs, values bound
    await storage.list_deliveries(DeliveryFilter(message_id="<a@mail.example>"))
    by_message = statements[-1]
    await storage.list_deliveries(DeliveryFilter(recipient="alice@example.org"))
    by_recipient = statements[-1]
    assert "<a@mail.example>" in by_message and "alice@example.org" in by_recipient  # with their values bound

    def plan(sql: str) -> str:
        return " | ".join(str(r[-1]) for r in db_rows(storage.path, f"EXPLAIN QUERY PLAN {sql}"))

    assert "events_message_id" in plan(by_message), plan(by_message)
    assert "events_recipient" in plan(by_recipient), plan(by_recipient)


async def test_stats_and_hourly_counts_are_backfilled_from_old_attempts(
    migrated: tuple[SqliteStorage, dict[str, Any]],
) -> None:
    storage, _ = migrated
    stats = await storage.webhook_stats(T)
    assert stats["wh_1"] == WebhookStats("wh_1", last_attempt_at=T - 1800, last_status_code=500,
                                         last_error="HTTP 500", succeeded_24h=1, failed_24h=1, pending=2)
    assert stats["wh_2"] == WebhookStats("wh_2", last_attempt_at=T - HOUR, last_status_code=None,
                                         last_error="timeout", failed_24h=2, paused=1)  # the 30 h old one: out
    assert stats["wh_3"] == WebhookStats("wh_3", pending=1)  # no attempt ever
    assert await storage.hourly_counts(H - 40 * HOUR, H + HOUR) == [
        HourCount(int(H - 30 * HOUR), failed=1), HourCount(int(H - 2 * HOUR), succeeded=1),
        HourCount(int(H - HOUR), failed=2), HourCount(int(H), failed=1),
    ]
    assert await storage.count_by_status() == {PENDING: 3, PAUSED: 1, SUCCEEDED: 1, FAILED: 1}


async def test_every_old_webhook_gets_the_empty_filter(migrated: tuple[SqliteStorage, dict[str, Any]]) -> None:
    storage, _ = migrated
    assert db_rows(storage.path, "SELECT id, filter FROM webhooks ORDER BY id") == [
        ("wh_1", "{}"), ("wh_2", "{}"), ("wh_3", "{}"),
    ]
    loaded = await storage.load_webhooks()
    assert [(w.id, w.filter) for w in loaded] == [("wh_1", EMPTY_FILTER), ("wh_2", EMPTY_FILTER),
                                                  ("wh_3", EMPTY_FILTER)]
    assert [(w.url, w.events, w.enabled, w.secret) for w in loaded] == [
        ("https://wh_1.example/h", ("*",), True, "whsec_wh_1"), ("https://wh_2.example/h", ("*",), False, "whsec_wh_2"),
        ("https://wh_3.example/h", ("*",), True, "whsec_wh_3"),
    ]


async def test_every_old_webhook_is_undeclared_and_names_are_unique(
    migrated: tuple[SqliteStorage, dict[str, Any]],
) -> None:
    storage, _ = migrated
    loaded = await storage.load_webhooks()
    assert [(w.id, w.name, w.declared_in) for w in loaded] == [("wh_1", None, None), ("wh_2", None, None),
                                                               ("wh_3", None, None)]
    with sqlite3.connect(storage.path) as conn:
        conn.execute("UPDATE webhooks SET name = 'shop' WHERE id = 'wh_1'")
        conn.execute("UPDATE webhooks SET name = NULL WHERE id = 'wh_2'")  # many unnamed ones are fine
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE webhooks SET name = 'shop' WHERE id = 'wh_3'")
    conn.close()


async def test_the_migrated_database_keeps_working(migrated: tuple[SqliteStorage, dict[str, Any]]) -> None:
    storage, _ = migrated
    again = parse_event(b'{"event": "bounced", "id": "key-2", "data": {"message_id": "m", "bounce_type": "soft"}}',
                        now=T)
    assert await storage.submit(again, [("wh_1", True)]) == "evt_2"  # the old idempotency key still answers
    new = parse_event(b'{"event": "delivered", "data": {"message_id": "<new@x>", "to": "Carol@example.org"}}', now=T)
    uid = await storage.submit(new, [("wh_1", True)])
    [d] = await storage.list_deliveries(DeliveryFilter(message_id="<new@x>"))
    assert (d.id, d.event_uid, d.recipient) == (7, uid, "Carol@example.org")  # ids continue after the old ones
    assert db_rows(storage.path, "SELECT id FROM events WHERE uid = ?", (uid,)) == [(5,)]
    detail = await storage.delivery(3)
    assert detail is not None
    assert [(a.at, a.status_code, a.error) for a in detail.attempts] == [(T - 1800, 500, "HTTP 500")]
    assert detail.body == EVENTS[1][4]


async def test_a_failed_migration_leaves_the_old_database_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    build(path, 2)
    with sqlite3.connect(path) as conn:  # a body no JSON function can read stops the backfill
        conn.execute("INSERT INTO events VALUES (9, 'evt_9', NULL, 'delivered', x'7b6e6f74', ?)", (T,))
    conn.close()
    before = snapshot(path)
    with pytest.raises(StoreError, match="cannot open database"):
        await SqliteStorage(path).open()
    assert db_rows(path, "PRAGMA user_version") == [(2,)]
    assert snapshot(path) == before
    columns = {r[1] for r in db_rows(path, "PRAGMA table_info(events)")}
    assert "message_id" not in columns


async def test_every_old_webhook_has_batching_off_and_old_attempts_no_batch(
    migrated: tuple[SqliteStorage, dict[str, Any]],
) -> None:
    storage, _ = migrated
    loaded = await storage.load_webhooks()
    assert [(w.id, w.batching) for w in loaded] == [("wh_1", OFF), ("wh_2", OFF), ("wh_3", OFF)]
    assert db_rows(storage.path, "SELECT count(*) FROM attempts WHERE batch_id IS NOT NULL") == [(0,)]
    detail = await storage.delivery(2)
    assert detail is not None and [a.batch_id for a in detail.attempts] == [None, None, None]
    # and the new columns work on the migrated database
    await storage.update_webhook("wh_1", url="https://wh_1.example/h", events=("*",), description="",
                                 filter=EMPTY_FILTER, updated_at=T, batching=Batching(100, 65536, 0.05))
    [first, *_] = await storage.load_webhooks()
    assert first.batching == Batching(100, 65536, 0.05)
    bid = "batch_" + "a" * 26
    storage.record_outcome(OutcomeRecord(delivery_id=5, webhook_id="wh_1", status=SUCCEEDED, attempts=1,
                                         next_attempt_at=None, at=T, duration_ms=1.0, status_code=200, error=None,
                                         response_body="ok", updated_at=T, batch_id=bid))
    await storage.update_webhook("wh_3", url="https://wh_3.example/h", events=("*",), description="",
                                 filter=EMPTY_FILTER, updated_at=T)  # a write after it: the outcome committed
    assert [d.id for d in await storage.list_deliveries(DeliveryFilter(batch_id=bid))] == [5]
    assert await storage.count_deliveries(DeliveryFilter(batch_id=bid)) == 1
async def test_every_old_webhook_gets_a_fanout_key_and_nothing_deferred(
    migrated: tuple[SqliteStorage, dict[str, Any]],
) -> None:
    storage, _ = migrated
    assert FANOUT_SCHEMA_VERSION <= SCHEMA_VERSION
    assert db_rows(storage.path, "SELECT webhook_id, key, cursor, deferred FROM fanout ORDER BY key") == [
        ("wh_1", 1, None, 0), ("wh_2", 2, None, 0), ("wh_3", 3, None, 0),  # keys in creation order
    ]
    assert db_rows(storage.path, "SELECT count(*) FROM events WHERE deferred IS NOT NULL") == [(0,)]
    # wh_2 was disabled: from now on its deliveries are deferred, and still listed and counted
    uid = await storage.submit(parse_event(b'{"event": "delivered", "data": {"message_id": "<d@x>"}}', now=T),
                               [("wh_1", True), ("wh_2", False)])
    assert db_rows(storage.path, "SELECT deferred FROM events WHERE uid = ?", (uid,)) == [(",2,",)]
    assert db_rows(storage.path, "SELECT webhook_id, cursor, deferred FROM fanout WHERE deferred > 0") == [
        ("wh_2", 5, 1)]
    assert (await storage.count_by_status())[PAUSED] == 2
    found = await storage.list_deliveries(DeliveryFilter(message_id="<d@x>"))
    assert sorted((d.webhook_id, d.status) for d in found) == [("wh_1", PENDING), ("wh_2", PAUSED)]
    assert db_rows(storage.path, "SELECT cursor, deferred FROM fanout WHERE webhook_id = 'wh_2'") == [(None, 0)]
