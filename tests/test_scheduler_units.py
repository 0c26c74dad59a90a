"""The scheduler on its own: no sockets, no real waits.

The clock and the monotonic clock are fakes the tests move by hand (and then call
`Scheduler.wake_all()`), the dispatcher is a fake Poster answering from a handler (like
httpx's MockTransport) that records every call and can hold attempts open, and the storage
is the real SqliteStorage on a tmp_path file, wired as webhookd.daemon wires it (on_fresh
→ push_fresh; events submitted with `scheduler.fan_out(event)`).

Tests run "burst" style: `Rig.settle()` turns the event loop (asyncio.sleep(0) only) until
nothing moves any more: no write queued or committing, no attempt in flight that is not held
open, no new call. Retry delays are huge (1000 s and up), so nothing is due again until a
test moves the clock.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import db_rows
from webhookd import scheduler as scheduler_module
from webhookd.config import DeliveryConfig
from webhookd.dispatcher import Outcome
from webhookd.events import Event, validate_event
from webhookd.filters import EMPTY_FILTER, WebhookFilter
from webhookd.metrics import Metrics
from webhookd.operations import Operations
from webhookd.policy import CONSECUTIVE_FAILURES, SLOW_START
from webhookd.scheduler import Scheduler, window_size
from webhookd.store.model import FAILED, PAUSED, PENDING, SUCCEEDED, Delivery, DeliveryFilter
from webhookd.store.sqlite import SqliteStorage
from webhookd.webhooks import START, Webhook

T0 = 1_800_000_000.0
BIG = 10_000_000.0  # moves the clock past any retry the tests make
BASE = DeliveryConfig(retry_base=1000.0, retry_max=1_000_000.0, max_attempts=50, disable_after=100)

OK = Outcome(success=True, status_code=200, error=None, duration_ms=1.0, response_body=b"ok")


def fail(status: int = 500, retry_after: float | None = None) -> Outcome:
    return Outcome(success=False, status_code=status, error=f"HTTP {status}", duration_ms=1.0,
                   response_body=b"no", retry_after=retry_after)


FAIL = fail()


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- the fake dispatcher ---------------------------------------------------------------------------
@dataclass(eq=False)
class Call:
    """One POST the scheduler made."""

    url: str
    event_id: str
    at: float  # the fake clock when it was made
    released: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: Outcome | None = None
    done: bool = False

    def release(self, outcome: Outcome | None = None) -> None:
        self.outcome = outcome
        self.released.set()


Handler = Callable[[Call], Outcome]


def script(*outcomes: Outcome, then: Outcome = OK) -> Handler:
    """Answers with `outcomes` in turn, then with `then`."""
    queue = list(outcomes)
    return lambda call: queue.pop(0) if queue else then


class FakePoster:
    """A Poster that answers from `handler`, records its calls and, while `hold` is set,
    keeps each attempt open until the test releases it (with an outcome, or the handler's)."""

    def __init__(self, clock: Callable[[], float], handler: Handler | None = None) -> None:
        self.clock = clock
        self.handler: Handler = handler or (lambda call: OK)
        self.hold = False
        self.calls: list[Call] = []
        self.peak = 0  # most attempts open at once since reset_peak()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        call = Call(url, headers["webhook-id"], self.clock())
        self.calls.append(call)
        self.peak = max(self.peak, len(self.open()))
        try:
            if self.hold:
                await call.released.wait()
            else:
                await asyncio.sleep(0)  # an attempt takes at least a turn of the loop
            return call.outcome if call.outcome is not None else self.handler(call)
        finally:
            call.done = True

    def open(self) -> list[Call]:
        return [c for c in self.calls if not c.done]

    def held(self) -> list[Call]:
        return [c for c in self.calls if not c.done and not c.released.is_set()]

    def release(self, n: int | None = None, outcome: Outcome | None = None) -> int:
        held = self.held()[:n]
        for call in held:
            call.release(outcome)
        return len(held)

    def reset_peak(self) -> None:
        self.peak = len(self.open())


# -- the rig ------------------------------------------------------------------------------------
BARRIER = "wh_barrier"  # no such webhook: a read through the writer that waits for what is queued before it
SPIN = 50


@dataclass(eq=False)
class Rig:
    clock: FakeClock
    monotonic: FakeClock
    poster: FakePoster
    storage: SqliteStorage
    scheduler: Scheduler
    ops: Operations
    metrics: Metrics
    path: Path
    disabled: list[str] = field(default_factory=list)  # on_disabled calls, by webhook id
    seq: int = 0

    async def hook(self, name: str = "a") -> Webhook:
        return await self.ops.create(url=f"https://{name}.example.com/hook", events=("*",), description=name)

    def submit(self, n: int = 1) -> list[asyncio.Future[str]]:
        """Queue n events as intake does (not awaited)."""
        futures = []
        for _ in range(n):
            self.seq += 1
            ev = validate_event({"event": "delivered", "data": {"message_id": f"<m{self.seq}@example.com>"}},
                                now=self.clock())
            futures.append(self.storage.submit(ev, self.scheduler.fan_out(ev)))
        return futures

    async def send(self, n: int = 1) -> list[str]:
        """Submit n events and wait until they are committed; their event ids."""
        return list(await asyncio.gather(*self.submit(n)))

    def later(self, seconds: float) -> None:
        self.clock.t += seconds
        self.monotonic.t += seconds
        self.scheduler.wake_all()

    def at(self, t: float) -> None:
        self.later(t - self.clock.t)

    def busy(self) -> int:
        """Attempts in flight that are not held open."""
        return self.scheduler.in_flight - len(self.poster.held())

    async def settle(self, observe: Callable[[], None] | None = None, rounds: int = 2000) -> None:
        """Run the loop until the scheduler is idle: twice in a row, a barrier through the
        writer committed alone and nothing else moved (no write queued, no attempt busy,
        no new call). Never sleeps; bounded."""
        last: tuple[int, int, int, int] | None = None
        quiet = 0
        for _ in range(rounds):
            await self.storage.take_due(BARRIER, START, 1)
            for _ in range(SPIN):
                await asyncio.sleep(0)
                if observe is not None:
                    observe()
            now = (self.storage.commits, len(self.poster.calls), self.storage.queued, self.busy())
            if last is not None and now == (last[0] + 1, last[1], 0, 0) and last[2:] == (0, 0):
                quiet += 1
                if quiet == 2:
                    return
            else:
                quiet = 0
            last = now
        raise AssertionError("the scheduler did not settle")

    async def deliveries(self, wh: Webhook) -> list[Delivery]:
        return sorted(await self.storage.list_deliveries(DeliveryFilter(webhook_id=wh.id), limit=10_000),
                      key=lambda d: d.id)

    async def statuses(self, wh: Webhook) -> dict[str, int]:
        return dict(Counter(d.status for d in await self.deliveries(wh)))

    def attempts_counted(self) -> float:
        return sum(s.value for m in self.metrics.attempts.collect() for s in m.samples if s.name.endswith("_total"))


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    async def make(handler: Handler | None = None, min_window: int | None = None, defer_after: int | None = None,
                   **delivery: Any) -> Rig:
        clock, monotonic = FakeClock(T0), FakeClock(1000.0)
        path = tmp_path / f"db{len(rigs)}" / "webhookd.db"
        scheduler: Scheduler | None = None

        def fresh(events: Any) -> None:
            assert scheduler is not None
            scheduler.push_fresh(events)

        storage = SqliteStorage(path, durability="normal", clock=clock, on_fresh=fresh, defer_after=defer_after)
        poster = FakePoster(clock, handler)
        metrics = Metrics()
        scheduler = Scheduler(storage, poster, replace(BASE, **delivery), clock=clock, monotonic=monotonic,
                              metrics=metrics)
        if min_window is not None:
            scheduler.min_window = min_window
        rig = Rig(clock, monotonic, poster, storage, scheduler, Operations(scheduler, storage), metrics, path)
        scheduler.on_disabled = lambda wh: rig.disabled.append(wh.id)
        await storage.open()
        await scheduler.load()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.scheduler.drain(0)
        await rig.storage.close()


# -- failures, backoff, disable -------------------------------------------------------------------
async def test_a_burst_of_failures_counts_once_and_then_one_probe_at_a_time(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.poster.hold = True
    wh = await rig.hook()
    await rig.send(10)
    await rig.settle()
    assert len(rig.poster.held()) == SLOW_START

    rig.poster.release(outcome=FAIL)  # the whole burst fails together
    await rig.settle()
    assert wh.consecutive_failures == 1
    [stored] = await rig.storage.load_webhooks()
    assert stored.consecutive_failures == 1 and stored.backoff_until == wh.gate.backoff_until > T0
    assert [d.attempts for d in await rig.deliveries(wh)] == [1] * 4 + [0] * 6
    assert await rig.statuses(wh) == {PENDING: 10}
    assert len(rig.poster.calls) == 4  # nothing starts before backoff_until

    for failures in (2, 3):
        rig.poster.reset_peak()
        rig.later(BIG)
        await rig.settle()
        assert len(rig.poster.held()) == 1 and rig.poster.peak == 1  # one probe at a time
        rig.poster.release(outcome=FAIL)
        await rig.settle()
        assert wh.consecutive_failures == failures

    rig.later(BIG)
    await rig.settle()
    assert len(rig.poster.held()) == 1
    rig.poster.release(outcome=OK)  # the probe succeeds: the gate resets, slow start doubled once
    await rig.settle()
    assert wh.consecutive_failures == 0 and wh.gate.backoff_until == 0.0
    assert len(rig.poster.held()) == 2 * SLOW_START
    rig.poster.hold = False
    rig.poster.release(outcome=OK)
    await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 10}
    [stored] = await rig.storage.load_webhooks()
    assert stored.consecutive_failures == 0 and stored.backoff_until == 0.0


async def test_consecutive_failures_disable_then_enable_delivers_the_paused(make_rig: MakeRig) -> None:
    rig = await make_rig(handler=lambda call: FAIL, disable_after=3)
    wh = await rig.hook()
    await rig.send(5)
    await rig.settle()
    assert len(rig.poster.calls) == SLOW_START and wh.consecutive_failures == 1
    rig.later(BIG)
    await rig.settle()
    assert wh.consecutive_failures == 2 and wh.enabled
    rig.later(BIG)
    await rig.settle()
    assert len(rig.poster.calls) == SLOW_START + 2

    assert not wh.gate.enabled and wh.disabled_reason == CONSECUTIVE_FAILURES and wh.consecutive_failures == 3
    assert rig.disabled == [wh.id]
    assert await rig.statuses(wh) == {PAUSED: 5}
    assert all(d.next_attempt_at is None for d in await rig.deliveries(wh))
    [stored] = await rig.storage.load_webhooks()
    assert (stored.enabled, stored.disabled_reason, stored.consecutive_failures) == (False, CONSECUTIVE_FAILURES, 3)
    rig.later(BIG)
    await rig.settle()
    assert len(rig.poster.calls) == SLOW_START + 2  # disabled: nothing more
    await rig.send(1)
    assert await rig.statuses(wh) == {PAUSED: 6}

    rig.poster.handler = lambda call: OK
    assert await rig.ops.enable(wh) == 6
    await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 6}
    assert len(rig.poster.calls) == SLOW_START + 2 + 6
    assert wh.enabled and wh.consecutive_failures == 0
    [stored] = await rig.storage.load_webhooks()
    assert (stored.enabled, stored.disabled_reason, stored.consecutive_failures) == (True, None, 0)
    assert rig.disabled == [wh.id]  # once


