"""Identifiers: a prefix and a ULID, e.g. ``evt_01jb3x6k4m9t0v5q8r2n7c1d4f``.

A ULID is 48 bits of Unix time in milliseconds followed by 80 random bits, written as 26 Crockford
base32 characters (lowercase here), so ids sort by creation time. Within one process they are
strictly increasing: in the same millisecond (or if the clock steps back) the previous random part
is incremented instead of drawing a new one.

This runs once per event, so the common call (same millisecond as the previous one) does an
increment and a concatenation of cached strings: the encoded time (10 characters) and the top 70
random bits (14 characters) change at most once per millisecond or per 1024 ids; only the last
two characters (10 bits) are looked up each time. ``base64.b32encode`` is pure Python and about
ten times slower than this.
"""

from __future__ import annotations

import threading
from os import register_at_fork, urandom
from time import time_ns
from typing import Final

__all__ = ["new_id"]

_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase
# Every 10-bit value as two base32 characters.
_PAIRS: Final = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_RANDOM_LIMIT: Final = 1 << 80

_lock = threading.Lock()
_last_ms = -1
_random = 0  # the last 80-bit random part
_head = ""  # encoded time (10 chars) + encoded top 70 bits of _random (14 chars)


def _encode(value: int, pairs: int) -> str:
    """The low ``10 * pairs`` bits of ``value`` as ``2 * pairs`` base32 characters."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(10 * (pairs - 1), -1, -10)])


def _start_ms(ms: int) -> None:
    global _last_ms, _random, _head
    _last_ms = ms
    _random = int.from_bytes(urandom(10), "big")
    # Time: 48 bits as 10 characters (50 bits, the top two zero).
    _head = _encode(ms, 5) + _encode(_random >> 10, 7)


def new_id(prefix: str) -> str:
    """``prefix`` + ``_`` + a new lowercase ULID, greater than every one made before in this process."""
    global _random, _head
    ms = time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            _start_ms(ms)
        else:
            _random += 1
            low = _random & 1023
            if low == 0:  # carried into the top 70 bits
                if _random >= _RANDOM_LIMIT:  # 2**80 ids in one millisecond: borrow the next one
                    _start_ms(_last_ms + 1)
                else:
                    _head = _head[:10] + _encode(_random >> 10, 7)
        return prefix + "_" + _head + _PAIRS[_random & 1023]


def _reset_after_fork() -> None:
    # A forked child must not continue the parent's sequence (it would repeat the parent's next ids).
    global _lock, _last_ms
    _lock = threading.Lock()
    _last_ms = -1


register_at_fork(after_in_child=_reset_after_fork)
