"""The contract every `Storage` backend keeps (webhookd/store/base.py), as plain tests.

Written only against the protocol: no SQL, no backend internals. A backend's test module
(tests/test_storage_<backend>.py) runs the whole suite by importing it and defining one
fixture, `make_storage` (see `MakeStorage`):

    pytest.register_assert_rewrite("tests.storage_contract")  # before the import below
    from tests.storage_contract import *  # noqa: E402, F403

    @pytest.fixture
    async def make_storage(tmp_path: Path) -> AsyncIterator[MakeStorage]: ...

pytest then collects every `test_*` function below (`__all__` names them all, with the
fixtures) once in that module, so each runs once per backend. Each test gets
a fake clock (`clock`), a fresh sink that keeps what it receives (`fresh`) and a storage
opened with both (`storage`); tests that close and reopen call `make_storage` themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
import pytest

from webhookd.events import Event, parse_event
from webhookd.filters import EMPTY_FILTER, WebhookFilter
from webhookd.reasons import Reason
from webhookd.store import (
    DELIVERY_STATUSES,
    FAILED,
    PAUSED,
    PENDING,
    SUCCEEDED,
    ApiToken,
    Attempt,
    BatchOutcomeRecord,
    Delivery,
    DeliveryFilter,
    DueItem,
    FreshEvent,
    FreshSink,
    HourCount,
    OutcomeRecord,
    Storage,
    StoreError,
    Subscriber,
    TrackingHit,
    WebhookRecord,
    WebhookState,
    WebhookStats,
)

HOUR = 3600.0
DAY = 24 * HOUR
T0 = 1_700_001_000.0  # half past an hour
H0 = T0 - 1800  # the start of that hour
START: tuple[float, int] = (float("-inf"), -1)  # a take_due cursor below every key
EVERYTHING = DeliveryFilter()


# -- what a backend module provides, and the fixtures built on it ----------------------------------
class MakeStorage(Protocol):
    """Opens the backend at the calling test's one location and returns it opened. A second
    call opens the same location again (a restart: close the first one before), so it sees
    what the first one committed. Whatever it opened is closed at teardown (close is safe
    to call twice)."""

    async def __call__(self, *, clock: Callable[[], float] | None = None,
                       on_fresh: FreshSink | None = None) -> Storage: ...


@dataclass
class FakeClock:
    """The storage's clock, moved by hand."""

    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fresh() -> list[FreshEvent]:
    """What the storage's fresh sink received, in order."""
    return []


@pytest.fixture
async def storage(make_storage: MakeStorage, clock: FakeClock, fresh: list[FreshEvent]) -> Storage:
    return await make_storage(clock=clock, on_fresh=fresh.extend)


# -- helpers ---------------------------------------------------------------------------------------
def ev(n: int, *, kind: str = "delivered", key: str | None = None, to: str | None = None,
       message_id: str | None = None) -> Event:
    """An event as intake parses it (no "to" unless given)."""
    data: dict[str, Any] = {"message_id": message_id or f"<m{n}@mail.example.com>", "subject": f"order {n}"}
    if to is not None:
        data["to"] = to
    obj: dict[str, Any] = {"event": kind, "data": data}
    if key is not None:
        obj["id"] = key
    return parse_event(orjson.dumps(obj), now=T0)


def webhook(wid: str, *, enabled: bool = True, created_at: float = T0,
            events: tuple[str, ...] = ("*",), filter: WebhookFilter = EMPTY_FILTER) -> WebhookRecord:
    return WebhookRecord(
        id=wid, url=f"https://{wid}.example/hook", events=events, description=f"the {wid} hook", enabled=enabled,
        disabled_reason=None if enabled else "disabled by hand", consecutive_failures=0, backoff_until=0.0,
        secret=f"whsec_{wid}", previous_secret=None, previous_secret_expires_at=None, created_at=created_at,
        updated_at=created_at, filter=filter,
    )


def outcome(delivery_id: int, webhook_id: str, *, ok: bool, at: float, attempts: int = 1,
            status: str | None = None, next_at: float | None = None, updated_at: float | None = None) -> OutcomeRecord:
    """A success (200, delivery succeeded) or a failure (500, delivery pending a minute later)."""
    if status is None:
        status = SUCCEEDED if ok else PENDING
    if status == PENDING and next_at is None:
        next_at = at + 60
    return OutcomeRecord(
        delivery_id=delivery_id, webhook_id=webhook_id, status=status, attempts=attempts,
        next_attempt_at=next_at if status == PENDING else None, at=at, duration_ms=12.5,
        status_code=200 if ok else 500, error=None if ok else "HTTP 500",
        response_body='{"ok": true}' if ok else "oops", updated_at=at + 1 if updated_at is None else updated_at,
    )


async def record(storage: Storage, *records: OutcomeRecord) -> None:
    """Record outcomes and wait until each has committed."""
    loop = asyncio.get_running_loop()
    committed: list[asyncio.Future[None]] = []
    for r in records:
        fut: asyncio.Future[None] = loop.create_future()
        storage.record_outcome(r, on_commit=fut.set_result)
        committed.append(fut)
    await asyncio.gather(*committed)


def ids(fe: FreshEvent) -> list[int]:
    return [fe.delivery_id(i) for i in range(len(fe.subscribers))]


async def submit(storage: Storage, fresh: list[FreshEvent], event: Event,
                 subscribers: Sequence[Subscriber]) -> list[int]:
    """Submit one event with subscribers; the ids of its deliveries, in subscriber order."""
    seen = len(fresh)
    await storage.submit(event, subscribers)
    [fe] = fresh[seen:]
    return ids(fe)


async def statuses(storage: Storage, where: DeliveryFilter = EVERYTHING) -> dict[int, str]:
    return {d.id: d.status for d in await storage.list_deliveries(where, limit=10_000)}


async def one(storage: Storage, delivery_id: int) -> Delivery:
    detail = await storage.delivery(delivery_id)
    assert detail is not None, delivery_id
    return detail.delivery


# -- intake ---------------------------------------------------------------------------------------------
async def test_submit_creates_a_delivery_per_subscriber(storage: Storage, fresh: list[FreshEvent],
                                                        clock: FakeClock) -> None:
    event = ev(1, to="customer1@example.org")
    uid = await storage.submit(event, [("wh_a", True), ("wh_b", False)])
    assert uid.startswith("evt_")

    [fe] = fresh
    assert (fe.event_uid, fe.event_type, fe.body, fe.next_at) == (uid, "delivered", event.body, T0)
    assert list(fe.subscribers) == [("wh_a", True), ("wh_b", False)]
    a, b = ids(fe)
    assert a != b
    [item] = fe.items()  # the pending one only
    assert item == DueItem(a, "wh_a", T0, 0, uid, "delivered", event.body)

    listed = {d.id: d for d in await storage.list_deliveries(EVERYTHING)}
    assert set(listed) == {a, b}
    assert listed[a] == Delivery(
        id=a, event_uid=uid, webhook_id="wh_a", event_type="delivered", status=PENDING, attempts=0,
        next_attempt_at=T0, last_status_code=None, last_error=None, created_at=T0, updated_at=T0,
        message_id="<m1@mail.example.com>", recipient="customer1@example.org",
    )
    assert listed[b] == replace(listed[a], id=b, webhook_id="wh_b", status=PAUSED, next_attempt_at=None)
    assert await storage.take_due("wh_a", START, 10) == [item]
    assert await storage.take_due("wh_b", START, 10) == []  # paused is not due


async def test_each_event_reaches_the_sink_once_with_its_delivery_ids(storage: Storage,
                                                                     fresh: list[FreshEvent]) -> None:
    subs: list[Subscriber] = [("wh_a", True), ("wh_b", True), ("wh_c", False)]
    uids = await asyncio.gather(
        storage.submit(ev(1), subs), storage.submit(ev(2), []), storage.submit(ev(3), subs[1:]),
        storage.submit(ev(4, kind="opened"), subs[:1]),
    )
    assert len(set(uids)) == 4
    assert [fe.event_uid for fe in fresh] == [uids[0], uids[2], uids[3]]  # the one without subscribers: none
    assert [len(fe.subscribers) for fe in fresh] == [3, 2, 1]
    assert [fe.event_type for fe in fresh] == ["delivered", "delivered", "opened"]
    all_ids = [i for fe in fresh for i in ids(fe)]
    assert len(set(all_ids)) == 6
    listed = await storage.list_deliveries(EVERYTHING)
    assert {(d.id, d.event_uid, d.webhook_id) for d in listed} == {
        (fe.delivery_id(i), fe.event_uid, wid) for fe in fresh for i, (wid, _) in enumerate(fe.subscribers)
    }
    assert [i.delivery_id for fe in fresh for i in fe.items()] == [
        fe.delivery_id(i) for fe in fresh for i, (_, enabled) in enumerate(fe.subscribers) if enabled
    ]


async def test_an_event_without_subscribers_is_stored_but_reaches_no_sink(storage: Storage,
                                                                         fresh: list[FreshEvent]) -> None:
    uid = await storage.submit(ev(1, key="k1"), [])
    assert uid.startswith("evt_")
    assert fresh == []
    assert await storage.count_deliveries(EVERYTHING) == 0
    assert storage.received() == {"delivered": 1}
    # stored: its idempotency key is known
    assert await storage.submit(ev(2, key="k1"), [("wh_a", True)]) == uid
    assert fresh == [] and await storage.count_deliveries(EVERYTHING) == 0


async def test_idempotency_within_one_batch(storage: Storage, fresh: list[FreshEvent]) -> None:
    commits = storage.commits
    subs: list[Subscriber] = [("wh_a", True)]
    a, b, c = await asyncio.gather(
        storage.submit(ev(1, key="k1"), subs), storage.submit(ev(2, key="k1"), subs), storage.submit(ev(3), subs)
    )
    assert storage.commits == commits + 1  # one batch
    assert a == b != c
    assert [fe.event_uid for fe in fresh] == [a, c]
    assert await storage.count_deliveries(EVERYTHING) == 2
    assert storage.received() == {"delivered": 2}