async def test_a_success_in_flight_across_an_automatic_disable_keeps_its_count(make_rig: MakeRig) -> None:
    """The failure that disables and a success still in flight end together: the webhook stays
    disabled, and what on_disabled (the notify command) and the stored row say still adds up."""
    rig = await make_rig(disable_after=1)
    rig.poster.hold = True
    seen: list[tuple[bool, str | None, int]] = []
    rig.scheduler.on_disabled = lambda wh: seen.append((wh.enabled, wh.disabled_reason, wh.consecutive_failures))
    wh = await rig.hook()
    await rig.send(2)
    await rig.settle()
    first, second = rig.poster.held()
    first.release(FAIL)
    second.release(OK)
    await rig.settle()
    assert seen == [(False, CONSECUTIVE_FAILURES, 1)]
    [stored] = await rig.storage.load_webhooks()
    assert (stored.enabled, stored.disabled_reason, stored.consecutive_failures) == (False, CONSECUTIVE_FAILURES, 1)
    assert sorted((await rig.statuses(wh)).items()) == [(PAUSED, 1), (SUCCEEDED, 1)]


async def test_max_attempts_fails_the_delivery(make_rig: MakeRig) -> None:
    rig = await make_rig(handler=lambda call: FAIL, max_attempts=3)
    wh = await rig.hook()
    await rig.send(1)
    await rig.settle()
    for attempts in (2, 3):
        rig.later(500.0)  # every backoff here is at least 800 s
        await rig.settle()
        assert len(rig.poster.calls) == attempts - 1
        rig.later(BIG)
        await rig.settle()
        assert len(rig.poster.calls) == attempts
    [d] = await rig.deliveries(wh)
    assert (d.status, d.attempts, d.next_attempt_at, d.last_status_code) == (FAILED, 3, None, 500)
    rig.later(BIG)
    await rig.settle()
    assert len(rig.poster.calls) == 3
    assert wh.enabled and wh.consecutive_failures == 3
    detail = await rig.storage.delivery(d.id)
    assert detail is not None and len(detail.attempts) == 3


