"""The dashboard (webhookd.ui) over HTTP: a real daemon in-process, the dashboard mounted into
the admin API's application as the daemon mounts it, served on loopback TCP (and a Unix
socket where the peer address matters). Each security property has a test that fails
without it."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
import structlog
from aiohttp import web
from markupsafe import escape

from tests.conftest import Harness, Receiver, event, eventually
from webhookd.admin import AdminApi
from webhookd.config import DashboardConfig
from webhookd.signing import legacy_signature
from webhookd.ui import Dashboard
from webhookd.ui.auth import UNIX_BUCKET, FailedLogins, client_bucket, digest

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@dataclass
class Clock:
    t: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.t


@dataclass
class Reply:
    status: int
    headers: Any
    text: str

    @property
    def location(self) -> str:
        return str(self.headers.get("Location", ""))


class UI:
    """A browser-like client of one dashboard: cookies kept, redirects not followed."""

    def __init__(self, h: Harness, dash: Dashboard, base: str, clock: Clock,
                 connector: aiohttp.BaseConnector | None = None) -> None:
        self.h, self.dash, self.base, self.clock = h, dash, base, clock
        self.host = base.split("//", 1)[1]
        self.client = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def request(self, method: str, path: str, *, data: Any = None, headers: dict[str, str] | None = None,
                      cookies: bool = True) -> Reply:
        session = self.client if cookies else aiohttp.ClientSession()
        try:
            async with session.request(method, self.base + path, data=data, headers=headers,
                                       allow_redirects=False) as resp:
                return Reply(resp.status, resp.headers, await resp.text())
        finally:
            if not cookies:
                await session.close()

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    def csrf(self) -> str:
        token = self.session_token()
        session = self.dash.sessions.get(token)
        assert session is not None, "not logged in"
        return session.csrf

    def session_token(self) -> str | None:
        return self.cookie("webhookd_session")

    def cookie(self, name: str) -> str | None:
        for cookie in self.client.cookie_jar:
            if cookie.key == name:
                return cookie.value
        return None

    async def post(self, path: str, fields: dict[str, Any] | list[tuple[str, str]] | None = None, *,
                   csrf: str | None = None, headers: dict[str, str | None] | None = None) -> Reply:
        """A form POST as a browser sends it from our pages (whose no-referrer policy makes
        the Origin null); `headers` overrides, None removes one."""
        pairs = list(fields.items()) if isinstance(fields, dict) else list(fields or [])
        pairs.append(("csrf", csrf if csrf is not None else self.csrf()))
        merged = {"Origin": "null", "Sec-Fetch-Site": "same-origin", **(headers or {})}
        hdrs = {k: v for k, v in merged.items() if v is not None}
        return await self.request("POST", path, data=pairs, headers=hdrs)

    async def login(self) -> None:
        page = await self.get("/ui/login")
        assert page.status == 200, page.text
        reply = await self.post("/ui/login", {"token": ADMIN_TOKEN}, csrf=login_csrf(page.text))
        assert reply.status == 303 and reply.location == "/ui/", reply

    async def page(self, path: str) -> str:
        reply = await self.get(path)
        assert reply.status == 200, (path, reply.status, reply.text[:500])
        return reply.text

    async def create(self, url: str, events: list[str] | None = None, description: str = "") -> str:
        """A webhook created through the form; returns its id."""
        fields = [("url", url), ("description", description)] + [("events", e) for e in events or ["*"]]
        reply = await self.post("/ui/webhooks/new", fields)
        assert reply.status == 303, reply.text
        return reply.location.rsplit("/", 1)[1]

    async def close(self) -> None:
        await self.client.close()


def login_csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


UIFactory = Callable[..., Awaitable[UI]]


@pytest.fixture
async def make_ui(start_daemon: Any, tmp_path: Path) -> AsyncIterator[UIFactory]:
    runners: list[web.AppRunner] = []
    uis: list[UI] = []

    async def make(*, admin_token: str = ADMIN_TOKEN, dashboard: dict[str, Any] | None = None,
                   unix: bool = False, beside: UI | None = None, **daemon: Any) -> UI:
        """A dashboard over a new daemon, or over the daemon of `beside`."""
        h: Harness = beside.h if beside is not None else await start_daemon(**daemon)
        clock = Clock()
        d = h.daemon
        production = not h.config.dev
        dash = Dashboard(d.admin.ops, d.store, DashboardConfig(**(dashboard or {})), production=production,
                         admin_token=admin_token, clock=clock)
        api = AdminApi(d.scheduler, d.store, production=production)
        api.ui = dash.app
        api.login_link = dash.create_login_link
        runner = web.AppRunner(api.app(token=admin_token), access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        if unix:
            path = str(tmp_path / "ui.sock")
            await web.UnixSite(runner, path).start()
            ui = UI(h, dash, "http://localhost", clock, aiohttp.UnixConnector(path))
        else:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            ui = UI(h, dash, f"http://127.0.0.1:{port}", clock)
        uis.append(ui)
        return ui

    yield make
    for ui in uis:
        await ui.close()
    for runner in runners:
        await runner.cleanup()


async def ui_logged_in(make_ui: UIFactory, **kw: Any) -> UI:
    ui = await make_ui(**kw)
    await ui.login()
    return ui


async def wait_status(ui: UI, wid: str, status: str, n: int = 1) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        rows = await ui.h.deliveries(webhook_id=wid, status=status)
        return rows if len(rows) >= n else None

    result: list[dict[str, Any]] = await eventually(check, what=f"{n} {status} deliveries")
    return result


class Html(HTMLParser):
    """What the accessibility and security checks need from a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.controls: list[dict[str, str]] = []
        self.labels: set[str] = set()
        self.buttons: list[str] = []
        self.links: list[dict[str, str]] = []
        self.scripts: list[dict[str, str]] = []
        self.inline_script = False
        self.style_attrs = 0
        self.handler_attrs = 0
        self.times: list[str] = []
        self._button: list[str] | None = None
        self._script = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "style" in a:
            self.style_attrs += 1
        self.handler_attrs += sum(1 for k in a if k.startswith("on"))
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.controls.append({"tag": tag, **a})
        elif tag == "label" and a.get("for"):
            self.labels.add(a["for"])
        elif tag == "button":
            self._button = []
        elif tag == "a":
            self.links.append(a)
        elif tag == "script":
            self.scripts.append(a)
            self._script = "src" not in a
        elif tag == "time":
            self.times.append(a.get("datetime", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "button" and self._button is not None:
            self.buttons.append("".join(self._button).strip())
            self._button = None
        if tag == "script":
            self._script = False

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button.append(data)
        if self._script and data.strip():
            self.inline_script = True


# -- sessions and log-in ---------------------------------------------------------------------------
PROTECTED = ["/ui/", "/ui/webhooks", "/ui/webhooks/new", "/ui/deliveries", "/ui/deliveries/rows", "/ui/chart.svg",
             "/ui/deliveries/retry-failed"]


async def test_pages_without_a_session_redirect_to_login_and_show_nothing(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook", description="secret-project-description")
    await ui.h.submit(event("delivered", 1))
    await wait_status(ui, wid, "pending")
    for path in [*PROTECTED, f"/ui/webhooks/{wid}", f"/ui/webhooks/{wid}/enable", "/ui/deliveries/dlv_1",
                 "/ui/nowhere"]:
        reply = await ui.get(path, cookies=False)
        assert reply.status == 303 and reply.location == "/ui/login", path
        assert reply.text == "", path
    for path in [f"/ui/webhooks/{wid}/delete", f"/ui/webhooks/{wid}/secret", "/ui/logout"]:
        reply = await ui.request("POST", path, data={"csrf": ui.csrf()}, cookies=False)
        assert reply.status == 303 and reply.location == "/ui/login" and reply.text == ""
    assert wid in ui.h.daemon.scheduler.webhooks  # the delete did nothing


async def test_token_login_sets_a_strict_cookie_and_logout_revokes_the_session(make_ui: UIFactory) -> None:
    ui = await make_ui()
    page = await ui.get("/ui/login")
    assert page.status == 200 and 'type="password"' in page.text
    wrong = await ui.post("/ui/login", {"token": "nope"}, csrf=login_csrf(page.text))
    assert wrong.status == 403 and "not the admin token" in wrong.text
    assert not any(c.startswith("webhookd_session=") for c in wrong.headers.getall("Set-Cookie", []))
    page = await ui.get("/ui/login")
    reply = await ui.post("/ui/login", {"token": ADMIN_TOKEN}, csrf=login_csrf(page.text))
    assert reply.status == 303 and reply.location == "/ui/"
    cookie = next(c for c in reply.headers.getall("Set-Cookie") if c.startswith("webhookd_session="))
    attrs = [p.strip().lower() for p in cookie.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/ui" in attrs
    assert any(a.startswith("max-age=") and int(a.split("=")[1]) == 12 * 3600 for a in attrs)
    token = ui.session_token()
    assert token and len(token) >= 43
    assert (await ui.get("/ui/")).status == 200
    assert (await ui.get("/ui/login")).location == "/ui/"  # already logged in

    out = await ui.post("/ui/logout")
    assert out.status == 303 and out.location == "/ui/login"
    assert len(ui.dash.sessions) == 0
    # the old cookie, replayed by hand, is dead: revoked server-side, not only deleted in the browser
    replay = await ui.get("/ui/", headers={"Cookie": f"webhookd_session={token}"}, cookies=False)
    assert replay.status == 303 and replay.location == "/ui/login"


async def test_tokens_are_compared_in_constant_time(make_ui: UIFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    ui = await ui_logged_in(make_ui)
    assert any(ADMIN_TOKEN.encode() in pair for pair in calls)  # the admin token
    csrf = ui.csrf().encode()
    calls.clear()
    await ui.post("/ui/webhooks/new", [("url", "ftp://x")])
    assert any(pair == (csrf, csrf) for pair in calls)  # the CSRF token
    token = ui.session_token()
    assert token and any(digest(token).encode() in pair for pair in calls)  # the session lookup


async def test_sessions_expire(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui, dashboard={"session_ttl": 600.0})
    ui.clock.t += 599
    assert (await ui.get("/ui/")).status == 200
    ui.clock.t += 2
    reply = await ui.get("/ui/")
    assert reply.status == 303 and reply.location == "/ui/login"


async def test_session_and_link_tokens_are_stored_hashed(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    token = ui.session_token()
    assert token is not None
    assert ui.dash.sessions.keys() == [hashlib.sha256(token.encode()).hexdigest()]
    path, _ = ui.dash.create_login_link()
    link = path.rsplit("/", 1)[1]
    assert len(link) >= 43 and ui.dash.links.keys() == [digest(link)]
    assert token not in repr(ui.dash.sessions.__dict__) and link not in repr(ui.dash.links.__dict__)


async def test_one_time_link_logs_in_once_and_expires(make_ui: UIFactory) -> None:
    ui = await make_ui()
    # the CLI's route: POST /v1/dashboard/links over the admin API (bearer token on TCP)
    async with aiohttp.ClientSession() as s, s.post(ui.base + "/v1/dashboard/links",
                                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 201
        created = await r.json()
    path = created["path"]
    assert path.startswith("/ui/login/") and created["expires_at"].endswith("Z")
    reply = await ui.get(path)
    assert reply.status == 303 and reply.location == "/ui/"  # the token leaves the address bar
    assert (await ui.get("/ui/")).status == 200
    again = await ui.get(path, cookies=False)
    assert again.status == 403 and "already used" in again.text and "webhookd dashboard" in again.text

    late, _ = ui.dash.create_login_link()
    ui.clock.t += 301
    expired = await ui.get(late, cookies=False)
    assert expired.status == 403 and "expired" in expired.text


async def test_without_an_admin_token_only_links_log_in(make_ui: UIFactory) -> None:
    ui = await make_ui(admin_token="")
    page = await ui.get("/ui/login")
    assert page.status == 200 and "webhookd dashboard" in page.text and 'type="password"' not in page.text
    for token in ("", "anything"):
        reply = await ui.post("/ui/login", {"token": token}, csrf=ui.cookie("webhookd_login"))
        assert reply.status == 403 and "webhookd dashboard" in reply.text
        assert ui.dash.sessions.keys() == []
    path, _ = ui.dash.create_login_link()
    assert (await ui.get(path)).location == "/ui/"


async def test_failed_logins_are_rate_limited_per_client(make_ui: UIFactory) -> None:
    ui = await make_ui()
    csrf = login_csrf((await ui.get("/ui/login")).text)
    for _ in range(5):
        assert (await ui.post("/ui/login", {"token": "guess"}, csrf=csrf)).status == 403
    limited = await ui.post("/ui/login", {"token": ADMIN_TOKEN}, csrf=csrf)  # even the right one, now
    assert limited.status == 429 and "Too many failed log-ins" in limited.text
    assert int(limited.headers["Retry-After"]) > 0
    path, _ = ui.dash.create_login_link()
    assert (await ui.get(path)).status == 429  # links too; and it was not spent
    ui.clock.t += 61
    assert (await ui.get(path)).status == 303


async def test_rate_limit_global_cap_and_one_bucket_for_the_unix_socket(make_ui: UIFactory) -> None:
    clock = Clock()
    limiter = FailedLogins(clock, per_client=5, overall=30)
    for i in range(30):
        limiter.failed(f"10.0.0.{i}")
    blocked = limiter.blocked("10.0.1.1")
    assert blocked is not None and blocked[0] == "overall"
    clock.t += 61
    assert limiter.blocked("10.0.1.1") is None
    assert client_bucket("") == client_bucket(None) == UNIX_BUCKET
    assert client_bucket("::1") == "::1"

    ui = await make_ui(unix=True)
    csrf = login_csrf((await ui.get("/ui/login")).text)
    for _ in range(5):
        await ui.post("/ui/login", {"token": "guess"}, csrf=csrf)
    assert ui.dash.failed_logins.blocked(UNIX_BUCKET) is not None
    reply = await ui.post("/ui/login", {"token": ADMIN_TOKEN}, csrf=csrf)
    assert reply.status == 429 and "from this address" in reply.text


# -- request checks ------------------------------------------------------------------------------------
async def test_posts_need_the_csrf_token(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook")
    for csrf in ("", "wrong", ui.csrf()[:-1]):
        reply = await ui.post(f"/ui/webhooks/{wid}/disable", csrf=csrf)
        assert reply.status == 403 and "security token" in reply.text
    assert ui.h.daemon.scheduler.webhooks[wid].enabled
    assert (await ui.post(f"/ui/webhooks/{wid}/disable")).status == 303
    assert not ui.h.daemon.scheduler.webhooks[wid].enabled
    # the log-in form: a double submit of the log-in cookie
    fresh = await make_ui(beside=ui)
    await fresh.get("/ui/login")
    assert (await fresh.post("/ui/login", {"token": ADMIN_TOKEN}, csrf="forged")).status == 403
    assert fresh.dash.sessions.keys() == []


async def test_cross_origin_posts_are_refused(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook")
    cases: list[dict[str, str | None]] = [
        {"Origin": "http://evil.example"}, {"Origin": "http://127.0.0.1:1"},
        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "none"},
        {"Origin": "null", "Sec-Fetch-Site": None},  # a null origin needs Sec-Fetch-Site: same-origin
        {"Origin": "http://evil.example", "Sec-Fetch-Site": None},
    ]
    for headers in cases:
        reply = await ui.post(f"/ui/webhooks/{wid}/delete", headers=headers)
        assert reply.status == 403 and "refused" in reply.text, headers
    assert wid in ui.h.daemon.scheduler.webhooks
    allowed: list[dict[str, str | None]] = [{"Origin": f"http://{ui.host}"}, {"Origin": None, "Sec-Fetch-Site": None}]
    for ok in allowed:
        assert (await ui.post(f"/ui/webhooks/{wid}/test", headers=ok)).status == 303, ok
    reply = await ui.post(f"/ui/webhooks/{wid}/delete")
    assert reply.status == 303 and wid not in ui.h.daemon.scheduler.webhooks


async def test_host_allowlist_refuses_rebinding(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    port = ui.host.split(":")[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        reply = await ui.get("/ui/", headers={"Host": host})
        assert reply.status == 421 and "dashboard.allowed_hosts" in reply.text, host
        assert "Overview" not in reply.text
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        assert (await ui.get("/ui/", headers={"Host": host})).status == 200, host
    other = await make_ui(beside=ui, dashboard={"allowed_hosts": ("mail.example.com",)})
    assert (await other.get("/ui/login")).status == 421
    assert (await other.get("/ui/login", headers={"Host": "mail.example.com:8026"})).status == 200


async def test_security_headers_on_every_response(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook")
    static = re.search(r'src="(/ui/static/[^"]+)"', await ui.page("/ui/"))
    assert static
    replies = [await ui.get(p) for p in ["/ui/", "/ui/webhooks", f"/ui/webhooks/{wid}", "/ui/deliveries",
                                          "/ui/chart.svg", "/ui/nowhere", static.group(1)]]
    replies += [await ui.get("/ui/login", cookies=False), await ui.get("/ui/", cookies=False),
                await ui.post(f"/ui/webhooks/{wid}/disable")]
    for r in replies:
        csp = r.headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'" and directives["default-src"] == "'none'"
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
    for r in replies[:-4] + replies[-3:]:
        assert r.headers["Cache-Control"] == "no-store"


async def test_static_files_are_versioned_cached_and_local(make_ui: UIFactory) -> None:
    ui = await make_ui()
    page = await ui.page("/ui/login")
    doc = Html(page)
    assert not doc.inline_script and doc.style_attrs == 0 and doc.handler_attrs == 0
    urls = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert all(u.startswith(("/ui/", "#")) for u in urls), urls  # nothing from another host, ever
    for url in [u for u in urls if "/static/" in u]:
        r = await ui.get(url)
        assert r.status == 200 and "immutable" in r.headers["Cache-Control"]
        assert "max-age=31536000" in r.headers["Cache-Control"]
        assert "//" not in r.text.replace("://www.w3.org", "") or url.endswith(".js")
        stale = url.replace("/static/", "/static/0", 1)
        assert (await ui.get(stale)).status == 404
        other = url.rsplit("/", 1)[0] + "/__init__.py"
        assert (await ui.get(other)).status == 404  # only the packaged static files, by name


async def test_errors_are_html_pages(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook")
    missing = await ui.get("/ui/webhooks/wh_<b>nope")
    assert missing.status == 404 and "text/html" in missing.headers["Content-Type"]
    assert "<b>nope" not in missing.text and "&lt;b&gt;nope" in missing.text
    assert (await ui.get("/ui/deliveries/dlv_999")).status == 404
    assert (await ui.get("/ui/nowhere")).status == 404
    wrong = await ui.request("PUT", "/ui/webhooks")
    assert wrong.status == 405 and "text/html" in wrong.headers["Content-Type"]
    big = await ui.post("/ui/webhooks/new", {"url": "https://x.example", "description": "x" * 70_000})
    assert big.status == 413 and "64 KiB" in big.text

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        yield f"csrf={ui.csrf()}&description=".encode()
        for _ in range(70):
            yield b"x" * 1024

    streamed = await ui.request("POST", f"/ui/webhooks/{wid}", data=chunks(), headers={
        "Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"})
    assert streamed.status == 413 and ui.h.daemon.scheduler.webhooks[wid].description == ""
    json_body = await ui.request("POST", "/ui/logout", data=b'{"csrf": "x"}',
                                 headers={"Content-Type": "application/json"})
    assert json_body.status == 415
    # the admin API around it keeps its JSON errors and its bearer token
    async with aiohttp.ClientSession() as s, s.get(ui.base + "/v1/webhooks") as r:
        assert r.status == 401 and (await r.json())["error"]


# -- screens ---------------------------------------------------------------------------------------------
async def test_overview_counts_highlights_disabled_and_loads_the_chart(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui, delivery={"max_attempts": 1})
    ok = await make_receiver()
    bad = await make_receiver(default=500)
    good = await ui.create(ok.url, description="works")
    failing = await ui.create(bad.url, description="broken one")
    await ui.h.submit(event("delivered", 1), event("bounced", 2))
    await wait_status(ui, good, "succeeded", 2)
    await wait_status(ui, failing, "failed", 2)
    await ui.post(f"/ui/webhooks/{failing}/disable")
    page = await ui.page("/ui/")
    assert 'aria-current="page"' in page and "Log out" in page
    assert re.search(r'badge-succeeded">succeeded</span></dt><dd><a href="[^"]+">2<', page)
    assert re.search(r'badge-failed">failed</span></dt><dd><a href="[^"]+">2<', page)
    assert "Disabled webhooks" in page and failing in page and "Disabled by hand." in page
    assert '<img src="/ui/chart.svg"' in page and "alt=" in page
    chart = await ui.get("/ui/chart.svg")
    assert chart.status == 200 and chart.headers["Content-Type"].startswith("image/svg+xml")
    svg = ElementTree.fromstring(chart.text)
    assert svg.tag.endswith("svg")
    assert "2 succeeded, 2 failed" in chart.text and "<script" not in chart.text and "style" not in chart.text


async def test_webhooks_list_shows_state_failures_last_attempt_rate_and_backlog(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui)
    ok = await make_receiver()
    good = await ui.create(ok.url, ["delivered"], "shop")
    paused = await ui.create("http://127.0.0.1:9/hook", description="parked")
    await ui.post(f"/ui/webhooks/{paused}/disable")
    await ui.h.submit(event("delivered", 1), event("delivered", 2), event("opened", 3))
    await wait_status(ui, good, "succeeded", 2)
    await wait_status(ui, paused, "paused", 3)
    page = await ui.page("/ui/webhooks")
    assert good in page and paused in page and "shop" in page and "parked" in page
    assert "100 %" in page and "HTTP 200" in page and "2 ok / 0 failed" in page
    assert 'class="row-disabled"' in page and "Disabled by hand." in page
    assert f'webhook_id={paused}&amp;status=paused">3<' in page
    assert "whsec_" not in page


async def test_create_shows_the_secret_once_with_working_snippets(make_ui: UIFactory) -> None:
    ui = await make_ui()
    with structlog.testing.capture_logs() as logs:
        link, _ = ui.dash.create_login_link()
        assert (await ui.get(link)).status == 303
        form = await ui.page("/ui/webhooks/new")
        for ev in ("delivered", "bounced", "opened", "clicked", "complained", "failed", "*"):
            assert f'name="events" value="{ev}"' in form
        reply = await ui.post("/ui/webhooks/new", [("url", "https://hooks.example.com/in"),
                                                   ("events", "delivered"), ("events", "bounced"),
                                                   ("description", "orders")])
        assert reply.status == 303
        wid = reply.location.rsplit("/", 1)[1]
        wh = ui.h.daemon.scheduler.webhooks[wid]
        assert wh.events == ("delivered", "bounced") and wh.description == "orders"
        secret = wh.secret
        assert secret not in reply.location and not reply.text
        shown = await ui.get(reply.location)
        assert shown.status == 200 and shown.headers["Cache-Control"] == "no-store"
        assert shown.text.count(secret) == 4  # the value and the three snippets
        assert "shown only this once" in shown.text and 'data-copy="secret-value"' in shown.text
        for lang in ("Python", "Node.js", "PHP"):
            assert lang in shown.text
        again = await ui.page(reply.location)
        assert secret not in again and "whsec_••••" in again
        for path in ("/ui/", "/ui/webhooks", "/ui/deliveries"):
            assert secret not in await ui.page(path)
    token = ui.session_token()
    assert token and any(entry["event"] == "dashboard log-in" for entry in logs)
    for value in (secret, token, link.rsplit("/", 1)[1]):
        assert not any(value in repr(entry) for entry in logs)
    # the Python snippet, as shown, verifies what the daemon signs
    code = re.search(r'<code id="snippet-python">(.*?)</code>', shown.text, re.S)
    assert code
    scope: dict[str, Any] = {}
    exec(unescape(code.group(1)), scope)
    body = b'{"event":"delivered"}'
    assert scope["verify_signature"](body, legacy_signature(secret, body), scope["WEBHOOK_SECRET"])
    node = re.search(r'<code id="snippet-node">(.*?)</code>', shown.text, re.S)
    assert node and f"const WEBHOOK_SECRET = '{secret}';" in unescape(node.group(1))


async def test_create_validation_errors_are_shown_in_the_form(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui, environment="production")
    reply = await ui.post("/ui/webhooks/new", [("url", "http://hooks.example.com/in"), ("events", "*"),
                                               ("description", "kept")])
    assert reply.status == 400 and "must use https:// in production" in reply.text
    assert 'value="http://hooks.example.com/in"' in reply.text and ">kept</textarea>" in reply.text
    reply = await ui.post("/ui/webhooks/new", [("url", "https://hooks.example.com/in")])
    assert reply.status == 400 and "events must be a non-empty list" in reply.text
    assert ui.h.daemon.scheduler.webhooks == {}
    reply = await ui.post("/ui/webhooks/new", [("url", "https://hooks.example.com/in"), ("events", "*")])
    assert reply.status == 303
    (wh,) = ui.h.daemon.scheduler.webhooks.values()
    assert wh.events == ("*",)


async def test_edit_disable_and_enable_with_the_backlog_count(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/a", ["delivered"], "before")
    reply = await ui.post(f"/ui/webhooks/{wid}", [("url", "http://127.0.0.1:9/b"), ("events", "opened"),
                                                  ("events", "clicked"), ("description", "after")])
    assert reply.status == 303 and reply.location == f"/ui/webhooks/{wid}"
    wh = ui.h.daemon.scheduler.webhooks[wid]
    assert (wh.url, wh.events, wh.description) == ("http://127.0.0.1:9/b", ("opened", "clicked"), "after")
    assert "Changes saved." in await ui.page(reply.location)
    bad = await ui.post(f"/ui/webhooks/{wid}", [("url", "ftp://x"), ("events", "*")])
    assert bad.status == 400 and "http(s) URL" in bad.text

    assert (await ui.post(f"/ui/webhooks/{wid}/disable")).status == 303
    await ui.h.submit(event("opened", 1), event("opened", 2), event("clicked", 3))
    await wait_status(ui, wid, "paused", 3)
    detail = await ui.page(f"/ui/webhooks/{wid}")
    assert "Webhook disabled." in detail and f'href="/ui/webhooks/{wid}/enable">Enable webhook…' in detail
    confirm = await ui.page(f"/ui/webhooks/{wid}/enable")
    assert '<strong id="paused-count">3 paused deliveries</strong>' in confirm and 'name="drop_backlog"' in confirm
    reply = await ui.post(f"/ui/webhooks/{wid}/enable", {"drop_backlog": "yes"})
    assert reply.status == 303 and wh.enabled
    assert "3 paused deliveries dropped" in await ui.page(reply.location)
    assert await ui.h.deliveries(webhook_id=wid, status="paused") == []


async def test_send_a_test_event_and_see_the_answer(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui)
    receiver = await make_receiver(default=202, reply=b'{"thanks": "yes"}')
    wid = await ui.create(receiver.url)
    reply = await ui.post(f"/ui/webhooks/{wid}/test", {"event": "bounced"})
    assert reply.status == 303 and reply.location == f"/ui/webhooks/{wid}"
    assert receiver.requests[0].json["event"] == "bounced"
    page = await ui.page(reply.location)
    assert "HTTP 202" in page and " ms</dd>" in page and "{&#34;thanks&#34;: &#34;yes&#34;}" in page
    assert "HTTP 202" not in await ui.page(reply.location)  # one-shot
    assert (await ui.post(f"/ui/webhooks/{wid}/test", {"event": "exploded"})).status == 400


async def test_reveal_and_rotate_the_secret(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook")
    await ui.page(f"/ui/webhooks/{wid}")  # the creation's one-shot secret is gone
    wh = ui.h.daemon.scheduler.webhooks[wid]
    first = wh.secret
    assert first not in await ui.page(f"/ui/webhooks/{wid}")
    reply = await ui.post(f"/ui/webhooks/{wid}/secret")
    assert reply.status == 303 and first not in reply.location
    assert first in await ui.page(reply.location)
    reply = await ui.post(f"/ui/webhooks/{wid}/rotate-secret")
    assert reply.status == 303 and wh.secret != first
    page = await ui.page(reply.location)
    assert wh.secret in page and first not in page and "previous secret keeps verifying until" in page
    expires = wh.previous_secret_expires_at
    assert expires is not None and time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)) in page


async def test_replay_shows_the_count_before_confirming(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui)
    receiver = await make_receiver()
    wid = await ui.create(receiver.url)
    await ui.h.submit(*(event("delivered", i) for i in range(3)))
    await wait_status(ui, wid, "succeeded", 3)
    since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - 3600))
    confirm = await ui.get(f"/ui/webhooks/{wid}/replay?since={since}&status=succeeded")
    assert confirm.status == 200 and '<strong id="replay-count">3 deliveries</strong>' in confirm.text
    none = await ui.page(f"/ui/webhooks/{wid}/replay?since={since}")  # default: failed only
    assert '<strong id="replay-count">0 deliveries</strong>' in none
    bad = await ui.get(f"/ui/webhooks/{wid}/replay?since=yesterday")
    assert bad.status == 400 and "since:" in bad.text
    reply = await ui.post(f"/ui/webhooks/{wid}/replay", [("since", since + ":00Z"), ("status", "succeeded")])
    assert reply.status == 303 and "3 deliveries queued again" in await ui.page(reply.location)
    await receiver.wait_for(6)


async def test_delete_needs_a_confirmation_step(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook", description="to go")
    detail = await ui.page(f"/ui/webhooks/{wid}")
    assert f'href="/ui/webhooks/{wid}/delete"' in detail  # a link to a confirmation page, not a button
    confirm = await ui.page(f"/ui/webhooks/{wid}/delete")
    assert "cannot be undone" in confirm and f'action="/ui/webhooks/{wid}/delete"' in confirm
    assert wid in ui.h.daemon.scheduler.webhooks
    reply = await ui.post(f"/ui/webhooks/{wid}/delete")
    assert reply.status == 303 and reply.location == "/ui/webhooks"
    assert wid not in ui.h.daemon.scheduler.webhooks and f"Webhook {wid} deleted." in await ui.page("/ui/webhooks")


async def test_deliveries_filters_search_and_keyset_pages(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui, delivery={"max_attempts": 1})
    ok = await make_receiver()
    bad = await make_receiver(default=500)
    good = await ui.create(ok.url)
    failing = await ui.create(bad.url, ["bounced"])
    await ui.h.submit(*(event("delivered", i) for i in range(55)), event("bounced", 99))
    await wait_status(ui, good, "succeeded", 56)
    await wait_status(ui, failing, "failed", 1)
    first = await ui.page("/ui/deliveries")
    assert first.count('target="_blank" rel="noopener noreferrer"') == 50 and "data-live-src" in first
    older = re.search(r'href="(/ui/deliveries\?before=dlv_\d+)">Older', first)
    assert older
    second = await ui.page(unescape(older.group(1)))
    assert second.count('target="_blank"') == 7 and "Newest" in second and "data-live-src" not in second
    both = await ui.page(f"/ui/deliveries?webhook_id={failing}&status=failed&status=pending")
    assert both.count('target="_blank"') == 1 and 'value="failed" checked' in both
    assert 'value="pending" checked' in both
    by_message = await ui.page("/ui/deliveries?message_id=%3Cmsg-7%40mail.example.com%3E")
    assert by_message.count('target="_blank"') == 1 and "customer7@example.org" in by_message
    by_rcpt = await ui.page("/ui/deliveries?to=customer99%40example.org")
    assert by_rcpt.count('target="_blank"') == 2
    by_event = await ui.page("/ui/deliveries?event=bounced")
    assert by_event.count('target="_blank"') == 2
    future = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 3600))
    assert (await ui.page(f"/ui/deliveries?since={future}")).count('target="_blank"') == 0
    assert (await ui.page(f"/ui/deliveries?until={future}")).count('target="_blank"') == 50
    wrong = await ui.get("/ui/deliveries?status=lost")
    assert wrong.status == 400 and "unknown status" in wrong.text
    assert (await ui.get("/ui/deliveries?before=yesterday")).status == 400


async def test_live_refresh_partial_is_the_first_page_rows(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    wid = await ui.create("http://127.0.0.1:9/hook")
    await ui.post(f"/ui/webhooks/{wid}/disable")
    rows = await ui.page("/ui/deliveries/rows")
    assert "No deliveries match." in rows and "<html" not in rows
    await ui.h.submit(event("delivered", 1))
    await wait_status(ui, wid, "paused")
    rows = await ui.page(f"/ui/deliveries/rows?webhook_id={wid}&status=paused")
    assert rows.strip().startswith("<tr>") and "dlv_" in rows and "badge-paused" in rows


async def test_retry_all_failed_matching_the_filters(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui, delivery={"max_attempts": 1})
    bad = await make_receiver(default=500)
    wid = await ui.create(bad.url)
    await ui.h.submit(event("delivered", 1), event("bounced", 2), event("bounced", 3))
    await wait_status(ui, wid, "failed", 3)
    deliveries = await ui.page("/ui/deliveries?event=bounced&status=failed")
    link = re.search(r'href="(/ui/deliveries/retry-failed[^"]*)"', deliveries)
    assert link
    confirm = await ui.page(unescape(link.group(1)))
    assert '<strong id="retry-count">2 failed deliveries</strong>' in confirm
    assert 'name="event" value="bounced"' in confirm
    bad.default = 200
    reply = await ui.post("/ui/deliveries/retry-failed", {"event": "bounced"})
    assert reply.status == 303 and reply.location.startswith("/ui/deliveries?")
    assert "2 failed deliveries queued again." in await ui.page(reply.location)
    await wait_status(ui, wid, "succeeded", 2)
    assert len(await ui.h.deliveries(webhook_id=wid, status="failed")) == 1


async def test_delivery_page_shows_payload_headers_attempts_and_retries(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui, delivery={"max_attempts": 1})
    receiver = await make_receiver(default=503, reply=b"busy, come back later")
    wid = await ui.create(receiver.url)
    await ui.h.submit(event("bounced", 5))
    (row,) = await wait_status(ui, wid, "failed")
    sent = receiver.requests[0]
    page = await ui.page(f"/ui/deliveries/{row['id']}")
    assert "&#34;bounce_type&#34;: &#34;hard&#34;" in page and '\n  &#34;event&#34;: &#34;bounced&#34;' in page
    for name in ("Content-Type", "User-Agent", "X-Webhook-Event", "X-Webhook-Id", "webhook-id", "webhook-timestamp"):
        assert f"<code>{name}</code></td><td><code class=\"wrap\">{escape(sent.headers[name])}</code>" in page, name
    assert page.count("…elided…") == 2
    assert sent.headers["X-Webhook-Signature"] not in page
    assert sent.headers["webhook-signature"].split(",", 1)[1] not in page
    assert "HTTP 503" in page and "busy, come back later" in page and "#1" in page
    reply = await ui.post(f"/ui/deliveries/{row['id']}/retry")
    assert reply.status == 303 and reply.location == f"/ui/deliveries/{row['id']}"
    assert "queued for an attempt now" in await ui.page(reply.location)
    await receiver.wait_for(2)


HOSTILE = ['<script>alert("x")</script>', "<img src=x onerror=alert(1)>", '"><svg onload=alert(2)>']


async def test_hostile_stored_text_is_escaped_everywhere(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui, delivery={"max_attempts": 1})
    receiver = await make_receiver(default=302, reply=HOSTILE[1].encode(), headers={"Location": HOSTILE[2]})
    url = receiver.url + "?q=" + HOSTILE[2]
    wid = await ui.create(url, description=HOSTILE[0] + HOSTILE[1])
    await ui.h.submit(event("delivered", 1, message_id=HOSTILE[0], to=HOSTILE[2], subject=HOSTILE[1]))
    (row,) = await wait_status(ui, wid, "failed")
    assert HOSTILE[2] in row["last_error"]
    await ui.post(f"/ui/webhooks/{wid}/test")
    pages = [await ui.page(f"/ui/webhooks/{wid}")]  # carries the test result: the receiver's body
    assert "onerror=alert(1)&gt;" in pages[0]
    await ui.post(f"/ui/webhooks/{wid}/disable")
    for path in ["/ui/", "/ui/webhooks", f"/ui/webhooks/{wid}", f"/ui/webhooks/{wid}/enable",
                 f"/ui/webhooks/{wid}/delete", "/ui/deliveries", "/ui/deliveries/rows",
                 f"/ui/deliveries/{row['id']}", f"/ui/deliveries?message_id={HOSTILE[0]}",
                 f"/ui/deliveries/retry-failed?to={HOSTILE[2]}", f"/ui/webhooks/{wid}/replay?since={HOSTILE[2]}"]:
        reply = await ui.get(path)
        assert reply.status in (200, 400), path
        pages.append(reply.text)
    for text in pages:
        for bad in HOSTILE:
            assert bad not in text
        doc = Html(text)
        assert not doc.inline_script and doc.handler_attrs == 0 and doc.style_attrs == 0
        assert all(s.get("src", "").startswith("/ui/static/") for s in doc.scripts)
    joined = "".join(pages)
    for bad in HOSTILE:
        assert str(escape(bad)) in joined


async def test_every_control_has_a_label_and_every_button_text(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    ui = await ui_logged_in(make_ui, delivery={"max_attempts": 1})
    receiver = await make_receiver(default=500)
    wid = await ui.create(receiver.url)
    await ui.h.submit(event("delivered", 1))
    (row,) = await wait_status(ui, wid, "failed")
    await ui.post(f"/ui/webhooks/{wid}/rotate-secret")
    await ui.post(f"/ui/webhooks/{wid}/test")
    since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - 60))
    paths = ["/ui/", "/ui/webhooks", "/ui/webhooks/new", f"/ui/webhooks/{wid}", f"/ui/webhooks/{wid}/enable",
             f"/ui/webhooks/{wid}/delete", f"/ui/webhooks/{wid}/replay?since={since}", "/ui/deliveries",
             "/ui/deliveries/retry-failed", f"/ui/deliveries/{row['id']}", "/ui/nowhere"]
    pages = [(p, await ui.get(p)) for p in paths] + [("login", await ui.get("/ui/login", cookies=False))]
    for path, reply in pages:
        doc = Html(reply.text)
        assert '<html lang="en">' in reply.text and 'name="viewport"' in reply.text, path
        for control in doc.controls:
            assert control.get("id") in doc.labels, (path, control)
        assert all(doc.buttons), (path, doc.buttons)
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in doc.times), path
    assert "<time datetime=" in dict(pages)["/ui/webhooks"].text
    css = re.search(r'href="(/ui/static/[^"]+\.css)"', pages[0][1].text)
    assert css
    sheet = (await ui.get(css.group(1))).text
    assert "prefers-color-scheme: dark" in sheet and ":focus-visible" in sheet and "overflow-x: auto" in sheet


async def test_the_dashboard_shares_its_state_between_listeners(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    second = web.Application()
    second.add_subapp("/ui/", ui.dash.app())  # a second admin listener: a new app, the same sessions
    runner = web.AppRunner(second, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        token = ui.session_token()
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/ui/webhooks",
                                                       headers={"Cookie": f"webhookd_session={token}"},
                                                       allow_redirects=False) as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
    await asyncio.sleep(0)


async def test_filters_in_the_forms_the_list_and_the_detail_page(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    form = await ui.page("/ui/webhooks/new")
    for name in ("from_domains", "to_domains", "tags", "metadata"):
        assert f'name="{name}"' in form
    reply = await ui.post("/ui/webhooks/new", [
        ("url", "http://127.0.0.1:9/shop"), ("events", "*"), ("from_domains", "Shop.Example, *.shop.example"),
        ("to_domains", ""), ("tags", "vip,eu"), ("metadata", "plan=gold\r\n\r\nregion = eu\r\n"),
    ])
    assert reply.status == 303, reply.text
    wid = reply.location.rsplit("/", 1)[1]
    wh = ui.h.daemon.scheduler.webhooks[wid]
    assert wh.filter.to_json() == {"from_domains": ["shop.example", "*.shop.example"], "to_domains": [],
                                   "tags": ["vip", "eu"], "metadata": {"plan": "gold", "region": "eu"}}
    plain = await ui.create("http://127.0.0.1:9/plain")
    listed = await ui.page("/ui/webhooks")
    assert "Filter: from shop.example, *.shop.example; tag vip, eu; metadata plan=gold, region=eu" in listed
    assert listed.count("Filter: ") == 1  # not for the unfiltered one
    detail = await ui.page(f"/ui/webhooks/{wid}")
    assert "Sender domain: <code>shop.example</code>, <code>*.shop.example</code>" in detail
    assert "Metadata (all of): <code>plan=gold</code>, <code>region=eu</code>" in detail
    assert 'name="from_domains" value="shop.example, *.shop.example"' in detail  # the edit form, filled in
    assert ">plan=gold\nregion=eu</textarea>" in detail
    assert "None: every event of its types" in await ui.page(f"/ui/webhooks/{plain}")

    # edit: replace, then clear by emptying every field
    reply = await ui.post(f"/ui/webhooks/{wid}", [("url", "http://127.0.0.1:9/shop"), ("events", "*"),
                                                  ("to_domains", "gmail.example")])
    assert reply.status == 303 and wh.filter.to_json()["to_domains"] == ["gmail.example"] and not wh.filter.tags
    reply = await ui.post(f"/ui/webhooks/{wid}", [("url", "http://127.0.0.1:9/shop"), ("events", "*"),
                                                  ("from_domains", " "), ("metadata", "\n")])
    assert reply.status == 303 and wh.filter.empty and wh.matcher is None

    # errors are shown in the form, with what was typed kept
    for fields, message in [([("from_domains", "shop example")], "filter.from_domains[0]: &#39;shop example&#39;"),
                            ([("metadata", "plan")], "filter.metadata line 1: expected key=value"),
                            ([("metadata", "n=1")] * 1 + [("tags", ",".join(f"t{i}" for i in range(51)))],
                             "filter.tags: at most 50 tags")]:
        bad = await ui.post(f"/ui/webhooks/{wid}", [("url", "http://127.0.0.1:9/shop"), ("events", "*"), *fields])
        assert bad.status == 400 and message in bad.text, bad.text[:3000]
    assert 'value="shop example"' in (await ui.post("/ui/webhooks/new", [
        ("url", "http://127.0.0.1:9/x"), ("events", "*"), ("from_domains", "shop example")])).text
    assert wh.filter.empty


async def test_hostile_filter_text_is_escaped_everywhere(make_ui: UIFactory) -> None:
    ui = await ui_logged_in(make_ui)
    status, made = await ui.h.api("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/x", "filter": {
        "tags": ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>'],
        "metadata": {"<b>k</b>": "</textarea><script>alert(3)</script>"}}})
    assert status == 201, made
    for path in ("/ui/webhooks", f"/ui/webhooks/{made['id']}"):
        page = await ui.page(path)
        assert "<script>alert" not in page and "<img src=x" not in page and "<b>k</b>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "</textarea><script>" not in page
    detail = await ui.page(f"/ui/webhooks/{made['id']}")
    assert "&lt;/textarea&gt;&lt;script&gt;alert(3)&lt;/script&gt;</textarea>" in detail  # kept, as text


async def test_a_declared_webhook_is_read_only_in_the_dashboard(make_ui: UIFactory) -> None:
    """Webhooks as code: the page says which file declares it and offers no edit, rotate or
    delete; posting them anyway is refused (409) naming the file; disable and enable work."""
    from webhookd.declared import DeclaredWebhook
    from webhookd.filters import EMPTY_FILTER

    ui = await ui_logged_in(make_ui)
    where = "/etc/webhookd/webhooks.d/<shop>.toml"  # escaped where shown
    await ui.h.daemon.admin.ops.sync([DeclaredWebhook(
        name="shop", url="http://127.0.0.1:9/shop", events=("delivered",), description="declared",
        filter=EMPTY_FILTER, source=where)])
    [wh] = [w for w in ui.h.daemon.scheduler.webhooks.values() if w.name == "shop"]
    shown = str(escape(where))
    listing = await ui.page("/ui/webhooks")
    assert f"declared in <code>{shown}</code> as <code>shop</code>" in listing
    detail = await ui.page(f"/ui/webhooks/{wh.id}")
    assert f"Declared in <code>{shown}</code> as <code>shop</code>" in detail and where not in detail
    buttons = Html(detail).buttons
    assert "Rotate secret" not in buttons and "Save changes" not in buttons and "Reveal secret" in buttons
    assert f"/webhooks/{wh.id}/delete" not in detail and 'id="h-edit"' not in detail
    for path, data in [(f"/ui/webhooks/{wh.id}", [("url", "http://127.0.0.1:9/b"), ("events", "opened")]),
                       (f"/ui/webhooks/{wh.id}/rotate-secret", None), (f"/ui/webhooks/{wh.id}/delete", None)]:
        reply = await ui.post(path, data)
        assert reply.status == 409 and f"is declared in {shown}" in reply.text, (path, reply.text[:300])
    refused = await ui.get(f"/ui/webhooks/{wh.id}/delete")
    assert refused.status == 409 and "delete" not in Html(refused.text).buttons
    assert (wh.url, wh.events) == ("http://127.0.0.1:9/shop", ("delivered",))
    assert (await ui.post(f"/ui/webhooks/{wh.id}/disable")).status == 303 and not wh.enabled
    assert (await ui.post(f"/ui/webhooks/{wh.id}/enable")).status == 303 and wh.enabled
    # an API-made webhook beside it keeps every form
    other = await ui.create("http://127.0.0.1:9/a")
    page = await ui.page(f"/ui/webhooks/{other}")
    assert "Rotate secret" in Html(page).buttons and 'id="declared"' not in page
