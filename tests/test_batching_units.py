"""Batched delivery in the scheduler, with the fake clock and fake dispatcher of
tests/test_scheduler_units.py (real SQLite): batches form by count, by bytes and by linger;
a batch is one attempt for the gate (a burst counts once, disabling at exactly
disable_after), is retried together with the same id, and every delivery keeps its own
max_attempts; the attempt log names the batch. Plus the pure parts (webhookd.batching)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import Any

import orjson
import pytest

from tests.test_scheduler_units import (  # noqa: F401 - make_rig is a fixture
    BIG,
    FAIL,
    OK,
    T0,
    Call,
    FakePoster,
    MakeRig,
    Rig,
    make_rig,
)
from webhookd import batching
from webhookd import scheduler as scheduler_module
from webhookd.batching import MAX_BYTES, MAX_EVENTS, OFF, Batching, BatchingError
from webhookd.declared import DeclaredWebhook
from webhookd.dispatcher import Outcome
from webhookd.events import validate_event
from webhookd.filters import EMPTY_FILTER
from webhookd.policy import CONSECUTIVE_FAILURES
from webhookd.store.model import FAILED, PAUSED, PENDING, SUCCEEDED, DeliveryFilter
from webhookd.webhooks import Webhook


class BodyPoster(FakePoster):
    """The fake dispatcher, keeping each call's body and headers."""

    def __init__(self, inner: FakePoster) -> None:
        super().__init__(inner.clock, inner.handler)
        self.bodies: dict[int, tuple[bytes, dict[str, str]]] = {}

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        self.bodies[len(self.calls)] = (body, headers)
        return await super().post(url, body, headers)

    def batch(self, call: Call) -> list[dict[str, Any]]:
        body, _headers = self.bodies[self.calls.index(call)]
        elements = orjson.loads(body)
        assert isinstance(elements, list)
        return elements


async def batching_rig(make_rig: MakeRig, **delivery: Any) -> tuple[Rig, BodyPoster]:  # noqa: F811
    rig = await make_rig(**delivery)
    poster = BodyPoster(rig.poster)
    rig.poster = poster
    rig.scheduler.dispatcher = poster
    return rig, poster


async def batched_hook(rig: Rig, settings: Batching, name: str = "b") -> Webhook:
    return await rig.ops.create(url=f"https://{name}.example.com/hook", events=("*",), description=name,
                                batching=settings)


def sizes(poster: BodyPoster) -> list[int]:
    return [len(poster.batch(c)) for c in poster.calls]


