"""The delivery policy (webhookd.policy), table by table: pure functions, no clock, no I/O.

Every row names what it shows. Delays are deterministic: unless a row says otherwise,
`rand` returns 0.5, which makes the jitter factor exactly 1, so `backoff(n)` is
`min(retry_max, retry_base * 2**(n-1))`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from webhookd.config import DeliveryConfig
from webhookd.policy import (
    CONSECUTIVE_FAILURES,
    MANUAL,
    SLOW_START,
    Decision,
    Gate,
    decide,
    disabled_by_hand,
    enabled_again,
    limit,
    start_at,
    want,
    water_level,
)
from webhookd.retry import backoff
from webhookd.store.model import FAILED, PAUSED, PENDING, SUCCEEDED

CFG = DeliveryConfig(retry_base=10.0, retry_max=1000.0, max_attempts=5, disable_after=3, per_webhook_concurrency=32)
LENIENT = replace(CFG, disable_after=100)  # many consecutive failures without a disable
NOW = 100.0


def middle() -> float:
    return 0.5  # jitter factor 1.0


def low() -> float:
    return 0.0  # jitter factor 0.8


def high() -> float:
    return 0.99  # jitter factor 1.196: a backoff at the cap lies above retry_max


def b(n: int, rand: Callable[[], float] = middle) -> float:
    """CFG's backoff after the n-th failure."""
    return backoff(n, base=CFG.retry_base, cap=CFG.retry_max, rand=rand)


# -- decide -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One call of decide() and the decision it must come to."""

    gate: Gate
    expect: Decision
    success: bool = False
    retry_after: float | None = None
    attempt_epoch: int | None = None  # None: the gate's current epoch
    attempts: int = 1
    cfg: DeliveryConfig = CFG
    rand: Callable[[], float] = middle


def ok(gate: Gate, changed: bool = False) -> Decision:
    return Decision(gate, SUCCEEDED, None, gate_changed=changed, disabled=False)


def pending(gate: Gate, next_at: float, changed: bool = True) -> Decision:
    return Decision(gate, PENDING, next_at, gate_changed=changed, disabled=False)


BACKING_OFF = Gate(consecutive_failures=2, backoff_until=500.0, epoch=7)

