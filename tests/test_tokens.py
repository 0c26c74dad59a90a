"""Scoped API tokens on the admin HTTP listener and the dashboard: hashing, revocation, last
use, and the key tests: every route of the admin app (and of the dashboard, with a session
of the token), called by tenant B against tenant A's webhook and delivery, answers exactly
what it answers for an id that does not exist, and no list holds A's data (the contract
tests for the storage verbs are in tests/storage_contract.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Harness, event, eventually, free_port
from tests.test_ui import UI, Clock, login_csrf
from webhookd.admin import ROUTES
from webhookd.store.model import ApiToken
from webhookd.tokens import PREFIX, TokenAuth, new_token, token_hash
from webhookd.ui.security import UI_ROUTES

ADMIN_TOKEN = "admin-token-0123456789abcdef"
StartDaemon = Callable[..., Awaitable[Harness]]


class Http:
    """Requests to the admin HTTP listener with one bearer token."""

    def __init__(self, port: int, token: str | None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    async def raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        data = orjson.dumps(body) if body is not None else None
        async with aiohttp.ClientSession() as s, s.request(method, self.base + path, data=data,
                                                           headers=headers) as resp:
            return resp.status, await resp.read()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, raw = await self.raw(method, path, body)
        return status, orjson.loads(raw) if raw else None


class Tenants:
    """A daemon with an admin HTTP listener, two tenants (A: shop.example, B: other.example),
    each with a filtered webhook and a delivery."""

    def __init__(self, h: Harness, port: int) -> None:
        self.h = h
        self.port = port
        self.admin = Http(port, ADMIN_TOKEN)

    async def token(self, domains: list[str], **kw: Any) -> tuple[Http, dict[str, Any]]:
        status, made = await self.admin.call("POST", "/v1/tokens", {"domains": domains, **kw})
        assert status == 201, made
        return Http(self.port, made["token"]), made

    async def webhook(self, domain: str) -> dict[str, Any]:
        status, hook = await self.h.api("POST", "/v1/webhooks", {
            "url": f"http://127.0.0.1:9/{domain}", "description": f"tenant {domain}",
            "filter": {"from_domains": [domain]}})
        assert status == 201, hook
        return dict(hook)


@pytest.fixture
async def tenants(start_daemon: StartDaemon) -> Tenants:
    port = free_port()
    h = await start_daemon(admin={"http_listen": f"127.0.0.1:{port}", "token": ADMIN_TOKEN},
                           tracking={"enabled": True, "listen": f"127.0.0.1:{free_port()}",
                                     "base_url": "https://t.example.com"})  # its /v1/tracking routes too
    return Tenants(h, port)


async def delivery_of(h: Harness, wid: str) -> str:
    async def made() -> Any:
        found = await h.deliveries(webhook_id=wid)
        return found[0]["id"] if found else None

    return str(await eventually(made, what="a delivery"))


def test_new_tokens_are_prefixed_high_entropy_and_stored_as_sha256() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for t in tokens:
        assert t.startswith(PREFIX) and re.fullmatch(r"wht_[A-Za-z0-9_-]{43}", t), t
    t = next(iter(tokens))
    assert token_hash(t) == __import__("hashlib").sha256(t.encode()).hexdigest()


async def test_tokens_are_made_listed_and_revoked_by_the_admin_and_only_their_hash_is_kept(
    tenants: Tenants,
) -> None:
    b, made = await tenants.token(["other.example"], description="panel B", read_only=True)
    assert made["domains"] == ["other.example"] and made["read_only"] is True and made["revoked_at"] is None
    rows = tenants.h.sql("SELECT hash, domains FROM api_tokens")
    assert rows == [(token_hash(str(b.token)), '["other.example"]')]
    db = tenants.h.config.storage.path.read_bytes()
    assert str(b.token).encode() not in db and str(b.token)[4:].encode() not in db
    status, listed = await tenants.admin.call("GET", "/v1/tokens")
    assert status == 200 and [t["id"] for t in listed["tokens"]] == [made["id"]]
    assert "token" not in listed["tokens"][0] and "hash" not in listed["tokens"][0]
    # over the Unix socket too (the CLI)
    status, listed = await tenants.h.api("GET", "/v1/tokens")
    assert status == 200 and len(listed["tokens"]) == 1

    assert (await b.call("GET", "/v1/webhooks"))[0] == 200
    status, revoked = await tenants.admin.call("DELETE", f"/v1/tokens/{made['id']}")
    assert status == 200 and revoked == {"revoked": made["id"]}
    status, body = await b.call("GET", "/v1/webhooks")
    assert status == 401 and body == {"error": "missing or wrong bearer token"}
    assert (await tenants.admin.call("DELETE", f"/v1/tokens/{made['id']}"))[0] == 404
    status, listed = await tenants.admin.call("GET", "/v1/tokens")
    assert listed["tokens"][0]["revoked_at"] is not None


@pytest.mark.parametrize("bad", [
    None, "", "Basic abc", "Bearer ", "Bearer wht_", "Bearer wht_" + "A" * 43, "Bearer " + ADMIN_TOKEN[:-1],
])
async def test_unknown_or_malformed_tokens_are_refused(tenants: Tenants, bad: str | None) -> None:
    await tenants.token(["other.example"])
    headers = {} if bad is None else {"Authorization": bad}
    async with aiohttp.ClientSession() as s, s.get(f"{tenants.admin.base}/v1/webhooks", headers=headers) as r:
        assert r.status == 401


async def test_token_creation_is_validated(tenants: Tenants) -> None:
    for body, word in [({}, "domains"), ({"domains": []}, "domains"), ({"domains": ["not a domain!"]}, "domains"),
                       ({"domains": ["a.example"], "read_only": "yes"}, "read_only"),
                       ({"domains": ["a.example"], "colour": 1}, "colour")]:
        status, reply = await tenants.admin.call("POST", "/v1/tokens", body)
        assert status == 400 and word in reply["error"], (body, reply)


async def test_last_use_is_written_at_most_once_a_minute_per_token(tenants: Tenants) -> None:
    b, made = await tenants.token(["other.example"])
    auth: TokenAuth = tenants.h.daemon.admin.tokens
    now = [1_800_000_000.0]
    auth.clock = lambda: now[0]
    storage = auth.storage
    writes: list[list[tuple[str, float]]] = []
    real = storage.touch_tokens

    def counting(used: Any) -> Any:
        writes.append(list(used))
        return real(used)

    auth.storage.touch_tokens = counting  # type: ignore[method-assign]
    for _ in range(20):
        assert (await b.call("GET", "/v1/webhooks"))[0] == 200
    await auth.drain()
    assert writes == [[(made["id"], now[0])]]
    now[0] += 30
    assert (await b.call("GET", "/v1/webhooks"))[0] == 200
    await auth.drain()
    assert len(writes) == 1
    now[0] += 31
    assert (await b.call("GET", "/v1/webhooks"))[0] == 200
    await auth.drain()
    assert writes[-1] == [(made["id"], now[0])] and len(writes) == 2
    _status, listed = await tenants.admin.call("GET", "/v1/tokens")
    assert listed["tokens"][0]["last_used_at"] == "2027-01-15T08:01:01Z"


def _app_routes(tenants: Tenants) -> list[tuple[str, str]]:
    app = tenants.h.daemon.admin.app(token=ADMIN_TOKEN)
    out = []
    for resource in app.router.resources():
        canonical = resource.canonical
        if canonical.startswith("/ui"):
            continue  # the dashboard: its own log-in (tests/test_ui.py)
        for route in resource:
            if route.method != "HEAD":
                out.append((route.method, canonical))
    return out


async def test_every_route_of_the_admin_app_is_classified(tenants: Tenants) -> None:
    """A new route must be added to admin.ROUTES (and to ATTACKS below) or this fails."""
    routes = _app_routes(tenants)
    assert routes, "no routes found"
    assert ("POST", "/v1/tracking/sign") in routes and ("GET", "/v1/webhooks/{id}") in routes
    missing = [r for r in routes if r not in ROUTES]
    assert not missing, f"routes without a scope in webhookd.admin.ROUTES: {missing}"
    untested = [r for r in routes if r not in ATTACKS]
    assert not untested, f"routes not exercised by the tenant test: {untested}"


SINCE = {"since": "2020-01-01T00:00:00Z", "status": ["failed", "succeeded", "paused"]}
# per route: the body B sends (what would change A's webhook if B were let through)
ATTACKS: dict[tuple[str, str], Any] = {
    ("GET", "/healthz"): None,
    ("GET", "/metrics"): None,
    ("GET", "/v1/status"): None,
    ("GET", "/v1/stats"): None,
    ("POST", "/v1/dashboard/links"): None,
    ("POST", "/v1/tokens"): {"domains": ["shop.example"]},
    ("GET", "/v1/tokens"): None,
    ("DELETE", "/v1/tokens/{id}"): None,
    ("GET", "/v1/tracking"): None,
    ("POST", "/v1/tracking/sign"): {},
    ("PUT", "/v1/tracking/opt-outs/{address}"): None,
    ("DELETE", "/v1/tracking/opt-outs/{address}"): None,
    ("POST", "/v1/webhooks"): {"url": "http://127.0.0.1:9/x", "filter": {"from_domains": ["shop.example"]}},
    ("GET", "/v1/webhooks"): None,
    ("GET", "/v1/webhooks/{id}"): None,
    ("PATCH", "/v1/webhooks/{id}"): {"description": "taken over", "filter": {"from_domains": ["other.example"]}},
    ("DELETE", "/v1/webhooks/{id}"): None,
    ("POST", "/v1/webhooks/{id}/enable"): {"drop_backlog": True},
    ("POST", "/v1/webhooks/{id}/disable"): None,
    ("POST", "/v1/webhooks/{id}/test"): None,
    ("POST", "/v1/webhooks/{id}/rotate-secret"): None,
    ("POST", "/v1/webhooks/{id}/replay"): SINCE,
    ("GET", "/v1/webhooks/{id}/secret"): None,
    ("GET", "/v1/deliveries"): None,
    ("GET", "/v1/deliveries/count"): None,
    ("POST", "/v1/deliveries/retry-failed"): {},
    ("GET", "/v1/deliveries/{id}"): None,
    ("POST", "/v1/deliveries/{id}/retry"): None,
}
WITH_WEBHOOK_ID = {("GET", "/v1/deliveries"), ("GET", "/v1/deliveries/count"), ("POST", "/v1/deliveries/retry-failed")}
NOT_FOUND = b'{"error":"Not Found"}'
GHOST_WH, GHOST_DLV = "wh_01jzzzzzzzzzzzzzzzzzzzzzzz", "dlv_99999999"


def same_but_ids(raw: bytes, webhook_id: str, delivery_id: str) -> bytes:
    """A reply with the ids the request itself named replaced by placeholders."""
    return raw.replace(webhook_id.encode(), b"<WH>").replace(delivery_id.encode(), b"<DLV>")


async def test_tenant_b_cannot_reach_anything_of_tenant_a_through_any_route(tenants: Tenants) -> None:
    h = tenants.h
    a_hook, b_hook = await tenants.webhook("shop.example"), await tenants.webhook("other.example")
    await h.submit(event(n=1, **{"from": "orders@shop.example"}), event(n=2, **{"from": "news@other.example"}))
    a_dlv, b_dlv = await delivery_of(h, a_hook["id"]), await delivery_of(h, b_hook["id"])
    b, b_made = await tenants.token(["other.example", "*.other.example"])
    _a, a_made = await tenants.token(["shop.example"])
    a_secret = (await h.api("GET", f"/v1/webhooks/{a_hook['id']}/secret"))[1]["secret"]
    a_marks = [a_hook["id"], a_dlv, a_secret, "shop.example", a_made["id"]]
    routes = _app_routes(tenants)

    def concrete(path: str, webhook_id: str, delivery_id: str) -> str:
        if path.startswith("/v1/deliveries/"):
            return path.replace("{id}", delivery_id)
        if path.startswith("/v1/tokens/"):
            return path.replace("{id}", a_made["id"])
        return path.replace("{id}", webhook_id).replace("{address}", "someone@shop.example")

    for method, path in routes:
        kind = ROUTES[(method, path)]
        body = ATTACKS[(method, path)]
        real = concrete(path, a_hook["id"], a_dlv)
        status, raw = await b.raw(method, real, body)
        text = raw.decode()
        if kind == "admin":
            assert (status, raw) == (404, NOT_FOUND), (method, path, status, text)
            continue
        if "{" in path:  # A's id answers exactly as an id that does not exist (its own id echoed)
            ghost = concrete(path, GHOST_WH, GHOST_DLV)
            ghost_status, ghost_raw = await b.raw(method, ghost, body)
            assert status == ghost_status == 404, (method, path, status, text)
            assert same_but_ids(raw, a_hook["id"], a_dlv) == same_but_ids(ghost_raw, GHOST_WH, GHOST_DLV), (
                method, path, text, ghost_raw)
            text = same_but_ids(raw, a_hook["id"], a_dlv).decode()
        assert not any(m in text for m in a_marks), (method, path, text)
        if (method, path) in WITH_WEBHOOK_ID:
            if method == "GET":
                got = await b.raw(method, f"{path}?webhook_id={a_hook['id']}")
                ghost_got = await b.raw(method, f"{path}?webhook_id={GHOST_WH}")
            else:
                got = await b.raw(method, path, {"webhook_id": a_hook["id"]})
                ghost_got = await b.raw(method, path, {"webhook_id": GHOST_WH})
            assert got[0] == ghost_got[0] == 404, (method, path, got)
            assert same_but_ids(got[1], a_hook["id"], a_dlv) == same_but_ids(ghost_got[1], GHOST_WH, GHOST_DLV)
            assert status == 400 and b"webhook_id is required" in raw, (method, path, text)  # no webhook named

    # nothing of A's changed, and B's own webhook and delivery are still B's to use
    shown = await h.webhook(a_hook["id"])
    assert shown["description"] == "tenant shop.example" and shown["enabled"] is True
    assert shown["filter"]["from_domains"] == ["shop.example"]
    assert (await h.api("GET", f"/v1/webhooks/{a_hook['id']}/secret"))[1]["secret"] == a_secret
    assert [w["description"] for w in (await h.api("GET", "/v1/webhooks"))[1]["webhooks"]] == [
        "tenant shop.example", "tenant other.example"]
    assert (await h.api("GET", "/v1/tokens"))[1]["tokens"][1]["revoked_at"] is None
    status, listed = await b.call("GET", "/v1/webhooks")
    assert [w["id"] for w in listed["webhooks"]] == [b_hook["id"]]
    status, listed = await b.call("GET", f"/v1/deliveries?webhook_id={b_hook['id']}")
    assert status == 200 and [d["id"] for d in listed["deliveries"]] == [b_dlv]
    assert (await b.call("GET", f"/v1/deliveries/{b_dlv}"))[0] == 200
    assert (await b.call("GET", f"/v1/deliveries/count?webhook_id={b_hook['id']}"))[1] == {"count": 1}
    assert (await b.call("GET", f"/v1/webhooks/{b_hook['id']}/secret"))[0] == 200
    assert b_made["domains"] == ["other.example", "*.other.example"]


async def test_a_scoped_token_creates_and_updates_only_within_its_domains(tenants: Tenants) -> None:
    b, _ = await tenants.token(["other.example", "*.other.example"])
    url = "http://127.0.0.1:9/b"
    for filter_ in [None, {}, {"tags": ["x"]}, {"from_domains": ["shop.example"]},
                    {"from_domains": ["other.example", "shop.example"]}, {"from_domains": ["*.example"]}]:
        status, reply = await b.call("POST", "/v1/webhooks", {"url": url, "filter": filter_})
        assert status == 403 and "within its domains (other.example, *.other.example)" in reply["error"], filter_
    assert tenants.h.sql("SELECT count(*) FROM webhooks") == [(0,)]
    status, made = await b.call("POST", "/v1/webhooks", {
        "url": url, "filter": {"from_domains": ["eu.other.example", "other.example"], "tags": ["t"]}})
    assert status == 201 and made["secret"].startswith("whsec_")
    status, reply = await b.call("PATCH", f"/v1/webhooks/{made['id']}", {"filter": {}})
    assert status == 403
    status, reply = await b.call("PATCH", f"/v1/webhooks/{made['id']}", {"filter": {"from_domains": ["x.example"]}})
    assert status == 403
    status, reply = await b.call("PATCH", f"/v1/webhooks/{made['id']}", {"description": "mine"})
    assert status == 200 and reply["filter"]["from_domains"] == ["eu.other.example", "other.example"]
    status, reply = await b.call("PATCH", f"/v1/webhooks/{made['id']}", {"filter": {"from_domains": ["other.example"]}})
    assert status == 200
    assert (await b.call("DELETE", f"/v1/webhooks/{made['id']}"))[0] == 200


async def test_a_read_only_token_reads_its_own_and_is_refused_every_write(tenants: Tenants) -> None:
    h = tenants.h
    b_hook = await tenants.webhook("other.example")
    await h.submit(event(n=2, **{"from": "news@other.example"}))
    b_dlv = await delivery_of(h, b_hook["id"])
    ro, _ = await tenants.token(["other.example"], read_only=True)
    for method, path in _app_routes(tenants):
        kind = ROUTES[(method, path)]
        if kind != "write":
            continue
        real = path.replace("{id}", b_dlv if path.startswith("/v1/deliveries/") else b_hook["id"])
        status, body = await ro.call(method, real, ATTACKS[(method, path)])
        assert (status, body) == (403, {"error": "this token is read-only"}), (method, path)
    assert (await ro.call("GET", "/v1/webhooks"))[1]["webhooks"][0]["id"] == b_hook["id"]
    assert (await ro.call("GET", f"/v1/webhooks/{b_hook['id']}"))[0] == 200
    assert (await ro.call("GET", f"/v1/deliveries/{b_dlv}"))[0] == 200
    assert (await ro.call("GET", f"/v1/deliveries?webhook_id={b_hook['id']}"))[0] == 200
    shown = await h.webhook(b_hook["id"])
    assert shown["enabled"] is True and shown["description"] == "tenant other.example"


async def test_the_admin_token_and_the_unix_socket_keep_full_rights(tenants: Tenants) -> None:
    a_hook = await tenants.webhook("shop.example")
    plain = (await tenants.h.api("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/all"}))[1]
    for who in (tenants.admin.call, tenants.h.api):
        _status, listed = await who("GET", "/v1/webhooks")
        assert {w["id"] for w in listed["webhooks"]} == {a_hook["id"], plain["id"]}
        assert (await who("GET", "/v1/status"))[0] == 200
        assert (await who("GET", "/v1/stats"))[0] == 200
        assert (await who("GET", "/v1/deliveries"))[0] == 200
        assert (await who("GET", f"/v1/webhooks/{plain['id']}/secret"))[0] == 200


# -- the dashboard with a scoped token's session ------------------------------------------------------
UI_PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/login/{token}"), ("POST", "/logout"),
             ("GET", "/static/{version}/{name}"), ("GET", "")}
UI_ATTACKS: dict[tuple[str, str], list[tuple[str, str]] | None] = {
    ("GET", "/"): None, ("GET", "/chart.svg"): None,
    ("GET", "/webhooks"): None, ("GET", "/webhooks/new"): None,
    ("POST", "/webhooks/new"): [("url", "http://127.0.0.1:9/x"), ("events", "*"), ("from_domains", "shop.example")],
    ("GET", "/webhooks/{id}"): None,
    ("POST", "/webhooks/{id}"): [("url", "http://127.0.0.1:9/x"), ("events", "*"), ("description", "taken"),
                                 ("from_domains", "other.example")],
    ("POST", "/webhooks/{id}/disable"): [], ("GET", "/webhooks/{id}/enable"): None,
    ("POST", "/webhooks/{id}/enable"): [("drop_backlog", "1")],
    ("POST", "/webhooks/{id}/test"): [("event", "delivered")],
    ("POST", "/webhooks/{id}/secret"): [], ("POST", "/webhooks/{id}/rotate-secret"): [],
    ("GET", "/webhooks/{id}/replay"): None,
    ("POST", "/webhooks/{id}/replay"): [("since", "2020-01-01T00:00"), ("status", "succeeded")],
    ("GET", "/webhooks/{id}/delete"): None, ("POST", "/webhooks/{id}/delete"): [],
    ("GET", "/deliveries"): None, ("GET", "/deliveries/rows"): None,
    ("GET", "/deliveries/retry-failed"): None, ("POST", "/deliveries/retry-failed"): [],
    ("GET", "/deliveries/{id}"): None, ("POST", "/deliveries/{id}/retry"): [],
}


def _ui_routes(tenants: Tenants) -> list[tuple[str, str]]:
    dash = tenants.h.daemon.dashboard
    assert dash is not None
    return [(route.method, resource.canonical) for resource in dash.app().router.resources()
            for route in resource if route.method != "HEAD"]


async def ui_login(tenants: Tenants, token: str) -> UI:
    dash = tenants.h.daemon.dashboard
    assert dash is not None
    ui = UI(tenants.h, dash, tenants.admin.base, Clock())
    page = await ui.get("/ui/login")
    reply = await ui.post("/ui/login", {"token": token}, csrf=login_csrf(page.text))
    assert reply.status == 303 and reply.location == "/ui/", reply
    return ui


def main_of(html: str) -> str:
    """The page's <main>, where the content is (the header carries the session's own bits)."""
    m = re.search(r"<main.*?</main>", html, re.S)
    return m.group(0) if m else html


async def test_every_dashboard_route_is_classified(tenants: Tenants) -> None:
    routes = _ui_routes(tenants)
    assert ("GET", "/webhooks/{id}") in routes
    missing = [r for r in routes if r not in UI_ROUTES]
    assert not missing, f"dashboard routes without a scope in webhookd.ui.security.UI_ROUTES: {missing}"
    untested = [r for r in routes if r not in UI_ATTACKS and r not in UI_PUBLIC]
    assert not untested, f"dashboard routes not exercised by the tenant test: {untested}"


async def test_tenant_b_in_the_dashboard_cannot_reach_anything_of_tenant_a(tenants: Tenants) -> None:
    h = tenants.h
    a_hook, b_hook = await tenants.webhook("shop.example"), await tenants.webhook("other.example")
    await h.submit(event(n=1, **{"from": "orders@shop.example"}), event(n=3, **{"from": "orders@shop.example"}),
                   event(n=2, **{"from": "news@other.example"}))
    a_dlv, b_dlv = await delivery_of(h, a_hook["id"]), await delivery_of(h, b_hook["id"])
    b_http, _ = await tenants.token(["other.example"])
    ui = await ui_login(tenants, str(b_http.token))
    try:
        a_marks = [a_hook["id"], a_dlv, a_hook["url"], "tenant shop.example"]  # (forms show example domains)
        unknown = {m: main_of((await (ui.get("/ui/no-such-page") if m == "GET" else ui.post("/ui/no-such-page"))).text)
                   for m in ("GET", "POST")}

        async def call(method: str, path: str, fields: Any) -> Any:
            return await (ui.get("/ui" + path) if method == "GET" else ui.post("/ui" + path, fields or []))

        def concrete(path: str, wid: str, did: str) -> str:
            return path.replace("{id}", did if path.startswith("/deliveries/") else wid)

        for (method, path), fields in UI_ATTACKS.items():
            kind = UI_ROUTES[(method, path)]
            reply = await call(method, concrete(path, a_hook["id"], a_dlv), fields)
            text = main_of(reply.text)
            if kind == "admin":
                assert (reply.status, text) == (404, unknown[method]), (method, path, reply.status)
                continue
            if "{id}" in path:
                ghost = await call(method, concrete(path, GHOST_WH, GHOST_DLV), fields)
                assert reply.status == ghost.status == 404, (method, path, reply.status, text[:300])
                assert (same_but_ids(text.encode(), a_hook["id"], a_dlv)
                        == same_but_ids(main_of(ghost.text).encode(), GHOST_WH, GHOST_DLV)), (method, path)
                text = same_but_ids(text.encode(), a_hook["id"], a_dlv).decode()
            assert not any(m in text for m in a_marks), (method, path, text[:500])
        for path in ("/deliveries", "/deliveries/rows", "/deliveries/retry-failed"):
            got, ghost = await ui.get(f"/ui{path}?webhook_id={a_hook['id']}"), await ui.get(
                f"/ui{path}?webhook_id={GHOST_WH}")
            assert got.status == ghost.status == 404, path
            assert same_but_ids(main_of(got.text).encode(), a_hook["id"], a_dlv) == same_but_ids(
                main_of(ghost.text).encode(), GHOST_WH, GHOST_DLV)
        got = await ui.post("/ui/deliveries/retry-failed", [("webhook_id", a_hook["id"])])
        assert got.status == 404

        # B's own: its webhook, its deliveries, the overview counts only its one delivery
        page = await ui.page("/ui/webhooks")
        assert b_hook["id"] in page and a_hook["id"] not in page
        overview = await ui.page("/ui/")
        assert "1 in all (finished" in overview and "chart.svg" not in overview
        assert b_dlv in await ui.page(f"/ui/deliveries?webhook_id={b_hook['id']}")
        assert (await ui.get(f"/ui/deliveries/{b_dlv}")).status == 200
        assert (await ui.get(f"/ui/webhooks/{b_hook['id']}")).status == 200
    finally:
        await ui.close()
    shown = await h.webhook(a_hook["id"])
    assert shown["description"] == "tenant shop.example" and shown["enabled"] is True
    assert len(await h.deliveries(webhook_id=a_hook["id"])) == 2
    assert len((await h.api("GET", "/v1/webhooks"))[1]["webhooks"]) == 2


async def test_the_dashboard_scopes_creates_refuses_read_only_writes_and_ends_revoked_sessions(
    tenants: Tenants,
) -> None:
    b_http, b_made = await tenants.token(["other.example"])
    ui = await ui_login(tenants, str(b_http.token))
    ro_http, _ = await tenants.token(["other.example"], read_only=True)
    ro = await ui_login(tenants, str(ro_http.token))
    try:
        base = [("url", "http://127.0.0.1:9/b"), ("events", "*")]
        refused = await ui.post("/ui/webhooks/new", base)
        assert refused.status == 403 and "other.example" in refused.text
        refused = await ui.post("/ui/webhooks/new", [*base, ("from_domains", "shop.example")])
        assert refused.status == 403
        made = await ui.post("/ui/webhooks/new", [*base, ("from_domains", "other.example")])
        assert made.status == 303
        wid = made.location.rsplit("/", 1)[1]
        moved = await ui.post(f"/ui/webhooks/{wid}", [*base, ("from_domains", "shop.example")])
        assert moved.status == 403
        assert (await tenants.h.webhook(wid))["filter"]["from_domains"] == ["other.example"]

        for method, path in UI_ATTACKS:
            if UI_ROUTES[(method, path)] != "write":
                continue
            real = "/ui" + path.replace("{id}", wid)
            reply = await (ro.get(real) if method == "GET" else ro.post(real, UI_ATTACKS[(method, path)] or []))
            assert reply.status == 403 and "read-only" in reply.text, (method, path)
        assert wid in await ro.page("/ui/webhooks")
        assert (await tenants.h.webhook(wid))["enabled"] is True

        assert (await tenants.admin.call("DELETE", f"/v1/tokens/{b_made['id']}"))[0] == 200
        gone = await ui.get("/ui/webhooks")
        assert gone.status == 303 and gone.location == "/ui/login"
        assert (await ui.get(f"/ui/webhooks/{wid}")).location == "/ui/login"
        bad = await ui.get("/ui/login")
        wrong = await ui.post("/ui/login", {"token": str(b_http.token)}, csrf=login_csrf(bad.text))
        assert wrong.status == 403 and "not a valid API token" in wrong.text
    finally:
        await ui.close()
        await ro.close()


async def test_a_use_during_the_last_use_write_is_written_too() -> None:
    """A token used while another's last use is being written (the write task still runs, so
    no new one starts) must not be left pending until some later use."""
    release = asyncio.Event()
    written: list[list[tuple[str, float]]] = []

    class Store:
        async def touch_tokens(self, used: list[tuple[str, float]]) -> None:
            written.append(list(used))
            await release.wait()

    auth = TokenAuth(Store(), clock=lambda: 100.0)  # type: ignore[arg-type]
    a = ApiToken(id="tok_a", hash="a", domains=("a.example",), read_only=False, description="",
                 created_at=1.0, last_used_at=None, revoked_at=None)
    auth._used(a)
    for _ in range(3):
        await asyncio.sleep(0)
    assert written == [[("tok_a", 100.0)]]  # in flight
    auth._used(dataclasses.replace(a, id="tok_b"))
    release.set()
    await asyncio.wait_for(auth.drain(), 5)
    assert written == [[("tok_a", 100.0)], [("tok_b", 100.0)]]
