"""Finding deliveries through a real daemon: filters, keyset pages, message id and recipient
search, over the admin API and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import Harness, event, eventually
from tests.test_cli_daemon import Cli, MakeReceiver, StartDaemon, cli, h, quiet_daemon_logs, write_config

# fixtures shared with the CLI tests: `h` (a daemon), `cli`, and the autouse `quiet_daemon_logs`
__all__ = ["cli", "h", "quiet_daemon_logs"]


async def listed(h: Harness, query: str, expect: int = 200) -> Any:
    status, body = await h.api("GET", f"/v1/deliveries?{query}")
    assert status == expect, body
    return body


async def settled(h: Harness, receiver: Any, n: int) -> None:
    await receiver.wait_for(n)

    async def done() -> bool:
        return len((await listed(h, "status=succeeded&limit=1000"))["deliveries"]) == n

    await eventually(done)


async def test_filters_and_search(h: Harness, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    hook = await h.create_webhook(receiver.url)
    other = await h.create_webhook(receiver.url, ["bounced"])
    await h.submit(*[event("delivered", i) for i in range(6)], event("bounced", 3), event("bounced", 7))
    await settled(h, receiver, 10)  # 8 to the first webhook, 2 to the second

    by_msg = (await listed(h, "message_id=" + quote("<msg-3@mail.example.com>")))["deliveries"]
    assert sorted((d["event"], d["webhook_id"]) for d in by_msg) == sorted(
        [("delivered", hook["id"]), ("bounced", hook["id"]), ("bounced", other["id"])]
    )
    assert {d["message_id"] for d in by_msg} == {"<msg-3@mail.example.com>"}

    by_to = (await listed(h, "to=" + quote("CUSTOMER7@example.org")))["deliveries"]  # case does not matter
    assert [(d["event"], d["to"]) for d in by_to] == [("bounced", "customer7@example.org")] * 2

    only = (await listed(h, f"webhook_id={other['id']}&event=bounced"))["deliveries"]
    assert len(only) == 2 and {d["webhook_id"] for d in only} == {other["id"]}
    assert (await listed(h, "event=bounced&status=pending,paused"))["deliveries"] == []
    assert len((await listed(h, "status=succeeded,failed"))["deliveries"]) == 10
    assert (await listed(h, "until=2000-01-01T00:00:00Z"))["deliveries"] == []
    assert len((await listed(h, "since=2000-01-01T00:00:00Z"))["deliveries"]) == 10
    assert (await listed(h, "message_id=nothing-like-it"))["deliveries"] == []


async def test_keyset_pages_walk_every_delivery_once(h: Harness, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    await h.create_webhook(receiver.url)
    await h.submit(*[event("delivered", i) for i in range(23)])
    await settled(h, receiver, 23)
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        page = await listed(h, "limit=5" + (f"&before={cursor}" if cursor else ""))
        seen.extend(d["id"] for d in page["deliveries"])
        if page["next_before"] is None:
            break
        cursor = page["next_before"]
    assert len(seen) == 23 == len(set(seen))
    numbers = [int(i.removeprefix("dlv_")) for i in seen]
    assert numbers == sorted(numbers, reverse=True)  # newest first, across pages


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=bogus", "unknown status 'bogus'"),
        ("event=opened2", "unknown event 'opened2'"),
        ("since=yesterday", "since: "),
        ("until=2026-13-01T00:00:00Z", "until: "),
        ("before=dlv_x", "before must be a delivery id"),
        ("before=1%20OR%201=1", "before must be a delivery id"),
        ("limit=0", "limit must be between"),
    ],
)
async def test_bad_filters_are_clear_errors(h: Harness, query: str, message: str) -> None:
    body = await listed(h, query, expect=400)
    assert message in body["error"]


async def test_hostile_search_text_is_data(h: Harness, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    await h.create_webhook(receiver.url)
    nasty = "<x'); DROP TABLE deliveries; --@evil>"
    await h.submit(event("delivered", 1, message_id=nasty, to="a%_@example.org"), event("delivered", 2))
    await settled(h, receiver, 2)
    [found] = (await listed(h, "message_id=" + quote(nasty)))["deliveries"]
    assert found["message_id"] == nasty
    # LIKE wildcards are not wildcards: the recipient match is exact (case aside)
    assert (await listed(h, "to=" + quote("%")))["deliveries"] == []
    assert len((await listed(h, "to=" + quote("A%_@example.org")))["deliveries"]) == 1
    assert len((await listed(h, ""))["deliveries"]) == 2  # the table is still there


async def test_cli_search_and_pages(cli: Cli, h: Harness, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    await h.create_webhook(receiver.url)
    await h.submit(*[event("delivered", i) for i in range(4)])
    await settled(h, receiver, 4)
    r = await cli.ok("deliveries", "list", "--message-id", "<msg-2@mail.example.com>", "--json")
    [d] = r.json["deliveries"]
    assert d["to"] == "customer2@example.org"
    r = await cli.ok("deliveries", "list", "--to", "customer1@example.org", "--event", "delivered",
                     "--since", "1h", "--json")
    assert [d["message_id"] for d in r.json["deliveries"]] == ["<msg-1@mail.example.com>"]
    first = await cli.ok("deliveries", "list", "--limit", "3")
    assert first.lines[-1].startswith("more: --before dlv_")
    cursor = first.lines[-1].split()[-1]
    rest = await cli.ok("deliveries", "list", "--before", cursor, "--json")
    assert len(rest.json["deliveries"]) == 1 and rest.json["next_before"] is None


async def _equals(get: Any, expected: Any) -> bool:
    return bool(await get() == expected)


async def failing_deliveries(h: Harness, make_receiver: MakeReceiver) -> tuple[Any, dict[str, Any]]:
    """A webhook whose receiver refused everything: 3 failed deliveries (max_attempts 1)."""
    receiver = await make_receiver(default=500)
    hook = await h.create_webhook(receiver.url)
    await h.submit(event("delivered", 1), event("bounced", 2), event("delivered", 3))

    async def failed() -> bool:
        return len((await listed(h, "status=failed"))["deliveries"]) == 3

    await eventually(failed)
    return receiver, hook


@pytest.fixture
async def h1(start_daemon: StartDaemon) -> Harness:
    return await start_daemon(delivery={"max_attempts": 1, "disable_after": 100})


@pytest.fixture
def cli1(h1: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(write_config(tmp_path / "cli.toml", h1.config.state_dir, h1.config.runtime_dir), capsys)


async def test_count_and_retry_failed_matching_filters(cli1: Cli, h1: Harness, make_receiver: MakeReceiver) -> None:
    receiver, _hook = await failing_deliveries(h1, make_receiver)
    assert (await cli1.ok("deliveries", "count", "--status", "failed", "--event", "delivered")).out == "2\n"
    status, body = await h1.api("GET", "/v1/deliveries/count?status=failed&event=bounced")
    assert (status, body) == (200, {"count": 1})
    receiver.default = 200
    r = await cli1.ok("deliveries", "retry-failed", "--event", "delivered", "--json")
    assert r.json == {"retried": 2}
    await receiver.wait_for(3 + 2)

    async def succeeded() -> list[str]:
        return sorted(d["event"] for d in (await listed(h1, "status=succeeded"))["deliveries"])

    await eventually(lambda: _equals(succeeded, ["delivered", "delivered"]))
    assert (await listed(h1, "status=failed"))["deliveries"][0]["event"] == "bounced"
    status, body = await h1.api("POST", "/v1/deliveries/retry-failed", {"status": "pending"})
    assert status == 400 and "unknown field 'status'" in body["error"]


async def test_stats_and_replay_dry_run(cli1: Cli, h1: Harness, make_receiver: MakeReceiver) -> None:
    _receiver, hook = await failing_deliveries(h1, make_receiver)
    status, stats = await h1.api("GET", "/v1/stats")
    assert status == 200 and stats["deliveries"]["failed"] == 3
    [w] = stats["webhooks"]
    assert (w["id"], w["failed_24h"], w["succeeded_24h"], w["last_status_code"]) == (hook["id"], 3, 0, 500)
    assert w["success_rate_24h"] == 0.0 and w["pending"] == 0
    assert sum(hr["failed"] for hr in stats["hourly"]) == 3
    table = (await cli1.ok("stats")).out
    assert hook["id"] in table and "0%" in table
    dry = await cli1.ok("webhooks", "replay", hook["id"], "--since", "1h", "--dry-run")
    assert dry.out.startswith("3 deliveries of") and "nothing was changed" in dry.out
    assert len((await listed(h1, "status=failed"))["deliveries"]) == 3  # really nothing changed


async def test_dashboard_link_needs_the_dashboard(cli: Cli, h: Harness) -> None:
    h.daemon.admin.login_link = None
    r = await cli("dashboard")
    assert r.code != 0 and "dashboard is disabled" in r.err