DECIDE = [
    # success from healthy: the ramp doubles from SLOW_START, nothing to write
    pytest.param(Case(Gate(), ok(Gate(ramp=2 * SLOW_START)), success=True), id="success-fresh-ramp-4-to-8"),
    pytest.param(Case(Gate(ramp=8, epoch=3), ok(Gate(ramp=16, epoch=3)), success=True), id="success-ramp-8-to-16"),
    pytest.param(Case(Gate(ramp=16), ok(Gate(ramp=32)), success=True), id="success-ramp-reaches-per-webhook"),
    pytest.param(Case(Gate(ramp=32), ok(Gate(ramp=32)), success=True), id="success-ramp-capped-at-per-webhook"),
    pytest.param(
        Case(Gate(ramp=16), ok(Gate(ramp=20)), success=True, cfg=replace(CFG, per_webhook_concurrency=20)),
        id="success-ramp-capped-at-odd-per-webhook",
    ),
    pytest.param(
        Case(Gate(ramp=32), ok(Gate(ramp=8)), success=True, cfg=replace(CFG, per_webhook_concurrency=8)),
        id="success-ramp-comes-down-to-a-lowered-per-webhook",
    ),
    pytest.param(
        Case(Gate(), ok(Gate(ramp=SLOW_START)), success=True, cfg=replace(CFG, per_webhook_concurrency=2)),
        id="success-ramp-never-below-slow-start-when-per-webhook-is-small",
    ),
    # success from backing off: the gate resets, the epoch moves, the ramp doubles
    pytest.param(
        Case(BACKING_OFF, ok(Gate(epoch=8, ramp=8), changed=True), success=True),
        id="success-from-backing-off-resets-the-gate",
    ),
    pytest.param(
        Case(BACKING_OFF, ok(Gate(epoch=8, ramp=8), changed=True), success=True, attempt_epoch=2),
        id="success-of-an-older-attempt-also-closes-the-episode",
    ),
    pytest.param(
        Case(Gate(backoff_until=500.0, epoch=1), ok(Gate(epoch=2, ramp=8), changed=True), success=True),
        id="success-clears-a-stale-backoff-until",
    ),
    pytest.param(
        Case(Gate(enabled=False, disabled_reason=MANUAL, epoch=4),
             ok(Gate(False, epoch=4, ramp=8, disabled_reason=MANUAL)), success=True, attempt_epoch=3),
        id="success-in-flight-across-a-manual-disable-stays-disabled",
    ),
    pytest.param(
        Case(Gate(False, 3, 500.0, epoch=5, disabled_reason=CONSECUTIVE_FAILURES),
             ok(Gate(False, 3, 500.0, epoch=5, ramp=8, disabled_reason=CONSECUTIVE_FAILURES)), success=True,
             attempt_epoch=3),
        id="success-in-flight-across-an-automatic-disable-keeps-its-count",
    ),
    pytest.param(
        Case(Gate(False, 2, 500.0, epoch=6, disabled_reason=MANUAL),
             ok(Gate(False, 2, 500.0, epoch=6, ramp=8, disabled_reason=MANUAL)), success=True, attempt_epoch=5),
        id="success-in-flight-across-a-manual-disable-keeps-the-gate",
    ),
    # failure in the current epoch: counts, backs off, back to slow start
    pytest.param(
        Case(Gate(ramp=16), pending(Gate(consecutive_failures=1, backoff_until=NOW + 10, epoch=1), NOW + 10)),
        id="first-failure-counts-and-backs-off",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1),
             pending(Gate(consecutive_failures=2, backoff_until=NOW + 20, epoch=2), NOW + 20), attempts=2),
        id="second-failure-doubles-the-backoff",
    ),
    pytest.param(
        Case(Gate(), pending(Gate(consecutive_failures=1, backoff_until=NOW + 8, epoch=1), NOW + 8), rand=low),
        id="failure-jitter-from-rand",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1),
             pending(Gate(consecutive_failures=2, backoff_until=NOW + 20, epoch=2), NOW + 80), attempts=4),
        id="failure-next-at-from-the-deliverys-own-attempts",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=1, epoch=1),
             pending(Gate(consecutive_failures=2, backoff_until=NOW + 20, epoch=2), NOW + 1000), attempts=9,
             cfg=replace(CFG, max_attempts=20)),
        id="failure-next-at-capped-by-retry-max",
    ),
    # failure of an attempt from an older epoch: a burst counts once
    pytest.param(
        Case(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1, ramp=0),
             pending(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1), NOW + 10, changed=False),
             attempt_epoch=0),
        id="burst-older-epoch-does-not-count",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1),
             pending(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1), NOW + 40, changed=False),
             attempt_epoch=0, attempts=3),
        id="burst-older-epoch-status-from-own-attempts",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1),
             Decision(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1), FAILED, None, False, False),
             attempt_epoch=0, attempts=5),
        id="burst-older-epoch-still-fails-at-max-attempts",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1),
             pending(Gate(consecutive_failures=1, backoff_until=110.0, epoch=1), NOW + 10, changed=False),
             attempt_epoch=0, retry_after=600.0),
        id="burst-older-epoch-retry-after-ignored",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=2, backoff_until=110.0, epoch=5),
             pending(Gate(consecutive_failures=2, backoff_until=110.0, epoch=5), NOW + 10, changed=False),
             attempt_epoch=4),
        id="burst-older-epoch-cannot-disable",
    ),
    pytest.param(
        Case(Gate(epoch=3, ramp=16), pending(Gate(epoch=3), NOW + 10, changed=False), attempt_epoch=2),
        id="older-epoch-failure-on-healthy-gate-back-to-slow-start",
    ),
    # Retry-After raises the webhook's delay, capped by retry_max; the delivery's own next_at is unchanged
    pytest.param(
        Case(Gate(), pending(Gate(consecutive_failures=1, backoff_until=NOW + 300, epoch=1), NOW + 10),
             retry_after=300.0),
        id="retry-after-raises-the-delay",
    ),
    pytest.param(
        Case(Gate(), pending(Gate(consecutive_failures=1, backoff_until=NOW + 10, epoch=1), NOW + 10),
             retry_after=1.0),
        id="retry-after-never-shortens-the-backoff",
    ),
    pytest.param(
        Case(Gate(), pending(Gate(consecutive_failures=1, backoff_until=NOW + 10, epoch=1), NOW + 10),
             retry_after=0.0),
        id="retry-after-zero",
    ),
    pytest.param(
        Case(Gate(), pending(Gate(consecutive_failures=1, backoff_until=NOW + 1000, epoch=1), NOW + 10),
             retry_after=86400.0),
        id="retry-after-capped-by-retry-max",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=19, epoch=1),
             pending(Gate(consecutive_failures=20, backoff_until=NOW + b(20, high), epoch=2), NOW + b(1, high)),
             rand=high, cfg=LENIENT),
        id="jittered-backoff-may-lie-above-retry-max",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=19, epoch=1),
             pending(Gate(consecutive_failures=20, backoff_until=NOW + b(20, high), epoch=2), NOW + b(1, high)),
             retry_after=5.0, rand=high, cfg=LENIENT),
        id="retry-after-never-shortens-a-jittered-backoff",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=19, epoch=1),
             pending(Gate(consecutive_failures=20, backoff_until=NOW + b(20, high), epoch=2), NOW + b(1, high)),
             retry_after=5000.0, rand=high, cfg=LENIENT),
        id="retry-after-capped-by-retry-max-never-shortens-a-jittered-backoff",
    ),
    # the disable_after-th failure disables: the deliveries pause
    pytest.param(
        Case(Gate(consecutive_failures=2, backoff_until=120.0, epoch=2),
             Decision(Gate(False, 3, NOW + 40, epoch=4, disabled_reason=CONSECUTIVE_FAILURES), PAUSED, None,
                      gate_changed=True, disabled=True), attempts=2),
        id="disable-after-th-failure-disables",
    ),
    pytest.param(
        Case(Gate(),
             Decision(Gate(False, 1, NOW + 10, epoch=2, disabled_reason=CONSECUTIVE_FAILURES), PAUSED, None,
                      gate_changed=True, disabled=True), cfg=replace(CFG, disable_after=1)),
        id="disable-after-one",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=2, epoch=2),
             Decision(Gate(False, 3, NOW + 40, epoch=4, disabled_reason=CONSECUTIVE_FAILURES), PAUSED, None,
                      gate_changed=True, disabled=True), attempts=5),
        id="disable-wins-over-max-attempts",
    ),
    pytest.param(
        Case(Gate(consecutive_failures=3, epoch=3),
             Decision(Gate(False, 4, NOW + 80, epoch=5, disabled_reason=CONSECUTIVE_FAILURES), PAUSED, None,
                      gate_changed=True, disabled=True), attempts=1),
        id="disable-after-lowered-below-the-count",
    ),
    pytest.param(
        Case(Gate(False, 2, 500.0, epoch=6, disabled_reason=MANUAL),
             Decision(Gate(False, 2, 500.0, epoch=6, disabled_reason=MANUAL), PAUSED, None, False, False),
             attempt_epoch=5),
        id="failure-in-flight-across-a-manual-disable-pauses-uncounted",
    ),
    pytest.param(
        Case(Gate(False, 0, 0.0, epoch=0, disabled_reason=MANUAL),
             Decision(Gate(False, 0, 0.0, epoch=0, disabled_reason=MANUAL), PAUSED, None, False, False)),
        id="failure-on-a-disabled-gate-never-counts-even-in-its-epoch",
    ),
    # max_attempts: failed for good
    pytest.param(
        Case(Gate(),
             Decision(Gate(consecutive_failures=1, backoff_until=NOW + 10, epoch=1), FAILED, None, True, False),
             attempts=5),
        id="max-attempts-fails",
    ),
    pytest.param(
        Case(Gate(),
             Decision(Gate(consecutive_failures=1, backoff_until=NOW + 10, epoch=1), FAILED, None, True, False),
             attempts=9),
        id="beyond-a-lowered-max-attempts-fails",
    ),
    pytest.param(
        Case(Gate(), pending(Gate(consecutive_failures=1, backoff_until=NOW + 10, epoch=1), NOW + 80), attempts=4),
        id="one-below-max-attempts-still-pending",
    ),
]


