"""End to end in one process: intake socket → SQLite → signed POST to a real receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook as StandardWebhook

from tests.conftest import event, eventually


async def test_payload_bytes_and_all_headers(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    hook = await h.create_webhook(receiver.url)
    ev = event("bounced", 1, x_custom={"a": [1, 2]})
    ev["timestamp"] = "2026-02-23T12:30:02+02:00"
    [ack] = await h.submit(ev)
    assert ack["ok"] is True
    [req] = await receiver.wait_for(1)

    assert req.body == orjson.dumps(
        {"event": "bounced", "timestamp": "2026-02-23T10:30:02Z", "data": ev["data"]}
    )
    headers = {k.lower(): v for k, v in req.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("webhookd/")
    assert headers["x-webhook-event"] == "bounced"
    assert headers["x-webhook-id"] == headers["webhook-id"] == ack["id"]
    expected = hmac.new(hook["secret"].encode(), req.body, hashlib.sha256).hexdigest()
    assert headers["x-webhook-signature"] == expected
    # the Standard Webhooks trio verifies with the reference implementation
    StandardWebhook(hook["secret"]).verify(req.body, headers)


async def test_only_subscribers_get_the_event(start_daemon: Any, make_receiver: Any) -> None:
    bounces, everything = await make_receiver(), await make_receiver()
    h = await start_daemon()
    await h.create_webhook(bounces.url, ["bounced", "complained"])
    await h.create_webhook(everything.url)
    acks = await h.submit(event("delivered", 1), event("bounced", 2), event("complained", 3))
    assert all(a["ok"] for a in acks)
    await everything.wait_for(3)
    await bounces.wait_for(2)
    await asyncio.sleep(0.1)
    assert sorted(r.json["event"] for r in bounces.requests) == ["bounced", "complained"]


async def test_retries_send_the_same_bytes_until_success(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(plan=[500, 502, 200])
    h = await start_daemon()
    hook = await h.create_webhook(receiver.url)
    await h.submit(event())
    reqs = await receiver.wait_for(3)
    assert len({r.body for r in reqs}) == 1
    assert len({r.headers["webhook-id"] for r in reqs}) == 1

    async def done() -> Any:
        ds = await h.deliveries(webhook_id=hook["id"])
        return ds if ds[0]["status"] == "succeeded" else None

    [d] = await eventually(done)
    assert d["attempts"] == 3 and d["last_status_code"] == 200
    _status, shown = await h.api("GET", f"/v1/deliveries/{d['id']}")
    assert [a["status_code"] for a in shown["attempt_log"]] == [500, 502, 200]
    assert shown["attempt_log"][0]["error"] == "HTTP 500"
    assert (await h.webhook(hook["id"]))["consecutive_failures"] == 0


async def test_burst_of_concurrent_failures_counts_once(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(default=500, delay=0.05)
    # a long webhook backoff keeps the webhook gated after the first wave
    h = await start_daemon(delivery={"retry_base": "10s", "retry_max": "10s"})
    hook = await h.create_webhook(receiver.url)
    await h.submit(*[event("delivered", i) for i in range(8)])
    await receiver.wait_for(4)  # slow start: 4 at once for a webhook without a success yet

    async def counted() -> Any:
        wh = await h.webhook(hook["id"])
        return wh if wh["consecutive_failures"] else None

    wh = await eventually(counted)
    await asyncio.sleep(0.2)
    wh = await h.webhook(hook["id"])
    assert wh["consecutive_failures"] == 1
    assert len(receiver.requests) == 4, "no probe may start before the webhook's backoff expires"


async def test_disable_pause_enable_resume(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(default=503)
    h = await start_daemon(delivery={"disable_after": 3, "max_attempts": 50})
    hook = await h.create_webhook(receiver.url)
    await h.submit(*[event("delivered", i) for i in range(4)])

    async def disabled() -> Any:
        wh = await h.webhook(hook["id"])
        return wh if not wh["enabled"] else None

    wh = await eventually(disabled)
    assert wh["disabled_reason"] == "consecutive_failures"
    assert wh["consecutive_failures"] == 3
    seen = len(receiver.requests)
    assert seen <= 4 + 2  # the first wave counts once, then one probe at a time

    await h.submit(event("delivered", 99))
    await asyncio.sleep(0.2)
    assert len(receiver.requests) == seen, "nothing is sent while disabled"
    statuses = {d["status"] for d in await h.deliveries(webhook_id=hook["id"])}
    assert statuses == {"paused"}

    receiver.default = 200
    status, body = await h.api("POST", f"/v1/webhooks/{hook['id']}/enable", {})
    assert status == 200 and body["enabled"] is True and body["resumed"] == 5

    async def all_succeeded() -> bool:
        return {d["status"] for d in await h.deliveries(webhook_id=hook["id"])} == {"succeeded"}

    await eventually(all_succeeded)
    delivered = {r.json["data"]["to"] for r in receiver.requests[seen:]}
    assert delivered == {f"customer{i}@example.org" for i in [0, 1, 2, 3, 99]}
    assert (await h.webhook(hook["id"]))["consecutive_failures"] == 0


async def test_enable_with_drop_backlog_fails_paused_deliveries(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    hook = await h.create_webhook(receiver.url)
    status, _ = await h.api("POST", f"/v1/webhooks/{hook['id']}/disable")
    assert status == 200
    assert (await h.webhook(hook["id"]))["disabled_reason"] == "manual"
    await h.submit(event("delivered", 1), event("delivered", 2))
    status, body = await h.api("POST", f"/v1/webhooks/{hook['id']}/enable", {"drop_backlog": True})
    assert body["dropped"] == 2
    ds = await h.deliveries(webhook_id=hook["id"])
    assert {d["status"] for d in ds} == {"failed"}
    assert "dropped" in ds[0]["last_error"]
    await h.submit(event("delivered", 3))
    await receiver.wait_for(1)
    assert receiver.requests[0].json["data"]["to"] == "customer3@example.org"


async def test_max_attempts_marks_failed_and_manual_retry(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(default=500)
    h = await start_daemon(delivery={"max_attempts": 3, "disable_after": 100})
    hook = await h.create_webhook(receiver.url)
    await h.submit(event())

    async def failed() -> Any:
        ds = await h.deliveries(webhook_id=hook["id"])
        return ds[0] if ds[0]["status"] == "failed" else None

    d = await eventually(failed)
    assert d["attempts"] == 3 and d["next_attempt_at"] is None
    await asyncio.sleep(0.1)
    assert len(receiver.requests) == 3

    receiver.default = 200
    status, body = await h.api("POST", f"/v1/deliveries/{d['id']}/retry")
    assert status == 200 and body["status"] == "pending"

    async def succeeded() -> bool:
        return (await h.deliveries(webhook_id=hook["id"]))[0]["status"] == "succeeded"

    await eventually(succeeded)
    assert len(receiver.requests) == 4


async def test_hanging_webhook_does_not_delay_a_healthy_one(start_daemon: Any, make_receiver: Any) -> None:
    hanging = await make_receiver(hang=True)
    healthy = await make_receiver()
    h = await start_daemon(delivery={"timeout": "30s", "concurrency": 16, "per_webhook_concurrency": 4})
    await h.create_webhook(hanging.url)
    await h.create_webhook(healthy.url)
    await h.submit(*[event("delivered", i) for i in range(50)])
    await healthy.wait_for(50, timeout=5)
    assert len(hanging.requests) == 4  # its own concurrency limit, nothing more


async def test_redirect_is_a_failure_and_not_followed(start_daemon: Any, make_receiver: Any) -> None:
    target = await make_receiver()
    redirector = await make_receiver(default=302, headers={"Location": target.url})
    h = await start_daemon(delivery={"max_attempts": 1})
    hook = await h.create_webhook(redirector.url)
    await h.submit(event())

    async def failed() -> Any:
        ds = await h.deliveries(webhook_id=hook["id"])
        return ds[0] if ds[0]["status"] == "failed" else None

    d = await eventually(failed)
    assert d["last_status_code"] == 302
    assert "redirect" in d["last_error"] and "not followed" in d["last_error"]
    assert target.requests == []


async def test_response_read_is_bounded(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(reply=b"x" * 200_000)
    h = await start_daemon(delivery={"max_response_bytes": 2048})
    hook = await h.create_webhook(receiver.url)
    await h.submit(event())

    async def done() -> Any:
        ds = await h.deliveries(webhook_id=hook["id"])
        return ds[0] if ds[0]["status"] == "succeeded" else None

    d = await eventually(done)
    _, shown = await h.api("GET", f"/v1/deliveries/{d['id']}")
    assert shown["attempt_log"][0]["response_body"] == "x" * 1024


async def test_connection_refused_is_recorded(start_daemon: Any) -> None:
    from tests.conftest import free_port

    h = await start_daemon(delivery={"max_attempts": 1})
    hook = await h.create_webhook(f"http://127.0.0.1:{free_port()}/nothing")
    await h.submit(event())

    async def failed() -> Any:
        ds = await h.deliveries(webhook_id=hook["id"])
        return ds[0] if ds[0]["status"] == "failed" else None

    d = await eventually(failed)
    assert d["last_status_code"] is None
    assert d["last_error"].startswith("connection failed")


async def test_test_event_leaves_counters_alone(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(plan=[418])
    h = await start_daemon()
    hook = await h.create_webhook(receiver.url)
    await h.api("POST", f"/v1/webhooks/{hook['id']}/disable")
    status, result = await h.api("POST", f"/v1/webhooks/{hook['id']}/test", {"event": "bounced"})
    assert status == 200
    assert result["ok"] is False and result["status_code"] == 418
    assert result["response_body"] == '{"received": true}'
    [req] = receiver.requests
    body = req.json
    assert body["event"] == "bounced" and body["data"]["message_id"].startswith("test-")
    assert body["data"]["tags"] == ["test"]
    StandardWebhook(hook["secret"]).verify(req.body, {k.lower(): v for k, v in req.headers.items()})
    wh = await h.webhook(hook["id"])
    assert wh["consecutive_failures"] == 0 and wh["enabled"] is False
    _, ok = await h.api("POST", f"/v1/webhooks/{hook['id']}/test", {})
    assert ok["ok"] is True and ok["error"] is None


async def test_restart_resumes_the_schedule(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(default=503)
    h = await start_daemon(delivery={"retry_base": "1h", "retry_max": "1h"})
    hook = await h.create_webhook(receiver.url)
    await h.submit(event())
    await receiver.wait_for(1)

    async def backing_off() -> Any:
        wh = await h.webhook(hook["id"])
        return wh["consecutive_failures"] == 1

    await eventually(backing_off)
    await h.close()
    # the restarted daemon keeps the hour-long backoff: nothing is sent
    h2 = await start_daemon(delivery={"retry_base": "1h", "retry_max": "1h"})
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1
    [d] = await h2.deliveries()
    assert d["status"] == "pending" and d["attempts"] == 1
    assert (await h2.webhook(hook["id"]))["consecutive_failures"] == 1


async def test_large_backlog_is_delivered_through_the_window(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon(delivery={"per_webhook_concurrency": 2})
    hook = await h.create_webhook(receiver.url)
    await h.api("POST", f"/v1/webhooks/{hook['id']}/disable")
    n = 1000  # far more than the in-memory window (64)
    await h.submit(*[event("delivered", i) for i in range(n)])
    h.daemon.scheduler.min_window = 64
    await h.api("POST", f"/v1/webhooks/{hook['id']}/enable", {})
    await receiver.wait_for(n, timeout=30)
    await asyncio.sleep(0.1)
    got = [r.json["data"]["to"] for r in receiver.requests]
    assert len(got) == n and len(set(got)) == n


async def test_retry_after_delays_the_webhook(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(plan=[503], headers={"Retry-After": "1"})
    h = await start_daemon(delivery={"retry_base": "10ms", "retry_max": "5s"})
    await h.create_webhook(receiver.url)
    await h.submit(event())
    await receiver.wait_for(1)
    loop = asyncio.get_running_loop()
    first = loop.time()
    await receiver.wait_for(2, timeout=5)
    assert loop.time() - first >= 0.9, "Retry-After: 1 must hold the next attempt for about a second"


async def test_production_refuses_private_targets(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    port = receiver.url.split(":")[2].split("/")[0]
    h = await start_daemon(environment="production", delivery={"max_attempts": 1})
    hook = await h.create_webhook(f"https://127.0.0.1:{port}/hook")
    localhost = await h.create_webhook(f"https://localhost:{port}/hook")
    await h.submit(event())

    async def failed() -> Any:
        ds = await h.deliveries()
        return ds if len(ds) == 2 and all(d["status"] == "failed" for d in ds) else None

    for d in await eventually(failed):
        assert d["last_error"].startswith("target refused: ")
        assert "loopback" in d["last_error"] and "allow_targets" in d["last_error"]
    assert {d["webhook_id"] for d in await h.deliveries()} == {hook["id"], localhost["id"]}
    assert receiver.requests == []


async def test_allow_targets_exempts_a_network(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    port = receiver.url.split(":")[2].split("/")[0]
    h = await start_daemon(environment="production",
                           delivery={"max_attempts": 1, "allow_targets": ["127.0.0.0/8"]})
    await h.create_webhook(f"https://127.0.0.1:{port}/hook")
    await h.submit(event())

    async def failed() -> Any:
        ds = await h.deliveries()
        return ds[0] if ds and ds[0]["status"] == "failed" else None

    d = await eventually(failed)
    # the connection was made (the plain-HTTP receiver cannot speak TLS): not refused by the guard
    assert not d["last_error"].startswith("target refused")
    assert receiver.requests == []


async def test_fresh_events_beyond_the_window_wait_in_sqlite(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(delay=0.001)
    h = await start_daemon(delivery={"per_webhook_concurrency": 1})
    h.daemon.scheduler.min_window = 16
    await h.create_webhook(receiver.url)
    n = 600
    await h.submit(*[event("delivered", i) for i in range(n)])
    [wh] = h.daemon.scheduler.webhooks.values()
    assert len(wh.items) <= 2 * 16, "memory holds a bounded window, the rest stays in SQLite"
    await receiver.wait_for(n, timeout=30)
    await asyncio.sleep(0.1)
    got = [r.json["data"]["to"] for r in receiver.requests]
    assert len(got) == n and len(set(got)) == n, "each delivery exactly once"


async def test_hanging_webhooks_cannot_take_every_global_slot(start_daemon: Any, make_receiver: Any) -> None:
    hanging = [await make_receiver(hang=True) for _ in range(3)]
    healthy = await make_receiver()
    h = await start_daemon(delivery={"timeout": "30s", "concurrency": 8, "per_webhook_concurrency": 8})
    for r in hanging:
        await h.create_webhook(r.url)
    await h.create_webhook(healthy.url)
    await h.submit(*[event("delivered", i) for i in range(40)])
    await healthy.wait_for(40, timeout=5)
    assert sum(len(r.requests) for r in hanging) <= 8


async def test_beside_hanging_webhooks_a_healthy_one_keeps_its_own_concurrency(
    start_daemon: Any, make_receiver: Any
) -> None:
    """Hanging webhooks stay at their slow start (4 each): the slots they cannot use are
    not withheld from the healthy webhook, which opens up to per_webhook_concurrency
    (an equal split would hold it to 40 // 5 = 8)."""
    hanging = [await make_receiver(hang=True) for _ in range(4)]
    healthy = await make_receiver(delay=0.2)
    h = await start_daemon(delivery={"timeout": "30s", "concurrency": 40, "per_webhook_concurrency": 16})
    for r in hanging:
        await h.create_webhook(r.url, events=["bounced"])
    await h.submit(*[event("bounced", i) for i in range(40)])  # their backlog
    for r in hanging:
        await r.wait_for(4)
    await h.create_webhook(healthy.url, events=["delivered"])
    await h.submit(*[event("delivered", i) for i in range(60)])
    await healthy.wait_for(60, timeout=10)
    assert healthy.max_active == 16
    assert all(len(r.requests) == 4 for r in hanging)


async def test_rotation_signs_with_both_secrets_during_the_grace_period(
    start_daemon: Any, make_receiver: Any
) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    hook = await h.create_webhook(receiver.url)
    _, rotated = await h.api("POST", f"/v1/webhooks/{hook['id']}/rotate-secret")
    old, new = hook["secret"], rotated["secret"]
    await h.submit(event())
    [req] = await receiver.wait_for(1)
    headers = {k.lower(): v for k, v in req.headers.items()}
    assert len(headers["webhook-signature"].split(" ")) == 2
    StandardWebhook(old).verify(req.body, headers)  # receivers not yet updated keep working
    StandardWebhook(new).verify(req.body, headers)
    assert headers["x-webhook-signature"] == hmac.new(new.encode(), req.body, hashlib.sha256).hexdigest()


async def test_slow_start_opens_up_with_successes(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(delay=0.05)
    h = await start_daemon(delivery={"per_webhook_concurrency": 16})
    await h.create_webhook(receiver.url)
    [wh] = h.daemon.scheduler.webhooks.values()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, wh.active)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    await h.submit(*[event("delivered", i) for i in range(4)])
    await receiver.wait_for(4)
    await asyncio.sleep(0.1)
    assert peak <= 4  # a new webhook starts with 4 at once
    await h.submit(*[event("delivered", i) for i in range(4, 100)])
    await receiver.wait_for(100)
    watcher.cancel()
    assert peak == 16  # successes opened it up to per_webhook_concurrency


async def test_mixed_batch_reaches_each_subscriber_with_its_own_deliveries(
    start_daemon: Any, make_receiver: Any
) -> None:
    """One commit of several event types, subscribers enabled and disabled in between:
    each enabled webhook gets exactly its events, and each outcome lands on its own
    delivery row (the scheduler derives delivery ids from the batch's subscriber lists)."""
    everything, bounces, paused = await make_receiver(), await make_receiver(), await make_receiver()
    h = await start_daemon()
    a = await h.create_webhook(everything.url)
    p = await h.create_webhook(paused.url)
    b = await h.create_webhook(bounces.url, events=["bounced"])
    await h.api("POST", f"/v1/webhooks/{p['id']}/disable")
    kinds = ["delivered", "bounced", "opened", "bounced", "delivered", "clicked"] * 5
    answers = await h.submit(*[event(k, i, **({"bounce_type": "hard"} if k == "bounced" else {}))
                               for i, k in enumerate(kinds)])
    assert all(a["ok"] for a in answers)
    await everything.wait_for(len(kinds))
    await bounces.wait_for(kinds.count("bounced"))
    await asyncio.sleep(0.2)
    assert sorted(r.json["data"]["to"] for r in everything.requests) == sorted(
        f"customer{i}@example.org" for i in range(len(kinds)))
    assert sorted(r.json["data"]["to"] for r in bounces.requests) == sorted(
        f"customer{i}@example.org" for i, k in enumerate(kinds) if k == "bounced")
    assert not paused.requests

    async def statuses(hook: dict[str, Any]) -> dict[str, int]:
        status, body = await h.api("GET", f"/v1/deliveries?webhook_id={hook['id']}&limit=100")
        assert status == 200, body
        counts: dict[str, int] = {}
        for d in body["deliveries"]:
            counts[d["status"]] = counts.get(d["status"], 0) + 1
        return counts

    async def settled() -> bool:
        return await statuses(a) == {"succeeded": len(kinds)} and await statuses(b) == {
            "succeeded": kinds.count("bounced")}

    await eventually(settled, what="every outcome written")
    assert await statuses(a) == {"succeeded": len(kinds)}
    assert await statuses(b) == {"succeeded": kinds.count("bounced")}
    assert await statuses(p) == {"paused": len(kinds)}
