"""Several daemons, one queue: what a webhookd instance on PostgreSQL does beside its writes.

- **Its lease.** Each running daemon has a row in `instances` (a random id per start) whose
  `lease_until` it renews every `lease / 3` seconds. Time is the database server's
  (`now()`), so hosts' clocks do not matter.
- **Claims.** A pending delivery is `claimed_by` the instance that holds it: intake
  inserts it claimed by the instance that took the event in, and `take_due` claims rows
  that are unclaimed, already its own, or claimed by an instance whose lease has ended,
  with `FOR UPDATE SKIP LOCKED` (two instances refilling together never wait for or take
  each other's rows). An instance that finds a lease ended deletes that instance's row,
  releases its pending rows (claimed_by NULL) and tells the others (NOTIFY
  `webhookd_work`), and every instance reads those webhooks' windows again: what a killed
  daemon held is delivered by the others once its lease is over. A clean stop releases its
  own claims at once.
- **Wake-ups.** Every change to a webhook (created, edited, rotated, disabled, enabled,
  deleted, its gate moved) runs `pg_notify('webhookd_webhooks', id)` in its transaction;
  the other instances read that webhook again and apply it (`Scheduler.refresh`). Rows
  made due by hand (enable, replay, retry) are released and announced on `webhookd_work`.
  The listening connection is one per instance; when it is lost, it reconnects and every
  webhook and window is read again (a notification may have been missed meanwhile).
- **The failure gate, fleet-wide.** A failed attempt (or any attempt while the gate is
  not healthy) is settled in the writer's transaction under a row lock on the webhook
  (`SELECT ... FOR UPDATE`): the decision (webhookd.policy.decide) is made from the stored
  gate and its `gate_epoch`, so a burst of failures from any instances counts once, and
  `disable_after` disables exactly once: only the instance whose transaction disabled it
  runs the notify command. A row lock, not an advisory lock: the gate lives in that row, the
  lock is released by the same COMMIT that writes the outcome, and a crash cannot leave it
  held. One probe at a time across the fleet: an instance starts a probe only after taking
  `webhooks.probe_by` / `probe_until` (a short lease of its own, released with the outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import structlog

from webhookd.ids import new_id
from webhookd.policy import Gate
from webhookd.store.model import BatchOutcomeRecord, OutcomeRecord, StoreError, WebhookRecord
from webhookd.store.postgres_batch import BatchOutcomes, Conn, Outcomes
from webhookd.store.postgres_rows import (
    ALL,
    DB_ERRORS,
    WEBHOOK_COLUMNS,
    WEBHOOKS_CHANNEL,
    WORK_CHANNEL,
    describe,
    notify_webhook,
    notify_work,
    webhook_row,
)

if TYPE_CHECKING:
    from webhookd.store.postgres import PostgresStorage

log = structlog.get_logger("webhookd.store")

DB_NOW = "extract(epoch from clock_timestamp())"
SHARE_EVERY = 0.5  # seconds between two announcements of one webhook's shared backlog
D = TypeVar("D")
UPKEEP_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, StoreError)  # PostgreSQL out of reach


class Fleet:
    """This daemon's membership of the fleet sharing one database."""

    def __init__(self, storage: PostgresStorage, *, lease: float, home: str = "") -> None:
        self.storage = storage
        self.lease = lease
        self.home = home  # the daemon's state_dir: with the host, who its earlier lives were
        self.instance_id = new_id("ins")
        self.on_webhook: Callable[[str], None] = lambda _id: None  # another instance changed it
        self.on_work: Callable[[list[str] | None], None] = lambda _ids: None  # None: every webhook
        self.on_resync: Callable[[], None] = lambda: None  # notifications may have been missed
        self.takeovers = 0  # instances whose ended lease this one released
        self._listener: Conn | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._shared_at: dict[str, float] = {}  # webhook id -> when its backlog was last announced
        self.peers = 0  # other daemons with a live lease, as of the last renewal

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Register (the storage is open) and start renewing, sweeping and listening."""
        await self._register()
        await self._take_over_earlier_lives()
        await self._renew()
        await self._listen()
        self._task = asyncio.create_task(self._run(), name="fleet")

    async def stop(self) -> None:
        """Stop renewing; release this instance's claims and its row (a clean stop: the others
        take its undelivered rows at once, not after the lease). Call after the scheduler
        drained and before the storage closes."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()

    async def release(self) -> None:
        """This instance's claims and row, dropped (after its last outcome committed)."""
        try:
            async with self._pool().acquire() as conn, conn.transaction():
                await conn.execute("DELETE FROM instances WHERE id = $1", self.instance_id)
                await _release_claims(conn, [self.instance_id])
        except DB_ERRORS as exc:
            log.warning("could not release this instance's claims; the others take them after its lease",
                        instance=self.instance_id, error=type(exc).__name__, lease_s=self.lease)

    def _pool(self) -> asyncpg.Pool:
        pool = self.storage._pool
        if pool is None:
            raise asyncpg.InterfaceError("storage closed")
        return pool

    async def _register(self) -> None:
        async with self._pool().acquire() as conn:
            await conn.execute(
                f"INSERT INTO instances (id, host, pid, home, started_at, lease_until) VALUES ($1, $2, $3, $5,"  # noqa: S608
                f" {DB_NOW}, {DB_NOW} + $4) ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until",
                self.instance_id, socket.gethostname(), os.getpid(), self.lease, self.home,
            )

    async def _take_over_earlier_lives(self) -> None:
        """A daemon restarted after a crash (kill -9, OOM, power) would otherwise wait a whole
        lease for what its previous life had claimed: an instance row with this host and
        state_dir whose process is gone (or has this very pid: a restarted container) is that
        previous life, and is taken over at once."""
        if not self.home:
            return
        async with self._pool().acquire() as conn:
            rows = await conn.fetch("SELECT id, pid FROM instances WHERE host = $1 AND home = $2 AND id <> $3",
                                    socket.gethostname(), self.home, self.instance_id)
        dead = [str(r[0]) for r in rows if int(r[1]) == os.getpid() or not _alive(int(r[1]))]
        if dead:
            await self._release_instances(dead, "took over from this daemon's previous life")

    async def _listen(self) -> None:
        conn: Conn = await asyncpg.connect(**self.storage._connect_args())
        try:
            await conn.add_listener(WEBHOOKS_CHANNEL, self._heard)
            await conn.add_listener(WORK_CHANNEL, self._heard)
        except BaseException:
            conn.terminate()
            raise
        self._listener = conn

    def _heard(self, conn: object, pid: int, channel: str, payload: object) -> None:
        payload = str(payload)
        if pid == self.storage.writer_pid:
            return  # this instance's own writes: it applied them (or shared them) already
        if channel == WEBHOOKS_CHANNEL:
            self.on_webhook(payload)
        elif channel == WORK_CHANNEL:
            self.on_work(None if payload == ALL else payload.split(","))

    async def _run(self) -> None:
        every = self.lease / 3
        while not self._stopping:
            await asyncio.sleep(every)
            try:
                await self._renew()
                await self._sweep()
                if self._listener is None or self._listener.is_closed():
                    self._listener = None
                    await self._listen()
                    log.info("listening again for the other instances' changes", instance=self.instance_id)
                    self.on_resync()
            except UPKEEP_ERRORS as exc:
                log.warning("cannot renew this instance's lease", instance=self.instance_id,
                            error=type(exc).__name__)
            except Exception:  # a bug: say so, and keep renewing (a dead task would lose the lease)
                log.exception("fleet upkeep failed", instance=self.instance_id)

    async def _renew(self) -> None:
        async with self._pool().acquire() as conn:
            renewed = await conn.fetchval(
                f"UPDATE instances SET lease_until = {DB_NOW} + $2 WHERE id = $1 RETURNING 1",  # noqa: S608
                self.instance_id, self.lease)
            self.peers = int(await conn.fetchval(
                f"SELECT count(*) FROM instances WHERE id <> $1 AND lease_until >= {DB_NOW}",  # noqa: S608
                self.instance_id))
        if renewed is None:
            # Another instance found this one's lease ended (a long pause, or PostgreSQL was out of
            # reach longer than the lease) and released its rows: register again and read every
            # window again. What memory still holds may be delivered twice (at-least-once).
            log.warning("this instance's lease had ended; its deliveries were released to the others",
                        instance=self.instance_id, lease_s=self.lease)
            await self._register()
            self.on_resync()

    async def _sweep(self) -> None:
        """Release what instances whose lease ended held, once (whoever deletes their row)."""
        async with self._pool().acquire() as conn:
            ended = [str(r[0]) for r in await conn.fetch(
                f"SELECT id FROM instances WHERE lease_until < {DB_NOW}")]  # noqa: S608
        if ended:
            await self._release_instances(ended, "took over from instances whose lease ended", ended_only=True)

    async def _release_instances(self, candidates: list[str], why: str, *, ended_only: bool = False) -> None:
        """Delete these instances' rows and release their pending rows, in one transaction; only
        the rows this call deleted count (another daemon may have taken them over first, or,
        `ended_only`, the instance renewed its lease meanwhile)."""
        still = f" AND lease_until < {DB_NOW}" if ended_only else ""
        async with self._pool().acquire() as conn, conn.transaction():
            gone = [str(r[0]) for r in await conn.fetch(
                f"DELETE FROM instances WHERE id = ANY($1::text[]){still} RETURNING id", candidates)]  # noqa: S608
            if not gone:
                return
            ids = await _release_claims(conn, gone)
        self.takeovers += len(gone)
        log.warning(why, instances=gone, webhooks=len(ids))

    # -- sharing a backlog -------------------------------------------------------------------
    def share(self, rows: dict[str, list[int]]) -> None:
        """Release rows intake gave this daemon that its window does not hold (a backlog beyond
        it), by webhook, and wake the others to take them (`NOTIFY webhookd_work`, at most every
        SHARE_EVERY seconds per webhook: between two, the rows are still released, and the
        daemons already reading that queue take them at their next refill). Whoever reads the
        queue first claims them, this daemon included. Internal: retried until it commits. Alone
        (no other daemon had a live lease at the last renewal), nothing to share."""
        if not self.peers:
            return
        now = time.monotonic()
        wake = [w for w in rows if now - self._shared_at.get(w, float("-inf")) >= SHARE_EVERY]
        for w in wake:
            self._shared_at[w] = now
        ids = sorted(i for group in rows.values() for i in group)
        instance = self.instance_id

        async def write(conn: Conn) -> None:
            await conn.execute(
                "UPDATE deliveries SET claimed_by = NULL WHERE id = ANY($1::bigint[]) AND claimed_by = $2"
                " AND status = 'pending'", ids, instance)
            await notify_work(conn, wake)

        self.storage._writer.run(write, internal=True)

    # -- the gate ----------------------------------------------------------------------------
    async def claim_probe(self, webhook_id: str, seconds: float) -> float:
        """Take the webhook's one probe for `seconds`: 0.0 when this instance has it, else the
        seconds until the current holder's probe lease ends."""
        try:
            async with self._pool().acquire() as conn:
                row = await conn.fetchrow(
                    f"UPDATE webhooks SET probe_by = $2, probe_until = {DB_NOW} + $3 WHERE id = $1"  # noqa: S608
                    f" AND (probe_by IS NULL OR probe_by = $2 OR probe_until < {DB_NOW}) RETURNING 1", webhook_id,
                    self.instance_id, seconds)
                if row is not None:
                    return 0.0
                left = await conn.fetchval(f"SELECT probe_until - {DB_NOW} FROM webhooks WHERE id = $1",  # noqa: S608
                                           webhook_id)
        except DB_ERRORS:
            return 1.0
        return max(0.05, float(left)) if left is not None else 1.0

    def settle(
        self,
        webhook_id: str,
        decide: Callable[[Gate], D],
        build: Callable[[D], OutcomeRecord | BatchOutcomeRecord],
        *,
        on_commit: Callable[[D | None], None],
    ) -> None:
        """Record an attempt's outcome with the fleet's gate: in the writer's transaction, lock
        the webhook's row, `decide` from the stored gate, store the gate it returns (and pause
        the backlog when it disables) and the outcome `build` makes of the decision. Resolves
        (on_commit) to the decision, or None if the webhook is gone. Internal: retried until
        it commits, deciding afresh each time."""
        instance = self.instance_id

        async def write(conn: Conn) -> D | None:
            row = await conn.fetchrow(
                "SELECT enabled, consecutive_failures, backoff_until, gate_epoch, disabled_reason, probe_by"
                " FROM webhooks WHERE id = $1 FOR UPDATE", webhook_id)
            if row is None:
                return None
            stored = Gate(enabled=row[0], consecutive_failures=row[1], backoff_until=row[2], epoch=int(row[3]),
                          disabled_reason=row[4])
            d = decide(stored)
            gate: Gate = d.gate  # type: ignore[attr-defined]
            record = build(d)
            changed = (gate.enabled, gate.consecutive_failures, gate.backoff_until, gate.epoch,
                       gate.disabled_reason) != (stored.enabled, stored.consecutive_failures, stored.backoff_until,
                                                 stored.epoch, stored.disabled_reason)
            await conn.execute(
                "UPDATE webhooks SET enabled = $2, consecutive_failures = $3, backoff_until = $4, gate_epoch = $5,"
                " disabled_reason = $6, updated_at = CASE WHEN $8 THEN $7 ELSE updated_at END,"
                " probe_by = CASE WHEN probe_by = $9 THEN NULL ELSE probe_by END,"
                " probe_until = CASE WHEN probe_by = $9 THEN NULL ELSE probe_until END WHERE id = $1",
                webhook_id, gate.enabled, gate.consecutive_failures, gate.backoff_until, gate.epoch,
                gate.disabled_reason, record.updated_at, changed, instance,
            )
            if isinstance(record, OutcomeRecord):
                await Outcomes().execute(conn, [record])
            else:
                await BatchOutcomes().execute(conn, [record])
            if d.disabled:  # type: ignore[attr-defined]
                await conn.execute(
                    "UPDATE deliveries SET status = 'paused', next_attempt_at = NULL, updated_at = $1"
                    " WHERE webhook_id = $2 AND status = 'pending'", record.updated_at, webhook_id)
            if changed or row[5] == instance:  # the others wait for the gate to move, or for the probe
                await notify_webhook(conn, webhook_id)
            return d

        self.storage._writer.run(write, on_commit=on_commit, internal=True)

    async def load_webhook(self, webhook_id: str) -> tuple[WebhookRecord, int] | None:
        """The webhook as stored, with its gate epoch (None: deleted). Raises StoreError."""
        try:
            async with self._pool().acquire() as conn:
                row = await conn.fetchrow(
                    f"SELECT {WEBHOOK_COLUMNS}, gate_epoch FROM webhooks WHERE id = $1", webhook_id)  # noqa: S608
        except DB_ERRORS as exc:
            raise StoreError(f"cannot read webhook {webhook_id}: {describe(exc)}") from None
        if row is None:
            return None
        return webhook_row(row), int(row["gate_epoch"])

    async def load_epochs(self) -> dict[str, int]:
        """Every webhook's gate epoch. Raises StoreError."""
        try:
            async with self._pool().acquire() as conn:
                return {str(r[0]): int(r[1]) for r in await conn.fetch("SELECT id, gate_epoch FROM webhooks")}
        except DB_ERRORS as exc:
            raise StoreError(f"cannot read the webhooks' gates: {describe(exc)}") from None


async def _release_claims(conn: Any, instances: list[str]) -> list[str]:
    """Release these instances' pending rows and announce them (NOTIFY webhookd_work); the
    webhooks they belong to."""
    ids = [str(r[0]) for r in await conn.fetch(
        "WITH r AS (UPDATE deliveries SET claimed_by = NULL WHERE claimed_by = ANY($1::text[])"
        " AND status = 'pending' RETURNING webhook_id) SELECT DISTINCT webhook_id FROM r", instances)]
    await notify_work(conn, ids)
    return ids


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (as far as this daemon can tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
