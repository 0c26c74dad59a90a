"""`webhookd migrate-storage --to postgresql://...`: a SQLite database copied into an empty
PostgreSQL one keeps everything (webhooks with secrets and state, deliveries in every
status, attempts, idempotency keys, counts, tracking, tokens), a non-empty target and a
running daemon are refused, and the copied deliveries are then sent by `webhookd serve`."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from tests.conftest import db_rows
from tests.pg import Cluster, new_schema, pg_dsn  # noqa: F401

pytest.register_assert_rewrite("tests.storage_contract")  # before its first import (test_storage_*.py do too)

from tests.storage_contract import (  # noqa: E402
    T0,
    FakeClock,
    api_token,
    ev,
    outcome,
    record,
    record_batch,
    webhook,
)
from tests.test_process import Proc, ThreadReceiver, lines, receiver, wait_until  # noqa: E402, F401
from tests.test_storage_postgresql_process import storage_table  # noqa: E402
from webhookd.batching import Batching  # noqa: E402
from webhookd.filters import WebhookFilter  # noqa: E402
from webhookd.store import (  # noqa: E402
    FAILED,
    PAUSED,
    PENDING,
    BatchOutcomeRecord,
    DeliveryFilter,
    FreshEvent,
    SqliteStorage,
    StoreError,
    TrackingHit,
    WebhookState,
)
from webhookd.store.copy import TABLES, sqlite_to_postgres  # noqa: E402
from webhookd.store.postgres import PostgresStorage  # noqa: E402

EVERYTHING = DeliveryFilter()
BATCH = "batch_" + "m" * 26


async def test_everything_arrives_with_its_ids_and_a_second_copy_is_refused(tmp_path: Path,
                                                                            pg_dsn: str) -> None:  # noqa: F811
    path = tmp_path / "webhookd.db"
    seen: list[FreshEvent] = []
    lite = SqliteStorage(path, clock=FakeClock(), on_fresh=seen.extend)
    await lite.open()
    shop = replace(webhook("wh_shop", filter=WebhookFilter.parse({"from_domains": ["shop.example"]})),
                   name="shop", declared_in="/etc/webhookd/webhooks.d/shop.toml", previous_secret="whsec_old",
                   previous_secret_expires_at=T0 + 86400, batching=Batching(50, 65536, 0.25))
    await lite.create_webhook(shop)
    await lite.create_webhook(webhook("wh_off", enabled=False, created_at=T0 + 1))
    await lite.create_webhook(webhook("wh_gate", created_at=T0 + 2))
    await lite.set_webhook_state("wh_gate", WebhookState(True, None, 4, T0 + 90, T0 + 3))
    subs = [("wh_shop", True), ("wh_off", False), ("wh_gate", True)]
    uids = [await lite.submit(ev(i, key=f"k{i}" if i % 2 else None, to=f"c{i}@example.org"), subs)
            for i in range(30)]
    # the disabled webhook's deliveries are deferred (no row, no id yet): they are left so, and
    # the copy must make them rows first; their ids are read after it, from PostgreSQL
    assert all(len(fe.subscribers) == 2 for fe in seen)
    eager = {(d.event_uid, d.webhook_id): d.id for d in await lite.list_deliveries(
        DeliveryFilter(webhook_id="wh_shop"), limit=1000) + await lite.list_deliveries(
        DeliveryFilter(webhook_id="wh_gate"), limit=1000)}
    ids = [[eager[(uid, "wh_shop")], eager[(uid, "wh_gate")]] for uid in uids]
    await record(lite, outcome(ids[0][0], "wh_shop", ok=True, at=T0 + 5),
                 outcome(ids[1][0], "wh_shop", ok=False, at=T0 + 6, status="failed"),
                 outcome(ids[2][1], "wh_gate", ok=False, at=T0 + 7),
                 outcome(ids[2][1], "wh_gate", ok=False, at=T0 + 8, attempts=2))
    await record_batch(lite, BatchOutcomeRecord(  # a batch attempt: its rows carry the batch id
        webhook_id="wh_shop", batch_id=BATCH, delivery_ids=(ids[3][0], ids[4][0]), statuses=(PENDING, FAILED),
        attempts=(1, 5), next_attempt_at=T0 + 70, at=T0 + 10, duration_ms=3.25, status_code=503, error="HTTP 503",
        response_body="busy", updated_at=T0 + 10))
    await lite.create_token(api_token(1))
    await lite.revoke_token("tok_1", now=T0 + 9)
    await lite.set_opt_out("h" * 16, opted_out=True, now=T0)
    await lite.track_hits([TrackingHit(b"first-key-000001", "<m1@mail.example.com>")], now=T0)
    await lite.delete_webhook("wh_none")  # nothing to delete, but next_delivery_id is kept now
    expected = {
        "webhooks": await lite.load_webhooks(),
        "deliveries": [await lite.list_deliveries(DeliveryFilter(webhook_id=w), limit=1000)
                       for w in ("wh_shop", "wh_gate")],
        "details": [await lite.delivery(i) for row in ids[:5] for i in row],
        "batch": await lite.list_deliveries(DeliveryFilter(webhook_id="wh_shop", batch_id=BATCH)),
        "tokens": await lite.list_tokens(), "stats": await lite.webhook_stats(T0),
        "hours": await lite.hourly_counts(T0 - 86400, T0 + 86400), "counts": await lite.count_by_status(),
    }
    deferred = db_rows(path, "SELECT count(*) FROM deliveries WHERE webhook_id = 'wh_off'")
    await lite.close()
    assert deferred == [(0,)]  # still deferred when the copy starts

    copied = await sqlite_to_postgres(path, pg_dsn)
    assert copied["webhooks"] == 3 and copied["events"] == 30 and copied["deliveries"] == 90
    assert copied["attempts"] == 6 and copied["api_tokens"] == 1 and copied["tracking_opt_outs"] == 1
    assert set(copied) == {t.name for t in TABLES}

    fresh: list[FreshEvent] = []
    pg = PostgresStorage(pg_dsn, clock=FakeClock(), on_fresh=fresh.extend)
    await pg.open()
    try:
        assert await pg.load_webhooks() == expected["webhooks"]  # secrets, gate, filter, name: all of it
        assert [await pg.list_deliveries(DeliveryFilter(webhook_id=w), limit=1000)
                for w in ("wh_shop", "wh_gate")] == expected["deliveries"]
        # the disabled webhook's deferred deliveries were made rows by the copy: paused, one per event
        off = await pg.list_deliveries(DeliveryFilter(webhook_id="wh_off"), limit=1000)
        assert sorted(d.event_uid for d in off) == sorted(uids) and {d.status for d in off} == {PAUSED}
        assert [await pg.delivery(i) for row in ids[:5] for i in row] == expected["details"]
        assert [a.batch_id for a in expected["details"][6].attempts] == [BATCH]  # (what was compared)
        assert expected["webhooks"][0].batching == Batching(50, 65536, 0.25)
        assert [d.id for d in await pg.list_deliveries(DeliveryFilter(batch_id=BATCH))] == [
            d.id for d in expected["batch"]] == [ids[4][0], ids[3][0]]
        assert await pg.list_tokens() == expected["tokens"]
        assert await pg.webhook_stats(T0) == expected["stats"]
        assert await pg.hourly_counts(T0 - 86400, T0 + 86400) == expected["hours"]
        assert await pg.count_by_status() == expected["counts"]
        assert await pg.count_opt_outs() == 1
        [hit] = await pg.track_hits([TrackingHit(b"first-key-000001", "<m1@mail.example.com>")], now=T0 + 1)
        assert not hit.first  # remembered
        assert await pg.submit(ev(99, key="k3"), [("wh_shop", True)]) == seen[3].event_uid  # idempotency kept
        assert [d.delivery_id for d in await pg.take_due("wh_gate", (float("-inf"), -1), 100)][:1] == [ids[0][1]]
        await pg.submit(ev(100), [("wh_shop", True)])
        assert fresh[-1].delivery_id(0) > max([i for row in ids for i in row] + [d.id for d in off])  # ids go on
    finally:
        await pg.close()

    with pytest.raises(StoreError, match="is not empty"):
        await sqlite_to_postgres(path, pg_dsn)


def test_migrate_storage_from_a_stopped_daemon_then_serve_sends_the_backlog(
    pg_cluster: Cluster, proc: Callable[..., Proc], receiver: ThreadReceiver,  # noqa: F811
) -> None:
    import asyncio

    receiver.status = 503  # the backlog stays pending on SQLite, each retried about once a second
    d = proc({"retry_base": "1s", "retry_max": "1s", "max_attempts": 1000, "disable_after": 1000}).start()
    hook = d.json("webhooks", "create", "--url", receiver.url)
    assert d.cli("submit", stdin=lines(20, "mig")).returncode == 0
    wait_until(lambda: d.json("status")["deliveries"]["pending"] == 20, what="20 pending deliveries")
    dsn = asyncio.run(new_schema(pg_cluster))

    running = d.cli("migrate-storage", "--to", dsn)
    assert running.returncode == 1 and b"stop it first" in running.stderr
    refused = d.cli("migrate-storage", "--to", dsn.replace("webhookd@", "webhookd:pw@"))
    assert refused.returncode == 2 and b"pw" not in refused.stderr
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0

    done = d.cli("migrate-storage", "--to", dsn, "--json")
    assert done.returncode == 0, done.stderr
    copied = json.loads(done.stdout)["copied"]
    assert (copied["webhooks"], copied["events"], copied["deliveries"]) == (1, 20, 20)
    again = d.cli("migrate-storage", "--to", dsn)
    assert again.returncode == 1 and b"is not empty" in again.stderr

    receiver.status = 200
    d.write_config({"retry_base": "50ms", "retry_max": "100ms"}, tables=storage_table(dsn))
    d.start()  # now on PostgreSQL: the copied backlog is sent, signed with the copied secret
    wait_until(lambda: receiver.delivered() == {f"<mig-{i}@x>" for i in range(20)}, timeout=60,
               what="the copied backlog delivered")
    for body, headers in zip(receiver.bodies, receiver.headers, strict=True):
        Webhook(hook["secret"]).verify(body, headers)
    assert d.json("status")["storage"]["backend"] == "postgresql"
