"""The group-committing writer: one task runs every queued write in one transaction.

Callers queue operations; the writer task takes *everything* queued, runs it in one
transaction and commits once, so throughput grows with load instead of being capped
by fsyncs (group commit). The items of one `Batcher` (events from intake, attempt
outcomes) queued between two plain operations run as one call (one executemany).

Batchers and the operations queued with `call` are synchronous functions of the backend's
raw connection, run on its database thread (SQLite). A backend whose driver is itself
asynchronous (PostgreSQL on asyncpg) has no such thread: its batchers are `AsyncBatcher`s,
awaited on the connection like `run` operations, and its `call`/`atomic` run the function
in place. A transaction made only of those (the hot
path: intake, outcomes, refills, webhook state) is one hand-off to that thread and back:
BEGIN, every statement and COMMIT in one call (`Transactions.atomic`), so an event's
acknowledgement waits for one thread wake-up each way instead of one per statement. An
asynchronous operation (`run`, admin writes) in the batch makes it a stepwise
transaction: `begin`, each asynchronous operation awaited in turn, each stretch of
synchronous ones as one `Transactions.call`, `commit`.

After the commit, in queue order and synchronously, before the next batch is built,
each operation's `on_commit(result)` runs and its future resolves; each batch run's
`Batcher.committed` runs at its place in that order. Whoever queued an operation
therefore sees its effects applied in exactly the order the database has them. The
writer knows nothing of what the operations mean.

Internal operations (facts the daemon already acted on: attempt outcomes, webhook
state) are retried until they commit; the others fail fast with `StoreError` so the
client hears about it (``ok: false`` / HTTP 503) instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import structlog

from webhookd.reasons import Lead, Reason
from webhookd.store.model import StoreError

log = structlog.get_logger("webhookd.store")

C = TypeVar("C")  # the backend's connection (asynchronous)
R = TypeVar("R")  # the backend's raw connection, used synchronously on its database thread
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of a batched operation
R_contra = TypeVar("R_contra", contravariant=True)
C_contra = TypeVar("C_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)  # (it is only ever handed to the backend's functions)

CLOSE_RETRIES = 3  # failed commits of internal operations tolerated while closing
TRANSIENT_RETRIES = 3  # a transaction that failed transiently (Transactions.transient) is run again
SHUTTING_DOWN = Lead.UNAVAILABLE.text(": daemon is shutting down")


class Transactions(Protocol[C, R_co]):
    """What the writer needs from a backend: one connection and its transactions."""

    async def begin(self) -> C: ...
    async def commit(self, conn: C) -> None: ...
    async def rollback(self, conn: C) -> None: ...

    async def call(self, conn: C, fn: Callable[[R_co], None]) -> None:
        """`fn(raw)` on the database thread, inside the transaction `begin` opened: one hand-off."""
        ...

    async def atomic(self, fn: Callable[[R_co], None]) -> None:
        """BEGIN, `fn(raw)` and COMMIT in one hand-off to the database thread; on any failure
        roll back and raise (what `begin`, `commit` and `rollback` do, in one call)."""
        ...

    def describe(self, exc: BaseException) -> str: ...

    def transient(self, exc: BaseException) -> bool:
        """Whether the transaction failed only because of another one (a deadlock between
        daemons sharing a database): then everything in it is run again, at once, up to
        TRANSIENT_RETRIES times, before anything fails."""
        ...


class Batcher(Protocol[R_contra, I, T]):
    """Runs the items of queued operations of one kind in one call."""

    def execute(self, conn: R_contra, items: list[I]) -> list[T]:
        """One result per item, in order; runs on the database thread, synchronously."""
        ...

    def committed(self, items: list[I], results: list[T]) -> None:
        """Runs right after the commit, at this run's place in queue order."""
        ...


class AsyncBatcher(Protocol[C_contra, I, T]):
    """A `Batcher` of a backend with an asynchronous driver: `execute` is awaited on the
    writer's connection, inside the transaction, between the synchronous stretches."""

    async def execute(self, conn: C_contra, items: list[I]) -> list[T]:
        """One result per item, in order."""
        ...

    def committed(self, items: list[I], results: list[T]) -> None:
        """Runs right after the commit, at this run's place in queue order."""
        ...


@dataclass(slots=True)
class _Op(Generic[C, T]):
    fn: Callable[[C], Awaitable[T]]
    future: asyncio.Future[T]
    on_commit: Callable[[T], None] | None
    internal: bool
    result: Any = None