async def test_idempotency_across_batches(storage: Storage, fresh: list[FreshEvent]) -> None:
    first = await storage.submit(ev(1, key="k1"), [("wh_a", True)])
    again = await storage.submit(ev(2, key="k1", kind="opened"), [("wh_a", True), ("wh_b", True)])
    other = await storage.submit(ev(3, key="k2"), [("wh_a", True)])
    assert first == again != other
    assert [fe.event_uid for fe in fresh] == [first, other]
    assert await storage.count_deliveries(EVERYTHING) == 2
    assert storage.received() == {"delivered": 2}  # the repeat (an "opened") is not counted
    [d] = await storage.list_deliveries(DeliveryFilter(message_id="<m1@mail.example.com>"))
    assert d.event_uid == first and d.event_type == "delivered"  # the first one's, untouched


async def test_concurrent_submits_share_a_few_commits(storage: Storage, fresh: list[FreshEvent]) -> None:
    commits = storage.commits
    futures = [storage.submit(ev(i), [("wh_a", True)]) for i in range(1000)]
    assert storage.queued == 1000
    uids = await asyncio.gather(*futures)
    assert storage.queued == 0
    assert len(set(uids)) == 1000
    assert storage.commits - commits <= 3
    assert [fe.event_uid for fe in fresh] == uids
    fresh_ids = [fe.delivery_id(0) for fe in fresh]
    assert len(set(fresh_ids)) == 1000
    assert await storage.count_deliveries(EVERYTHING) == 1000
    assert {d.id for d in await storage.list_deliveries(EVERYTHING, limit=2000)} == set(fresh_ids)
    assert storage.received() == {"delivered": 1000}


async def test_received_counts_new_events_by_type(storage: Storage) -> None:
    assert storage.received() == {}
    await asyncio.gather(
        storage.submit(ev(1), [("wh_a", True)]), storage.submit(ev(2, kind="opened", key="k"), []),
        storage.submit(ev(3, kind="opened", key="k"), [("wh_a", True)]),
    )
    await storage.submit(ev(4, kind="opened", key="k"), [])
    await storage.submit(ev(5), [])
    assert storage.received() == {"delivered": 2, "opened": 1}


# -- the scheduler's verbs ----------------------------------------------------------------------------
async def test_take_due_in_key_order_after_the_cursor(storage: Storage, fresh: list[FreshEvent]) -> None:
    subs: list[Subscriber] = [("wh_a", True), ("wh_b", True)]
    await asyncio.gather(*(storage.submit(ev(i), subs) for i in range(6)))
    a = [fe.delivery_id(0) for fe in fresh]  # wh_a's, all due at T0, in id order
    b = [fe.delivery_id(1) for fe in fresh]
    await storage.reschedule(a[0], status=PENDING, next_attempt_at=T0 + 50, now=T0)
    await storage.reschedule(a[1], status=PENDING, next_attempt_at=T0 - 50, now=T0)
    await storage.reschedule(a[2], status=PAUSED, next_attempt_at=None, now=T0)
    await record(storage, outcome(a[3], "wh_a", ok=True, at=T0))

    due = await storage.take_due("wh_a", START, 100)
    assert [d.delivery_id for d in due] == [a[1], a[4], a[5], a[0]]  # by (next_attempt_at, id)
    assert [d.key for d in due] == [(T0 - 50, a[1]), (T0, a[4]), (T0, a[5]), (T0 + 50, a[0])]
    assert {d.webhook_id for d in due} == {"wh_a"}
    assert due[1] == DueItem(a[4], "wh_a", T0, 0, fresh[4].event_uid, "delivered", ev(4).body)
    assert [d.delivery_id for d in await storage.take_due("wh_a", due[1].key, 100)] == [a[5], a[0]]
    assert [d.delivery_id for d in await storage.take_due("wh_a", (T0, a[4] - 1), 2)] == [a[4], a[5]]
    assert [d.delivery_id for d in await storage.take_due("wh_a", (T0, 0), 100)] == [a[4], a[5], a[0]]
    assert await storage.take_due("wh_a", due[-1].key, 100) == []
    assert [d.delivery_id for d in await storage.take_due("wh_b", START, 3)] == b[:3]
    assert await storage.take_due("wh_nobody", START, 100) == []


async def test_take_due_reads_in_the_writers_order(storage: Storage, fresh: list[FreshEvent]) -> None:
    loaded: list[list[DueItem]] = []
    submitted = storage.submit(ev(1), [("wh_a", True)])
    due = storage.take_due("wh_a", START, 10, on_commit=loaded.append)  # queued behind the submit
    [item] = await due
    assert loaded == [[item]]
    assert await submitted == item.event_uid
    rescheduled = storage.reschedule(item.delivery_id, status=PAUSED, next_attempt_at=None, now=T0)
    assert await storage.take_due("wh_a", START, 10) == []
    await rescheduled


async def test_record_outcome_updates_the_delivery_and_adds_attempts(storage: Storage, fresh: list[FreshEvent]) -> None:
    event = ev(1)
    [d] = await submit(storage, fresh, event, [("wh_a", True)])
    committed: list[None] = []
    storage.record_outcome(outcome(d, "wh_a", ok=False, at=T0 + 1, next_at=T0 + 61, updated_at=T0 + 2),
                           on_commit=committed.append)
    [due] = await storage.take_due("wh_a", START, 10)  # behind the outcome
    assert committed == [None]
    assert (due.attempts, due.next_at) == (1, T0 + 61)
    after_fail = await one(storage, d)
    assert (after_fail.status, after_fail.attempts, after_fail.next_attempt_at) == (PENDING, 1, T0 + 61)
    assert (after_fail.last_status_code, after_fail.last_error, after_fail.updated_at) == (500, "HTTP 500", T0 + 2)

    await record(storage, outcome(d, "wh_a", ok=True, at=T0 + 61, attempts=2, updated_at=T0 + 62))
    assert await storage.take_due("wh_a", START, 10) == []
    detail = await storage.delivery(d)
    assert detail is not None
    assert detail.body == event.body
    assert replace(detail.delivery, updated_at=0.0) == replace(
        after_fail, status=SUCCEEDED, attempts=2, next_attempt_at=None, last_status_code=200, last_error=None,
        updated_at=0.0,
    )
    assert detail.delivery.updated_at == T0 + 62
    assert detail.attempts == (
        Attempt(T0 + 1, 12.5, 500, "HTTP 500", "oops"), Attempt(T0 + 61, 12.5, 200, None, '{"ok": true}'),
    )

    # a final failure
    [d2] = await submit(storage, fresh, ev(2), [("wh_a", True)])
    await record(storage, outcome(d2, "wh_a", ok=False, at=T0 + 5, status=FAILED))
    failed = await one(storage, d2)
    assert (failed.status, failed.next_attempt_at, failed.last_status_code) == (FAILED, None, 500)


BATCH = "batch_" + "b" * 26


async def record_batch(storage: Storage, record: BatchOutcomeRecord) -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    storage.record_batch_outcome(record, on_commit=fut.set_result)
    await fut


async def test_a_batch_outcome_updates_each_delivery_and_adds_an_attempt_each(
        storage: Storage, fresh: list[FreshEvent], clock: FakeClock) -> None:
    await storage.create_webhook(webhook("wh_a"))
    ds = [(await submit(storage, fresh, ev(i), [("wh_a", True)]))[0] for i in range(4)]
    # one failed batch: three stay pending (kept together), one reaches its max attempts
    await record_batch(storage, BatchOutcomeRecord(
        webhook_id="wh_a", batch_id=BATCH, delivery_ids=tuple(ds), statuses=(PENDING, PENDING, FAILED, PENDING),
        attempts=(1, 1, 3, 1), next_attempt_at=T0 + 60, at=T0 + 1, duration_ms=7.5, status_code=503,
        error="HTTP 503", response_body="busy", updated_at=T0 + 2))
    rows = [await one(storage, d) for d in ds]
    assert [(r.status, r.attempts, r.next_attempt_at, r.last_status_code, r.last_error, r.updated_at)
            for r in rows] == [(PENDING, 1, T0 + 60, 503, "HTTP 503", T0 + 2)] * 2 + [
        (FAILED, 3, None, 503, "HTTP 503", T0 + 2), (PENDING, 1, T0 + 60, 503, "HTTP 503", T0 + 2)]
    due = await storage.take_due("wh_a", START, 10)
    assert [(x.delivery_id, x.next_at, x.attempts) for x in due] == [(ds[0], T0 + 60, 1), (ds[1], T0 + 60, 1),
                                                                      (ds[3], T0 + 60, 1)]
    await record_batch(storage, BatchOutcomeRecord(
        webhook_id="wh_a", batch_id=BATCH, delivery_ids=(ds[0], ds[1], ds[3]), statuses=(SUCCEEDED,) * 3,
        attempts=(2, 2, 2), next_attempt_at=None, at=T0 + 61, duration_ms=3.0, status_code=200, error=None,
        response_body="ok", updated_at=T0 + 62))
    detail = await storage.delivery(ds[0])
    assert detail is not None and detail.attempts == (
        Attempt(T0 + 1, 7.5, 503, "HTTP 503", "busy", BATCH), Attempt(T0 + 61, 3.0, 200, None, "ok", BATCH))
    assert await statuses(storage) == {ds[0]: SUCCEEDED, ds[1]: SUCCEEDED, ds[2]: FAILED, ds[3]: SUCCEEDED}
    assert await storage.count_by_status() == {PENDING: 0, PAUSED: 0, SUCCEEDED: 3, FAILED: 1}
    assert sorted(d.id for d in await storage.list_deliveries(DeliveryFilter(batch_id=BATCH))) == ds
    assert await storage.count_deliveries(DeliveryFilter(batch_id=BATCH, statuses=(SUCCEEDED,))) == 3
    assert await storage.count_deliveries(DeliveryFilter(batch_id="batch_" + "c" * 26)) == 0
    stats = (await storage.webhook_stats(clock()))["wh_a"]
    assert (stats.succeeded_24h, stats.failed_24h, stats.last_attempt_at, stats.last_status_code) == (
        3, 4, T0 + 61, 200)  # per delivery: 4 failed attempts, then 3 successes
    assert await storage.hourly_counts(H0, H0 + HOUR) == [HourCount(int(H0), succeeded=3, failed=4)]