@pytest.mark.parametrize(
    ("retry_after", "retry_max", "delay"),
    [
        pytest.param(50_000.0, 1_000_000.0, 50_000.0, id="raises-the-delay"),
        pytest.param(1e9, 100_000.0, 100_000.0, id="capped-by-retry-max"),
    ],
)
async def test_retry_after_delays_the_next_attempt(
    make_rig: MakeRig, retry_after: float, retry_max: float, delay: float
) -> None:
    rig = await make_rig(handler=script(fail(503, retry_after)), retry_max=retry_max)
    wh = await rig.hook()
    await rig.send(1)
    await rig.settle()
    assert len(rig.poster.calls) == 1
    assert wh.gate.backoff_until == T0 + delay
    rig.later(2000.0)  # the plain backoff (at most 1200 s) is over, Retry-After's is not
    await rig.settle()
    rig.at(T0 + delay - 1)
    await rig.settle()
    assert len(rig.poster.calls) == 1
    rig.at(T0 + delay)
    await rig.settle()
    assert [c.at for c in rig.poster.calls] == [T0, T0 + delay]
    assert await rig.statuses(wh) == {SUCCEEDED: 1}


# -- concurrency ----------------------------------------------------------------------------------
async def test_slow_start_holds_a_fresh_webhook_at_slow_start_until_a_success(make_rig: MakeRig) -> None:
    rig = await make_rig(per_webhook_concurrency=32)
    rig.poster.hold = True  # the receiver hangs
    wh = await rig.hook()
    await rig.send(50)
    await rig.settle()
    for _ in range(3):  # time passes, more events come: still SLOW_START
        rig.later(60.0)
        await rig.send(10)
        await rig.settle()
    assert rig.poster.peak == SLOW_START and len(rig.poster.calls) == SLOW_START
    rig.poster.release(1, OK)
    await rig.settle()
    assert len(rig.poster.held()) == 2 * SLOW_START  # the first success doubles it
    rig.poster.hold = False
    rig.poster.release()
    await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 80}


