"""Finding deliveries through a real daemon: filters, keyset pages, message id and recipient
search, over the admin API and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import Harness, event, eventually
from tests.test_cli_daemon import Cli, MakeReceiver, StartDaemon, write_config


@pytest.fixture
async def h(start_daemon: StartDaemon) -> Harness:
    return await start_daemon()


@pytest.fixture
def cli(h: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(write_config(tmp_path / "cli.toml", h.config.state_dir, h.config.runtime_dir), capsys)


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