async def test_a_batch_outcome_for_deleted_deliveries_is_dropped(storage: Storage, fresh: list[FreshEvent]) -> None:
    await storage.create_webhook(webhook("wh_a"))
    await storage.create_webhook(webhook("wh_b"))
    a = (await submit(storage, fresh, ev(1), [("wh_a", True)]))[0]
    b = (await submit(storage, fresh, ev(2), [("wh_b", True)]))[0]
    await storage.delete_webhook("wh_b")
    await record_batch(storage, BatchOutcomeRecord(
        webhook_id="wh_b", batch_id=BATCH, delivery_ids=(b,), statuses=(SUCCEEDED,), attempts=(1,),
        next_attempt_at=None, at=T0, duration_ms=1.0, status_code=200, error=None, response_body="", updated_at=T0))
    assert await storage.delivery(b) is None
    assert await storage.count_deliveries(DeliveryFilter(batch_id=BATCH)) == 0
    assert await storage.count_by_status() == {PENDING: 1, PAUSED: 0, SUCCEEDED: 0, FAILED: 0}
    assert await statuses(storage) == {a: PENDING}


async def test_outcomes_count_in_stats_and_hourly_counts(storage: Storage, fresh: list[FreshEvent],
                                                        clock: FakeClock) -> None:
    subs: list[Subscriber] = [("wh_a", True), ("wh_b", True), ("wh_p", False)]
    for wid, enabled in subs:
        await storage.create_webhook(webhook(wid, enabled=enabled))
    rows = [await submit(storage, fresh, ev(i), subs) for i in range(6)]
    a = [r[0] for r in rows]
    b = [r[1] for r in rows]
    await record(
        storage,
        outcome(a[0], "wh_a", ok=False, at=T0 - 2 * DAY, status=FAILED),  # outside the 24 h
        outcome(a[1], "wh_a", ok=True, at=T0 - 3 * HOUR),
        outcome(a[2], "wh_a", ok=True, at=T0 - 600),
        outcome(a[3], "wh_a", ok=False, at=T0 - 300),  # the last one, still pending
        outcome(b[0], "wh_b", ok=False, at=T0 - HOUR, status=FAILED),
    )
    await record(storage, outcome(a[4], "wh_a", ok=True, at=T0 - 5 * HOUR))  # committed last, but older

    stats = await storage.webhook_stats(clock())
    assert stats["wh_a"] == WebhookStats(
        "wh_a", last_attempt_at=T0 - 300, last_status_code=500, last_error="HTTP 500", succeeded_24h=3,
        failed_24h=1, pending=2, paused=0,  # a[3] and a[5] pending
    )
    assert stats["wh_b"] == WebhookStats(
        "wh_b", last_attempt_at=T0 - HOUR, last_status_code=500, last_error="HTTP 500", failed_24h=1, pending=5,
    )
    assert stats["wh_p"] == WebhookStats("wh_p", paused=6)
    assert stats.get("wh_none", WebhookStats("wh_none")) == WebhookStats("wh_none")

    assert await storage.hourly_counts(H0 - 3 * HOUR, H0 + HOUR) == [
        HourCount(int(H0 - 3 * HOUR), succeeded=1), HourCount(int(H0 - HOUR), failed=1),
        HourCount(int(H0), succeeded=1, failed=1),
    ]
    assert await storage.hourly_counts(H0 - 3 * HOUR, H0) == [
        HourCount(int(H0 - 3 * HOUR), succeeded=1), HourCount(int(H0 - HOUR), failed=1),
    ]
    week = await storage.hourly_counts(H0 - 7 * DAY, H0 + HOUR)
    assert week[0] == HourCount(int(H0 - 2 * DAY), failed=1)
    assert (sum(h.succeeded for h in week), sum(h.failed for h in week)) == (3, 3)
    assert await storage.hourly_counts(H0 + HOUR, H0 + 5 * HOUR) == []

    clock.advance(2 * DAY)  # a day without attempts: the counts fall to zero, the last attempt stays
    later = await storage.webhook_stats(clock())
    assert later["wh_a"] == replace(stats["wh_a"], succeeded_24h=0, failed_24h=0)
    assert later["wh_b"] == replace(stats["wh_b"], failed_24h=0)


async def test_set_webhook_state_with_and_without_pausing(storage: Storage, fresh: list[FreshEvent]) -> None:
    await storage.create_webhook(webhook("wh_a"))
    await storage.create_webhook(webhook("wh_b", created_at=T0 + 1))
    rows = [await submit(storage, fresh, ev(i), [("wh_a", True), ("wh_b", True)]) for i in range(3)]
    await record(storage, outcome(rows[0][0], "wh_a", ok=True, at=T0))

    backoff = WebhookState(enabled=True, disabled_reason=None, consecutive_failures=3, backoff_until=T0 + 30,
                           updated_at=T0 + 5)
    committed: list[None] = []
    await storage.set_webhook_state("wh_b", backoff, on_commit=committed.append)
    assert committed == [None]
    off = WebhookState(enabled=False, disabled_reason="consecutive_failures", consecutive_failures=5,
                       backoff_until=T0 + 60, updated_at=T0 + 9)
    await storage.set_webhook_state("wh_a", off, pause_pending=True)

    a, b = await storage.load_webhooks()
    assert a == replace(webhook("wh_a"), enabled=False, disabled_reason="consecutive_failures",
                        consecutive_failures=5, backoff_until=T0 + 60, updated_at=T0 + 9)
    assert b == replace(webhook("wh_b", created_at=T0 + 1), consecutive_failures=3, backoff_until=T0 + 30,
                        updated_at=T0 + 5)
    listed = {d.id: d for d in await storage.list_deliveries(EVERYTHING)}
    assert listed[rows[0][0]].status == SUCCEEDED  # finished ones stay as they are
    for r in rows[1:]:
        paused = listed[r[0]]
        assert (paused.status, paused.next_attempt_at, paused.updated_at) == (PAUSED, None, T0 + 9)
    assert {listed[r[1]].status for r in rows} == {PENDING}  # without pause_pending
    assert await storage.take_due("wh_a", START, 10) == []
    assert len(await storage.take_due("wh_b", START, 10)) == 3


# -- webhook administration ---------------------------------------------------------------------------
async def test_create_update_and_rotate_are_visible_in_load_webhooks(storage: Storage) -> None:
    assert await storage.load_webhooks() == []
    newer, older = webhook("wh_new", created_at=T0 + 100), webhook("wh_old", created_at=T0, events=("bounced",))
    log: list[str] = []
    await storage.create_webhook(newer, on_commit=lambda _: log.append("created"))
    assert log == ["created"]
    await storage.create_webhook(older)
    assert await storage.load_webhooks() == [older, newer]  # oldest first

    await storage.update_webhook("wh_old", url="https://elsewhere.example/h", events=("delivered", "opened"),
                                 description="moved", filter=EMPTY_FILTER, updated_at=T0 + 200,
                                 on_commit=lambda _: log.append("updated"))
    await storage.rotate_secret("wh_new", secret="whsec_new", previous_secret="whsec_wh_new",
                                previous_expires_at=T0 + 86_400, now=T0 + 300,
                                on_commit=lambda _: log.append("rotated"))
    assert log == ["created", "updated", "rotated"]
    assert await storage.load_webhooks() == [
        replace(older, url="https://elsewhere.example/h", events=("delivered", "opened"), description="moved",
                updated_at=T0 + 200),
        replace(newer, secret="whsec_new", previous_secret="whsec_wh_new", previous_secret_expires_at=T0 + 86_400,
                updated_at=T0 + 300),
    ]


# every field at its bounds' kind: IDN and wildcard domains, non-ASCII and markup in tags and metadata
FULL_FILTER = WebhookFilter.parse({
    "from_domains": ["shop.example", "*.shop.example", "bücher.example"],
    "to_domains": ["gmail.example"],
    "tags": ["vip", "<script>alert(1)</script>", "ünïcode", 'quote"d'],
    "metadata": {"plan": "gold", "région": "eu-west", "empty": "", "json": '{"a": [1]}'},
})


async def test_filters_round_trip_through_create_update_and_reopen(make_storage: MakeStorage,
                                                                   clock: FakeClock) -> None:
    storage = await make_storage(clock=clock)
    only_tags = WebhookFilter.parse({"tags": ["eu"]})
    await storage.create_webhook(webhook("wh_full", filter=FULL_FILTER))
    await storage.create_webhook(webhook("wh_none", created_at=T0 + 1))
    await storage.create_webhook(webhook("wh_tags", created_at=T0 + 2, filter=only_tags))
    loaded = {w.id: w.filter for w in await storage.load_webhooks()}
    assert loaded == {"wh_full": FULL_FILTER, "wh_none": EMPTY_FILTER, "wh_tags": only_tags}
    assert loaded["wh_none"].empty and loaded["wh_full"].to_json() == FULL_FILTER.to_json()

    log: list[str] = []
    await storage.update_webhook("wh_none", url="https://wh_none.example/hook", events=("*",),
                                 description="the wh_none hook", filter=FULL_FILTER, updated_at=T0 + 10,
                                 on_commit=lambda _: log.append("set"))
    await storage.update_webhook("wh_full", url="https://wh_full.example/hook", events=("*",),
                                 description="the wh_full hook", filter=EMPTY_FILTER, updated_at=T0 + 10)
    assert log == ["set"]
    await storage.close()

    again = await make_storage(clock=clock)  # what a restart reads
    by_id = {w.id: w for w in await again.load_webhooks()}
    assert by_id["wh_none"] == replace(webhook("wh_none", created_at=T0 + 1, filter=FULL_FILTER), updated_at=T0 + 10)
    assert by_id["wh_full"] == replace(webhook("wh_full"), updated_at=T0 + 10)  # cleared: the empty filter
    assert by_id["wh_tags"].filter == only_tags