async def test_reconfigure_moves_per_webhook_concurrency_both_ways(make_rig: MakeRig) -> None:
    rig = await make_rig(per_webhook_concurrency=2)
    rig.poster.hold = True
    wh = await rig.hook()
    uids = await rig.send(40)
    await rig.settle()
    assert len(rig.poster.held()) == 2

    rig.scheduler.reconfigure(replace(rig.scheduler.cfg, per_webhook_concurrency=4))
    await rig.settle()
    assert len(rig.poster.held()) == 4  # at once: no attempt had to end

    rig.scheduler.reconfigure(replace(rig.scheduler.cfg, per_webhook_concurrency=1))
    await rig.settle()
    assert len(rig.poster.held()) == 4  # nothing is cut off
    seen = []
    for _ in range(6):
        rig.poster.release(1, OK)
        await rig.settle()
        seen.append(len(rig.poster.open()))
    assert seen == [3, 2, 1, 1, 1, 1]  # down as attempts end, then one at a time

    # raised again after successes at 1: back to slow start at once, doubling from there
    rig.scheduler.reconfigure(replace(rig.scheduler.cfg, per_webhook_concurrency=8))
    await rig.settle()
    assert len(rig.poster.held()) == SLOW_START
    rig.poster.release(outcome=OK)
    await rig.settle()
    assert len(rig.poster.held()) == 8

    rig.poster.hold = False
    rig.poster.release()
    await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 40}
    assert sorted(c.event_id for c in rig.poster.calls) == sorted(uids)


# -- the window and its refills -------------------------------------------------------------------
@pytest.mark.parametrize("defer_after", [None, 5], ids=["rows", "deferred"])  # the storage defers past 5 pending
@pytest.mark.parametrize("backlog", ["fresh-at-once", "fresh-in-waves", "resumed-from-storage"])
async def test_refills_attempt_every_delivery_once_with_bounded_memory(make_rig: MakeRig, backlog: str,
                                                                       defer_after: int | None) -> None:
    rig = await make_rig(per_webhook_concurrency=2, min_window=8, defer_after=defer_after)
    window = window_size(rig.scheduler.cfg, rig.scheduler.min_window)
    assert window == 8
    wh = await rig.hook()
    peak = 0

    def observe() -> None:
        nonlocal peak
        peak = max(peak, len(wh.items))

    futures: list[asyncio.Future[str]] = []
    if backlog == "fresh-at-once":
        futures = rig.submit(300)
    elif backlog == "fresh-in-waves":
        for _ in range(10):
            futures += rig.submit(30)
            for _ in range(7):
                await asyncio.sleep(0)
                observe()
    else:
        await rig.ops.disable(wh)
        futures = rig.submit(300)
        await asyncio.gather(*futures)
        assert await rig.ops.enable(wh) == 300
    await rig.settle(observe)

    uids = [f.result() for f in futures]
    assert Counter(c.event_id for c in rig.poster.calls) == Counter(uids)  # each exactly once
    assert await rig.statuses(wh) == {SUCCEEDED: 300}
    assert peak <= 2 * window
    assert not wh.items and not wh.inflight


