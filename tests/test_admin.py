"""The admin API over its Unix socket."""

from __future__ import annotations

from typing import Any

from tests.conftest import event


async def test_webhook_crud(start_daemon: Any) -> None:
    h = await start_daemon()
    status, created = await h.api(
        "POST", "/v1/webhooks",
        {"url": "https://hooks.example.com/x", "events": ["delivered", "bounced"], "description": "shop"},
    )
    assert status == 201
    assert created["secret"].startswith("whsec_")
    wid = created["id"]
    assert created["events"] == ["delivered", "bounced"] and created["enabled"] is True
    assert created["disabled_reason"] is None and created["consecutive_failures"] == 0

    status, listed = await h.api("GET", "/v1/webhooks")
    assert [w["id"] for w in listed["webhooks"]] == [wid]
    assert "secret" not in listed["webhooks"][0]

    status, shown = await h.api("GET", f"/v1/webhooks/{wid}")
    assert status == 200 and "secret" not in shown

    status, updated = await h.api("PATCH", f"/v1/webhooks/{wid}", {"events": ["*"], "description": "all"})
    assert status == 200 and updated["events"] == ["*"] and updated["description"] == "all"
    assert updated["url"] == "https://hooks.example.com/x"

    status, secret = await h.api("GET", f"/v1/webhooks/{wid}/secret")
    assert secret == {"id": wid, "secret": created["secret"]}

    status, rotated = await h.api("POST", f"/v1/webhooks/{wid}/rotate-secret")
    assert status == 200 and rotated["secret"] != created["secret"]
    assert rotated["previous_secret_expires_at"]

    status, deleted = await h.api("DELETE", f"/v1/webhooks/{wid}")
    assert status == 200 and deleted == {"deleted": wid}
    status, body = await h.api("GET", f"/v1/webhooks/{wid}")
    assert status == 404 and wid in body["error"]


async def test_webhooks_survive_a_restart(start_daemon: Any) -> None:
    h = await start_daemon()
    created = await h.create_webhook("https://hooks.example.com/a", ["opened"])
    await h.close()
    h2 = await start_daemon()
    assert (await h2.webhook(created["id"]))["events"] == ["opened"]


async def test_validation_errors_name_the_problem(start_daemon: Any) -> None:
    h = await start_daemon()
    cases = [
        ({"url": "ftp://x.example.com"}, "http"),
        ({"url": "https://x.example.com", "events": ["exploded"]}, "exploded"),
        ({"url": "https://x.example.com", "events": []}, "events"),
        ({"url": "https://x.example.com", "colour": "red"}, "colour"),
        ({}, "url"),
    ]
    for body, word in cases:
        status, reply = await h.api("POST", "/v1/webhooks", body)
        assert status == 400, body
        assert word in reply["error"], (body, reply)


async def test_production_requires_https(start_daemon: Any) -> None:
    h = await start_daemon(environment="production")
    status, reply = await h.api("POST", "/v1/webhooks", {"url": "http://example.com/hook"})
    assert status == 400 and "https" in reply["error"]
    status, _ = await h.api("POST", "/v1/webhooks", {"url": "https://example.com/hook"})
    assert status == 201


async def test_unknown_ids_are_404(start_daemon: Any) -> None:
    h = await start_daemon()
    for method, path in [
        ("GET", "/v1/webhooks/wh_nope"),
        ("PATCH", "/v1/webhooks/wh_nope"),
        ("DELETE", "/v1/webhooks/wh_nope"),
        ("POST", "/v1/webhooks/wh_nope/enable"),
        ("POST", "/v1/webhooks/wh_nope/test"),
        ("GET", "/v1/deliveries/999"),
        ("GET", "/v1/deliveries/abc"),
        ("POST", "/v1/deliveries/999/retry"),
    ]:
        status, body = await h.api(method, path)
        assert status == 404, (method, path)
        assert body["error"]