async def test_declared_name_and_file_round_trip_and_names_are_unique(make_storage: MakeStorage,
                                                                       clock: FakeClock) -> None:
    """Webhooks as code (webhookd/declared.py): a declared webhook's name and file are stored
    with it; the file can be cleared (removed from the config) and set again; the name stays,
    and no second webhook can take it. Webhooks made through the API have neither."""
    storage = await make_storage(clock=clock)
    shop = replace(webhook("wh_shop"), name="shop", declared_in="/etc/webhookd/webhooks.d/shop.toml")
    await storage.create_webhook(shop)
    await storage.create_webhook(webhook("wh_api", created_at=T0 + 1))
    await storage.create_webhook(webhook("wh_api2", created_at=T0 + 2))  # many unnamed ones
    assert [(w.id, w.name, w.declared_in) for w in await storage.load_webhooks()] == [
        ("wh_shop", "shop", "/etc/webhookd/webhooks.d/shop.toml"), ("wh_api", None, None), ("wh_api2", None, None),
    ]
    with pytest.raises(StoreError):
        await storage.create_webhook(replace(webhook("wh_dup", created_at=T0 + 3), name="shop"))
    log: list[str] = []
    await storage.set_declared_in("wh_shop", None, updated_at=T0 + 10, on_commit=lambda _: log.append("cleared"))
    assert log == ["cleared"]
    await storage.close()

    again = await make_storage(clock=clock)
    [first, *_] = await again.load_webhooks()
    assert first == replace(shop, declared_in=None, updated_at=T0 + 10)
    assert len(await again.load_webhooks()) == 3  # the refused duplicate left nothing
    await again.set_declared_in("wh_shop", "/etc/webhookd/config.toml", updated_at=T0 + 20)
    [first, *_] = await again.load_webhooks()
    assert (first.name, first.declared_in, first.updated_at) == ("shop", "/etc/webhookd/config.toml", T0 + 20)


async def test_a_filter_does_not_change_what_submit_stores(storage: Storage, fresh: list[FreshEvent]) -> None:
    """Filters are applied by the caller of submit (the fan-out): the storage stores one delivery
    per subscriber it is given, filtered webhook or not, and none for an empty list."""
    await storage.create_webhook(webhook("wh_f", filter=WebhookFilter.parse({"tags": ["never"]})))
    uid = await storage.submit(ev(1), [("wh_f", True)])
    assert [(d.event_uid, d.webhook_id) for d in await storage.list_deliveries(EVERYTHING)] == [(uid, "wh_f")]
    await storage.submit(ev(2), [])
    assert len(await storage.list_deliveries(EVERYTHING)) == 1


async def test_delete_webhook_removes_its_deliveries_and_attempts(storage: Storage, fresh: list[FreshEvent],
                                                                  clock: FakeClock) -> None:
    await storage.create_webhook(webhook("wh_a"))
    await storage.create_webhook(webhook("wh_b", created_at=T0 + 1))
    rows = [await submit(storage, fresh, ev(i), [("wh_a", True), ("wh_b", True)]) for i in range(3)]
    await record(storage, outcome(rows[0][0], "wh_a", ok=True, at=T0 - 10),
                 outcome(rows[1][0], "wh_a", ok=False, at=T0 - 10),
                 outcome(rows[0][1], "wh_b", ok=False, at=T0 - 5, status=FAILED))
    committed: list[None] = []
    await storage.delete_webhook("wh_a", on_commit=committed.append)
    assert committed == [None]

    assert [w.id for w in await storage.load_webhooks()] == ["wh_b"]
    assert await storage.list_deliveries(DeliveryFilter(webhook_id="wh_a")) == []
    assert await storage.count_deliveries(DeliveryFilter(webhook_id="wh_a")) == 0
    assert await storage.take_due("wh_a", START, 10) == []
    for r in rows:
        assert await storage.delivery(r[0]) is None
        assert await storage.due_item(r[0]) is None
    assert sorted(await statuses(storage)) == sorted(r[1] for r in rows)
    detail = await storage.delivery(rows[0][1])
    assert detail is not None and len(detail.attempts) == 1  # the other webhook keeps its attempts
    stats = await storage.webhook_stats(clock())
    assert "wh_a" not in stats
    assert stats["wh_b"].failed_24h == 1
    assert await storage.hourly_counts(H0 - HOUR, H0 + HOUR) == [HourCount(int(H0), failed=1)]
    counts = await storage.count_by_status()
    assert (counts[PENDING], counts[FAILED], counts[SUCCEEDED]) == (2, 1, 0)


async def test_enable_webhook_resumes_the_paused_backlog(storage: Storage, fresh: list[FreshEvent]) -> None:
    await storage.create_webhook(webhook("wh_a"))
    rows = [await submit(storage, fresh, ev(i), [("wh_a", True), ("wh_b", True)]) for i in range(3)]
    a = [r[0] for r in rows]
    await record(storage, outcome(a[0], "wh_a", ok=True, at=T0))
    off = WebhookState(False, "consecutive_failures", 5, T0 + 60, T0 + 1)
    await storage.set_webhook_state("wh_a", off, pause_pending=True)
    assert await storage.take_due("wh_a", START, 10) == []

    resumed: list[int] = []
    assert await storage.enable_webhook("wh_a", now=T0 + 100, drop_backlog=False, on_commit=resumed.append) == 2
    assert resumed == [2]
    [wh] = await storage.load_webhooks()
    assert wh == replace(webhook("wh_a"), updated_at=T0 + 100)  # enabled, the gate reset
    due = await storage.take_due("wh_a", START, 10)
    assert [(d.delivery_id, d.next_at) for d in due] == [(a[1], T0 + 100), (a[2], T0 + 100)]  # due now
    listed = await statuses(storage, DeliveryFilter(webhook_id="wh_a"))
    assert listed == {a[0]: SUCCEEDED, a[1]: PENDING, a[2]: PENDING}
    assert {s for d, s in (await statuses(storage)).items() if d not in a} == {PENDING}  # wh_b untouched
    assert await storage.enable_webhook("wh_a", now=T0 + 200, drop_backlog=False) == 0  # nothing paused


async def test_enable_webhook_can_drop_the_backlog(storage: Storage, fresh: list[FreshEvent]) -> None:
    await storage.create_webhook(webhook("wh_a", enabled=False))
    for i in range(3):  # a disabled webhook's deliveries may be deferred: the listing names them
        await storage.submit(ev(i), [("wh_a", False)])
    rows = [[d] for d in sorted(await statuses(storage, DeliveryFilter(webhook_id="wh_a")))]
    assert len(rows) == 3
    await storage.reschedule(rows[0][0], status=PENDING, next_attempt_at=T0, now=T0)
    dropped: list[int] = []
    assert await storage.enable_webhook("wh_a", now=T0 + 100, drop_backlog=True, on_commit=dropped.append) == 2
    assert dropped == [2]
    [wh] = await storage.load_webhooks()
    assert (wh.enabled, wh.disabled_reason, wh.updated_at) == (True, None, T0 + 100)
    for r in rows[1:]:
        d = await one(storage, r[0])
        assert (d.status, d.next_attempt_at, d.updated_at) == (FAILED, None, T0 + 100)
        assert d.last_error  # says why
    assert [d.delivery_id for d in await storage.take_due("wh_a", START, 10)] == [rows[0][0]]  # it was pending


# -- deliveries ---------------------------------------------------------------------------------------------
async def test_reschedule_sets_a_delivery_pending_or_paused(storage: Storage, fresh: list[FreshEvent]) -> None:
    [d] = await submit(storage, fresh, ev(1), [("wh_a", True)])
    await record(storage, outcome(d, "wh_a", ok=False, at=T0, status=FAILED))
    committed: list[None] = []
    await storage.reschedule(d, status=PENDING, next_attempt_at=T0 + 10, now=T0 + 5, on_commit=committed.append)
    assert committed == [None]
    [due] = await storage.take_due("wh_a", START, 10)
    assert (due.delivery_id, due.next_at, due.attempts) == (d, T0 + 10, 1)
    row = await one(storage, d)
    assert (row.status, row.next_attempt_at, row.updated_at, row.attempts) == (PENDING, T0 + 10, T0 + 5, 1)
    await storage.reschedule(d, status=PAUSED, next_attempt_at=None, now=T0 + 6)
    row = await one(storage, d)
    assert (row.status, row.next_attempt_at, row.updated_at) == (PAUSED, None, T0 + 6)
    assert await storage.take_due("wh_a", START, 10) == []


async def test_replay_requeues_by_age_and_status(storage: Storage, fresh: list[FreshEvent], clock: FakeClock) -> None:
    made: list[list[int]] = []
    for i in range(4):  # created at T0, T0+10, T0+20, T0+30
        made.append(await submit(storage, fresh, ev(i), [("wh_a", True), ("wh_b", True)]))
        clock.advance(10)
    a = [r[0] for r in made]
    await record(storage, outcome(a[0], "wh_a", ok=True, at=T0 + 40), outcome(a[1], "wh_a", ok=True, at=T0 + 40),
                 outcome(a[2], "wh_a", ok=False, at=T0 + 40, status=FAILED),
                 outcome(made[2][1], "wh_b", ok=True, at=T0 + 40))
    requeued: list[int] = []
    n = await storage.replay("wh_a", since=T0 + 10, statuses=(SUCCEEDED, FAILED), status=PENDING,
                             next_attempt_at=T0 + 50, now=T0 + 45, on_commit=requeued.append)
    assert n == 2 and requeued == [2]  # a[1] (created exactly at `since`) and a[2]; a[0] is older; a[3] pending
    assert await statuses(storage, DeliveryFilter(webhook_id="wh_a")) == {
        a[0]: SUCCEEDED, a[1]: PENDING, a[2]: PENDING, a[3]: PENDING,
    }
    replayed = await one(storage, a[2])
    assert (replayed.next_attempt_at, replayed.updated_at, replayed.attempts) == (T0 + 50, T0 + 45, 1)
    assert (await one(storage, made[2][1])).status == SUCCEEDED  # the other webhook's: untouched
    assert await storage.replay("wh_a", since=T0, statuses=(FAILED,), status=PAUSED, next_attempt_at=None,
                                now=T0 + 46) == 0
    assert await storage.replay("wh_a", since=T0, statuses=(PENDING,), status=PAUSED, next_attempt_at=None,
                                now=T0 + 46) == 3
    assert await storage.take_due("wh_a", START, 10) == []


