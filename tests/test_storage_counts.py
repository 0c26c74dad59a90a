"""The SQLite backend keeps delivery counts by (webhook, status) in memory so the dashboard
and `status` never scan a large table. After every kind of write they must equal a fresh
GROUP BY of the file, also after a rolled-back transaction and after a reopen."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import db_rows
from webhookd.events import parse_event
from webhookd.store import (
    FAILED,
    PAUSED,
    PENDING,
    SUCCEEDED,
    BatchOutcomeRecord,
    DeliveryFilter,
    OutcomeRecord,
    SqliteStorage,
    WebhookRecord,
    WebhookState,
)


def ev(n: int, kind: str = "delivered") -> Any:
    extra = ', "bounce_type": "soft"' if kind == "bounced" else ""
    return parse_event(f'{{"event": "{kind}", "data": {{"message_id": "m{n}"{extra}}}}}'.encode(), now=0)


def hook(wid: str) -> WebhookRecord:
    return WebhookRecord(wid, "https://x.example/h", ("*",), "", True, None, 0, 0.0, "whsec_x", None, None, 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    s = SqliteStorage(tmp_path / "c.db", clock=Clock())
    s.retry_delay = 0.01
    await s.open()
    yield s
    await s.close()


def fresh_counts(s: SqliteStorage) -> Counter[tuple[str, str]]:
    rows = db_rows(s.path, "SELECT webhook_id, status, count(*) FROM deliveries GROUP BY webhook_id, status")
    return Counter({(w, st): n for w, st, n in rows})


def check(s: SqliteStorage) -> None:
    kept = Counter({k: n for k, n in s._counts.by.items() if n})
    assert kept == fresh_counts(s)
    assert all(n >= 0 for n in s._counts.by.values())


def outcome(did: int, wid: str, status: str, at: float = 1_000_000.0) -> OutcomeRecord:
    ok = status == SUCCEEDED
    return OutcomeRecord(did, wid, status, 1, at + 60 if status == PENDING else None, at, 5.0,
                         200 if ok else 500, None if ok else "HTTP 500", "", at)


async def test_counts_follow_every_kind_of_write(storage: SqliteStorage) -> None:
    s = storage
    await s.create_webhook(hook("wh_a"))
    await s.create_webhook(hook("wh_b"))
    subs = [("wh_a", True), ("wh_b", False)]
    await asyncio.gather(*[s.submit(ev(i, "bounced" if i % 3 else "delivered"), subs) for i in range(30)])
    check(s)  # inserts: pending for a, paused for b
    a_ids = [d.id for d in await s.list_deliveries(DeliveryFilter(webhook_id="wh_a"), limit=100)]
    for i, did in enumerate(a_ids[:12]):
        s.record_outcome(outcome(did, "wh_a", (SUCCEEDED, FAILED, PENDING)[i % 3]))
    await s.set_webhook_state("wh_a", WebhookState(True, None, 0, 0.0, 1.0))  # flush behind the outcomes
    check(s)  # outcomes
    await s.set_webhook_state("wh_a", WebhookState(False, "manual", 0, 0.0, 2.0), pause_pending=True)
    check(s)  # a disable pauses the pending ones
    s.record_outcome(outcome(a_ids[20], "wh_a", PAUSED))  # an outcome after the disable: paused → paused
    batch = a_ids[21:26]  # a batch's outcome after the disable: paused → each its status
    s.record_batch_outcome(BatchOutcomeRecord(
        "wh_a", "batch_" + "a" * 26, tuple(batch), (SUCCEEDED, FAILED, PAUSED, PENDING, SUCCEEDED), (1,) * 5,
        2_000_000.0, 1_000_000.0, 5.0, 200, None, "", 1_000_000.0))
    await s.set_webhook_state("wh_a", WebhookState(False, "manual", 0, 0.0, 2.5))  # flush behind it
    check(s)
    assert await s.enable_webhook("wh_a", now=3.0, drop_backlog=False) > 0
    check(s)
    assert await s.enable_webhook("wh_b", now=3.0, drop_backlog=True) == 30
    check(s)  # drop the backlog: paused → failed
    await s.replay("wh_b", since=0, statuses=[FAILED, SUCCEEDED], status=PENDING, next_attempt_at=4.0, now=4.0)
    check(s)
    await s.reschedule(a_ids[0], status=PENDING, next_attempt_at=5.0, now=5.0)
    await s.reschedule(10**9, status=PENDING, next_attempt_at=5.0, now=5.0)  # no such delivery
    check(s)
    assert await s.retry_failed(DeliveryFilter(), [("wh_a", True), ("wh_b", False)], now=6.0) >= 1
    check(s)
    await s.delete_webhook("wh_b")
    check(s)
    assert ("wh_b", PENDING) not in s._counts.by
    assert await s.prune(cutoff=10**10) > 0
    check(s)
    by_status = await s.count_by_status()
    assert by_status == {st: sum(n for (_w, x), n in fresh_counts(s).items() if x == st)
                         for st in (PENDING, PAUSED, SUCCEEDED, FAILED)}


async def test_a_rolled_back_batch_changes_no_count(storage: SqliteStorage) -> None:
    s = storage
    await s.create_webhook(hook("wh_a"))
    await s.submit(ev(1), [("wh_a", True)])
    before = dict(s._counts.by)

    async def broken(db: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    doomed = s.submit(ev(2), [("wh_a", True)])  # same transaction as the failing operation
    failing = s._writer.run(broken)
    with pytest.raises(Exception, match="disk I/O error"):
        await failing
    with pytest.raises(Exception, match="disk I/O error"):
        await doomed
    assert dict(s._counts.by) == before
    check(s)
    await s.submit(ev(3), [("wh_a", True)])
    check(s)


async def test_counts_are_loaded_at_open(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    s = SqliteStorage(path)
    await s.open()
    await s.create_webhook(hook("wh_a"))
    await asyncio.gather(*[s.submit(ev(i), [("wh_a", i % 2 == 0)]) for i in range(9)])
    await s.close()
    again = SqliteStorage(path)
    await again.open()
    try:
        assert (await again.count_by_status())[PENDING] == 5
        assert (await again.count_by_status())[PAUSED] == 4
        check(again)
    finally:
        await again.close()


async def test_status_listing_merges_per_webhook_walks(storage: SqliteStorage) -> None:
    """Several statuses over several webhooks, newest first, page by page: the merged keyset
    walks give the same rows as a plain filtered query would."""
    s = storage
    for w in ("wh_a", "wh_b", "wh_c"):
        await s.create_webhook(hook(w))
    subs = [("wh_a", True), ("wh_b", False), ("wh_c", True)]
    await asyncio.gather(*[s.submit(ev(i), subs) for i in range(40)])
    ids = [d.id for d in await s.list_deliveries(DeliveryFilter(webhook_id="wh_c"), limit=100)]
    for did in ids[::3]:
        s.record_outcome(outcome(did, "wh_c", FAILED))
    await s.set_webhook_state("wh_c", WebhookState(True, None, 0, 0.0, 1.0))
    expected = [r[0] for r in db_rows(
        s.path, "SELECT id FROM deliveries WHERE status IN ('paused', 'failed') ORDER BY id DESC")]
    seen: list[int] = []
    before = None
    while True:
        page = await s.list_deliveries(DeliveryFilter(statuses=(PAUSED, FAILED)), before=before, limit=7)
        seen.extend(d.id for d in page)
        if len(page) < 7:
            break
        before = page[-1].id
    assert seen == expected
    only_c = await s.list_deliveries(DeliveryFilter(webhook_id="wh_c", statuses=(FAILED, PAUSED)), limit=100)
    assert [d.id for d in only_c] == sorted(ids[::3], reverse=True)
    assert await s.list_deliveries(DeliveryFilter(statuses=(SUCCEEDED,)), limit=10) == []


async def test_listings_never_depend_on_the_counts(storage: SqliteStorage) -> None:
    """A listing reads its webhooks and walks in one read transaction, never the in-memory
    counts: those may be a commit ahead of (or behind) what the reader sees. (When the walks
    were chosen from the counts, a delivery that went pending → failed between the choice
    and the query vanished from its webhook's listing, seen under load.)"""
    s = storage
    await s.create_webhook(hook("wh_a"))
    await s.submit(ev(1), [("wh_a", True)])
    s._counts.by.clear()  # as stale as counts can be
    assert [d.webhook_id for d in await s.list_deliveries(DeliveryFilter(webhook_id="wh_a"))] == ["wh_a"]
    assert len(await s.list_deliveries(DeliveryFilter(statuses=(PENDING, FAILED)))) == 1
