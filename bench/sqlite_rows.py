"""What SQLite alone costs per delivery, with webhookd's schema and pragmas: the floor
under the daemon's figures in docs/performance.md.

    python bench/sqlite_rows.py [--events 2000] [--fanout 51] [--deliveries 30000]

Prints JSON:
- `fanout_us_per_row`: inserting events that fan out to `--fanout` webhooks, per delivery
  row, with the schema's indexes and with some dropped (what each index costs);
- `lifecycle`: one delivery's whole life (event and delivery rows at intake, the outcome
  UPDATE and the attempt row), wall and CPU microseconds per delivery by batch size.

Run it pinned to one core (`taskset -c 0`) to compare with the daemon's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhookd.store.sqlite_schema import MIGRATIONS

WEBHOOK_ID = "wh_" + "0" * 26  # as long as a real one
BODY = b"x" * 230  # about a bench event's body


def database(path: Path, synchronous: str = "FULL", drop: tuple[str, ...] = ()) -> sqlite3.Connection:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    for migration in MIGRATIONS:
        db.executescript(migration)
    for index in drop:
        db.execute(f"DROP INDEX {index}")
    return db


def insert_events(db: sqlite3.Connection, first: int, n: int, webhooks: list[str], next_delivery: int) -> int:
    db.executemany(
        "INSERT INTO events (id, uid, idempotency_key, type, body, created_at, message_id, recipient)"
        " VALUES (?,?,?,?,?,?,?,?)",
        [(i, f"evt_{i:026d}", None, "delivered", BODY, 1.0, f"<{i * 7919 % 1000003}.a1b2@shop.example>",
          f"customer{i * 104729 % 99991}@example.org") for i in range(first, first + n)],
    )
    rows = []
    for i in range(first, first + n):
        for wh in webhooks:
            rows.append((next_delivery, i, wh, "pending", 1.0, 1.0, 1.0))
            next_delivery += 1
    db.executemany(
        "INSERT INTO deliveries (id, event_id, webhook_id, status, next_attempt_at, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?,?)",
        rows,
    )
    return next_delivery


def fanout(path: Path, events: int, fan: int, drop: tuple[str, ...]) -> float:
    db = database(path, drop=drop)
    webhooks = [f"wh_{k:026d}" for k in range(fan)]
    started, next_delivery = time.perf_counter(), 1
    for first in range(1, events + 1, 100):
        db.execute("BEGIN")
        next_delivery = insert_events(db, first, min(100, events + 1 - first), webhooks, next_delivery)
        db.execute("COMMIT")
    db.close()
    return (time.perf_counter() - started) / (events * fan) * 1e6


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def lifecycle(path: Path, deliveries: int, batch: int, synchronous: str,
              drop: tuple[str, ...] = ()) -> dict[str, Any]:
    db = database(path, synchronous, drop)
    wall = {"intake": 0.0, "outcome": 0.0}
    cpu_started = cpu()
    for first in range(1, deliveries + 1, batch):
        n = min(batch, deliveries + 1 - first)
        t0 = time.perf_counter()
        db.execute("BEGIN")
        insert_events(db, first, n, [WEBHOOK_ID], first)
        db.execute("COMMIT")
        t1 = time.perf_counter()
        db.execute("BEGIN")
        db.executemany(
            "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status_code = ?,"
            " last_error = ?, updated_at = ? WHERE id = ?",
            [("succeeded", 1, None, 200, None, 2.0, i) for i in range(first, first + n)],
        )
        db.executemany(
            "INSERT INTO attempts (delivery_id, at, duration_ms, status_code, error, response_body)"
            " VALUES (?,?,?,?,?,?)",
            [(i, 2.0, 1.234, 200, None, '{"received": true}') for i in range(first, first + n)],
        )
        db.execute("COMMIT")
        wall["intake"] += t1 - t0
        wall["outcome"] += time.perf_counter() - t1
    used = cpu() - cpu_started
    db.close()
    return {
        "batch": batch,
        "synchronous": synchronous,
        "intake_wall_us": round(wall["intake"] / deliveries * 1e6, 1),
        "outcome_wall_us": round(wall["outcome"] / deliveries * 1e6, 1),
        "cpu_us": round(used / deliveries * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2000, help="fan-out: events")
    ap.add_argument("--fanout", type=int, default=51, help="fan-out: webhooks per event")
    ap.add_argument("--deliveries", type=int, default=30000, help="lifecycle: deliveries")
    args = ap.parse_args()
    out: dict[str, Any] = {"sqlite": sqlite3.sqlite_version, "cpu_affinity": sorted(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="whs") as tmp:
        path = Path(tmp) / "bench.db"
        variants = {
            "schema": (),
            "without deliveries_status": ("deliveries_status",),
            "without deliveries_event": ("deliveries_event",),
            "without any delivery index": ("deliveries_status", "deliveries_event", "deliveries_due"),
        }
        out["fanout"] = args.fanout
        out["fanout_us_per_row"] = {name: round(fanout(path, args.events, args.fanout, drop), 2)
                                    for name, drop in variants.items()}
        out["lifecycle"] = [lifecycle(path, args.deliveries, batch, sync)
                            for batch, sync in ((30, "FULL"), (100, "FULL"), (30, "NORMAL"))]
        out["lifecycle_without_search_indexes"] = lifecycle(
            path, args.deliveries, 30, "FULL", drop=("events_message_id", "events_recipient"))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
