"""Retry delays (webhookd.retry.backoff)."""

from __future__ import annotations

import math
import random
import sys

import pytest

from webhookd.retry import backoff

BASE = 30.0
CAP = 4 * 3600.0


def mid() -> float:
    return 0.5  # factor 1.0: no jitter


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (5, 480.0), (9, 7680.0), (10, CAP), (12, CAP),
     (1000, CAP)],
)
def test_exponential_then_capped(n: int, expected: float) -> None:
    assert backoff(n, base=BASE, cap=CAP, rand=mid) == pytest.approx(expected)


@pytest.mark.parametrize("n", [0, -1, -(10**30)])
def test_n_below_one_counts_as_one(n: int) -> None:
    assert backoff(n, base=BASE, cap=CAP, rand=mid) == pytest.approx(BASE)


@pytest.mark.parametrize("n", [1023, 1024, 1025, 10**6, sys.maxsize, 10**400])
def test_huge_n_does_not_overflow(n: int) -> None:
    assert backoff(n, base=BASE, cap=CAP, rand=mid) == pytest.approx(CAP)
    assert backoff(n, base=1e300, cap=math.inf, rand=mid) == math.inf


@pytest.mark.parametrize(
    ("r", "factor"),
    [(0.0, 0.8), (0.25, 0.9), (0.5, 1.0), (0.75, 1.1), (0.999999, 1.2)],
)
@pytest.mark.parametrize("n", [1, 3, 20])
def test_jitter_is_plus_minus_20_percent_by_default(r: float, factor: float, n: int) -> None:
    plain = min(CAP, BASE * 2 ** (n - 1))
    assert backoff(n, base=BASE, cap=CAP, rand=lambda: r) == pytest.approx(plain * factor, rel=1e-5)


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.5, 1.0])
def test_jitter_is_configurable(jitter: float) -> None:
    lo = backoff(1, base=10.0, cap=100.0, jitter=jitter, rand=lambda: 0.0)
    hi = backoff(1, base=10.0, cap=100.0, jitter=jitter, rand=lambda: 1.0)
    assert lo == pytest.approx(10.0 * (1 - jitter))
    assert hi == pytest.approx(10.0 * (1 + jitter))


@pytest.mark.parametrize("seed", range(5))
def test_bounds_hold_for_random_inputs(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2000):
        n = rng.randrange(-5, 3000)
        base = rng.choice([0.0, 0.001, 1.0, 30.0, 1e6])
        cap = rng.choice([0.0, 0.5, 60.0, 14400.0])
        jitter = rng.choice([0.0, 0.2, 0.5, 1.0, 3.0])
        d = backoff(n, base=base, cap=cap, jitter=jitter, rand=rng.random)
        assert 0.0 <= d <= cap * (1 + jitter)
        plain = min(cap, base * 2.0 ** min(max(n, 1) - 1, 1023))
        assert d >= plain * (1 - jitter) - 1e-9 or jitter > 1


def test_default_rand_spreads_delays() -> None:
    delays = {backoff(3, base=BASE, cap=CAP) for _ in range(200)}
    assert len(delays) > 100
    assert all(0.8 * 120 <= d <= 1.2 * 120 for d in delays)


@pytest.mark.parametrize("r", [-1.0, 1.5, 100.0])
def test_a_misbehaving_rand_cannot_break_the_bounds(r: float) -> None:
    d = backoff(50, base=BASE, cap=CAP, rand=lambda: r)
    assert 0.0 <= d <= CAP * 1.2


def test_negative_inputs_never_give_negative_delays() -> None:
    assert backoff(1, base=-5.0, cap=CAP, rand=mid) == 0.0
    assert backoff(1, base=BASE, cap=-1.0, rand=mid) == 0.0
    assert backoff(1, base=BASE, cap=CAP, jitter=5.0, rand=lambda: 0.0) == 0.0
