"""Delivery policy as pure functions: retry, probe, disable, max_attempts, slow start, fair share.

Nothing here does I/O, reads a clock or touches the scheduler: each function maps a
webhook's gate, an outcome, the config and `now` to a decision, and the scheduler only
applies decisions. This is the place to change the retry rule.

A webhook's gate (SPEC §4.2):
- healthy (`consecutive_failures == 0`): up to `limit()` attempts at once, that is
  `per_webhook_concurrency`, reached by slow start: a webhook starts at SLOW_START
  attempts at once and doubles it with each success (a receiver that hangs from the
  start never holds more than SLOW_START slots);
- backing off (`consecutive_failures > 0`): nothing until `backoff_until`, then one
  probe at a time. Only a failure of an attempt started in the current `epoch` counts,
  so a burst of concurrent failures adds one; any success closes the gate's episode.
- `disable_after` consecutive failures disable the webhook: its deliveries pause.
A delivery is retried with capped exponential backoff on its own attempt count, and
fails for good after `max_attempts`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from webhookd.config import DeliveryConfig
from webhookd.retry import backoff
from webhookd.store.model import FAILED, PAUSED, PENDING, SUCCEEDED

SLOW_START = 4
CONSECUTIVE_FAILURES = "consecutive_failures"
MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class Gate:
    """A webhook's failure gate."""

    enabled: bool = True
    consecutive_failures: int = 0
    backoff_until: float = 0.0
    epoch: int = 0  # bumped whenever a failure counts, or the gate resets
    ramp: int = 0  # slow start: attempts allowed at once (0: not started, SLOW_START)
    disabled_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What one attempt's outcome changes."""

    gate: Gate
    status: str  # the delivery's new status
    next_at: float | None  # when it is attempted again (pending only)
    gate_changed: bool  # the stored gate fields changed and must be written
    disabled: bool  # this outcome disabled the webhook


def decide(
    gate: Gate,
    *,
    success: bool,
    retry_after: float | None,
    attempt_epoch: int,
    attempts: int,
    cfg: DeliveryConfig,
    now: float,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """The gate and delivery status after an attempt. `attempts` counts this attempt;
    `attempt_epoch` is the gate's epoch when the attempt started."""
    if success:
        # never below SLOW_START: a per_webhook_concurrency raised by a reload must not leave a
        # webhook that succeeded below where a fresh one starts
        ramp = max(SLOW_START, min(cfg.per_webhook_concurrency, 2 * (gate.ramp or SLOW_START)))
        # a disabled gate keeps the counts it was disabled with (the notify command reports
        # them) until enabled_again() resets it
        if gate.enabled and (gate.consecutive_failures or gate.backoff_until):
            new = replace(gate, consecutive_failures=0, backoff_until=0.0, epoch=gate.epoch + 1, ramp=ramp)
            return Decision(new, SUCCEEDED, None, gate_changed=True, disabled=False)
        return Decision(replace(gate, ramp=ramp), SUCCEEDED, None, gate_changed=False, disabled=False)

    new = replace(gate, ramp=0)  # back to slow start
    changed = disabled = False
    if attempt_epoch == gate.epoch and gate.enabled:
        failures = gate.consecutive_failures + 1
        delay = backoff(failures, base=cfg.retry_base, cap=cfg.retry_max, rand=rand)
        if retry_after is not None:  # raises the delay, itself capped; never shortens the backoff
            delay = max(delay, min(retry_after, cfg.retry_max))
        new = replace(new, consecutive_failures=failures, backoff_until=now + delay, epoch=gate.epoch + 1)
        changed = True
        if failures >= cfg.disable_after:
            new = replace(new, enabled=False, disabled_reason=CONSECUTIVE_FAILURES, epoch=new.epoch + 1)
            disabled = True
    if not new.enabled:
        return Decision(new, PAUSED, None, changed, disabled)
    if attempts >= cfg.max_attempts:
        return Decision(new, FAILED, None, changed, disabled)
    next_at = now + backoff(attempts, base=cfg.retry_base, cap=cfg.retry_max, rand=rand)
    return Decision(new, PENDING, next_at, changed, disabled)


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """What one batch attempt's outcome changes: the gate once, each delivery's status."""

    gate: Gate
    statuses: tuple[str, ...]  # per delivery, in the batch's order
    next_at: float | None  # when the still-pending ones are attempted again, together
    gate_changed: bool
    disabled: bool


def decide_batch(
    gate: Gate,
    *,
    success: bool,
    retry_after: float | None,
    attempt_epoch: int,
    attempts: Sequence[int],
    cfg: DeliveryConfig,
    now: float,
    rand: Callable[[], float] = random.random,
) -> BatchDecision:
    """`decide` for a batch: one POST is one attempt for the gate (its failure counter, probe,
    backoff and disabling move once, exactly as for one delivery), and each delivery (its
    `attempts`, this one included) is succeeded, or failed at `max_attempts`, or paused, or
    pending again; the pending ones share one retry time, from the largest attempt count
    among them, so the batch is retried together."""
    d = decide(gate, success=success, retry_after=retry_after, attempt_epoch=attempt_epoch,
               attempts=1, cfg=replace(cfg, max_attempts=max(2, cfg.max_attempts)), now=now, rand=rand)
    if success:
        return BatchDecision(d.gate, (SUCCEEDED,) * len(attempts), None, d.gate_changed, d.disabled)
    if not d.gate.enabled:
        return BatchDecision(d.gate, (PAUSED,) * len(attempts), None, d.gate_changed, d.disabled)
    statuses = tuple(FAILED if a >= cfg.max_attempts else PENDING for a in attempts)
    retried = [a for a, st in zip(attempts, statuses, strict=True) if st == PENDING]
    next_at = now + backoff(max(retried), base=cfg.retry_base, cap=cfg.retry_max, rand=rand) if retried else None
    return BatchDecision(d.gate, statuses, next_at, d.gate_changed, d.disabled)


def limit(gate: Gate, per_webhook_concurrency: int) -> int:
    """Attempts the webhook may have in flight at once."""
    if gate.consecutive_failures:
        return 1  # one probe at a time
    return min(per_webhook_concurrency, gate.ramp or SLOW_START)


def start_at(gate: Gate, *, active: int, next_at: float, per_webhook_concurrency: int) -> float | None:
    """When the soonest due delivery may start: None while the webhook is at its limit
    (wait until an attempt ends), else a time (start now if it is not in the future)."""
    if active >= limit(gate, per_webhook_concurrency):
        return None
    if gate.consecutive_failures:
        return max(next_at, gate.backoff_until)
    return next_at


def want(gate: Gate, *, active: int, per_webhook_concurrency: int) -> int:
    """The slots a busy webhook can use now, for the fair share: its limit, and never
    less than it already holds."""
    return max(active, limit(gate, per_webhook_concurrency))


def water_level(total: int, wants: list[int]) -> int:
    """Max-min fairness: the most each claimant may take of `total` slots when every
    claimant wanting less than that gets all it wants (at least 1; `total` when every
    want fits)."""
    remaining, left = total, len(wants)
    for w in sorted(wants):
        level = remaining // left
        if w > level:
            return max(1, level)
        remaining -= w
        left -= 1
    return max(1, total)


def disabled_by_hand(gate: Gate) -> Gate:
    return replace(gate, enabled=False, disabled_reason=MANUAL, epoch=gate.epoch + 1)


def enabled_again(gate: Gate) -> Gate:
    """A re-enable resets the gate: no failures, no backoff, slow start again."""
    return Gate(enabled=True, epoch=gate.epoch + 1)
