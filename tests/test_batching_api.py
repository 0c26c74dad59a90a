"""Batch settings through the admin API (in-process daemon, real sockets): shown in every
webhook document, set by POST, changed field by field by PATCH, stored, refused with the
field named (huge values, wrong types), and the delivery document's batch ids."""

from __future__ import annotations

from typing import Any

from tests.conftest import event, eventually

OFF = {"batch_max_events": 0, "batch_max_bytes": 1048576, "batch_linger": "0ms"}


def batch_fields(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in OFF}


async def test_batch_settings_through_the_api(start_daemon: Any) -> None:
    h = await start_daemon()
    status, plain = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/plain"})
    assert status == 201 and batch_fields(plain) == OFF  # every webhook shows them, off by default
    status, made = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/b", "batch_max_events": 100,
                                                         "batch_linger": "50ms"})
    assert status == 201, made
    assert batch_fields(made) == {"batch_max_events": 100, "batch_max_bytes": 1048576, "batch_linger": "50ms"}
    wid = made["id"]
    status, listed = await h.api("GET", "/v1/webhooks")
    assert [batch_fields(w) for w in listed["webhooks"]] == [OFF, batch_fields(made)]

    # PATCH changes only the batch fields it gives; other fields leave them alone
    status, updated = await h.api("PATCH", f"/v1/webhooks/{wid}", {"batch_max_bytes": 65536})
    assert status == 200 and batch_fields(updated) == {"batch_max_events": 100, "batch_max_bytes": 65536,
                                                       "batch_linger": "50ms"}
    status, updated = await h.api("PATCH", f"/v1/webhooks/{wid}", {"description": "renamed", "batch_linger": 1.5})
    assert batch_fields(updated)["batch_linger"] == "1500ms" and updated["description"] == "renamed"
    assert h.sql("SELECT batch_max_events, batch_max_bytes, batch_linger FROM webhooks WHERE id = ?", (wid,)) == [
        (100, 65536, 1.5)]
    await h.close()
    h2 = await start_daemon()  # stored
    assert batch_fields(await h2.webhook(wid)) == {"batch_max_events": 100, "batch_max_bytes": 65536,
                                                   "batch_linger": "1500ms"}


async def test_batch_setting_errors_name_the_field(start_daemon: Any) -> None:
    h = await start_daemon()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"batch_max_events": 1001}, "batch_max_events must be between 0 and 1000, got 1001"),
        ({"batch_max_events": 2**63 - 1}, "batch_max_events must be between 0 and 1000"),
        ({"batch_max_events": -5}, "batch_max_events must be between 0 and 1000, got -5"),
        ({"batch_max_events": "100"}, "batch_max_events must be an integer"),
        ({"batch_max_events": None}, "batch_max_events must be an integer"),
        ({"batch_max_events": [1]}, "batch_max_events must be an integer"),
        ({"batch_max_events": True}, "batch_max_events must be an integer"),
        ({"batch_max_bytes": 5 * 1024 * 1024}, "batch_max_bytes must be between 1024 and 4194304"),
        ({"batch_max_bytes": 1.5e6}, "batch_max_bytes must be an integer"),
        ({"batch_linger": "10s"}, "batch_linger must be between 0ms and 5s"),
        ({"batch_linger": "x" * 100_000}, "batch_linger must be a duration such as"),
        ({"batch_linger": {"ms": 5}}, "batch_linger must be a duration such as"),
        ({"batch_linger": 1e308}, "batch_linger must be between 0ms and 5s"),
        ({"batch_size": 10}, "unknown field 'batch_size'"),
    ]
    status, hook = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/x"})
    for bad, message in cases:
        status, body = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/x", **bad})
        assert (status, body["error"][:len(message)]) == (400, message), bad
        assert len(body["error"]) < 400  # a huge value is not echoed back whole
        status, body = await h.api("PATCH", f"/v1/webhooks/{hook['id']}", {"description": "changed", **bad})
        assert (status, body["error"][:len(message)]) == (400, message), bad
    assert batch_fields(await h.webhook(hook["id"])) == OFF  # nothing half-applied
    assert (await h.webhook(hook["id"]))["description"] == ""
    status, listed = await h.api("GET", "/v1/webhooks")
    assert len(listed["webhooks"]) == 1
    status, body = await h.api("GET", "/v1/deliveries?batch=nope")
    assert status == 400 and "batch must be a batch id" in body["error"]


async def test_the_delivery_document_names_each_attempt_batch(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    status, made = await h.api("POST", "/v1/webhooks", {"url": receiver.url, "batch_max_events": 3})
    assert status == 201
    await h.submit(*(event(n=i) for i in range(3)))
    [request] = await receiver.wait_for(1)
    batch_id = request.headers["webhook-id"]
    assert batch_id.startswith("batch_") and [e["id"] for e in request.json] == [
        d["event_id"] for d in sorted(await h.deliveries(webhook_id=made["id"]), key=lambda d: d["id"])]

    async def succeeded() -> list[dict[str, Any]]:
        ds = await h.deliveries(batch=batch_id)
        return ds if len(ds) == 3 and all(d["status"] == "succeeded" for d in ds) else []

    found = await eventually(succeeded, what="the batch's deliveries succeeded")
    status, doc = await h.api("GET", f"/v1/deliveries/{found[0]['id']}")
    assert status == 200 and [a["batch_id"] for a in doc["attempt_log"]] == [batch_id]
    status, counted = await h.api("GET", f"/v1/deliveries/count?batch={batch_id}")
    assert (status, counted) == (200, {"count": 3})


async def test_retry_failed_takes_a_batch(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(default=500)
    h = await start_daemon(delivery={"max_attempts": 1})
    status, made = await h.api("POST", "/v1/webhooks", {"url": receiver.url, "batch_max_events": 2})
    assert status == 201
    await h.submit(*(event(n=i) for i in range(4)))
    requests = await receiver.wait_for(2)
    first = requests[0].headers["webhook-id"]

    async def failed() -> list[dict[str, Any]]:
        ds = await h.deliveries(webhook_id=made["id"], status="failed")
        return ds if len(ds) == 4 else []

    await eventually(failed, what="4 failed deliveries")
    receiver.default = 200
    status, body = await h.api("POST", "/v1/deliveries/retry-failed", {"batch": first})
    assert (status, body) == (200, {"retried": 2})  # only that batch's two
    await receiver.wait_for(3)
    again = receiver.requests[2]
    assert again.headers["webhook-id"] == first and again.body == requests[0].body  # the same batch, again
    status, body = await h.api("POST", "/v1/deliveries/retry-failed", {"batch": 7})
    assert status == 400 and "string" in body["error"]
