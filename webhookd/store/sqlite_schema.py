"""The SQLite schema, as versioned migrations (`PRAGMA user_version`).

Each entry upgrades the schema by one version; never edit a released entry, append
a new one. Version N is reached after running MIGRATIONS[:N], each in its own
transaction.
"""

from __future__ import annotations

# Deferred fan-out: the lagging subscribers' keys on each event (",3,7,"; NULL: none), and per
# webhook its key, the id of its first deferred event not yet made a delivery row (its
# cursor; NULL: none) and how many deliveries are deferred. Every webhook gets its key.
FANOUT_MIGRATION = """
    ALTER TABLE events ADD COLUMN deferred TEXT;
    CREATE TABLE fanout (
        webhook_id TEXT PRIMARY KEY,
        key INTEGER NOT NULL UNIQUE,
        cursor INTEGER,
        deferred INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO fanout (webhook_id, key, cursor, deferred)
        SELECT id, row_number() OVER (ORDER BY created_at, id), NULL, 0 FROM webhooks;
"""


MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        enabled INTEGER NOT NULL DEFAULT 1,
        disabled_reason TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        backoff_until REAL NOT NULL DEFAULT 0,
        secret TEXT NOT NULL,
        previous_secret TEXT,
        previous_secret_expires_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        uid TEXT NOT NULL,
        idempotency_key TEXT,
        type TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX events_idempotency ON events (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        event_id INTEGER NOT NULL,
        webhook_id TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_status_code INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (webhook_id, next_attempt_at, id)
        WHERE status = 'pending';
    CREATE INDEX deliveries_status ON deliveries (status, webhook_id);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery_id INTEGER NOT NULL,
        at REAL NOT NULL,
        duration_ms REAL NOT NULL,
        status_code INTEGER,
        error TEXT,
        response_body TEXT
    );
    CREATE INDEX attempts_delivery ON attempts (delivery_id);
    """,
    # v2: retention pruning finds finished deliveries by age, and events by their deliveries.
    """
    CREATE INDEX deliveries_finished ON deliveries (updated_at) WHERE status IN ('succeeded', 'failed');
    CREATE INDEX deliveries_event ON deliveries (event_id);
    """,
    # v3: message id and recipient as indexed columns (search), and what the dashboard
    # shows per webhook without scanning: its last attempt, and attempts counted by hour.
    """
    ALTER TABLE events ADD COLUMN message_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE events ADD COLUMN recipient TEXT NOT NULL DEFAULT '' COLLATE NOCASE;
    UPDATE events SET
        message_id = coalesce(json_extract(CAST(body AS TEXT), '$.data.message_id'), ''),
        recipient = coalesce(json_extract(CAST(body AS TEXT), '$.data.to'), '');
    CREATE INDEX events_message_id ON events (message_id);
    CREATE INDEX events_recipient ON events (recipient);
    ALTER TABLE webhooks ADD COLUMN last_attempt_at REAL;
    ALTER TABLE webhooks ADD COLUMN last_status_code INTEGER;
    ALTER TABLE webhooks ADD COLUMN last_error TEXT;
    UPDATE webhooks SET (last_attempt_at, last_status_code, last_error) = (
        SELECT a.at, a.status_code, a.error FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
        WHERE d.webhook_id = webhooks.id ORDER BY a.at DESC, a.id DESC LIMIT 1);
    CREATE TABLE attempt_hours (
        hour INTEGER NOT NULL,
        webhook_id TEXT NOT NULL,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, webhook_id)
    ) WITHOUT ROWID;
    INSERT INTO attempt_hours (hour, webhook_id, succeeded, failed)
        SELECT CAST(a.at / 3600 AS INTEGER) * 3600, d.webhook_id, sum(a.error IS NULL), sum(a.error IS NOT NULL)
        FROM attempts a JOIN deliveries d ON d.id = a.delivery_id GROUP BY 1, 2;
    """,
    # v4: opens and clicks. Which hits came first (a key per message and recipient, or
    # link), the opted-out recipients (keyed hashes, never addresses), and `delivered`
    # events found by message id for seconds_since_delivered.
    """
    CREATE TABLE tracking_firsts (key BLOB PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
    CREATE INDEX tracking_firsts_at ON tracking_firsts (at);
    CREATE TABLE tracking_opt_outs (hash TEXT PRIMARY KEY, created_at REAL NOT NULL) WITHOUT ROWID;
    CREATE INDEX events_delivered ON events (message_id, recipient) WHERE type = 'delivered';
    """,
    # v5: a filter per webhook (webhookd/filters.py), its JSON object; '{}' is the empty
    # filter, which every webhook made before had.
    """
    ALTER TABLE webhooks ADD COLUMN filter TEXT NOT NULL DEFAULT '{}';
    """,
    # v6: webhooks as code (webhookd/declared.py): a declared webhook's stable name, unique
    # when set, and the file declaring it (NULL once removed from the config: it is then
    # disabled as removed_from_config and keeps its name, so declaring it again finds it).
    """
    ALTER TABLE webhooks ADD COLUMN name TEXT;
    ALTER TABLE webhooks ADD COLUMN declared_in TEXT;
    CREATE UNIQUE INDEX webhooks_name ON webhooks (name) WHERE name IS NOT NULL;
    """,
    # v7: scoped API tokens (webhookd/tokens.py): only the SHA-256 of each token (hex, unique:
    # looked up by it), the sender domains it is scoped to (a JSON list), and when it was
    # made, last used (updated at most once a minute) and revoked (kept, never reused).
    """
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        domains TEXT NOT NULL,
        read_only INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        last_used_at REAL,
        revoked_at REAL
    );
    """,
    # v8: batched delivery, opt-in per webhook (webhookd/batching.py): its settings (0 events:
    # off, which every webhook made before has), and on each attempt the batch it was part
    # of (NULL for a single-event attempt), indexed to list a batch's deliveries.
    """
    ALTER TABLE webhooks ADD COLUMN batch_max_events INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE webhooks ADD COLUMN batch_max_bytes INTEGER NOT NULL DEFAULT 1048576;
    ALTER TABLE webhooks ADD COLUMN batch_linger REAL NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN batch_id TEXT;
    CREATE INDEX attempts_batch ON attempts (batch_id) WHERE batch_id IS NOT NULL;
    """,
    # deferred fan-out (webhookd/store/sqlite_fanout.py), FANOUT_MIGRATION below
    FANOUT_MIGRATION,
)
SCHEMA_VERSION = len(MIGRATIONS)
FANOUT_SCHEMA_VERSION = MIGRATIONS.index(FANOUT_MIGRATION) + 1
"""The version that adds deferred fan-out: its position in MIGRATIONS (one place to renumber)."""


def split_sql(script: str) -> list[str]:
    """The statements of a migration (none of them contains a ';' of its own)."""
    return [s.strip() for s in script.split(";") if s.strip()]
