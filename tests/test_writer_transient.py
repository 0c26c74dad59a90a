"""The writer runs a transaction again when the backend says it failed transiently (a deadlock
between two daemons on one PostgreSQL: `Transactions.transient`): nothing in it fails, intake's
writes included, unless it keeps failing; any other failure fails intake at once as before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from webhookd.store.model import StoreError
from webhookd.store.writer import TRANSIENT_RETRIES, Writer


class Deadlock(Exception):
    pass


class FakeTransactions:
    """Commits fail with `failures` (in turn) before they succeed."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.began = 0
        self.committed = 0

    async def begin(self) -> object:
        self.began += 1
        return object()

    async def commit(self, conn: object) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.committed += 1

    async def rollback(self, conn: object) -> None:
        pass

    async def call(self, conn: object, fn: Callable[[Any], None]) -> None:
        fn(conn)

    async def atomic(self, fn: Callable[[Any], None]) -> None:
        conn = await self.begin()
        fn(conn)
        await self.commit(conn)

    def describe(self, exc: BaseException) -> str:
        return f"storage error: {exc}"

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, Deadlock)


async def _run(tx: FakeTransactions) -> tuple[int, int]:
    """One operation that is not internal (what intake and admin writes are), through a writer:
    how many times it ran when it succeeded, and the writer's failed commits."""
    writer: Writer[Any, Any] = Writer(tx, retry_delay=0.001)
    writer.start()
    ran: list[int] = []

    async def op(conn: object) -> int:
        ran.append(1)
        return len(ran)

    try:
        return await writer.run(op), writer.failed_commits
    finally:
        await writer.close()


async def test_a_deadlocked_transaction_is_run_again_and_nothing_fails() -> None:
    tx = FakeTransactions([Deadlock("40P01"), Deadlock("40P01")])
    runs, failed_commits = await _run(tx)
    assert runs == 3  # the operation ran three times; its third run committed
    assert tx.committed == 1 and failed_commits == 2


async def test_a_transaction_that_keeps_deadlocking_fails_like_any_other() -> None:
    tx = FakeTransactions([Deadlock("40P01")] * (TRANSIENT_RETRIES + 1))
    with pytest.raises(StoreError, match="40P01"):
        await _run(tx)


async def test_other_failures_fail_intake_at_once() -> None:
    tx = FakeTransactions([RuntimeError("disk full")])
    with pytest.raises(StoreError, match="disk full"):
        await _run(tx)
    assert tx.began == 1