@pytest.mark.parametrize("case", DECIDE)
def test_decide(case: Case) -> None:
    epoch = case.gate.epoch if case.attempt_epoch is None else case.attempt_epoch
    got = decide(
        case.gate, success=case.success, retry_after=case.retry_after, attempt_epoch=epoch,
        attempts=case.attempts, cfg=case.cfg, now=NOW, rand=case.rand,
    )
    assert got == case.expect


def test_a_burst_of_failures_counts_once() -> None:
    """N attempts started in one epoch fail together: the first one counts, the rest don't."""
    gate = Gate(ramp=8)
    started = gate.epoch
    statuses = []
    for _ in range(8):
        d = decide(gate, success=False, retry_after=None, attempt_epoch=started, attempts=1, cfg=CFG, now=NOW,
                   rand=middle)
        gate = d.gate
        statuses.append(d.status)
    assert gate.consecutive_failures == 1
    assert statuses == [PENDING] * 8
    # a probe started in the new epoch counts again
    d = decide(gate, success=False, retry_after=None, attempt_epoch=gate.epoch, attempts=2, cfg=CFG, now=NOW,
               rand=middle)
    assert d.gate.consecutive_failures == 2


# -- limit, start_at, want ------------------------------------------------------------------------
LIMIT = [
    pytest.param(Gate(), 32, SLOW_START, id="fresh-slow-start"),
    pytest.param(Gate(ramp=8), 32, 8, id="after-one-success"),
    pytest.param(Gate(ramp=16), 32, 16, id="after-two-successes"),
    pytest.param(Gate(ramp=32), 32, 32, id="full-speed"),
    pytest.param(Gate(ramp=32), 8, 8, id="per-webhook-lowered-by-reload"),
    pytest.param(Gate(ramp=16), 64, 16, id="per-webhook-raised-grows-with-successes"),
    pytest.param(Gate(), 2, 2, id="per-webhook-below-slow-start"),
    pytest.param(Gate(ramp=SLOW_START), 2, 2, id="per-webhook-below-slow-start-after-success"),
    pytest.param(Gate(consecutive_failures=1, backoff_until=500.0), 32, 1, id="backing-off-one-probe"),
    pytest.param(Gate(consecutive_failures=7, ramp=32), 32, 1, id="backing-off-ignores-the-ramp"),
]


