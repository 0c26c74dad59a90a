"""`webhookd migrate-storage`: copy a SQLite database into an empty PostgreSQL one, with the
daemon stopped. Everything is copied with its ids: webhooks (secrets, gate state, filters,
declared names, batch settings), events (bodies, idempotency keys), deliveries in every
status, attempts (with their batch ids), the hourly counts, tracking's first hits and
opt-outs, and API tokens. The copy is one
PostgreSQL transaction (COPY in chunks), read from one SQLite read transaction; the
target's id sequences then continue above every copied id. A target that already holds
anything is refused.

One entry per table in `TABLES`: a column added to both schemas is added here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from webhookd.store.model import StoreError
from webhookd.store.postgres import PostgresStorage
from webhookd.store.sqlite import SqliteStorage

CHUNK = 5000


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    booleans: frozenset[str] = frozenset()  # INTEGER 0/1 in SQLite, boolean in PostgreSQL
    order: str = "rowid"

    def rows(self, conn: sqlite3.Connection) -> Iterator[list[tuple[Any, ...]]]:
        convert: list[Callable[[Any], Any]] = [
            (lambda v: None if v is None else bool(v)) if c in self.booleans else _plain for c in self.columns
        ]
        cur = conn.execute(f"SELECT {', '.join(self.columns)} FROM {self.name} ORDER BY {self.order}")  # noqa: S608
        while chunk := cur.fetchmany(CHUNK):
            yield [tuple(f(v) for f, v in zip(convert, row, strict=True)) for row in chunk]


def _plain(value: Any) -> Any:
    return value


TABLES: tuple[Table, ...] = (
    Table("webhooks", ("id", "url", "events", "description", "enabled", "disabled_reason", "consecutive_failures",
                       "backoff_until", "secret", "previous_secret", "previous_secret_expires_at", "created_at",
                       "updated_at", "filter", "name", "declared_in", "last_attempt_at", "last_status_code",
                       "last_error", "batch_max_events", "batch_max_bytes", "batch_linger"), frozenset({"enabled"})),
    Table("events", ("id", "uid", "idempotency_key", "type", "body", "created_at", "message_id", "recipient"),
          order="id"),
    Table("deliveries", ("id", "event_id", "webhook_id", "status", "attempts", "next_attempt_at", "last_status_code",
                         "last_error", "created_at", "updated_at"), order="id"),
    Table("attempts", ("id", "delivery_id", "at", "duration_ms", "status_code", "error", "response_body", "batch_id"),
          order="id"),
    Table("attempt_hours", ("hour", "webhook_id", "succeeded", "failed"), order="hour, webhook_id"),
    Table("tracking_firsts", ("key", "at"), order="key"),
    Table("tracking_opt_outs", ("hash", "created_at"), order="hash"),
    Table("api_tokens", ("id", "hash", "domains", "read_only", "description", "created_at", "last_used_at",
                         "revoked_at"), frozenset({"read_only"})),
)


async def sqlite_to_postgres(source: Path, dsn: str, *, password_file: Path | None = None) -> dict[str, int]:
    """Copy `source` into the empty database at `dsn`; rows copied per table. Raises StoreError."""
    if not source.is_file():  # noqa: ASYNC240 - a CLI command, nothing else runs on its loop
        raise StoreError(f"no SQLite database at {source} (storage.path)")
    lite = SqliteStorage(source)
    await lite.open()  # brings an older file to the current schema (the daemon is stopped)
    try:
        # deliveries deferred by fan-out (sqlite_fanout.py) have no row yet: make them rows, so
        # the copy below has every delivery (PostgreSQL writes every row at intake)
        await lite.materialise_deferred()
    finally:
        await lite.close()
    # exclusive: no daemon may be running on the target either
    target = PostgresStorage(dsn, password_file=password_file, exclusive=True)
    await target.open()
    try:
        conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            conn.execute("BEGIN")  # one snapshot of the whole file
            return await target.in_transaction(lambda pg: _copy(conn, pg, target.where))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {source}: {exc}") from None
    finally:
        await target.close()


async def _copy(lite: sqlite3.Connection, pg: asyncpg.Connection, where: str) -> dict[str, int]:
    for table in TABLES:
        if await pg.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table.name})"):  # noqa: S608
            raise StoreError(f"{where} is not empty ({table.name} has rows): migrate-storage copies only into"
                             " an empty database (or schema)")
    copied: dict[str, int] = {}
    for table in TABLES:
        n = 0
        for chunk in table.rows(lite):
            await pg.copy_records_to_table(table.name, records=chunk, columns=list(table.columns))
            n += len(chunk)
        copied[table.name] = n
    # The ids continue above every copied one, and above any SQLite once showed (the newest
    # deliveries may have been deleted since: a dlv_N shown once never names another).
    kept = lite.execute("SELECT value FROM meta WHERE key = 'next_delivery_id'").fetchone()
    floors = {"event_ids": _max(lite, "events"), "delivery_ids": max(_max(lite, "deliveries"),
                                                                      int(kept[0]) - 1 if kept else 0)}
    for sequence, top in floors.items():
        await pg.execute("SELECT setval($1::regclass, $2, false)", sequence, top + 1)
    await pg.execute("SELECT setval(pg_get_serial_sequence('attempts', 'id'), $1, false)", _max(lite, "attempts") + 1)
    for table in TABLES:
        stored = int(await pg.fetchval(f"SELECT count(*) FROM {table.name}"))  # noqa: S608
        if stored != copied[table.name]:
            raise StoreError(f"{table.name}: copied {copied[table.name]} rows but {stored} are stored")
    return copied


def _max(lite: sqlite3.Connection, table: str) -> int:
    return int(lite.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0])  # noqa: S608


def describe_copy(copied: dict[str, int]) -> Sequence[str]:
    return [f"{name}: {n}" for name, n in copied.items()]
