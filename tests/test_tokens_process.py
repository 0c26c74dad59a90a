"""Scoped API tokens through the real `webhookd serve` process: the CLI makes a token per
tenant (printed once), two tenants' filtered webhooks get events, and over admin.http_listen
each token sees only its own webhooks and deliveries, over the API and in the dashboard;
the other tenant's ids answer exactly as ids that do not exist; tokens list shows the last
use; a revoked token is refused."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import Receiver, eventually
from tests.test_filters_process import cli, ev, submit
from tests.test_process import Proc
from tests.test_tokens import GHOST_DLV, GHOST_WH, Http, same_but_ids
from tests.test_ui import login_csrf

ADMIN_TOKEN = "process-admin-token-0123456789"
MakeReceiver = Callable[..., Awaitable[Receiver]]


async def test_two_tenants_each_see_only_their_own_through_the_real_process(
    proc: Callable[..., Proc], make_receiver: MakeReceiver
) -> None:
    d = proc()
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d.write_config(tables=f'[admin]\nhttp_listen = "127.0.0.1:{port}"\ntoken = "{ADMIN_TOKEN}"\n')
    await asyncio.to_thread(d.start)
    shop_r, other_r = await make_receiver(), await make_receiver()
    shop = await cli(d, "webhooks", "create", "--url", shop_r.url, "--from-domain", "shop.example,*.shop.example")
    other = await cli(d, "webhooks", "create", "--url", other_r.url, "--from-domain", "other.example")
    await cli(d, "webhooks", "create", "--url", shop_r.url)  # unfiltered: the admin's only

    printed = await asyncio.to_thread(d.cli, "tokens", "create", "--domains", "shop.example,*.shop.example",
                                      "--description", "shop panel")
    assert printed.returncode == 0, printed.stderr
    shop_token = printed.stdout.decode().splitlines()[0]
    assert re.fullmatch(r"wht_[A-Za-z0-9_-]{43}", shop_token) and "shown once" in printed.stdout.decode()
    other_made = await cli(d, "tokens", "create", "--domains", "other.example", "--read-only")
    assert other_made["read_only"] is True
    a, b = Http(port, shop_token), Http(port, other_made["token"])

    await submit(d, [ev("s1", "orders@shop.example"), ev("o1", "news@other.example"),
                     ev("s2", "orders@eu.shop.example"), ev("o2", "news@other.example")])

    async def delivered() -> bool:
        return len(shop_r.requests) >= 4 and len(other_r.requests) >= 2  # s1, s2 twice: filtered + unfiltered

    await eventually(delivered, timeout=30, what="every delivery")
    mine = {"a": (a, shop["id"]), "b": (b, other["id"])}
    dlv: dict[str, list[str]] = {}
    for name, (http, wid) in mine.items():
        status, listed = await http.call("GET", "/v1/webhooks")
        assert status == 200 and [w["id"] for w in listed["webhooks"]] == [wid], name
        status, found = await http.call("GET", f"/v1/deliveries?webhook_id={wid}")
        assert status == 200 and {x["webhook_id"] for x in found["deliveries"]} == {wid}
        dlv[name] = [x["id"] for x in found["deliveries"]]
        assert len(dlv[name]) == 2
        assert (await http.call("GET", f"/v1/deliveries/{dlv[name][0]}"))[0] == 200
    for me, them in (("a", "b"), ("b", "a")):
        http = mine[me][0]
        their_wh = mine[them][1]
        for path, ghost in [(f"/v1/webhooks/{their_wh}", f"/v1/webhooks/{GHOST_WH}"),
                            (f"/v1/webhooks/{their_wh}/secret", f"/v1/webhooks/{GHOST_WH}/secret"),
                            (f"/v1/deliveries/{dlv[them][0]}", f"/v1/deliveries/{GHOST_DLV}"),
                            (f"/v1/deliveries?webhook_id={their_wh}", f"/v1/deliveries?webhook_id={GHOST_WH}")]:
            got, expected = await http.raw("GET", path), await http.raw("GET", ghost)
            refused = 403 if me == "b" and path.endswith("/secret") else 404  # b is read-only: no secrets at all
            assert got[0] == expected[0] == refused, (me, path, got)
            assert same_but_ids(got[1], their_wh, dlv[them][0]) == same_but_ids(expected[1], GHOST_WH, GHOST_DLV)
        for path in ("/v1/status", "/metrics", "/v1/stats", "/v1/tokens"):
            assert await http.raw("GET", path) == (404, b'{"error":"Not Found"}'), path
    status, body = await b.call("POST", f"/v1/webhooks/{other['id']}/disable")
    assert (status, body) == (403, {"error": "this token is read-only"})
    status, body = await a.call("POST", f"/v1/webhooks/{shop['id']}/disable")
    assert status == 200 and body["enabled"] is False
    assert (await a.call("POST", f"/v1/webhooks/{other['id']}/disable"))[0] == 404
    assert (await cli(d, "webhooks", "show", other["id"]))["enabled"] is True

    async def last_used() -> Any:
        listed = (await cli(d, "tokens", "list"))["tokens"]
        return listed if all(t["last_used_at"] for t in listed) else None

    listed = await eventually(last_used, timeout=15, what="last use recorded")
    assert [t["description"] for t in listed] == ["shop panel", ""]
    table = await asyncio.to_thread(d.cli, "tokens", "list")
    assert b"shop panel" in table.stdout and b"LAST USED" in table.stdout and shop_token.encode() not in table.stdout

    # the dashboard: each token's session sees only its own
    ui = f"http://127.0.0.1:{port}/ui"
    form_headers = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    for http, wid, their, their_dlv in ((a, shop["id"], other["id"], dlv["b"][0]),
                                        (b, other["id"], shop["id"], dlv["a"][0])):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(f"{ui}/login") as r:
                page = await r.text()
            async with s.post(f"{ui}/login", allow_redirects=False, headers=form_headers,
                              data={"token": str(http.token), "csrf": login_csrf(page)}) as r:
                assert r.status == 303, await r.text()
            async with s.get(f"{ui}/webhooks", allow_redirects=False) as r:
                text = await r.text()
                assert r.status == 200 and wid in text and their not in text
            async with s.get(f"{ui}/webhooks/{wid}", allow_redirects=False) as r:
                assert r.status == 200
            for path in (f"/webhooks/{their}", f"/deliveries/{their_dlv}", f"/deliveries?webhook_id={their}"):
                async with s.get(ui + path, allow_redirects=False) as r:
                    assert r.status == 404, path
            async with s.get(f"{ui}/deliveries?webhook_id={wid}", allow_redirects=False) as r:
                assert r.status == 200 and dlv["a" if http is a else "b"][0] in await r.text()

    revoked = await asyncio.to_thread(d.cli, "tokens", "revoke", other_made["id"])
    assert revoked.returncode == 0 and f"revoked {other_made['id']}".encode() in revoked.stdout
    assert (await b.call("GET", "/v1/webhooks"))[0] == 401
    assert (await a.call("GET", "/v1/webhooks"))[0] == 200