@pytest.mark.parametrize(("gate", "per", "expect"), LIMIT)
def test_limit(gate: Gate, per: int, expect: int) -> None:
    assert limit(gate, per) == expect


def test_slow_start_doubles_up_to_per_webhook() -> None:
    gate, seen = Gate(), []
    for _ in range(6):
        seen.append(limit(gate, 32))
        gate = decide(gate, success=True, retry_after=None, attempt_epoch=gate.epoch, attempts=1, cfg=CFG,
                      now=NOW).gate
    assert seen == [4, 8, 16, 32, 32, 32]
    gate = decide(gate, success=False, retry_after=None, attempt_epoch=gate.epoch, attempts=1, cfg=CFG, now=NOW,
                  rand=middle).gate
    assert limit(gate, 32) == 1  # backing off: one probe
    gate = decide(gate, success=True, retry_after=None, attempt_epoch=gate.epoch, attempts=2, cfg=CFG, now=NOW).gate
    assert limit(gate, 32) == 8  # the probe succeeded: slow start again, doubled once


START_AT = [
    # (gate, active, next_at, per, expect)
    pytest.param(Gate(), 0, 50.0, 32, 50.0, id="healthy-due-at-next-at"),
    pytest.param(Gate(), 3, 50.0, 32, 50.0, id="healthy-below-slow-start"),
    pytest.param(Gate(), SLOW_START, 50.0, 32, None, id="fresh-at-slow-start-limit"),
    pytest.param(Gate(ramp=32), 31, 50.0, 32, 50.0, id="one-slot-left"),
    pytest.param(Gate(ramp=32), 32, 50.0, 32, None, id="at-per-webhook-limit"),
    pytest.param(Gate(ramp=32), 20, 50.0, 8, None, id="above-a-lowered-limit"),
    pytest.param(Gate(backoff_until=200.0), 0, 50.0, 32, 50.0, id="healthy-ignores-a-stale-backoff-until"),
    pytest.param(Gate(consecutive_failures=1, backoff_until=200.0), 0, 50.0, 32, 200.0,
                 id="backing-off-waits-for-backoff-until"),
    pytest.param(Gate(consecutive_failures=1, backoff_until=200.0), 0, 300.0, 32, 300.0,
                 id="backing-off-and-the-delivery-not-due-yet"),
    pytest.param(Gate(consecutive_failures=1, backoff_until=200.0), 1, 50.0, 32, None,
                 id="backing-off-one-probe-at-a-time"),
    pytest.param(Gate(consecutive_failures=1, backoff_until=0.0), 0, 50.0, 32, 50.0,
                 id="backing-off-backoff-already-over"),
]