@dataclass(slots=True)
class _Call(Generic[R, T]):
    """A plain operation that is a synchronous function of the raw connection."""

    fn: Callable[[R], T]
    future: asyncio.Future[T]
    on_commit: Callable[[T], None] | None
    internal: bool
    result: Any = None


@dataclass(slots=True)
class _Item(Generic[R, I, T]):
    batcher: Batcher[R, I, T] | AsyncBatcher[Any, I, T]
    item: I
    future: asyncio.Future[T]
    on_commit: Callable[[T], None] | None
    internal: bool
    result: Any = None


_Queued = _Op[Any, Any] | _Call[Any, Any] | _Item[Any, Any, Any]
_Plain = _Op[Any, Any] | _Call[Any, Any]
_Run = _Plain | list[_Item[Any, Any, Any]]


class Writer(Generic[C, R]):
    """The one writer of a database."""

    def __init__(self, tx: Transactions[C, R], *, retry_delay: float = 0.05) -> None:
        self._tx = tx
        self._queue: list[_Queued] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.retry_delay = retry_delay
        self.commits = 0
        self.failed_commits = 0  # transactions that raised instead of committing

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhookd-writer")

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        """Commit what is queued, then stop. Safe to call twice."""
        if self._closing:
            if self._task is not None:
                await asyncio.shield(self._task)
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    # -- queueing ------------------------------------------------------------------------
    def run(
        self,
        fn: Callable[[C], Awaitable[T]],
        *,
        on_commit: Callable[[T], None] | None = None,
        internal: bool = False,
    ) -> asyncio.Future[T]:
        """Queue `fn(conn)` to run inside the next write transaction."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return self._enqueue(_Op(fn, fut, on_commit, internal))

    def call(
        self,
        fn: Callable[[R], T],
        *,
        on_commit: Callable[[T], None] | None = None,
        internal: bool = False,
    ) -> asyncio.Future[T]:
        """Queue `fn(raw)`, a synchronous function run on the database thread inside the next
        write transaction (like `run`, but it keeps that transaction one hand-off)."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return self._enqueue(_Call(fn, fut, on_commit, internal))

    def add(
        self,
        batcher: Batcher[R, I, T] | AsyncBatcher[C, I, T],
        item: I,
        *,
        on_commit: Callable[[T], None] | None = None,
        internal: bool = False,
    ) -> asyncio.Future[T]:
        """Queue one item of a batched operation."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return self._enqueue(_Item(batcher, item, fut, on_commit, internal))

    def _enqueue(self, op: _Queued) -> asyncio.Future[Any]:
        # Closing refuses new writes, except internal ones while the task still runs (it
        # commits them); once it has stopped, nothing would ever run them: refuse those too.
        stopped = self._task is None or self._task.done()
        if self._closing and (not op.internal or stopped):
            op.future.set_exception(StoreError(SHUTTING_DOWN, Reason.UNAVAILABLE))
        else:
            self._queue.append(op)
            self._wake.set()
        return op.future

    # -- the writer task -------------------------------------------------------------------
    async def _run(self) -> None:
        delay = self.retry_delay
        failures_while_closing = 0
        transient = 0
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            ops, self._queue = self._queue, []
            runs = _runs(ops)
            try:
                await self._execute(runs)
            except Exception as exc:
                if transient < TRANSIENT_RETRIES and self._tx.transient(exc):
                    transient += 1
                    self.failed_commits += 1
                    log.warning("transaction run again", error=self._tx.describe(exc), ops=len(ops), attempt=transient)
                    for op in ops:
                        op.result = None
                    self._queue[:0] = ops
                    continue
                transient = 0
                retry = self._fail(ops, exc)
                if retry and self._closing:
                    failures_while_closing += 1
                    if failures_while_closing >= CLOSE_RETRIES:
                        # Shutting down and still unable to commit: give up on them. Each is
                        # a recorded outcome; the database still says "pending", so the
                        # delivery is sent again after a restart (at-least-once).
                        log.error("giving up on uncommitted outcomes at shutdown", ops=len(retry))
                        for op in retry:
                            if not op.future.done():
                                op.future.set_exception(StoreError(self._tx.describe(exc)))
                        retry = []
                if retry:
                    self._queue[:0] = retry
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                continue
            delay = self.retry_delay
            transient = 0
            self.commits += 1
            self._succeed(runs)

    async def _execute(self, runs: list[_Run]) -> None:
        if not any(_asynchronous(run) for run in runs):
            await self._tx.atomic(lambda raw: _apply(raw, runs))  # the hot path: one hand-off
            return
        conn = await self._tx.begin()
        try:
            stretch: list[_Run] = []  # synchronous runs since the last asynchronous one
            for run in runs:
                if not _asynchronous(run):
                    stretch.append(run)
                    continue
                if stretch:
                    await self._tx.call(conn, functools.partial(_apply, runs=stretch))
                    stretch = []
                if isinstance(run, _Op):
                    run.result = await run.fn(conn)
                    continue
                assert isinstance(run, list)
                asynchronous = cast(AsyncBatcher[Any, Any, Any], run[0].batcher)
                results = await asynchronous.execute(conn, [i.item for i in run])
                for queued, result in zip(run, results, strict=True):
                    queued.result = result
            if stretch:
                await self._tx.call(conn, functools.partial(_apply, runs=stretch))
            await self._tx.commit(conn)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._tx.rollback(conn)
            raise

    def _succeed(self, runs: list[_Run]) -> None:
        for run in runs:
            if not isinstance(run, list):
                _finish(run)
                continue
            try:
                run[0].batcher.committed([i.item for i in run], [i.result for i in run])
            except Exception:
                log.exception("commit callback failed")
            for queued in run:
                _finish(queued)

    def _fail(self, ops: Sequence[_Queued], exc: Exception) -> list[_Queued]:
        """Fail intake and admin operations; return internal ones to retry."""
        self.failed_commits += 1
        reason = self._tx.describe(exc)
        retry: list[_Queued] = []
        failed = 0
        for op in ops:
            if op.internal:
                op.result = None
                retry.append(op)
            elif not op.future.done():
                failed += 1
                op.future.set_exception(StoreError(reason))
        log.error("commit failed", error=reason, failed_ops=failed, retrying_ops=len(retry))
        return retry


class WriterBacked:
    """The `Storage` properties every backend answers from its one `Writer`."""

    _writer: Writer[Any, Any]

    @property
    def commits(self) -> int:
        return self._writer.commits

    @property
    def queued(self) -> int:
        return self._writer.queued

    @property
    def failed_commits(self) -> int:
        return self._writer.failed_commits

    @property
    def retry_delay(self) -> float:
        return self._writer.retry_delay

    @retry_delay.setter
    def retry_delay(self, value: float) -> None:
        self._writer.retry_delay = value


@functools.lru_cache(maxsize=64)
def _async_batcher(kind: type) -> bool:
    return inspect.iscoroutinefunction(getattr(kind, "execute", None))


def _asynchronous(run: _Run) -> bool:
    """An operation queued with `run`, or a run of an `AsyncBatcher`'s items."""
    if isinstance(run, _Op):
        return True
    return isinstance(run, list) and _async_batcher(type(run[0].batcher))


