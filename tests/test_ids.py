"""Identifiers (webhookd.ids.new_id)."""

from __future__ import annotations

import re
import threading
import time

import pytest

import webhookd.ids as ids
from webhookd.ids import new_id

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
ULID = re.compile(r"[0-7][0-9a-hjkmnp-tv-z]{25}")


def decode(ulid: str) -> int:
    value = 0
    for ch in ulid:
        value = value * 32 + CROCKFORD.index(ch)
    return value


def parts(ident: str) -> tuple[str, int, int]:
    prefix, _, ulid = ident.rpartition("_")
    value = decode(ulid)
    return prefix, value >> 80, value & ((1 << 80) - 1)


@pytest.mark.parametrize("prefix", ["evt", "wh", "dlv", "a_b", ""])
def test_shape(prefix: str) -> None:
    ident = new_id(prefix)
    assert ident.startswith(prefix + "_")
    ulid = ident[len(prefix) + 1:]
    assert len(ulid) == 26 and ULID.fullmatch(ulid)
    assert ident == ident.lower()


def test_time_part_is_unix_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    _, ms, _ = parts(new_id("evt"))
    after = time.time_ns() // 1_000_000
    assert before <= ms <= after + 1


def test_encoding_matches_a_straightforward_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = 1771842602123
    monkeypatch.setattr(ids, "time_ns", lambda: ms * 1_000_000 + 999_999)
    monkeypatch.setattr(ids, "_last_ms", -1)
    monkeypatch.setattr(ids, "urandom", lambda n: bytes(range(1, n + 1)))
    ident = new_id("evt")
    value = (ms << 80) | int.from_bytes(bytes(range(1, 11)), "big")
    expected = "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))
    assert ident == "evt_" + expected
    assert ident.startswith("evt_01")  # 2026


def test_monotonic_and_unique_within_a_process() -> None:
    made = [new_id("evt") for _ in range(20_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_same_millisecond_increments_the_random_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "time_ns", lambda: 1771842602123_000_000)
    monkeypatch.setattr(ids, "_last_ms", -1)
    made = [parts(new_id("x")) for _ in range(3000)]  # crosses several 1024 boundaries
    assert {ms for _, ms, _ in made} == {1771842602123}
    randoms = [r for _, _, r in made]
    assert randoms == list(range(randoms[0], randoms[0] + 3000))


def test_clock_stepping_back_keeps_order(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([5_000, 5_000, 4_000, 3_000, 5_001, 6_000])
    monkeypatch.setattr(ids, "time_ns", lambda: next(clock) * 1_000_000)
    monkeypatch.setattr(ids, "_last_ms", -1)
    made = [new_id("evt") for _ in range(6)]
    assert made == sorted(made) and len(set(made)) == 6
    assert [parts(m)[1] for m in made] == [5_000, 5_000, 5_000, 5_000, 5_001, 6_000]


def test_random_overflow_moves_to_the_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "time_ns", lambda: 7_000 * 1_000_000)
    monkeypatch.setattr(ids, "_last_ms", -1)
    monkeypatch.setattr(ids, "urandom", lambda n: b"\xff" * n)
    a, b = new_id("e"), new_id("e")
    assert parts(a)[1:] == (7_000, (1 << 80) - 1)
    assert parts(b)[1] == 7_001
    assert a < b


def test_new_random_part_each_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(10_000, 10_050))
    monkeypatch.setattr(ids, "time_ns", lambda: next(clock) * 1_000_000)
    monkeypatch.setattr(ids, "_last_ms", -1)
    randoms = {parts(new_id("e"))[2] for _ in range(50)}
    assert len(randoms) == 50


def test_threads_never_collide() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def work(bucket: list[str]) -> None:
        for _ in range(3000):
            bucket.append(new_id("evt"))

    threads = [threading.Thread(target=work, args=(b,)) for b in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for b in out for i in b]
    assert len(set(every)) == len(every)
    assert all(b == sorted(b) for b in out)


def test_fork_reset_forgets_the_sequence() -> None:
    new_id("evt")
    ids._reset_after_fork()
    assert ids._last_ms == -1
    assert new_id("evt") < new_id("evt")
