"""The scheduler as one of a fleet (`Scheduler(fleet=...)`), on its own: two schedulers with
fake clocks and fake dispatchers (tests/test_scheduler_units.py's rig) share one webhook
through a fake fleet that keeps the stored gate in memory and applies each decision to the
other scheduler as a notification would (`Scheduler.refresh`). What the real fleet does in
PostgreSQL (row lock, claims, NOTIFY) is tested with real processes in
tests/test_cluster_process.py; here, the scheduler's side of it: it decides from the stored
gate, sends one probe only when it holds the fleet's, and tells on_disabled only when its
own decision disabled the webhook."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.test_scheduler_units import BASE, BIG, FAIL, OK, T0, FakeClock, FakePoster, Rig
from webhookd import policy
from webhookd.metrics import Metrics
from webhookd.operations import Operations
from webhookd.policy import SLOW_START, Gate
from webhookd.scheduler import Scheduler
from webhookd.store.model import BatchOutcomeRecord, OutcomeRecord, WebhookRecord
from webhookd.store.sqlite import SqliteStorage
from webhookd.webhooks import Webhook

D = TypeVar("D", policy.Decision, policy.BatchDecision)


@dataclass
class FakeFleet:
    """The stored gate of each webhook and its one probe, shared by the members."""

    gates: dict[str, Gate] = field(default_factory=dict)
    probe: dict[str, str] = field(default_factory=dict)  # webhook id -> the member holding it
    members: list[Member] = field(default_factory=list)
    settled: int = 0


@dataclass(eq=False)
class Member:
    """One scheduler's view of the fake fleet (the FleetGate protocol)."""

    fleet: FakeFleet
    name: str
    storage: SqliteStorage
    scheduler: Scheduler | None = None
    denied: int = 0

    async def claim_probe(self, webhook_id: str, seconds: float) -> float:
        holder = self.fleet.probe.get(webhook_id)
        if holder in (None, self.name):
            self.fleet.probe[webhook_id] = self.name
            return 0.0
        self.denied += 1
        return 3600.0  # woken by the holder's outcome, as by a notification

    def share(self, rows: dict[str, list[int]]) -> None:
        pass  # the rig's backlogs fit their windows

    def settle(self, webhook_id: str, decide: Callable[[Gate], D],
               build: Callable[[D], OutcomeRecord | BatchOutcomeRecord], *,
               on_commit: Callable[[D | None], None]) -> None:
        fleet = self.fleet
        d = decide(fleet.gates.get(webhook_id, Gate()))
        fleet.gates[webhook_id] = replace(d.gate, ramp=0)
        fleet.settled += 1
        if fleet.probe.get(webhook_id) == self.name:
            del fleet.probe[webhook_id]
        record = build(d)
        assert isinstance(record, OutcomeRecord)

        def committed(_: None) -> None:
            on_commit(d)
            for other in fleet.members:  # what NOTIFY webhookd_webhooks makes the others do
                if other is not self and other.scheduler is not None:
                    wh = other.scheduler.webhooks.get(webhook_id)
                    if wh is not None:
                        gate = fleet.gates[webhook_id]
                        other.scheduler.refresh(webhook_id, (stored_as(wh, gate), gate.epoch))

        self.storage.record_outcome(record, on_commit=committed)