async def test_retry_failed_requeues_matching_failures_of_the_given_webhooks(
    storage: Storage, fresh: list[FreshEvent], clock: FakeClock
) -> None:
    subs: list[Subscriber] = [("wh_a", True), ("wh_b", True), ("wh_c", True)]
    rows = [await submit(storage, fresh, ev(i, kind="opened" if i == 2 else "delivered"), subs) for i in range(3)]
    await record(storage, *(outcome(d, wid, ok=False, at=T0, status=FAILED)
                            for r in rows for d, (wid, _) in zip(r, subs, strict=True)))
    await record(storage, outcome(rows[0][0], "wh_a", ok=False, at=T0 + 1, attempts=2))  # back to pending
    where = DeliveryFilter(event_type="delivered", statuses=(SUCCEEDED,))  # statuses are ignored
    retried: list[int] = []
    n = await storage.retry_failed(where, [("wh_a", True), ("wh_b", False)], now=T0 + 100,
                                   on_commit=retried.append)
    assert n == 3 and retried == [3]  # rows[1] on wh_a, rows[0..1] on wh_b
    listed = await statuses(storage)
    assert listed[rows[1][0]] == PENDING and listed[rows[0][1]] == listed[rows[1][1]] == PAUSED
    assert listed[rows[2][0]] == listed[rows[2][1]] == FAILED  # an "opened"
    assert {listed[r[2]] for r in rows} == {FAILED}  # wh_c was not named
    due = await storage.take_due("wh_a", START, 10)
    assert [(d.delivery_id, d.next_at) for d in due] == [(rows[0][0], T0 + 61), (rows[1][0], T0 + 100)]
    assert (await one(storage, rows[0][1])).next_attempt_at is None
    assert await storage.retry_failed(DeliveryFilter(webhook_id="wh_c"), subs, now=T0 + 200) == 3


async def test_due_item_is_the_delivery_as_attempted(storage: Storage, fresh: list[FreshEvent]) -> None:
    event = ev(1)
    a, b = await submit(storage, fresh, event, [("wh_a", True), ("wh_b", False)])
    await record(storage, outcome(a, "wh_a", ok=False, at=T0, next_at=T0 + 30))
    assert await storage.due_item(a) == (DueItem(a, "wh_a", T0 + 30, 1, fresh[0].event_uid, "delivered", event.body),
                                         PENDING)
    found = await storage.due_item(b)
    assert found is not None and found[1] == PAUSED and found[0].delivery_id == b and found[0].body == event.body
    await record(storage, outcome(a, "wh_a", ok=True, at=T0 + 30, attempts=2))
    found = await storage.due_item(a)
    assert found is not None and (found[0].attempts, found[1]) == (2, SUCCEEDED)
    assert await storage.due_item(b + 1000) is None


# -- queries for people -----------------------------------------------------------------------------
async def test_list_deliveries_pages_newest_first_with_a_keyset(storage: Storage, fresh: list[FreshEvent]) -> None:
    await asyncio.gather(*(storage.submit(ev(i), [("wh_a", True), ("wh_b", True)]) for i in range(12)))
    everything = sorted((i for fe in fresh for i in ids(fe)), reverse=True)
    assert [d.id for d in await storage.list_deliveries(EVERYTHING)] == everything
    assert [d.id for d in await storage.list_deliveries(EVERYTHING, limit=3)] == everything[:3]

    async def walk(where: DeliveryFilter, size: int) -> list[int]:
        seen: list[int] = []
        before: int | None = None
        for _ in range(100):
            page = await storage.list_deliveries(where, before=before, limit=size)
            assert len(page) <= size
            seen.extend(d.id for d in page)
            if len(page) < size:
                return seen
            before = page[-1].id
        raise AssertionError("the walk never ended")

    assert await walk(EVERYTHING, 5) == everything  # 24: every one once, in order
    assert await walk(EVERYTHING, 24) == everything
    assert await walk(DeliveryFilter(webhook_id="wh_b"), 5) == [fe.delivery_id(1) for fe in reversed(fresh)]
    assert [d.id for d in await storage.list_deliveries(EVERYTHING, before=everything[10], limit=3)] == \
        everything[11:14]
    assert await storage.list_deliveries(EVERYTHING, before=everything[-1]) == []


async def test_list_and_count_deliveries_by_every_filter(storage: Storage, fresh: list[FreshEvent],
                                                        clock: FakeClock) -> None:
    a_b: list[Subscriber] = [("wh_a", True), ("wh_b", True)]
    e1 = await submit(storage, fresh, ev(1, to="Customer1@Example.org"), a_b)  # at T0
    clock.advance(10)
    e2 = await submit(storage, fresh, ev(2, kind="opened", to="customer2@example.org"), a_b[:1])  # T0+10
    clock.advance(10)
    e3 = await submit(storage, fresh, ev(3), [("wh_b", False)])  # T0+20, no "to"
    clock.advance(10)
    e4 = await submit(storage, fresh, ev(4, kind="opened", to="customer1@example.org",
                                         message_id="<m1@mail.example.com>"), a_b)  # T0+30, same message as e1
    await record(storage, outcome(e1[0], "wh_a", ok=True, at=T0 + 40),
                 outcome(e1[1], "wh_b", ok=False, at=T0 + 40, status=FAILED),
                 outcome(e2[0], "wh_a", ok=False, at=T0 + 40), outcome(e4[0], "wh_a", ok=True, at=T0 + 40))
    uid = [fe.event_uid for fe in fresh]
    # id -> (webhook, status, type, message id, recipient, created_at, event uid)
    m1, m2, m3 = "<m1@mail.example.com>", "<m2@mail.example.com>", "<m3@mail.example.com>"
    expected: dict[int, tuple[str, str, str, str, str, float, str]] = {
        e1[0]: ("wh_a", SUCCEEDED, "delivered", m1, "Customer1@Example.org", T0, uid[0]),
        e1[1]: ("wh_b", FAILED, "delivered", m1, "Customer1@Example.org", T0, uid[0]),
        e2[0]: ("wh_a", PENDING, "opened", m2, "customer2@example.org", T0 + 10, uid[1]),
        e3[0]: ("wh_b", PAUSED, "delivered", m3, "", T0 + 20, uid[2]),
        e4[0]: ("wh_a", SUCCEEDED, "opened", m1, "customer1@example.org", T0 + 30, uid[3]),
        e4[1]: ("wh_b", PENDING, "opened", m1, "customer1@example.org", T0 + 30, uid[3]),
    }
    listed = await storage.list_deliveries(EVERYTHING)
    assert {d.id: (d.webhook_id, d.status, d.event_type, d.message_id, d.recipient, d.created_at, d.event_uid)
            for d in listed} == expected

    def matches(f: DeliveryFilter, row: tuple[str, str, str, str, str, float, str]) -> bool:
        wid, status, kind, msg, to, created, _ = row
        return ((f.webhook_id is None or wid == f.webhook_id) and (not f.statuses or status in f.statuses)
                and (f.event_type is None or kind == f.event_type) and (f.message_id is None or msg == f.message_id)
                and (f.recipient is None or to.lower() == f.recipient.lower())
                and (f.since is None or created >= f.since) and (f.until is None or created < f.until))

    filters = [
        DeliveryFilter(webhook_id="wh_a"), DeliveryFilter(webhook_id="wh_nobody"),
        DeliveryFilter(statuses=(PENDING,)), DeliveryFilter(statuses=(SUCCEEDED, FAILED)),
        DeliveryFilter(statuses=(PAUSED, PENDING, FAILED)), DeliveryFilter(event_type="opened"),
        DeliveryFilter(message_id=m1), DeliveryFilter(message_id="<nothing-like-it>"),
        DeliveryFilter(recipient="customer1@example.org"), DeliveryFilter(recipient="CUSTOMER1@EXAMPLE.ORG"),
        DeliveryFilter(recipient="Customer2@example.ORG"), DeliveryFilter(recipient="customer1"),
        DeliveryFilter(since=T0 + 10), DeliveryFilter(until=T0 + 10), DeliveryFilter(since=T0 + 10, until=T0 + 30),
        DeliveryFilter(webhook_id="wh_a", event_type="opened", message_id=m1),
        DeliveryFilter(recipient="CUSTOMER1@example.org", statuses=(SUCCEEDED, PENDING), since=T0 + 1),
        DeliveryFilter(webhook_id="wh_b", statuses=(FAILED, PAUSED), event_type="delivered", until=T0 + 21),
        DeliveryFilter(webhook_id="wh_b", message_id=m1, recipient="customer1@example.org", event_type="opened",
                       statuses=(PENDING,), since=T0 + 30, until=T0 + 31),
    ]
    for f in filters:
        want = sorted((i for i, row in expected.items() if matches(f, row)), reverse=True)
        got = [d.id for d in await storage.list_deliveries(f)]
        assert got == want, f
        assert await storage.count_deliveries(f) == len(want), f
        assert [d.id for d in await storage.list_deliveries(f, limit=1)] == want[:1], f
    assert len(await storage.list_deliveries(DeliveryFilter(recipient="customer1@example.org"))) == 4
    assert await storage.count_deliveries(EVERYTHING) == 6


async def test_delivery_detail_has_the_body_and_attempts_in_order(storage: Storage, fresh: list[FreshEvent]) -> None:
    event = ev(1, to="someone@example.org")
    [d] = await submit(storage, fresh, event, [("wh_a", True)])
    detail = await storage.delivery(d)
    assert detail is not None
    assert detail.body == event.body and isinstance(detail.body, bytes)
    assert orjson.loads(detail.body)["data"]["to"] == "someone@example.org"
    assert detail.attempts == ()
    assert detail.delivery == (await storage.list_deliveries(EVERYTHING))[0]
    await record(storage, *(outcome(d, "wh_a", ok=False, at=T0 + i, attempts=i + 1) for i in range(3)))
    await record(storage, outcome(d, "wh_a", ok=True, at=T0 + 3, attempts=4))
    detail = await storage.delivery(d)
    assert detail is not None
    assert [(a.at, a.status_code, a.error) for a in detail.attempts] == [
        (T0, 500, "HTTP 500"), (T0 + 1, 500, "HTTP 500"), (T0 + 2, 500, "HTTP 500"), (T0 + 3, 200, None),
    ]
    assert detail.delivery.attempts == 4
    assert await storage.delivery(d + 1) is None
    assert await storage.delivery(0) is None