def _apply(raw: Any, runs: list[_Run]) -> None:
    """Synchronous runs on the database thread, in order: each result kept on its operation."""
    for run in runs:
        if isinstance(run, _Call):
            run.result = run.fn(raw)
            continue
        assert isinstance(run, list)
        batcher = cast(Batcher[Any, Any, Any], run[0].batcher)  # not an AsyncBatcher: _asynchronous said so
        results = batcher.execute(raw, [i.item for i in run])
        for queued, result in zip(run, results, strict=True):
            queued.result = result


def _finish(op: _Queued) -> None:
    if op.on_commit is not None:
        try:
            op.on_commit(op.result)
        except Exception:
            log.exception("on_commit callback failed")
    if not op.future.done():
        op.future.set_result(op.result)


def _runs(ops: list[_Queued]) -> list[_Run]:
    """Plain operations stay alone, in order. Between two of them, the items of each
    batcher are gathered into one run (in their queued order), so events and outcomes
    that arrive interleaved still make one executemany each. Batchers must therefore
    touch disjoint rows (new events vs. existing deliveries): only their order relative
    to plain operations is kept."""
    runs: list[_Run] = []
    segment: dict[int, list[_Item[Any, Any, Any]]] = {}
    for op in ops:
        if not isinstance(op, _Item):
            runs.extend(segment.values())
            segment = {}
            runs.append(op)
        else:
            segment.setdefault(id(op.batcher), []).append(op)
    runs.extend(segment.values())
    return runs