# -- memory changes at queue time ---------------------------------------------------------------------
async def test_events_right_after_disable_and_enable_fan_out_by_the_new_state(make_rig: MakeRig) -> None:
    rig = await make_rig()
    wh = await rig.hook()

    commits = rig.storage.commits
    disabling = asyncio.create_task(rig.ops.disable(wh))
    await asyncio.sleep(0)
    assert not wh.enabled and rig.storage.commits == commits  # queued, not committed
    [submitted] = rig.submit(1)
    await disabling
    first = await submitted
    await rig.settle()
    [d] = await rig.deliveries(wh)
    assert (d.status, d.attempts, d.next_attempt_at) == (PAUSED, 0, None)
    assert rig.poster.calls == []

    commits = rig.storage.commits
    enabling = asyncio.create_task(rig.ops.enable(wh))
    await asyncio.sleep(0)
    assert wh.gate.enabled and rig.storage.commits == commits
    assert list(rig.scheduler.subscribers("delivered")) == [(wh.id, True)]
    [submitted] = rig.submit(1)
    assert await enabling == 1  # the paused one; the new one is created pending after it
    second = await submitted
    await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 2}
    assert sorted(c.event_id for c in rig.poster.calls) == sorted([first, second])


@pytest.mark.parametrize("outcome", [pytest.param(FAIL, id="failure"), pytest.param(OK, id="success")])
async def test_attempts_in_flight_across_disable_and_enable_are_neither_repeated_nor_counted(
    make_rig: MakeRig, outcome: Outcome
) -> None:
    rig = await make_rig(disable_after=1)  # a counted failure would disable it at once
    rig.poster.hold = True
    wh = await rig.hook()
    uids = await rig.send(2)
    await rig.settle()
    assert len(rig.poster.held()) == 2  # below the limit: slots are free

    await rig.ops.disable(wh)
    assert await rig.statuses(wh) == {PAUSED: 2}
    assert await rig.ops.enable(wh) == 2  # the rows of the two in flight are pending again
    await rig.settle()
    assert len(rig.poster.calls) == 2  # the refill from storage skips what is in flight

    rig.poster.hold = False
    rig.poster.release(outcome=outcome)
    await rig.settle()
    assert wh.enabled and wh.consecutive_failures == 0 and rig.disabled == []
    if outcome is FAIL:  # from the epoch before the disable: pending again, not counted
        assert await rig.statuses(wh) == {PENDING: 2}
        rig.later(BIG)
        await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 2}
    assert sorted(c.event_id for c in rig.poster.calls) == sorted(uids * (2 if outcome is FAIL else 1))