async def test_count_by_status_includes_zeros(storage: Storage, fresh: list[FreshEvent]) -> None:
    assert await storage.count_by_status() == dict.fromkeys(DELIVERY_STATUSES, 0)
    a, _b, _c = await submit(storage, fresh, ev(1), [("wh_a", True), ("wh_b", False), ("wh_c", True)])
    await record(storage, outcome(a, "wh_a", ok=True, at=T0))
    assert await storage.count_by_status() == {PENDING: 1, PAUSED: 1, SUCCEEDED: 1, FAILED: 0}


async def test_oldest_pending_is_the_first_created_pending_delivery(storage: Storage, fresh: list[FreshEvent],
                                                                   clock: FakeClock) -> None:
    assert await storage.oldest_pending() is None
    a1, p1 = await submit(storage, fresh, ev(1), [("wh_a", True), ("wh_p", False)])
    clock.advance(10)
    a2, b2 = await submit(storage, fresh, ev(2), [("wh_a", True), ("wh_b", True)])
    clock.advance(10)
    [b3] = await submit(storage, fresh, ev(3), [("wh_b", True)])
    assert await storage.oldest_pending() == T0

    await record(storage, outcome(a1, "wh_a", ok=True, at=T0 + 30))
    assert await storage.oldest_pending() == T0 + 10  # the paused one (T0) does not count
    await record(storage, outcome(a2, "wh_a", ok=False, at=T0 + 31))  # retried later: still pending
    assert await storage.oldest_pending() == T0 + 10
    await record(storage, outcome(a2, "wh_a", ok=True, at=T0 + 32, attempts=2),
                 outcome(b2, "wh_b", ok=False, at=T0 + 33, status=FAILED))
    assert await storage.oldest_pending() == T0 + 20
    await record(storage, outcome(b3, "wh_b", ok=True, at=T0 + 34))
    assert await storage.oldest_pending() is None

    # a manual retry makes an old delivery pending again: its age is its event's
    await storage.reschedule(b2, status=PENDING, next_attempt_at=T0 + 40, now=T0 + 40)
    assert await storage.oldest_pending() == T0 + 10
    await storage.enable_webhook("wh_p", now=T0 + 50, drop_backlog=False)  # resumes p1, created at T0
    assert await storage.oldest_pending() == T0
    off = WebhookState(False, "consecutive_failures", 10, T0 + 60, T0 + 60)
    await storage.set_webhook_state("wh_p", off, pause_pending=True)
    await storage.set_webhook_state("wh_b", off, pause_pending=True)
    assert await storage.oldest_pending() is None
    assert await statuses(storage) == {a1: SUCCEEDED, p1: PAUSED, a2: SUCCEEDED, b2: PAUSED, b3: SUCCEEDED}


# -- retention ----------------------------------------------------------------------------------------
async def test_prune_removes_only_what_is_finished_and_old(storage: Storage, fresh: list[FreshEvent],
                                                         clock: FakeClock) -> None:
    cutoff = T0 + 100
    [d1] = await submit(storage, fresh, ev(1, key="k1"), [("wh_a", True)])
    [d2] = await submit(storage, fresh, ev(2, key="k2"), [("wh_a", True)])
    d3a, d3b = await submit(storage, fresh, ev(3, key="k3"), [("wh_a", True), ("wh_b", True)])
    [d4] = await submit(storage, fresh, ev(4, key="k4"), [("wh_a", True)])
    [d5] = await submit(storage, fresh, ev(5, key="k5"), [("wh_p", False)])
    [d6] = await submit(storage, fresh, ev(6, key="k6"), [("wh_a", True)])
    old_uid = await storage.submit(ev(7, key="k7"), [])
    clock.advance(200)
    new_uid = await storage.submit(ev(8, key="k8"), [])  # not old yet
    await record(
        storage,
        outcome(d1, "wh_a", ok=False, at=T0 + 1), outcome(d1, "wh_a", ok=True, at=T0 + 2, attempts=2),
        outcome(d2, "wh_a", ok=False, at=T0 + 3, status=FAILED), outcome(d3a, "wh_a", ok=True, at=T0 + 4),
        outcome(d4, "wh_a", ok=True, at=T0 + 5, updated_at=cutoff + 50),  # finished recently
        outcome(d6, "wh_a", ok=False, at=T0 + 6),  # old, but pending
    )
    uids = [fe.event_uid for fe in fresh]

    assert await storage.prune(T0 - 1000) == 0  # nothing is that old
    removed = await storage.prune(cutoff)
    assert 0 < removed < 1000
    assert sorted(await statuses(storage)) == sorted([d3b, d4, d5, d6])
    for gone in (d1, d2, d3a):
        assert await storage.delivery(gone) is None
    kept = await storage.delivery(d3b)  # its event is still needed
    assert kept is not None and kept.body == ev(3, key="k3").body
    assert await storage.prune(cutoff) == 0
    # pruned events free their idempotency keys; kept ones still answer with their id
    assert await storage.submit(ev(1, key="k1"), []) not in uids
    assert await storage.submit(ev(7, key="k7"), []) != old_uid
    assert await storage.submit(ev(3, key="k3"), []) == uids[2]
    assert await storage.submit(ev(5, key="k5"), []) == uids[4]
    assert await storage.submit(ev(8, key="k8"), []) == new_uid


async def test_prune_in_batches_until_it_returns_less_than_the_limit(storage: Storage,
                                                                    fresh: list[FreshEvent]) -> None:
    rows = [await submit(storage, fresh, ev(i, key=f"k{i}"), [("wh_a", True)]) for i in range(5)]
    await record(storage, *(outcome(r[0], "wh_a", ok=True, at=T0 + i) for i, r in enumerate(rows)))
    assert await storage.prune(T0 + 100, limit=2) == 2
    assert await storage.count_deliveries(EVERYTHING) == 3  # no more than the limit
    calls = 1
    while await storage.prune(T0 + 100, limit=2) == 2:
        calls += 1
        assert calls < 10
    assert await storage.count_deliveries(EVERYTHING) == 0
    assert await storage.prune(T0 + 100, limit=2) == 0
    for i in range(5):  # every event went too
        assert await storage.submit(ev(i, key=f"k{i}"), []) != fresh[i].event_uid


# -- the writer's order, closing, reopening -------------------------------------------------------------
async def test_on_commit_runs_in_queue_order_before_awaiters_resume(make_storage: MakeStorage,
                                                                    clock: FakeClock) -> None:
    log: list[str] = []
    seen: list[FreshEvent] = []

    def sink(events: list[FreshEvent]) -> None:
        seen.extend(events)
        log.extend(f"fresh {e.event_type}" for e in events)

    storage = await make_storage(clock=clock, on_fresh=sink)
    await storage.submit(ev(0, kind="failed"), [("wh_0", True)])  # the writer is idle now
    [earlier] = ids(seen[0])
    log.clear()
    futures: dict[str, asyncio.Future[Any]] = {
        "create": storage.create_webhook(webhook("wh_a"), on_commit=lambda _: log.append("create")),
        "submit delivered": storage.submit(ev(1), [("wh_a", True)]),
        "take_due": storage.take_due("wh_a", START, 10, on_commit=lambda rows: log.append(f"take_due {len(rows)}")),
        "submit opened": storage.submit(ev(2, kind="opened"), [("wh_a", True)]),
        "state": storage.set_webhook_state("wh_a", WebhookState(True, None, 1, T0, T0),
                                           on_commit=lambda _: log.append("state")),
        "rotate": storage.rotate_secret("wh_a", secret="s2", previous_secret="s1", previous_expires_at=T0, now=T0,
                                        on_commit=lambda _: log.append("rotate")),
        "submit clicked": storage.submit(ev(3, kind="clicked"), [("wh_a", True)]),
        "enable": storage.enable_webhook("wh_a", now=T0, drop_backlog=False,
                                         on_commit=lambda n: log.append(f"enable {n}")),
    }
    storage.record_outcome(outcome(earlier, "wh_0", ok=True, at=T0), on_commit=lambda _: log.append("outcome"))
    commit_of = {"create": "create", "submit delivered": "fresh delivered", "take_due": "take_due 1",
                 "submit opened": "fresh opened", "state": "state", "rotate": "rotate",
                 "submit clicked": "fresh clicked", "enable": "enable 0"}

    async def wait(name: str, fut: asyncio.Future[Any]) -> None:
        await fut
        log.append(f"awaited {name}")

    await asyncio.gather(*(wait(name, fut) for name, fut in futures.items()))
    assert [e for e in log if not e.startswith("awaited")] == [*commit_of.values(), "outcome"]
    for name, entry in commit_of.items():
        assert log.index(entry) < log.index(f"awaited {name}"), log


async def test_close_commits_what_is_queued_and_refuses_more(make_storage: MakeStorage, clock: FakeClock) -> None:
    fresh: list[FreshEvent] = []
    first = await make_storage(clock=clock, on_fresh=fresh.extend)
    [d] = await submit(first, fresh, ev(0), [("wh_0", True)])
    created = first.create_webhook(webhook("wh_a"))
    submitted = first.submit(ev(1, key="k1"), [("wh_a", True)])
    first.record_outcome(outcome(d, "wh_0", ok=True, at=T0))  # internal, queued before close
    await first.close()
    assert created.done() and created.result() is None
    uid = submitted.result()
    await first.close()  # twice is fine

    late = first.submit(ev(2), [("wh_a", True)])
    with pytest.raises(StoreError) as refused:
        await late
    assert refused.value.reason is Reason.UNAVAILABLE
    with pytest.raises(StoreError) as admin:
        await first.create_webhook(webhook("wh_b"))
    assert admin.value.reason is Reason.UNAVAILABLE

    again = await make_storage(clock=clock)
    assert await again.load_webhooks() == [webhook("wh_a")]
    assert await again.submit(ev(3, key="k1"), []) == uid
    assert await statuses(again) == {d: SUCCEEDED, fresh[1].delivery_id(0): PENDING}
    assert again.received() == {}  # counted since this open