async def test_status_and_delivery_filters(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    a = await h.create_webhook(receiver.url)
    b = await h.create_webhook(receiver.url)
    await h.api("POST", f"/v1/webhooks/{b['id']}/disable")
    await h.submit(*[event("delivered", i) for i in range(3)])
    await receiver.wait_for(3)

    async def counts() -> Any:
        _, st = await h.api("GET", "/v1/status")
        return st if st["deliveries"]["succeeded"] == 3 else None

    from tests.conftest import eventually

    st = await eventually(counts)
    assert st["deliveries"] == {"pending": 0, "paused": 3, "succeeded": 3, "failed": 0}
    assert st["webhooks"] == {"enabled": 1, "disabled": 1}
    assert len(await h.deliveries(webhook_id=a["id"])) == 3
    assert len(await h.deliveries(status="paused")) == 3
    assert len(await h.deliveries(limit=2)) == 2
    status, body = await h.api("GET", "/v1/deliveries?status=bogus")
    assert status == 400 and "bogus" in body["error"]
    _, hz = await h.api("GET", "/healthz")
    assert hz == {"ok": True}


async def test_replay_requeues_failed_deliveries_since_a_time(start_daemon: Any, make_receiver: Any) -> None:
    from tests.conftest import eventually

    receiver = await make_receiver(default=500)
    h = await start_daemon(delivery={"max_attempts": 1, "disable_after": 100})
    hook = await h.create_webhook(receiver.url)
    await h.submit(*[event("delivered", i) for i in range(3)])

    async def all_failed() -> bool:
        return [d["status"] for d in await h.deliveries()] == ["failed"] * 3

    await eventually(all_failed)
    receiver.default = 200
    status, body = await h.api("POST", f"/v1/webhooks/{hook['id']}/replay",
                               {"since": "2020-01-01T00:00:00Z", "status": ["failed"]})
    assert status == 200 and body["replayed"] == 3

    async def all_succeeded() -> bool:
        return [d["status"] for d in await h.deliveries()] == ["succeeded"] * 3

    await eventually(all_succeeded)
    status, body = await h.api("POST", f"/v1/webhooks/{hook['id']}/replay", {"since": "2999-01-01T00:00:00Z"})
    assert body["replayed"] == 0
    status, body = await h.api("POST", f"/v1/webhooks/{hook['id']}/replay", {"since": "yesterday"})
    assert status == 400 and "since" in body["error"]
    status, body = await h.api("POST", f"/v1/webhooks/{hook['id']}/replay",
                               {"since": "2020-01-01T00:00:00Z", "status": ["pending"]})
    assert status == 400


def test_cli_since_accepts_a_duration_ago() -> None:
    import time

    from webhookd.cli import _since

    assert _since("2026-02-23T10:00:00Z") == "2026-02-23T10:00:00Z"
    two_hours_ago = time.strftime("%Y-%m-%dT%H", time.gmtime(time.time() - 7200))
    assert _since("2h").startswith(two_hours_ago)


EMPTY = {"from_domains": [], "to_domains": [], "tags": [], "metadata": {}}


async def test_webhook_filters_through_the_api(start_daemon: Any) -> None:
    h = await start_daemon()
    status, plain = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/plain"})
    assert status == 201 and plain["filter"] == EMPTY  # every webhook shows its filter, empty or not
    wanted = {"from_domains": ["Shop.Example", "*.shop.example"], "tags": ["vip"], "metadata": {"plan": "gold"}}
    status, made = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/f", "filter": wanted})
    assert status == 201, made
    stored = {"from_domains": ["shop.example", "*.shop.example"], "to_domains": [], "tags": ["vip"],
              "metadata": {"plan": "gold"}}
    assert made["filter"] == stored  # normalised
    wid = made["id"]
    status, listed = await h.api("GET", "/v1/webhooks")
    assert [w["filter"] for w in listed["webhooks"]] == [EMPTY, stored]
    assert (await h.webhook(wid))["filter"] == stored

    # PATCH replaces the whole filter; other fields leave it alone
    status, updated = await h.api("PATCH", f"/v1/webhooks/{wid}", {"filter": {"to_domains": ["gmail.example"]}})
    assert status == 200 and updated["filter"] == {**EMPTY, "to_domains": ["gmail.example"]}
    status, updated = await h.api("PATCH", f"/v1/webhooks/{wid}", {"description": "renamed"})
    assert updated["filter"] == {**EMPTY, "to_domains": ["gmail.example"]}
    for clear in (None, {}):
        await h.api("PATCH", f"/v1/webhooks/{wid}", {"filter": {"tags": ["x"]}})
        status, cleared = await h.api("PATCH", f"/v1/webhooks/{wid}", {"filter": clear})
        assert status == 200 and cleared["filter"] == EMPTY
    await h.api("PATCH", f"/v1/webhooks/{wid}", {"filter": wanted})
    await h.close()
    h2 = await start_daemon()  # stored
    assert (await h2.webhook(wid))["filter"] == stored


async def test_filter_validation_errors_name_the_field(start_daemon: Any) -> None:
    h = await start_daemon()
    cases = [
        ({"from_domains": ["not a domain"]}, "filter.from_domains[0]: 'not a domain' is not a domain name"),
        ({"from_domains": "shop.example"}, "filter.from_domains must be a list of domain names"),
        ({"from_domains": [f"d{i}.example" for i in range(101)]}, "filter.from_domains: at most 100 domains, got 101"),
        ({"tags": ["ok", ""]}, "filter.tags[1] must be a non-empty string"),
        ({"metadata": {"order_id": 12345}}, "filter.metadata.order_id: the value must be a string"),
        ({"sender": ["shop.example"]}, "filter: unknown field 'sender'"),
        (["shop.example"], "filter must be an object"),
    ]
    status, hook = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/x"})
    for bad, message in cases:
        status, body = await h.api("POST", "/v1/webhooks", {"url": "https://hooks.example.com/x", "filter": bad})
        assert (status, body["error"][:len(message)]) == (400, message), bad
        status, body = await h.api("PATCH", f"/v1/webhooks/{hook['id']}", {"filter": bad})
        assert (status, body["error"][:len(message)]) == (400, message), bad
    assert (await h.webhook(hook["id"]))["filter"] == EMPTY  # nothing half-applied
    status, listed = await h.api("GET", "/v1/webhooks")
    assert len(listed["webhooks"]) == 1
