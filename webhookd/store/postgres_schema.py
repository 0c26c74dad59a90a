"""The PostgreSQL schema, as versioned migrations (table `webhookd_schema`).

Each entry upgrades the schema by one version; never edit a released entry, append a new
one. `migrate` runs each missing one in its own transaction, recording its version in the
same transaction, while holding a session advisory lock (`MIGRATION_LOCK`): two daemons
starting together on one database take turns, and the second finds the work done.

The versions are PostgreSQL's own (they need not follow the SQLite schema's numbers):
version 1 is the whole of SQLite's v1..v7 at once, version 2 is SQLite's v8 (batched
delivery). The lead ports later SQLite changes here as new entries.

Ids: event and delivery ids come from sequences that hand out *blocks* of ids
(`INCREMENT BY ID_BLOCK`): an instance takes a block with one `nextval` and numbers the
rows of its batches from it, so several daemons on one database never collide and one
event's deliveries are still numbered contiguously (`FreshEvent.delivery_id`).

Several daemons, one queue (version 3, webhookd/store/postgres_cluster.py): each running
daemon has a row in `instances` that it renews (its lease); a pending delivery is
`claimed_by` the instance that holds it, and another instance takes it only once that
instance's lease has ended. `webhooks.gate_epoch` is the failure gate's epoch, shared by
the fleet; `probe_by` / `probe_until` hold the one probe a backing-off webhook may have.
"""

from __future__ import annotations

import asyncpg
import structlog

from webhookd.store.model import StoreError

log = structlog.get_logger("webhookd.store")

MIGRATION_LOCK = 0x77686B64_0001  # pg_advisory_lock key: "whkd", 1 (any bigint, fixed forever)
BLOCK_LOCK = 0x77686B64_0002  # held while an instance takes id blocks (postgres_batch.IdBlocks)
# (key, hashtext(current_schema())): every daemon holds it shared; `webhookd migrate-storage`
# takes it exclusively, so it never copies into a database that daemons are using (and a
# daemon does not start while a copy runs); see PostgresStorage(exclusive=...)
INSTANCE_LOCK = 0x77686B65
ID_BLOCK = 1000  # the sequences' increment: ids an instance numbers from one nextval

MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE SEQUENCE event_ids AS bigint INCREMENT BY {ID_BLOCK} START WITH 1;
    CREATE SEQUENCE delivery_ids AS bigint INCREMENT BY {ID_BLOCK} START WITH 1;
    CREATE TABLE webhooks (
        id text PRIMARY KEY,
        url text NOT NULL,
        events text NOT NULL,
        description text NOT NULL DEFAULT '',
        enabled boolean NOT NULL DEFAULT true,
        disabled_reason text,
        consecutive_failures integer NOT NULL DEFAULT 0,
        backoff_until double precision NOT NULL DEFAULT 0,
        secret text NOT NULL,
        previous_secret text,
        previous_secret_expires_at double precision,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        filter text NOT NULL DEFAULT '{{}}',
        name text,
        declared_in text,
        last_attempt_at double precision,
        last_status_code integer,
        last_error text
    );
    CREATE UNIQUE INDEX webhooks_name ON webhooks (name) WHERE name IS NOT NULL;
    CREATE TABLE events (
        id bigint PRIMARY KEY,
        uid text NOT NULL,
        idempotency_key text,
        type text NOT NULL,
        body bytea NOT NULL,
        created_at double precision NOT NULL,
        message_id text NOT NULL DEFAULT '',
        recipient text NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX events_idempotency ON events (idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX events_message_id ON events (message_id);
    CREATE INDEX events_recipient ON events (lower(recipient));
    CREATE INDEX events_delivered ON events (message_id, lower(recipient)) WHERE type = 'delivered';
    CREATE INDEX events_created ON events (created_at);
    CREATE TABLE deliveries (
        id bigint PRIMARY KEY,
        event_id bigint NOT NULL,
        webhook_id text NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision,
        last_status_code integer,
        last_error text,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        claimed_by text,
        lease_until double precision
    );
    CREATE INDEX deliveries_due ON deliveries (webhook_id, next_attempt_at, id) WHERE status = 'pending';
    CREATE INDEX deliveries_status ON deliveries (status, webhook_id, id);
    CREATE INDEX deliveries_webhook ON deliveries (webhook_id, id);
    CREATE INDEX deliveries_pending_age ON deliveries (created_at) WHERE status = 'pending';
    CREATE INDEX deliveries_finished ON deliveries (updated_at) WHERE status IN ('succeeded', 'failed');
    CREATE INDEX deliveries_event ON deliveries (event_id);
    CREATE TABLE attempts (
        id bigserial PRIMARY KEY,
        delivery_id bigint NOT NULL,
        at double precision NOT NULL,
        duration_ms double precision NOT NULL,
        status_code integer,
        error text,
        response_body text
    );
    CREATE INDEX attempts_delivery ON attempts (delivery_id, id);
    CREATE TABLE attempt_hours (
        hour bigint NOT NULL,
        webhook_id text NOT NULL,
        succeeded bigint NOT NULL DEFAULT 0,
        failed bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, webhook_id)
    );
    CREATE TABLE tracking_firsts (key bytea PRIMARY KEY, at double precision NOT NULL);
    CREATE INDEX tracking_firsts_at ON tracking_firsts (at);
    CREATE TABLE tracking_opt_outs (hash text PRIMARY KEY, created_at double precision NOT NULL);
    CREATE TABLE api_tokens (
        id text PRIMARY KEY,
        hash text NOT NULL UNIQUE,
        domains text NOT NULL,
        read_only boolean NOT NULL DEFAULT false,
        description text NOT NULL DEFAULT '',
        created_at double precision NOT NULL,
        last_used_at double precision,
        revoked_at double precision
    );
    """,
    # v2 (SQLite's v8): batched delivery, opt-in per webhook (webhookd/batching.py): its
    # settings (0 events: off, which every webhook made before has), and on each attempt the
    # batch it was part of (NULL for a single-event attempt), indexed to list a batch's deliveries.
    """
    ALTER TABLE webhooks ADD COLUMN batch_max_events integer NOT NULL DEFAULT 0;
    ALTER TABLE webhooks ADD COLUMN batch_max_bytes integer NOT NULL DEFAULT 1048576;
    ALTER TABLE webhooks ADD COLUMN batch_linger double precision NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN batch_id text;
    CREATE INDEX attempts_batch ON attempts (batch_id) WHERE batch_id IS NOT NULL;
    """,
    # v3: several daemons, one queue (postgres_cluster.py): the running instances and their
    # leases, the fleet's gate epoch and its one probe, and the claims of the pending rows.
    """
    CREATE TABLE instances (
        id text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        home text NOT NULL DEFAULT '',
        started_at double precision NOT NULL,
        lease_until double precision NOT NULL
    );
    ALTER TABLE webhooks ADD COLUMN gate_epoch bigint NOT NULL DEFAULT 0;
    ALTER TABLE webhooks ADD COLUMN probe_by text;
    ALTER TABLE webhooks ADD COLUMN probe_until double precision;
    CREATE INDEX deliveries_claimed ON deliveries (claimed_by) WHERE status = 'pending';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def schema_version(conn: asyncpg.Connection) -> int:
    """The database's version: 0 for a database webhookd never touched."""
    exists = await conn.fetchval("SELECT to_regclass('webhookd_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM webhookd_schema"))


async def migrate(conn: asyncpg.Connection, *, now: float, where: str) -> None:
    """Bring the schema to SCHEMA_VERSION under the migration lock, one transaction per version."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS webhookd_schema (version integer PRIMARY KEY,"
            " applied_at double precision NOT NULL)"
        )
        version = await schema_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(f"database {where} has schema version {version}, newer than this webhookd "
                             f"({SCHEMA_VERSION}); upgrade webhookd")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[target - 1])  # a script: asyncpg runs it as one simple query
                if target == 1:
                    await conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', $1)", str(now))
                await conn.execute("INSERT INTO webhookd_schema (version, applied_at) VALUES ($1, $2)", target, now)
            log.info("schema migrated", version=target, backend="postgresql")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