async def test_every_verb_fails_after_close_instead_of_waiting(make_storage: MakeStorage, clock: FakeClock) -> None:
    storage = await make_storage(clock=clock)
    await storage.create_webhook(webhook("wh_a"))
    await storage.close()
    state = WebhookState(False, "by hand", 0, 0.0, T0)
    internal: list[asyncio.Future[Any]] = [
        storage.set_webhook_state("wh_a", state, pause_pending=True), storage.take_due("wh_a", START, 10),
        storage.delete_webhook("wh_a"), storage.enable_webhook("wh_a", now=T0, drop_backlog=True),
        storage.track_hits([TrackingHit(b"k" * 16, "<m@a>")], now=T0), storage.prune_tracking(T0),
    ]
    for fut in internal:
        with pytest.raises(StoreError) as failed:
            await asyncio.wait_for(fut, 5)
        assert failed.value.reason is Reason.UNAVAILABLE
    with pytest.raises(StoreError):
        await asyncio.wait_for(storage.load_webhooks(), 5)
    with pytest.raises(StoreError):
        await asyncio.wait_for(storage.list_deliveries(EVERYTHING), 5)


async def test_ids_continue_after_reopen(make_storage: MakeStorage, clock: FakeClock) -> None:
    fresh: list[FreshEvent] = []
    subs: list[Subscriber] = [("wh_a", True), ("wh_b", True)]
    first = await make_storage(clock=clock, on_fresh=fresh.extend)
    await submit(first, fresh, ev(1), subs)
    await first.close()
    second = await make_storage(clock=clock, on_fresh=fresh.extend)
    await submit(second, fresh, ev(2), subs)
    assert second.received() == {"delivered": 1}
    made = [i for fe in fresh for i in ids(fe)]
    assert made == sorted(made) and len(set(made)) == 4
    assert len({fe.event_uid for fe in fresh}) == 2
    assert {d.id for d in await second.list_deliveries(EVERYTHING)} == set(made)


async def test_ids_are_not_reused_after_the_newest_deliveries_are_gone(make_storage: MakeStorage,
                                                                       clock: FakeClock) -> None:
    fresh: list[FreshEvent] = []
    storage = await make_storage(clock=clock, on_fresh=fresh.extend)
    kept = await submit(storage, fresh, ev(1), [("wh_a", True)])
    finished = await submit(storage, fresh, ev(2), [("wh_a", True)])
    deleted = await submit(storage, fresh, ev(3), [("wh_b", True)])
    await record(storage, outcome(finished[0], "wh_a", ok=True, at=T0))
    assert await storage.prune(T0 + 100) > 0
    await storage.delete_webhook("wh_b")
    assert [d.id for d in await storage.list_deliveries(EVERYTHING)] == kept
    await storage.close()
    storage = await make_storage(clock=clock, on_fresh=fresh.extend)
    [new] = await submit(storage, fresh, ev(4), [("wh_a", True)])
    assert new > deleted[0] > finished[0] > kept[0]  # a dlv_N once shown never names another delivery


# -- tracking: first hits, opt-outs, the delivered lookup ----------------------------------------
def hit(key: str, message_id: str = "<m1@mail.example.com>", *, to: str = "", opt_out: str = "") -> TrackingHit:
    return TrackingHit(key.encode().ljust(16, b"."), message_id, to, opt_out)


async def test_track_hits_marks_the_first_hit_once_per_key_across_batches_and_restarts(
    make_storage: MakeStorage, clock: FakeClock,
) -> None:
    storage = await make_storage(clock=clock)
    facts = await storage.track_hits([hit("a"), hit("b"), hit("a")], now=T0)
    assert [f.first for f in facts] == [True, True, False]  # the same key twice in one batch
    assert not any(f.opted_out for f in facts)
    assert [f.first for f in await storage.track_hits([hit("a"), hit("c")], now=T0 + 1)] == [False, True]
    await storage.close()
    storage = await make_storage(clock=clock)
    assert [f.first for f in await storage.track_hits([hit("b"), hit("d")], now=T0 + 2)] == [False, True]


async def test_track_hits_finds_the_delivered_event_of_the_message_and_recipient(storage: Storage) -> None:
    def at(ts: str, n: int, **kw: Any) -> Event:
        event = ev(n, **kw)
        body = orjson.loads(event.body)
        body["timestamp"] = ts
        return replace(event, timestamp=ts, body=orjson.dumps(body))

    await storage.submit(at("2026-02-23T10:00:00Z", 1, message_id="<x@a>", to="Bob@Example.org", kind="complained"), [])
    await storage.submit(at("2026-02-23T10:00:05Z", 2, message_id="<x@a>", to="carol@example.org"), [])
    await storage.submit(at("2026-02-23T10:00:09Z", 3, message_id="<x@a>", to="bob@example.org"), [])
    await storage.submit(at("2026-02-23T10:00:01Z", 4, message_id="<y@a>"), [])
    facts = await storage.track_hits([
        hit("1", "<x@a>", to="BOB@example.org"),  # that recipient's, whatever the case
        hit("2", "<x@a>"),  # no recipient: the message's first delivered
        hit("3", "<x@a>", to="dave@example.org"),  # not among them: the message's first delivered
        hit("4", "<y@a>", to="eve@example.org"),
        hit("5", "<z@a>"),  # never delivered (that webhookd knows)
    ], now=T0)
    assert [f.delivered_at for f in facts] == [
        "2026-02-23T10:00:09Z", "2026-02-23T10:00:05Z", "2026-02-23T10:00:05Z", "2026-02-23T10:00:01Z", None,
    ]


async def test_opted_out_hits_are_neither_marked_nor_looked_up(storage: Storage, clock: FakeClock) -> None:
    assert await storage.count_opt_outs() == 0
    assert await storage.set_opt_out("h1", opted_out=True, now=T0) is True
    assert await storage.set_opt_out("h1", opted_out=True, now=T0) is False  # already
    assert await storage.count_opt_outs() == 1
    facts = await storage.track_hits([hit("a", opt_out="h1"), hit("b", opt_out="h2"), hit("c")], now=T0)
    assert [(f.opted_out, f.first) for f in facts] == [(True, False), (False, True), (False, True)]
    assert await storage.set_opt_out("h1", opted_out=False, now=T0) is True
    assert await storage.set_opt_out("h1", opted_out=False, now=T0) is False
    assert await storage.count_opt_outs() == 0
    again = await storage.track_hits([hit("a", opt_out="h1")], now=T0 + 1)
    assert (again[0].opted_out, again[0].first) == (False, True)  # the opted-out hit was not remembered


async def test_prune_tracking_forgets_first_hits_older_than_the_cutoff_in_batches(storage: Storage) -> None:
    await storage.track_hits([hit(f"old{i}") for i in range(5)], now=T0)
    await storage.track_hits([hit("new")], now=T0 + DAY)
    assert await storage.prune_tracking(T0 + 1, limit=3) == 3
    assert await storage.prune_tracking(T0 + 1, limit=3) == 2
    assert await storage.prune_tracking(T0 + 1, limit=3) == 0
    facts = await storage.track_hits([hit("old0"), hit("new")], now=T0 + 2 * DAY)
    assert [f.first for f in facts] == [True, False]



# -- scoped API tokens ------------------------------------------------------------------------------
def api_token(n: int, **kw: Any) -> ApiToken:
    base: dict[str, Any] = {"id": f"tok_{n}", "hash": f"{n:064x}", "domains": ("shop.example", "*.shop.example"),
                            "read_only": False, "description": f"panel {n}", "created_at": T0 + n}
    return ApiToken(**{**base, **kw})


async def test_tokens_round_trip_and_are_found_by_hash_only(make_storage: MakeStorage, clock: FakeClock) -> None:
    storage = await make_storage(clock=clock)
    first, second = api_token(1), api_token(2, read_only=True, domains=("other.example",), description="")
    await storage.create_token(first)
    await storage.create_token(second)
    assert await storage.list_tokens() == [first, second]
    assert await storage.token_by_hash(second.hash) == second
    assert await storage.token_by_hash("f" * 64) is None
    assert await storage.token_by_hash(second.id) is None  # never by id
    await storage.close()
    again = await make_storage(clock=clock)  # a restart reads them back equal
    assert await again.list_tokens() == [first, second]


async def test_a_token_hash_is_unique(storage: Storage) -> None:
    await storage.create_token(api_token(1))
    with pytest.raises(StoreError):
        await storage.create_token(api_token(2, hash=api_token(1).hash))
    assert [t.id for t in await storage.list_tokens()] == ["tok_1"]


async def test_revoking_a_token_keeps_it_listed_and_its_first_revocation_time(storage: Storage) -> None:
    await storage.create_token(api_token(1))
    assert await storage.revoke_token("tok_1", now=T0 + 10) is True
    assert await storage.revoke_token("tok_1", now=T0 + 20) is False  # already
    assert await storage.revoke_token("tok_nope", now=T0 + 20) is False
    found = await storage.token_by_hash(api_token(1).hash)
    assert found is not None and found.revoked_at == T0 + 10
    assert [t.revoked_at for t in await storage.list_tokens()] == [T0 + 10]


async def test_touch_tokens_sets_last_use_in_one_write_and_never_moves_it_back(storage: Storage) -> None:
    for n in (1, 2, 3):
        await storage.create_token(api_token(n))
    before = storage.commits
    await storage.touch_tokens([("tok_1", T0 + 100), ("tok_2", T0 + 200)])
    assert storage.commits == before + 1
    await storage.touch_tokens([("tok_1", T0 + 50), ("tok_nope", T0 + 300)])  # older: kept; unknown: ignored
    assert [t.last_used_at for t in await storage.list_tokens()] == [T0 + 100, T0 + 200, None]


# -- deferred fan-out: deliveries a backend may create late (for a webhook that cannot take them now) ----
# A backend may defer the deliveries of a disabled webhook, or of one with a long backlog: such a
# delivery is then missing from the fresh event and gets its id when the backend makes it a row
# (webhookd/store/sqlite_fanout.py). Whether it does is invisible here: listings, counts, stats,
# take_due, replay, enable, delete, retention and a restart see every delivery exactly once.
BACKLOG = 600  # more than any backend may keep as rows before it defers (SQLite: 256)


async def walk_due(storage: Storage, webhook_id: str, limit: int = 100) -> list[DueItem]:
    """Every pending delivery of the webhook, taken in key order as the scheduler's refills do."""
    out: list[DueItem] = []
    after = START
    while True:
        got = await storage.take_due(webhook_id, after, limit)
        out.extend(got)
        if len(got) < limit:
            return out
        after = got[-1].key


