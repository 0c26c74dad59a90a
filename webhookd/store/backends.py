"""Which `Storage` a config asks for: SQLite (the default) or PostgreSQL (asyncpg, the
`postgresql` extra, imported only when asked for). Backend-neutral: the daemon and the CLI
open storage through here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from webhookd.config import StorageConfig
from webhookd.store.base import FreshSink, Storage
from webhookd.store.model import StoreError
from webhookd.store.sqlite import SqliteStorage


@dataclass(frozen=True, slots=True)
class Health:
    """The storage connection as metrics and /v1/status show it (never the DSN's secrets)."""

    backend: str
    database: str  # the SQLite path, or the DSN without password or query
    connected: bool
    reconnects: int


def make_storage(
    cfg: StorageConfig, *, clock: Callable[[], float] = time.time, on_fresh: FreshSink | None = None
) -> tuple[Storage, Callable[[], Health]]:
    """The configured backend, not yet opened, and how to ask it for its health."""
    if cfg.backend == "postgresql":
        try:
            from webhookd.store.postgres import PostgresStorage
        except ImportError as exc:
            raise StoreError(
                'storage.backend = "postgresql" needs asyncpg: pip install "webhookd[postgresql]"'
                f" ({exc.name} is missing)"
            ) from None
        # a lease: a member of the fleet of daemons that may share this database's queue
        # home: the state_dir, by which a daemon restarted after a crash recognises its previous life
        pg = PostgresStorage(cfg.dsn, password_file=cfg.password_file, clock=clock, on_fresh=on_fresh,
                             lease=cfg.lease, home=str(cfg.path.parent))
        return pg, lambda: Health("postgresql", pg.where, pg.connected, pg.reconnects)
    lite = SqliteStorage(cfg.path, durability=cfg.durability, clock=clock, on_fresh=on_fresh)
    return lite, lambda: Health("sqlite", str(cfg.path), True, 0)