@pytest.mark.parametrize("outcome", [pytest.param(FAIL, id="failure"), pytest.param(OK, id="success")])
async def test_a_webhook_deleted_mid_attempt_records_and_counts_nothing(make_rig: MakeRig, outcome: Outcome) -> None:
    rig = await make_rig(disable_after=1)  # a counted failure would disable it at once
    rig.poster.hold = True
    wh = await rig.hook()
    await rig.send(1)
    await rig.settle()
    assert len(rig.poster.held()) == 1

    deleting = asyncio.create_task(rig.ops.delete(wh))
    await asyncio.sleep(0)
    [after] = rig.submit(1)  # fans out to nobody
    await deleting
    await after
    rig.poster.release(outcome=outcome)
    await rig.settle()

    assert rig.scheduler.in_flight == 0 and wh.id not in rig.scheduler.webhooks
    assert wh.consecutive_failures == 0 and rig.disabled == []
    assert rig.attempts_counted() == 0
    assert await rig.storage.load_webhooks() == []
    for table in ("deliveries", "attempts", "attempt_hours", "webhooks"):
        assert db_rows(rig.path, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert db_rows(rig.path, "SELECT count(*) FROM events") == [(2,)]


async def test_an_attempt_that_fails_inside_webhookd_is_a_recorded_failure(make_rig: MakeRig) -> None:
    """Bad stored data (a secret that is not whsec_<base64>) or a bug while building the
    request: the attempt is a failure with an "internal error" text, its slot is released
    and the delivery is retried, instead of a task dying with the delivery in flight."""
    rig = await make_rig(max_attempts=5)
    wh = await rig.hook()
    wh.secret = "whsec_x"  # as a hand-edited row could hold
    await rig.send(1)
    await rig.settle()
    assert rig.scheduler.in_flight == 0 and rig.poster.calls == []
    [d] = await rig.deliveries(wh)
    assert d.status == PENDING and d.attempts == 1
    assert d.last_error is not None and d.last_error.startswith("internal error: ValueError: signing secret")
    assert wh.consecutive_failures == 1


# -- fan-out with filters ------------------------------------------------------------------------
def event(kind: str = "delivered", **data: Any) -> Event:
    return validate_event({"event": kind, "data": {"message_id": "<m@example.com>", **data}}, now=T0)


class CountingLoads:
    """Stands in for the scheduler's orjson: counts the bodies fan-out decodes."""

    JSONDecodeError = orjson.JSONDecodeError

    def __init__(self) -> None:
        self.calls = 0

    def loads(self, raw: bytes) -> Any:
        self.calls += 1
        return orjson.loads(raw)


async def test_without_filters_fan_out_is_the_cached_list_and_reads_no_body(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await make_rig()
    a, b = await rig.hook("a"), await rig.hook("b")
    counting = CountingLoads()
    monkeypatch.setattr(scheduler_module, "orjson", counting)
    cached = rig.scheduler.subscribers("delivered")
    assert list(cached) == [(a.id, True), (b.id, True)]
    garbage = Event("delivered", "2027-01-15T08:00:00Z", None, b"\xff not even JSON")
    assert rig.scheduler.fan_out(garbage) is cached  # the body is never looked at
    assert rig.scheduler.fan_out(event(**{"from": "x@shop.example"})) is cached
    # a filtered webhook of another type costs this type nothing either
    await rig.ops.update(a, url=None, events=None, description=None)
    bounces = await rig.ops.create(url="https://c.example.com/hook", events=("bounced",), description="c",
                                   filter=WebhookFilter.parse({"tags": ["x"]}))
    cached = rig.scheduler.subscribers("delivered")
    assert rig.scheduler.fan_out(event()) is cached and bounces.id not in {s[0] for s in cached}
    assert counting.calls == 0


async def test_fan_out_runs_only_the_filters_of_the_type_and_decodes_once(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await make_rig()
    everything = await rig.hook("all")
    ops = rig.ops
    shop = await ops.create(url="https://shop.example.com/h", events=("*",), description="shop",
                            filter=WebhookFilter.parse({"from_domains": ["shop.example", "*.shop.example"]}))
    other = await ops.create(url="https://other.example.com/h", events=("delivered",), description="other",
                             filter=WebhookFilter.parse({"from_domains": ["other.example"]}))
    vip = await ops.create(url="https://vip.example.com/h", events=("delivered",), description="vip",
                           filter=WebhookFilter.parse({"tags": ["vip"], "metadata": {"plan": "gold"}}))
    assert shop.matcher is not None and everything.matcher is None
    counting = CountingLoads()
    monkeypatch.setattr(scheduler_module, "orjson", counting)

    def ids(ev: Event) -> list[str]:
        return [wid for wid, _enabled in rig.scheduler.fan_out(ev)]

    assert ids(event(**{"from": "Shop <a@eu.shop.example>"})) == [everything.id, shop.id]
    assert ids(event(**{"from": "a@other.example"})) == [everything.id, other.id]
    assert ids(event(**{"from": "a@other.example", "tags": ["vip"], "metadata": {"plan": "gold"}})) == [
        everything.id, other.id, vip.id]
    assert ids(event(**{"from": "a@nobody.example", "tags": ["vip"], "metadata": {"plan": 1}})) == [everything.id]
    assert ids(event()) == [everything.id]  # no data.from: no sender filter matches
    assert ids(event("bounced", bounce_type="hard", **{"from": "a@shop.example"})) == [everything.id, shop.id]
    assert counting.calls == 6  # one decode per event, however many filters
    # events with the same outcome share one list (push_fresh takes them together)
    first = rig.scheduler.fan_out(event(**{"from": "a@shop.example"}))
    assert rig.scheduler.fan_out(event(**{"from": "b@shop.example", "subject": "x"})) is first
    # and the storage makes exactly those deliveries
    for sender in ("a@shop.example", "a@other.example", "a@nobody.example"):
        ev = event(**{"from": sender})
        await rig.storage.submit(ev, rig.scheduler.fan_out(ev))
    await rig.settle()
    counts = Counter(d.webhook_id for d in await rig.storage.list_deliveries(DeliveryFilter(), limit=100))
    assert counts == {everything.id: 3, shop.id: 1, other.id: 1}
    assert len(rig.poster.calls) == 5


async def test_a_filter_change_applies_to_events_submitted_after_its_commit(make_rig: MakeRig) -> None:
    rig = await make_rig()
    wh = await rig.ops.create(url="https://t.example.com/h", events=("*",), description="t",
                              filter=WebhookFilter.parse({"from_domains": ["shop.example"]}))
    from_shop, from_other = event(**{"from": "a@shop.example"}), event(**{"from": "a@other.example"})
    assert list(rig.scheduler.fan_out(from_shop)) == [(wh.id, True)] and list(rig.scheduler.fan_out(from_other)) == []
    commits = rig.storage.commits
    updating = asyncio.create_task(rig.ops.update(wh, url=None, events=None, description=None,
                                                  filter=WebhookFilter.parse({"from_domains": ["other.example"]})))
    await asyncio.sleep(0)
    assert rig.storage.commits == commits  # queued, not committed: the old filter still holds
    assert list(rig.scheduler.fan_out(from_shop)) == [(wh.id, True)]
    await updating
    assert wh.filter.from_domains == ("other.example",)
    assert list(rig.scheduler.fan_out(from_shop)) == [] and list(rig.scheduler.fan_out(from_other)) == [(wh.id, True)]
    [stored] = await rig.storage.load_webhooks()
    assert stored.filter == wh.filter
    await rig.ops.update(wh, url=None, events=None, description=None, filter=EMPTY_FILTER)  # cleared
    assert wh.matcher is None and rig.scheduler.fan_out(from_shop) is rig.scheduler.subscribers("delivered")
    # a filter is kept when an update does not name it
    await rig.ops.update(wh, url="https://moved.example.com/h", events=None, description=None,
                         filter=WebhookFilter.parse({"tags": ["a"]}))
    await rig.ops.update(wh, url=None, events=None, description="renamed")
    assert wh.filter.tags == ("a",) and wh.description == "renamed"


async def test_a_disabled_filtered_webhook_still_gets_its_matching_events_paused(make_rig: MakeRig) -> None:
    rig = await make_rig()
    wh = await rig.ops.create(url="https://t.example.com/h", events=("*",), description="t",
                              filter=WebhookFilter.parse({"from_domains": ["shop.example"]}))
    await rig.ops.disable(wh)
    assert list(rig.scheduler.fan_out(event(**{"from": "a@shop.example"}))) == [(wh.id, False)]
    assert list(rig.scheduler.fan_out(event(**{"from": "a@other.example"}))) == []


FILTERS = [None, {"from_domains": ["shop.example"]}, {"from_domains": ["*.shop.example"]},
           {"from_domains": ["shop.example", "*.shop.example"], "tags": ["vip"]},
           {"from_domains": ["other.example", "*.eu.shop.example"], "metadata": {"plan": "gold"}},
           {"from_domains": ["other.example"], "to_domains": ["*.gmail.example"]},
           {"tags": ["vip", "eu"]}, {"to_domains": ["gmail.example"]}, {"metadata": {"plan": "gold", "x": "1"}},
           {"from_domains": ["shop.example"]}]  # the same filter twice: both are in the index
SENDERS = [None, "a@shop.example", "Shop <a@EU.shop.example>", "a@x.eu.shop.example", "a@other.example",
           "a@nobody.example", "garbage", "a@evil.example <a@shop.example>"]
EXTRAS: list[dict[str, Any]] = [{}, {"tags": ["vip"]}, {"tags": ["eu"], "metadata": {"plan": "gold"}},
                                {"to": "u@mail.gmail.example", "metadata": {"plan": "gold", "x": "1"}},
                                {"to": "U@gmail.example", "tags": ["vip"]}]


async def test_the_indexed_fan_out_picks_what_each_filter_alone_picks(make_rig: MakeRig) -> None:
    rig = await make_rig()
    hooks = [await rig.ops.create(url=f"https://h{i}.example.com/h", events=("*",), description=str(i),
                                  filter=WebhookFilter.parse(f)) for i, f in enumerate(FILTERS)]
    for sender in SENDERS:
        for extra in EXTRAS:
            data = {**extra, **({"from": sender} if sender is not None else {})}
            expected = [wh.id for wh in hooks if wh.matcher is None or wh.matcher.matches(data)]
            got = [wid for wid, _enabled in rig.scheduler.fan_out(event(**data))]
            assert got == expected, data



# -- deferred fan-out: webhooks that cannot deliver get no rows ------------------------------------------
async def test_hanging_and_disabled_webhooks_cost_no_rows_and_later_get_every_event_once(make_rig: MakeRig) -> None:
    rig = await make_rig(per_webhook_concurrency=2, min_window=8, defer_after=20)
    healthy = await rig.hook("healthy")
    hanging = [await rig.hook(f"hang{i}") for i in range(4)]
    off = [await rig.hook(f"off{i}") for i in range(3)]
    for wh in off:
        await rig.ops.disable(wh)
    hang_urls = {wh.url for wh in hanging}
    rig.poster.handler = lambda call: OK
    original = rig.poster.post

    async def post(url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        if url in hang_urls and not released:  # held open, as rig.poster.hold does, for these only
            call = Call(url, headers["webhook-id"], rig.clock())
            rig.poster.calls.append(call)
            try:
                await call.released.wait()
                return OK
            finally:
                call.done = True
        return await original(url, body, headers)

    released = False
    rig.poster.post = post  # type: ignore[method-assign]
    uids: list[str] = []
    for _ in range(10):
        uids += await rig.send(30)
        await rig.settle()
    # the healthy one got all 300; the hanging ones hold 2 attempts each and have few rows
    assert Counter(c.event_id for c in rig.poster.calls if c.url == healthy.url) == Counter(uids)
    rows = dict(db_rows(rig.path, "SELECT webhook_id, count(*) FROM deliveries GROUP BY webhook_id"))
    assert rows[healthy.id] == 300 and not any(wh.id in rows for wh in off)
    assert all(rows[wh.id] <= 20 + 30 for wh in hanging)  # the threshold and one batch
    counts = await rig.storage.count_by_status()
    assert counts == {PENDING: 4 * 300, PAUSED: 3 * 300, SUCCEEDED: 300, FAILED: 0}
    stats = await rig.storage.webhook_stats(rig.clock())
    assert {stats[wh.id].pending for wh in hanging} == {300} and {stats[wh.id].paused for wh in off} == {300}
    assert await rig.storage.oldest_pending() == T0
    # now they answer, and the disabled ones come back: every event reaches every webhook once
    released = True
    assert rig.poster.release() == 4 * 2
    for wh in off:
        assert await rig.ops.enable(wh) == 300
    await rig.settle()
    by_url = Counter((c.url, c.event_id) for c in rig.poster.calls)
    for wh in [*hanging, *off]:
        got = Counter({uid: n for (url, uid), n in by_url.items() if url == wh.url})
        assert got == Counter(uids), wh.id
    assert await rig.storage.count_by_status() == {PENDING: 0, PAUSED: 0, SUCCEEDED: 8 * 300, FAILED: 0}
    for wh in [healthy, *hanging, *off]:
        assert await rig.statuses(wh) == {SUCCEEDED: 300}
        assert not wh.items and not wh.inflight


async def test_a_webhook_that_starts_lagging_with_everything_in_memory_still_gets_the_rest(
        make_rig: MakeRig) -> None:
    # the window holds everything (boundary None) when the storage begins to defer: the scheduler
    # is told (FreshEvent.resync) and reads the window again, so the deferred ones are not stranded
    rig = await make_rig(per_webhook_concurrency=1, min_window=64, defer_after=3)
    wh = await rig.hook()
    rig.poster.hold = True
    uids = await rig.send(2)
    uids += await rig.send(2)
    await rig.settle()
    assert wh.boundary is None  # 4 pending: all in memory
    uids += await rig.send(5)  # deferred from here on (4 pending > 3); the window is read again and
    await rig.settle()  # ... its refill made them rows (it has room for them)
    assert db_rows(rig.path, "SELECT count(*), max(id) FROM deliveries") == [(9, 9)]
    rig.poster.hold = False
    rig.poster.release()
    await rig.settle()
    assert Counter(c.event_id for c in rig.poster.calls) == Counter(uids)
    assert await rig.statuses(wh) == {SUCCEEDED: 9}
    uids += await rig.send(1)  # caught up: eager again, straight from memory
    await rig.settle()
    assert wh.boundary is None and Counter(c.event_id for c in rig.poster.calls) == Counter(uids)
