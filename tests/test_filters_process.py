"""Filters end to end, through the real `webhookd serve` process: two tenants' webhooks
(shop.example with its subdomains, other.example without), a tag/metadata webhook and an
unfiltered one, each with a real aiohttp receiver; interleaved events over the intake
socket reach exactly the receivers whose filters match them, and a filter changed with the
CLI applies to the events accepted after it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from tests.conftest import Receiver, eventually
from tests.test_process import Proc
from webhookd.signing import legacy_signature

MakeReceiver = Callable[..., Awaitable[Receiver]]


async def submit(d: Proc, events: list[dict[str, Any]]) -> list[str]:
    """Pipelined on one intake-socket connection, as an MTA hook does; the event ids."""
    reader, writer = await asyncio.open_unix_connection(str(d.run / "intake.sock"))
    writer.write(b"".join(orjson.dumps(e) + b"\n" for e in events))
    await writer.drain()
    writer.write_eof()
    answers = [orjson.loads(line) for line in (await asyncio.wait_for(reader.read(), 20)).splitlines()]
    writer.close()
    assert [a["ok"] for a in answers] == [True] * len(events), answers
    return [a["id"] for a in answers]


def ev(mid: str, sender: str | None, **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"message_id": f"<{mid}@mail.example>", "to": f"{mid}@customer.example", **data}
    if sender is not None:
        body["from"] = sender
    return {"event": "delivered", "data": body}


def got(r: Receiver) -> list[str]:
    return sorted(req.json["data"]["message_id"].strip("<>").split("@")[0] for req in r.requests)


async def until(predicate: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return predicate()

    await eventually(check, timeout=30, what=what)


async def cli(d: Proc, *args: str) -> Any:
    return await asyncio.to_thread(d.json, *args)


async def test_two_tenants_interleaved_each_receiver_gets_exactly_its_own(
    proc: Callable[..., Proc], make_receiver: MakeReceiver
) -> None:
    d = proc()
    await asyncio.to_thread(d.start)
    shop_r, other_r, vip_r, all_r = [await make_receiver() for _ in range(4)]
    shop = await cli(d, "webhooks", "create", "--url", shop_r.url, "--from-domain", "shop.example,*.shop.example",
                     "--description", "tenant shop")
    other = await cli(d, "webhooks", "create", "--url", other_r.url, "--from-domain", "other.example",
                      "--description", "tenant other")
    vip = await cli(d, "webhooks", "create", "--url", vip_r.url, "--events", "delivered,bounced",
                    "--tag", "vip", "--metadata", "plan=gold")
    await cli(d, "webhooks", "create", "--url", all_r.url)
    assert shop["filter"]["from_domains"] == ["shop.example", "*.shop.example"]

    events = [
        ev("s1", "orders@shop.example"),
        ev("o1", "Other Ltd <news@other.example>"),
        ev("s2", "Shop EU <orders@EU.Shop.Example>"),  # a subdomain, in capitals
        ev("o2", "news@mail.other.example"),  # other.example asked for no subdomains
        ev("s3", '"Shop, Inc." <a@x.y.shop.example>', tags=["vip"], metadata={"plan": "gold"}),
        ev("n1", "someone@notshop.example"),
        ev("v1", "x@nobody.example", tags=["order", "vip"], metadata={"plan": "gold", "id": "7"}),
        ev("v2", "x@nobody.example", tags=["vip"], metadata={"plan": 1}),  # a number is not "1", nor "gold"
        ev("n2", None),  # no data.from: no sender filter matches
        ev("n3", "garbage"),
        ev("o3", "news@other.example", tags=["vip"], metadata={"plan": "silver"}),
        {"event": "bounced", "data": {"message_id": "<v3@mail.example>", "from": "x@shop.example",
                                      "bounce_type": "hard", "tags": ["vip"], "metadata": {"plan": "gold"}}},
    ]
    for _ in range(2):  # interleaved, twice over: the second time on warm caches
        ids = await submit(d, events)
        assert len(set(ids)) == len(events)
    expected = {
        "shop": ["s1", "s2", "s3", "v3"] * 2, "other": ["o1", "o3"] * 2, "vip": ["s3", "v1", "v3"] * 2,
        "all": [e["data"]["message_id"].strip("<>").split("@")[0] for e in events] * 2,
    }
    receivers = {"shop": shop_r, "other": other_r, "vip": vip_r, "all": all_r}

    async def all_in() -> bool:
        return all(len(r.requests) >= len(expected[k]) for k, r in receivers.items())

    await eventually(all_in, timeout=30, what="every expected delivery")
    deliveries = (await cli(d, "deliveries", "list", "--limit", "1000"))["deliveries"]
    assert len(deliveries) == sum(len(v) for v in expected.values())  # nothing else was even created
    assert {x["status"] for x in deliveries} == {"succeeded"}
    for name, r in receivers.items():
        assert got(r) == sorted(expected[name]), name
    secret = (await cli(d, "webhooks", "secret", shop["id"]))["secret"]
    assert all(req.headers["X-Webhook-Signature"] == legacy_signature(secret, req.body) for req in shop_r.requests)

    # the other tenant moves to its subdomains only: events accepted from now on follow it
    changed = await cli(d, "webhooks", "update", other["id"], "--from-domain", "*.other.example")
    assert changed["filter"]["from_domains"] == ["*.other.example"] and changed["filter"]["tags"] == []
    before = len(other_r.requests)
    await submit(d, [ev("o4", "news@other.example"), ev("o5", "news@mail.other.example"),
                     ev("s4", "orders@shop.example")])
    # deliveries are made when an event is accepted: what the list holds now is final
    made = (await cli(d, "deliveries", "list", "--webhook", other["id"], "--limit", "1000"))["deliveries"]
    assert len(made) == before + 1
    await until(lambda: len(other_r.requests) == before + 1 and len(shop_r.requests) == len(expected["shop"]) + 1,
                "the events after the update")
    assert got(other_r) == sorted(expected["other"] + ["o5"])
    assert got(shop_r) == sorted(expected["shop"] + ["s4"])

    # and cleared: it gets everything again
    await cli(d, "webhooks", "update", other["id"], "--clear-filter")
    await submit(d, [ev("n4", "x@nobody.example")])
    await until(lambda: "n4" in got(other_r), "n4 at other")
    # the filters survive a restart
    d.stop()
    await asyncio.to_thread(d.start)
    listed = {h["id"]: h["filter"] for h in (await cli(d, "webhooks", "list"))["webhooks"]}
    assert listed[shop["id"]]["from_domains"] == ["shop.example", "*.shop.example"]
    assert listed[vip["id"]] == {"from_domains": [], "to_domains": [], "tags": ["vip"],
                                 "metadata": {"plan": "gold"}}
    assert listed[other["id"]] == {"from_domains": [], "to_domains": [], "tags": [], "metadata": {}}


def test_a_stored_filter_the_daemon_cannot_read_stops_it_with_one_line(proc: Callable[..., Proc]) -> None:
    d = proc().start()
    hook = d.json("webhooks", "create", "--url", "http://127.0.0.1:9/h", "--tag", "vip")
    d.stop()
    with sqlite3.connect(d.root / "state" / "webhookd.db") as conn:
        conn.execute("UPDATE webhooks SET filter = ? WHERE id = ?", (json.dumps({"tags": "vip"}), hook["id"]))
    conn.close()
    p = d.cli("serve")
    assert p.returncode == 1
    assert p.stderr.decode().strip().splitlines()[-1] == (
        f"webhookd: webhook {hook['id']}: its stored filter cannot be read (filter.tags must be a list of strings)"
    )