@pytest.mark.parametrize(("gate", "active", "next_at", "per", "expect"), START_AT)
def test_start_at(gate: Gate, active: int, next_at: float, per: int, expect: float | None) -> None:
    assert start_at(gate, active=active, next_at=next_at, per_webhook_concurrency=per) == expect


WANT = [
    pytest.param(Gate(), 0, 32, SLOW_START, id="fresh-wants-slow-start"),
    pytest.param(Gate(), SLOW_START, 32, SLOW_START, id="hanging-holds-slow-start"),
    pytest.param(Gate(ramp=32), 5, 32, 32, id="healthy-wants-its-limit"),
    pytest.param(Gate(ramp=16), 3, 32, 16, id="ramping-wants-its-ramp"),
    pytest.param(Gate(ramp=32), 20, 8, 20, id="never-less-than-it-holds"),
    pytest.param(Gate(consecutive_failures=2), 0, 32, 1, id="backing-off-wants-one-probe"),
    pytest.param(Gate(consecutive_failures=2), 3, 32, 3, id="backing-off-still-holding-a-burst"),
]


@pytest.mark.parametrize(("gate", "active", "per", "expect"), WANT)
def test_want(gate: Gate, active: int, per: int, expect: int) -> None:
    assert want(gate, active=active, per_webhook_concurrency=per) == expect


# -- water_level (tests/test_dispatch_units.py has the basic rows) ---------------------------------
HANGING = want(Gate(), active=SLOW_START, per_webhook_concurrency=32)  # never succeeded: SLOW_START
HEALTHY = want(Gate(ramp=32), active=10, per_webhook_concurrency=32)  # full speed: 32
PROBE = want(Gate(consecutive_failures=3), active=0, per_webhook_concurrency=32)  # one probe

WATER = [
    pytest.param(200, [HANGING] * 40 + [HEALTHY], 200, id="40-hanging-and-a-healthy-one-all-fit"),
    pytest.param(100, [HANGING] * 20 + [HEALTHY], 20, id="20-hanging-leave-the-rest-to-the-healthy-one"),
    pytest.param(100, [HANGING] * 20 + [HEALTHY] * 2, 10, id="20-hanging-two-healthy-share-the-rest"),
    pytest.param(30, [HANGING] * 10 + [HEALTHY], 2, id="hanging-alone-exceed-the-total"),
    pytest.param(10, [PROBE] * 4 + [HEALTHY], 6, id="probes-take-one-each"),
    pytest.param(10, [HEALTHY], 10, id="one-want-above-the-total"),
    pytest.param(16, [4, 4, 4, 4], 16, id="wants-exactly-fill-the-total"),
    pytest.param(15, [4, 4, 4, 4], 3, id="one-short-of-filling"),
    pytest.param(64, [4, 4, 32, 32], 28, id="two-small-two-large"),
    pytest.param(1, [32, 32], 1, id="one-slot-two-claimants"),
    pytest.param(7, [1, 2, 3, 100], 2, id="small-wants-served-the-rest-split"),
    pytest.param(10, [1, 2, 3, 100], 4, id="level-rises-past-the-small-wants"),
]