def eager_ids(fresh: list[FreshEvent], webhook_id: str) -> list[int]:
    return [fe.delivery_id(i) for fe in fresh for i, (w, _) in enumerate(fe.subscribers) if w == webhook_id]


async def test_a_disabled_webhooks_deliveries_are_counted_listed_and_resumed_exactly(
        storage: Storage, fresh: list[FreshEvent], clock: FakeClock) -> None:
    await storage.create_webhook(webhook("wh_a"))
    await storage.create_webhook(webhook("wh_off", enabled=False))
    uids = [await storage.submit(ev(i), [("wh_a", True), ("wh_off", False)]) for i in range(5)]
    assert len(eager_ids(fresh, "wh_a")) == 5
    assert await storage.count_by_status() == {PENDING: 5, PAUSED: 5, SUCCEEDED: 0, FAILED: 0}
    stats = await storage.webhook_stats(T0)
    assert (stats["wh_a"].pending, stats["wh_off"].paused, stats["wh_off"].pending) == (5, 5, 0)
    assert await storage.oldest_pending() == T0
    assert await storage.take_due("wh_off", START, 100) == []  # paused
    assert await storage.count_deliveries(DeliveryFilter(webhook_id="wh_off")) == 5
    listed = await storage.list_deliveries(DeliveryFilter(webhook_id="wh_off"))
    assert sorted(d.event_uid for d in listed) == sorted(uids)  # each event once
    assert {(d.status, d.next_attempt_at, d.created_at) for d in listed} == {(PAUSED, None, T0)}
    assert [d.event_uid for d in listed] == uids[::-1]  # newest first: ids follow the events
    clock.advance(100)
    assert await storage.enable_webhook("wh_off", now=T0 + 100, drop_backlog=False) == 5
    assert await storage.count_by_status() == {PENDING: 10, PAUSED: 0, SUCCEEDED: 0, FAILED: 0}
    due = await walk_due(storage, "wh_off")
    assert [d.event_uid for d in due] == uids and {d.next_at for d in due} == {T0 + 100}
    assert {d.delivery_id for d in due} == {d.id for d in listed}


async def test_deferred_deliveries_reach_take_due_in_event_order_once_without_a_listing(
        storage: Storage, fresh: list[FreshEvent], clock: FakeClock) -> None:
    await storage.create_webhook(webhook("wh_off", enabled=False))
    uids = []
    for i in range(7):
        uids.append(await storage.submit(ev(i, to=f"c{i}@example.org"), [("wh_off", False)]))
        clock.advance(1)
    clock.advance(100)
    assert await storage.enable_webhook("wh_off", now=clock.now, drop_backlog=False) == 7
    assert (await storage.webhook_stats(clock.now))["wh_off"].pending == 7
    assert await storage.oldest_pending() == T0  # the first event's time, made a row or not
    due = await walk_due(storage, "wh_off", limit=3)  # in chunks
    assert [d.event_uid for d in due] == uids
    assert [d.body for d in due] == [ev(i, to=f"c{i}@example.org").body for i in range(7)]
    assert len({d.delivery_id for d in due}) == 7 and [d.key for d in due] == sorted(d.key for d in due)
    assert await walk_due(storage, "wh_off") == due  # the same rows, not new ones
    listed = {d.id: d for d in await storage.list_deliveries(DeliveryFilter(webhook_id="wh_off"))}
    assert set(listed) == {d.delivery_id for d in due}
    assert sorted(d.created_at for d in listed.values()) == [T0 + i for i in range(7)]  # its event's time
    assert await storage.count_deliveries(DeliveryFilter(recipient="c3@example.org")) == 1


async def test_a_long_backlog_is_exact_through_take_due_outcomes_and_new_events(
        storage: Storage, fresh: list[FreshEvent], clock: FakeClock) -> None:
    await storage.create_webhook(webhook("wh_a"))
    first = await asyncio.gather(*(storage.submit(ev(i), [("wh_a", True)]) for i in range(BACKLOG // 2)))
    clock.advance(10)
    second = await asyncio.gather(*(storage.submit(ev(i), [("wh_a", True)]) for i in range(BACKLOG // 2, BACKLOG)))
    uids = [*first, *second]
    assert await storage.count_by_status() == {PENDING: BACKLOG, PAUSED: 0, SUCCEEDED: 0, FAILED: 0}
    assert await storage.oldest_pending() == T0
    due = await walk_due(storage, "wh_a")
    assert [d.event_uid for d in due] == uids  # every event once, in order
    assert set(eager_ids(fresh, "wh_a")) <= {d.delivery_id for d in due}
    await record(storage, *(outcome(d.delivery_id, "wh_a", ok=True, at=clock.now) for d in due[:BACKLOG // 2]))
    assert await storage.oldest_pending() == T0 + 10  # the second half's: made rows or still deferred
    await record(storage, *(outcome(d.delivery_id, "wh_a", ok=True, at=clock.now) for d in due[BACKLOG // 2:]))
    assert await storage.count_by_status() == {PENDING: 0, PAUSED: 0, SUCCEEDED: BACKLOG, FAILED: 0}
    assert await storage.oldest_pending() is None
    seen = len(fresh)
    uid = await storage.submit(ev(BACKLOG), [("wh_a", True)])  # caught up: fresh deliveries reach the sink again
    [fe] = [fe for fe in fresh[seen:] if fe.subscribers]
    assert fe.event_uid == uid and [i.webhook_id for i in fe.items()] == ["wh_a"]
    assert await storage.count_deliveries(DeliveryFilter(webhook_id="wh_a")) == BACKLOG + 1


async def test_disable_pauses_deferred_deliveries_and_drop_backlog_fails_them(
        storage: Storage, fresh: list[FreshEvent], clock: FakeClock) -> None:
    await storage.create_webhook(webhook("wh_a"))
    await asyncio.gather(*(storage.submit(ev(i), [("wh_a", True)]) for i in range(BACKLOG)))
    off = WebhookState(False, "disabled by hand", 0, 0.0, T0 + 1)
    await storage.set_webhook_state("wh_a", off, pause_pending=True)
    assert await storage.count_by_status() == {PENDING: 0, PAUSED: BACKLOG, SUCCEEDED: 0, FAILED: 0}
    await storage.submit(ev(BACKLOG), [("wh_a", False)])
    assert (await storage.webhook_stats(T0))["wh_a"].paused == BACKLOG + 1
    assert await storage.oldest_pending() is None
    clock.advance(50)
    assert await storage.enable_webhook("wh_a", now=clock.now, drop_backlog=True) == BACKLOG + 1
    assert await storage.count_by_status() == {PENDING: 0, PAUSED: 0, SUCCEEDED: 0, FAILED: BACKLOG + 1}
    listed = await storage.list_deliveries(DeliveryFilter(webhook_id="wh_a"), limit=10_000)
    assert len(listed) == BACKLOG + 1 and {d.status for d in listed} == {FAILED}
    assert all(d.last_error for d in listed)
    assert await storage.take_due("wh_a", START, 10) == []


async def test_replay_delete_and_retention_see_deferred_deliveries(storage: Storage, fresh: list[FreshEvent],
                                                                   clock: FakeClock) -> None:
    await storage.create_webhook(webhook("wh_a"))
    await storage.create_webhook(webhook("wh_off", enabled=False))
    await storage.create_webhook(webhook("wh_gone", enabled=False))
    subs: list[Subscriber] = [("wh_a", True), ("wh_off", False), ("wh_gone", False)]
    for i in range(4):
        await storage.submit(ev(i), subs)
    a = eager_ids(fresh, "wh_a")
    await record(storage, *(outcome(d, "wh_a", ok=True, at=T0) for d in a))
    # a day later every finished delivery and every event no delivery needs may go: these are needed
    clock.advance(DAY)
    while await storage.prune(T0 + HOUR, limit=2) == 2:
        pass
    assert await storage.count_deliveries(DeliveryFilter(webhook_id="wh_a")) == 0
    assert await storage.replay("wh_off", since=T0, statuses=(PAUSED,), status=PAUSED, next_attempt_at=None,
                                now=clock.now) == 4
    await storage.delete_webhook("wh_gone")
    assert await storage.count_by_status() == {PENDING: 0, PAUSED: 4, SUCCEEDED: 0, FAILED: 0}
    assert "wh_gone" not in await storage.webhook_stats(clock.now)
    listed = await storage.list_deliveries(EVERYTHING)
    assert {(d.webhook_id, d.status) for d in listed} == {("wh_off", PAUSED)} and len(listed) == 4
    found = await storage.due_item(listed[0].id)
    assert found is not None and found[0].body == ev(3).body  # its event was kept
    assert await storage.enable_webhook("wh_off", now=clock.now, drop_backlog=True) == 4
    clock.advance(DAY)
    while await storage.prune(clock.now - HOUR) == 1000:
        pass
    assert await storage.count_deliveries(EVERYTHING) == 0


async def test_deferred_deliveries_survive_a_restart(make_storage: MakeStorage, clock: FakeClock) -> None:
    got: list[FreshEvent] = []
    s = await make_storage(clock=clock, on_fresh=got.extend)
    await s.create_webhook(webhook("wh_a"))
    await s.create_webhook(webhook("wh_off", enabled=False))
    uids = await asyncio.gather(*(s.submit(ev(i), [("wh_a", True), ("wh_off", False)]) for i in range(BACKLOG)))
    await s.close()
    s = await make_storage(clock=clock, on_fresh=got.extend)
    assert await s.count_by_status() == {PENDING: BACKLOG, PAUSED: BACKLOG, SUCCEEDED: 0, FAILED: 0}
    assert (await s.webhook_stats(T0))["wh_off"].paused == BACKLOG
    assert [d.event_uid for d in await walk_due(s, "wh_a")] == list(uids)
    assert await s.enable_webhook("wh_off", now=T0, drop_backlog=False) == BACKLOG
    assert [d.event_uid for d in await walk_due(s, "wh_off")] == list(uids)
    assert await s.count_deliveries(EVERYTHING) == 2 * BACKLOG


__all__ = ["EVERYTHING", "START", "T0", "FakeClock", "MakeStorage", "clock", "ev", "fresh", "outcome", "record",
           "storage", "webhook", "api_token", *(name for name in list(globals()) if name.startswith("test_"))]