# -- formation ------------------------------------------------------------------------------------
async def test_full_batches_go_at_once_and_the_rest_after_the_linger(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    wh = await batched_hook(rig, Batching(max_events=10, linger=100.0))
    uids = await rig.send(25)
    await rig.settle()
    assert sizes(poster) == [10, 10]  # the partial third waits for its linger
    rig.later(99.0)
    await rig.settle()
    assert sizes(poster) == [10, 10]
    rig.later(1.0)
    await rig.settle()
    assert sizes(poster) == [10, 10, 5]
    # in order, every event once, each element its own payload with its event id
    sent = [e for c in poster.calls for e in poster.batch(c)]
    assert [e["id"] for e in sent] == uids
    assert await rig.statuses(wh) == {SUCCEEDED: 25}


async def test_the_body_is_the_stored_payloads_joined_byte_for_byte(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    wh = await batched_hook(rig, Batching(max_events=3))
    await rig.send(3)
    await rig.settle()
    [call] = poster.calls
    body, headers = poster.bodies[0]
    stored = [(await rig.storage.delivery(d.id)) for d in await rig.deliveries(wh)]
    # each element: {"id":"evt_...", then the stored payload's bytes after its "{"
    assert body == b"[" + b",".join(b'{"id":"' + d.delivery.event_uid.encode() + b'",' + d.body[1:]
                                    for d in stored if d is not None) + b"]"
    for element, d in zip(orjson.loads(body), stored, strict=True):
        assert d is not None and element == {"id": d.delivery.event_uid, **orjson.loads(d.body)}
    assert headers["webhook-id"] == headers["X-Webhook-Id"] == call.event_id
    assert call.event_id == batching.batch_id(wh.id, [d.event_uid for d in await rig.deliveries(wh)])
    assert call.event_id.startswith("batch_") and len(call.event_id) == 32
    assert headers["X-Webhook-Event"] == "batch"


async def test_batches_never_pass_max_bytes_and_a_large_event_goes_alone(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    settings = Batching(max_events=100, max_bytes=1024, linger=100.0)
    wh = await batched_hook(rig, settings)
    uids = await rig.send(30)
    await rig.settle()
    assert len(poster.calls) >= 2  # full by bytes: sent at once, the rest lingers
    stored = {d.event_uid: d for d in await rig.deliveries(wh)}
    for i, (body, _h) in enumerate(poster.bodies.values()):
        assert len(body) <= 1024
        following = await rig.storage.delivery(stored[uids[sum(sizes(poster)[: i + 1])]].id)
        assert following is not None  # the event after this batch did not fit in it
        assert len(body) + 1 + batching.element_size(following.delivery.event_uid, following.body) > 1024
    rig.later(100.0)
    await rig.settle()
    assert sum(sizes(poster)) == 30
    poster.calls.clear()
    poster.bodies.clear()
    big = validate_event({"event": "delivered", "data": {"message_id": "<big@example.com>", "subject": "x" * 2000}},
                         now=rig.clock())
    await rig.storage.submit(big, rig.scheduler.fan_out(big))
    await rig.send(1)
    await rig.settle()
    rig.later(100.0)
    await rig.settle()
    assert sizes(poster) == [1, 1]  # the large one alone (the next does not fit beside it)
    assert [len(b) > 1024 for b, _h in poster.bodies.values()] == [True, False]
    assert await rig.statuses(wh) == {SUCCEEDED: 32}


def test_take_counts_the_array_bytes_and_always_takes_the_first() -> None:
    s = Batching(max_events=10, max_bytes=1024)
    assert batching.take([100] * 20, s) == 10  # by count
    assert batching.take([300] * 5, s) == 3  # 1 + 3*301 = 904 fits, a fourth (1205) does not
    assert batching.take([339, 339, 339], s) == 3  # 1 + 3 * 340 = 1021
    assert batching.take([340, 340, 340], s) == 3  # 1 + 3 * 341 = 1024: exactly the limit
    assert batching.take([341, 341, 341], s) == 2
    assert batching.take([5000, 1], s) == 1  # too large alone: still sent, alone
    assert batching.take([], s) == 0
    payload = b'{"a":"' + b"x" * 300 + b'"}'
    size = batching.element_size("evt_1", payload)
    assert len(batching.element("evt_1", payload)) == size
    assert batching.array_size([size] * 3) == len(batching.body([("evt_1", payload)] * 3))


@pytest.mark.parametrize("payload", [b"[1]", b"{}", b"", b'"x"'])
def test_an_element_needs_a_non_empty_object(payload: bytes) -> None:
    with pytest.raises(ValueError, match="cannot batch"):
        batching.element("evt_1", payload)
    with pytest.raises(ValueError, match="cannot batch"):
        batching.element('evt_"1', b'{"a":1}')


async def test_the_linger_waits_for_more_events_then_sends_what_it_has(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    await batched_hook(rig, Batching(max_events=100, linger=50.0))
    await rig.send(3)
    await rig.settle()
    rig.later(30.0)
    await rig.send(4)  # joins the batch being formed: the linger runs from the first
    await rig.settle()
    assert poster.calls == []
    rig.later(19.0)
    await rig.settle()
    assert poster.calls == []
    rig.later(1.0)
    await rig.settle()
    assert sizes(poster) == [7]
    assert poster.calls[0].at == T0 + 50.0


async def test_no_linger_sends_what_is_due_at_once(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    wh = await batched_hook(rig, Batching(max_events=100))
    await rig.send(1)
    await rig.settle()
    assert sizes(poster) == [1]
    assert await rig.statuses(wh) == {SUCCEEDED: 1}


async def test_batching_off_is_single_event_delivery(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    for settings in (OFF, Batching(max_events=1, linger=100.0)):
        wh = await batched_hook(rig, settings, name=f"s{settings.max_events}")
        poster.calls.clear()
        poster.bodies.clear()
        uids = await rig.send(3)
        await rig.settle()
        assert sorted(c.event_id for c in poster.calls if c.url == wh.url) == sorted(uids)
        assert all(not b.startswith(b"[") for b, _h in poster.bodies.values())


async def test_a_batch_never_mixes_webhooks(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    a = await batched_hook(rig, Batching(max_events=50), name="a")
    b = await batched_hook(rig, Batching(max_events=50), name="b")
    await rig.send(20)
    await rig.settle()
    by_url: dict[str, list[str]] = {}
    for call in poster.calls:
        by_url.setdefault(call.url, []).extend(e["id"] for e in poster.batch(call))
    assert sorted(by_url) == sorted([a.url, b.url])
    assert by_url[a.url] == by_url[b.url] and len(by_url[a.url]) == 20
    assert len({c.event_id for c in poster.calls}) == len(poster.calls)  # each webhook's batch its own id


async def test_turning_batching_off_sends_the_batch_being_formed_one_by_one(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    wh = await batched_hook(rig, Batching(max_events=100, linger=1000.0))
    uids = await rig.send(5)
    await rig.settle()
    assert poster.calls == [] and len(wh.forming) == 5
    await rig.ops.update(wh, url=None, events=None, description=None, batching=OFF)
    await rig.settle()
    assert sorted(c.event_id for c in poster.calls) == sorted(uids)
    assert await rig.statuses(wh) == {SUCCEEDED: 5}
    [stored] = [w for w in await rig.storage.load_webhooks() if w.id == wh.id]
    assert stored.batching == OFF


async def test_a_retry_of_a_forming_delivery_is_sent_once(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    wh = await batched_hook(rig, Batching(max_events=100, linger=1000.0))
    await rig.send(3)
    await rig.settle()
    first = (await rig.deliveries(wh))[0]
    await rig.ops.retry_delivery(first.id)
    await rig.settle()
    rig.later(1000.0)
    await rig.settle()
    sent = [e["id"] for c in poster.calls for e in poster.batch(c)]
    assert sorted(sent) == sorted(d.event_uid for d in await rig.deliveries(wh))  # each exactly once
    assert await rig.statuses(wh) == {SUCCEEDED: 3}


# -- retries, the gate, disabling -----------------------------------------------------------------
async def test_a_burst_of_failed_batches_counts_once_and_each_is_retried_together(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    poster.hold = True
    wh = await batched_hook(rig, Batching(max_events=10))
    await rig.send(30)
    await rig.settle()
    assert sizes(poster) == [10, 10, 10]  # three batch attempts at once (slow start allows 4)
    first_ids = [c.event_id for c in poster.calls]
    members = {c.event_id: [e["id"] for e in poster.batch(c)] for c in poster.calls}
    poster.release(outcome=FAIL)
    await rig.settle()
    assert wh.consecutive_failures == 1  # the burst counts once
    assert rig.attempts_counted() == 3  # one attempt per batch
    assert [d.attempts for d in await rig.deliveries(wh)] == [1] * 30
    assert await rig.statuses(wh) == {PENDING: 30}
    due = {d.next_attempt_at for d in await rig.deliveries(wh)}
    assert len(due) == 3  # each batch shares one retry time

    for failures in (2, 3):
        rig.later(BIG)
        await rig.settle()
        [probe] = poster.held()  # backing off: one probe, a whole batch, with its first id
        assert probe.event_id in first_ids and [e["id"] for e in poster.batch(probe)] == members[probe.event_id]
        poster.release(outcome=FAIL)
        await rig.settle()
        assert wh.consecutive_failures == failures
    rig.later(BIG)
    await rig.settle()
    [probe] = poster.held()
    poster.release(outcome=OK)
    await rig.settle()
    assert wh.consecutive_failures == 0
    poster.hold = False
    poster.release(outcome=OK)
    await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 30}
    assert {c.event_id for c in poster.calls} == set(first_ids)  # every retry kept its batch's id
    for bid, uids in members.items():  # the attempt log names the batch of each attempt
        found = await rig.storage.list_deliveries(DeliveryFilter(batch_id=bid))
        assert sorted(d.event_uid for d in found) == sorted(uids)


async def test_batches_disable_the_webhook_at_exactly_disable_after(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig, disable_after=3)
    poster.handler = lambda call: FAIL
    wh = await batched_hook(rig, Batching(max_events=10))
    await rig.send(30)
    await rig.settle()
    assert len(poster.calls) == 3 and wh.consecutive_failures == 1
    rig.later(BIG)
    await rig.settle()
    assert len(poster.calls) == 4 and wh.consecutive_failures == 2 and wh.enabled
    rig.later(BIG)
    await rig.settle()
    assert len(poster.calls) == 5
    assert not wh.enabled and wh.disabled_reason == CONSECUTIVE_FAILURES and wh.consecutive_failures == 3
    assert rig.disabled == [wh.id]
    assert await rig.statuses(wh) == {PAUSED: 30}
    rig.later(BIG)
    await rig.settle()
    assert len(poster.calls) == 5
    poster.handler = lambda call: OK
    assert await rig.ops.enable(wh) == 30
    await rig.settle()
    assert await rig.statuses(wh) == {SUCCEEDED: 30}
    assert len(poster.calls) == 5 + 3  # the paused ones, batched again
    assert wh.enabled and wh.consecutive_failures == 0


async def test_max_attempts_applies_to_each_delivery_of_a_batch(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig, max_attempts=2)
    poster.handler = lambda call: FAIL
    wh = await batched_hook(rig, Batching(max_events=10))
    await rig.send(4)
    await rig.settle()
    rig.later(BIG)
    await rig.settle()
    assert len(poster.calls) == 2 and poster.calls[0].event_id == poster.calls[1].event_id
    assert [(d.status, d.attempts) for d in await rig.deliveries(wh)] == [(FAILED, 2)] * 4
    detail = await rig.storage.delivery((await rig.deliveries(wh))[0].id)
    assert detail is not None and [a.batch_id for a in detail.attempts] == [poster.calls[0].event_id] * 2
    rig.later(BIG)
    await rig.settle()
    assert len(poster.calls) == 2


async def test_a_batch_attempt_abandoned_at_shutdown_stays_pending(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    poster.hold = True
    wh = await batched_hook(rig, Batching(max_events=10))
    await rig.send(5)
    await rig.settle()
    assert len(poster.held()) == 1
    assert await rig.scheduler.drain(0) == 1
    await asyncio.sleep(0)
    assert await rig.statuses(wh) == {PENDING: 5}
    assert wh.inflight == set()


# -- the settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_max_events": MAX_EVENTS + 1}, "batch_max_events must be between 0 and 1000, got 1001"),
        ({"batch_max_events": -1}, "batch_max_events must be between 0 and 1000"),
        ({"batch_max_events": "100"}, "batch_max_events must be an integer between 0 and 1000, got '100'"),
        ({"batch_max_events": True}, "batch_max_events must be an integer"),
        ({"batch_max_events": 1.5}, "batch_max_events must be an integer"),
        ({"batch_max_events": 10**30}, "batch_max_events must be between 0 and 1000"),
        ({"batch_max_bytes": MAX_BYTES + 1}, "batch_max_bytes must be between 1024 and 4194304"),
        ({"batch_max_bytes": 10}, "batch_max_bytes must be between 1024 and 4194304, got 10"),
        ({"batch_max_bytes": None}, "batch_max_bytes must be an integer"),
        ({"batch_linger": "6s"}, "batch_linger must be between 0ms and 5s, got '6s'"),
        ({"batch_linger": -1}, "batch_linger must be between 0ms and 5s"),
        ({"batch_linger": "soon"}, 'batch_linger must be a duration such as "50ms" or "1s", got \'soon\''),
        ({"batch_linger": float("nan")}, "batch_linger must be a duration"),
        ({"batch_linger": float("inf")}, "batch_linger must be a duration"),
        ({"batch_linger": [1]}, "batch_linger must be a duration"),
        ({"batch_linger": "5m"}, "batch_linger must be a duration"),
        ({"batch_linger": "9" * 100 + "ms"}, "batch_linger must be a duration"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(BatchingError) as err:
        OFF.updated(fields)
    assert str(err.value).startswith(message)
    assert len(str(err.value)) < 400


def test_settings_parse_and_show() -> None:
    s = OFF.updated({"batch_max_events": 100, "batch_linger": "50ms"})
    assert s == Batching(100, batching.DEFAULT_BYTES, 0.05) and s.on
    assert s.to_json() == {"batch_max_events": 100, "batch_max_bytes": 1048576, "batch_linger": "50ms"}
    assert OFF.updated({"batch_linger": 1.5}).linger == 1.5
    assert OFF.updated({"batch_linger": "1.5s"}).linger == 1.5
    assert OFF.updated({"batch_linger": "0.0004s"}).linger == 0.0  # whole milliseconds
    assert s.updated({"batch_max_bytes": 2048}) == Batching(100, 2048, 0.05)  # only what is given changes
    assert not OFF.on and not Batching(1).on and OFF.describe() == "off"
    assert s.describe() == "100 events, 1048576 bytes, linger 50ms"


def test_the_batch_id_names_the_content() -> None:
    a = batching.batch_id("wh_1", ["evt_a", "evt_b"])
    assert a == batching.batch_id("wh_1", ["evt_a", "evt_b"])
    assert a != batching.batch_id("wh_2", ["evt_a", "evt_b"])
    assert a != batching.batch_id("wh_1", ["evt_a"])
    assert a != batching.batch_id("wh_1", ["evt_b", "evt_a"])
    assert a != batching.batch_id("wh_1", ["evt_a\nevt_b"])
    assert a.startswith("batch_") and len(a) == 32 and a[6:].isalnum() and a == a.lower()


async def test_a_declared_webhook_gets_and_changes_its_batch_settings_by_sync(make_rig: MakeRig) -> None:  # noqa: F811
    rig, poster = await batching_rig(make_rig)
    entry = DeclaredWebhook(name="bulk", url="https://bulk.example.com/h", events=("*",), description="",
                            filter=EMPTY_FILTER, source="/etc/webhookd/config.toml", batching=Batching(4))
    [created] = await rig.ops.sync([entry])
    assert created.kind == "create"
    [wh] = [w for w in rig.scheduler.webhooks.values() if w.name == "bulk"]
    assert wh.batching == Batching(4)
    await rig.send(8)
    await rig.settle()
    assert sizes(poster) == [4, 4]
    [changed] = await rig.ops.sync([replace(entry, batching=OFF)])
    assert changed.kind == "update" and changed.fieldnames() == ("batching",)
    assert wh.batching == OFF
    [stored] = [w for w in await rig.storage.load_webhooks() if w.id == wh.id]
    assert stored.batching == OFF
    assert await rig.ops.sync([replace(entry, batching=OFF)]) == []  # in step


@pytest.mark.parametrize("backlog", ["fresh-at-once", "fresh-in-waves", "resumed-from-storage", "failing-first"])
async def test_refills_batch_every_delivery_once_with_bounded_memory(make_rig: MakeRig, backlog: str) -> None:  # noqa: F811
    """A batching webhook's window (BATCH_WINDOW batches) refilled from storage again and
    again: every event is sent exactly once, in batches of at most max_events, memory bounded."""
    rig, poster = await batching_rig(make_rig, per_webhook_concurrency=2, min_window=8)
    settings = Batching(max_events=3)
    wh = await batched_hook(rig, settings)
    window = rig.scheduler._window_of(wh)
    assert window == scheduler_module.BATCH_WINDOW * 3
    peak = 0

    def observe() -> None:
        nonlocal peak
        peak = max(peak, len(wh.items) + len(wh.forming))

    futures: list[asyncio.Future[str]] = []
    if backlog == "fresh-in-waves":
        for _ in range(10):
            futures += rig.submit(30)
            for _ in range(7):
                await asyncio.sleep(0)
                observe()
    elif backlog == "resumed-from-storage":
        await rig.ops.disable(wh)
        futures = rig.submit(300)
        await asyncio.gather(*futures)
        assert await rig.ops.enable(wh) == 300
    else:
        if backlog == "failing-first":
            failures = iter([FAIL] * 5)
            poster.handler = lambda call: next(failures, OK)
        futures = rig.submit(300)
    await rig.settle(observe)
    if backlog == "failing-first":
        for _ in range(6):
            rig.later(BIG)
            await rig.settle(observe)

    uids = [f.result() for f in futures]
    sent = [e["id"] for c in poster.calls for e in poster.batch(c)]
    assert all(len(poster.batch(c)) <= 3 for c in poster.calls)
    if backlog == "failing-first":  # the failed batches were sent again: all of them, their events only
        assert set(sent) == set(uids) and len(sent) == 300 + 3 * 5
    else:
        assert Counter(sent) == Counter(uids)  # each exactly once
    assert await rig.statuses(wh) == {SUCCEEDED: 300}
    assert peak <= 2 * window + 3
    assert not wh.items and not wh.inflight and not wh.forming