@pytest.mark.parametrize(("total", "wants", "level"), WATER)
def test_water_level_rows(total: int, wants: list[int], level: int) -> None:
    assert water_level(total, wants) == level


@pytest.mark.parametrize(("total", "wants", "level"), WATER)
def test_water_level_is_the_largest_fair_level(total: int, wants: list[int], level: int) -> None:
    """Order does not matter, the level never hands out more than `total` (but for the
    one-slot floor), and one more would."""
    for order in (wants[::-1], sorted(wants), sorted(wants, reverse=True), wants[1:] + wants[:1]):
        assert water_level(total, order) == level
    if sum(wants) <= total:
        assert level == total
        return
    assert sum(min(w, level) for w in wants) <= total or level == 1
    assert sum(min(w, level + 1) for w in wants) > total


# -- disabled_by_hand, enabled_again ----------------------------------------------------------------
BY_HAND = [
    pytest.param(Gate(), Gate(False, epoch=1, disabled_reason=MANUAL), id="healthy"),
    pytest.param(Gate(consecutive_failures=2, backoff_until=500.0, epoch=4, ramp=0),
                 Gate(False, 2, 500.0, epoch=5, disabled_reason=MANUAL), id="backing-off-keeps-its-counts"),
    pytest.param(Gate(False, 10, 900.0, epoch=9, disabled_reason=CONSECUTIVE_FAILURES),
                 Gate(False, 10, 900.0, epoch=10, disabled_reason=MANUAL), id="auto-disabled-becomes-manual"),
    pytest.param(Gate(ramp=32, epoch=2), Gate(False, epoch=3, ramp=32, disabled_reason=MANUAL), id="ramped"),
]


@pytest.mark.parametrize(("gate", "expect"), BY_HAND)
def test_disabled_by_hand(gate: Gate, expect: Gate) -> None:
    assert disabled_by_hand(gate) == expect


AGAIN = [
    pytest.param(Gate(False, 10, 900.0, epoch=9, disabled_reason=CONSECUTIVE_FAILURES), id="auto-disabled"),
    pytest.param(Gate(False, 2, 500.0, epoch=5, ramp=16, disabled_reason=MANUAL), id="manual"),
    pytest.param(Gate(consecutive_failures=3, backoff_until=700.0, epoch=1), id="enabled-but-backing-off"),
]


@pytest.mark.parametrize("gate", AGAIN)
def test_enabled_again_resets_the_gate(gate: Gate) -> None:
    assert enabled_again(gate) == Gate(True, 0, 0.0, epoch=gate.epoch + 1, ramp=0, disabled_reason=None)
    assert limit(enabled_again(gate), 32) == SLOW_START


@pytest.mark.parametrize(
    "change",
    [pytest.param(disabled_by_hand, id="disable"), pytest.param(enabled_again, id="enable")],
)
def test_a_gate_change_by_hand_starts_a_new_epoch(change: Callable[[Gate], Gate]) -> None:
    """An attempt in flight across a disable or an enable does not count when it fails."""
    before = Gate(consecutive_failures=1, backoff_until=110.0, epoch=1)
    after = change(before)
    d = decide(after, success=False, retry_after=None, attempt_epoch=before.epoch, attempts=1, cfg=CFG, now=NOW,
               rand=middle)
    assert d.gate_changed is False and d.disabled is False
    assert d.gate.consecutive_failures == after.consecutive_failures
    assert d.status == (PENDING if after.enabled else PAUSED)