def stored_as(wh: Webhook, gate: Gate) -> WebhookRecord:
    """The webhook as the other member would read it back: its fields, the fleet's gate."""
    return replace(wh.record(), enabled=gate.enabled, consecutive_failures=gate.consecutive_failures,
                   backoff_until=gate.backoff_until, disabled_reason=gate.disabled_reason)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    rigs: list[Rig] = []
    schedulers: dict[str, Scheduler] = {}

    async def make(**delivery: Any) -> tuple[FakeFleet, Rig, Rig, str]:
        fleet = FakeFleet()
        clock, monotonic = FakeClock(T0), FakeClock(1000.0)  # one time for both
        for name in ("a", "b"):
            storage = SqliteStorage(tmp_path / name / "webhookd.db", durability="normal", clock=clock,
                                    on_fresh=lambda events, n=name: schedulers[n].push_fresh(events))
            member = Member(fleet, name, storage)
            poster = FakePoster(clock)
            metrics = Metrics()
            scheduler = Scheduler(storage, poster, replace(BASE, **delivery), clock=clock, monotonic=monotonic,
                                  metrics=metrics, fleet=member)
            member.scheduler = scheduler
            schedulers[name] = scheduler
            fleet.members.append(member)
            rig = Rig(clock, monotonic, poster, storage, scheduler, Operations(scheduler, storage), metrics,
                      tmp_path / name)
            scheduler.on_disabled = lambda wh, r=rig: r.disabled.append(wh.id)
            await storage.open()
            await scheduler.load()
            rigs.append(rig)
        a, b = rigs[-2], rigs[-1]
        wh = await a.hook()
        await b.storage.create_webhook(wh.record())  # the same webhook, as both daemons load it
        b.scheduler.add(Webhook.from_record(wh.record()))
        return fleet, a, b, wh.id

    yield make
    for rig in rigs:
        await rig.scheduler.drain(0)
        await rig.storage.close()


async def settle_both(a: Rig, b: Rig) -> None:
    for _ in range(3):
        await a.settle()
        await b.settle()


async def test_a_burst_of_failures_from_two_daemons_counts_once(pair: Callable[..., Any]) -> None:
    fleet, a, b, wid = await pair()
    for rig in (a, b):
        rig.poster.hold = True
        await rig.send(10)
    await settle_both(a, b)
    assert len(a.poster.held()) == len(b.poster.held()) == SLOW_START  # both healthy: a burst each
    a.poster.release(outcome=FAIL)
    b.poster.release(outcome=FAIL)
    await settle_both(a, b)
    assert fleet.settled == 2 * SLOW_START
    assert fleet.gates[wid].consecutive_failures == 1  # eight failures, all started in one epoch
    assert a.scheduler.webhooks[wid].consecutive_failures == b.scheduler.webhooks[wid].consecutive_failures == 1


async def test_one_probe_at_a_time_across_the_fleet_and_disabled_once(pair: Callable[..., Any]) -> None:
    fleet, a, b, wid = await pair(disable_after=4)
    for rig in (a, b):
        rig.poster.handler = lambda call: FAIL
        await rig.send(5)
    await settle_both(a, b)
    assert fleet.gates[wid].consecutive_failures == 1
    for _ in range(10):  # each round: the backoff passes; both want to probe, one does
        for rig in (a, b):
            rig.poster.hold = True
        a.later(BIG)
        b.scheduler.wake_all()
        await settle_both(a, b)
        held = len(a.poster.held()) + len(b.poster.held())
        if not fleet.gates[wid].enabled:
            assert held == 0
            break
        assert held == 1, (len(a.poster.held()), len(b.poster.held()))
        for rig in (a, b):
            rig.poster.hold = False
            rig.poster.release()
        await settle_both(a, b)
    gate = fleet.gates[wid]
    assert not gate.enabled and gate.consecutive_failures == 4
    assert a.disabled + b.disabled == [wid]  # on_disabled once, by the member whose decision disabled it
    assert not a.scheduler.webhooks[wid].enabled and not b.scheduler.webhooks[wid].enabled
    assert a.scheduler.fleet is not None and b.scheduler.fleet is not None
    assert sum(m.denied for m in fleet.members) >= 1  # the other member asked and waited


async def test_a_success_closes_the_fleets_failure_episode_for_both(pair: Callable[..., Any]) -> None:
    fleet, a, b, wid = await pair()
    a.poster.handler = lambda call: FAIL
    await a.send(1)
    await settle_both(a, b)
    assert b.scheduler.webhooks[wid].consecutive_failures == 1  # b heard of a's failure
    a.poster.handler = b.poster.handler = lambda call: OK  # the receiver is back
    await b.send(1)
    b.later(BIG)
    a.scheduler.wake_all()
    await settle_both(a, b)
    assert fleet.gates[wid].consecutive_failures == 0
    assert a.scheduler.webhooks[wid].consecutive_failures == 0
