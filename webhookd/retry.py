"""Retry delays: capped exponential backoff with jitter (a small pure function)."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff"]

# 2.0 ** 1024 overflows a float; beyond this exponent the delay is the cap anyway.
_MAX_EXPONENT = 1023


def backoff(
    n: int,
    *,
    base: float,
    cap: float,
    jitter: float = 0.2,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after the ``n``-th failed attempt (``n < 1`` counts as 1).

    ``min(cap, base * 2**(n-1))``, scaled by a uniform factor in ``[1-jitter, 1+jitter)`` taken from
    ``rand()`` (which returns a value in ``[0, 1)``). The result is never negative and never above
    ``cap * (1 + jitter)``, and no ``n`` (however large) raises ``OverflowError``.
    """
    exponent = min(max(n, 1) - 1, _MAX_EXPONENT)
    delay = min(cap, base * 2.0**exponent)  # the product may be inf, never an exception
    j = max(0.0, jitter)
    r = min(max(rand(), 0.0), 1.0)
    delay *= 1.0 - j + 2.0 * j * r
    return max(0.0, min(delay, cap * (1.0 + j)))
