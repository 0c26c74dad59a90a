"""The dashboard in a real browser: Playwright drives Debian's chromium against a real
`webhookd serve` process (development mode, admin.http_listen on loopback with a token,
millisecond retries) that delivers to real aiohttp receivers on 127.0.0.1.

The HTTP-level properties are tests/test_ui.py's; these tests are what only a browser
shows: that the pages work by mouse and keyboard, that the controls are found by their
roles and labels (every control labelled, every button with its text), that the secret
really is gone after a reload or Back, that hostile text stays text with JavaScript
running, that a form without its token is refused from inside the page, and the layout
at phone width and in dark mode.

One browser, one daemon and one receiver server per module; a fresh browser context per
test (holding the cookie of one log-in made for the module, or none for the log-in
tests), and every webhook is deleted after each test. Without playwright or chromium
the module is skipped, unless WEBHOOKD_REQUIRE_BROWSER=1 (CI), where that is an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.test_process import Proc, wait_until

REQUIRE_BROWSER = os.environ.get("WEBHOOKD_REQUIRE_BROWSER") == "1"
CHROMIUM = "/usr/bin/chromium"

try:
    from playwright.sync_api import Browser, BrowserContext, Locator, Page, Playwright, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    if REQUIRE_BROWSER:
        raise
    pytest.skip("playwright is not installed (pip install -e '.[test]')", allow_module_level=True)

TOKEN = "browser-test-admin-token-0123456789"
DELIVERY = {
    "retry_base": "10ms", "retry_max": "40ms", "timeout": "5s", "connect_timeout": "2s",
    "max_attempts": 2, "disable_after": 3, "shutdown_grace": "1s",
}
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
WAIT_MS = 10_000  # the longest any expect() or page action waits

# The snippet's text on the secret page; only the whitespace may differ from the documentation.
DOC_SNIPPET = re.compile(
    r"def verify_signature\(payload_body, signature, secret\):\s+expected = hmac\.new\(\s+secret\.encode\(\),"
    r"\s+payload_body,\s+hashlib\.sha256\s+\)\.hexdigest\(\)\s+return hmac\.compare_digest\(expected, signature\)"
)


# The original webhook documentation's Python snippet, verbatim (annotations added).
def verify_signature(payload_body: bytes, signature: str, secret: str) -> bool:
    expected = hmac.new(
        secret.encode(),
        payload_body,
        hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, signature)


# -- receivers: one aiohttp server in a thread, one path per endpoint ---------------------------
@dataclass
class Got:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Endpoint:
    """Answers `plan` first, then `status`, with `body`. With a `secret`, a request whose
    X-Webhook-Signature does not verify (with the documentation's snippet) gets 401."""

    url: str
    status: int = 200
    plan: list[int] = field(default_factory=list)
    body: bytes = b'{"received": true}'
    content_type: str = "application/json"
    secret: str | None = None
    got: list[Got] = field(default_factory=list)


class Receivers:
    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name="receivers", daemon=True)
        self.thread.start()
        if not started.wait(10) or not self.port:
            raise RuntimeError("the receivers did not start")

    def _run(self, started: threading.Event) -> None:
        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/r/{key}", self._handle)
            self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            self.port = self.runner.addresses[0][1]

        try:
            self.loop.run_until_complete(start())
        finally:
            started.set()
        self.loop.run_forever()
        if self.runner is not None:
            self.loop.run_until_complete(self.runner.cleanup())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.cond:
            ep = self.endpoints.get(request.match_info["key"])
            if ep is None:
                return web.Response(status=404)
            signature = request.headers.get("X-Webhook-Signature", "")
            if ep.secret is not None and not verify_signature(body, signature, ep.secret):
                status = 401
            else:
                status = ep.plan.pop(0) if ep.plan else ep.status
            ep.got.append(Got(dict(request.headers), body, status))
            self.cond.notify_all()
        return web.Response(status=status, body=ep.body, content_type=ep.content_type)

    def add(self, **kwargs: Any) -> Endpoint:
        with self.cond:
            key = f"e{len(self.endpoints)}"
            ep = Endpoint(url=f"http://127.0.0.1:{self.port}/r/{key}", **kwargs)
            self.endpoints[key] = ep
            return ep

    def set(self, ep: Endpoint, **changes: Any) -> None:
        with self.cond:
            for name, value in changes.items():
                setattr(ep, name, value)

    def wait(self, ep: Endpoint, check: Callable[[list[Got]], bool], what: str, timeout: float = 10) -> list[Got]:
        with self.cond:
            if not self.cond.wait_for(lambda: check(ep.got), timeout):
                raise AssertionError(f"timed out waiting for {what}; got {[g.status for g in ep.got]}")
            return list(ep.got)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the daemon: `webhookd serve` as a process --------------------------------------------------
class Daemon:
    def __init__(self, proc: Proc, admin_port: int) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{admin_port}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def create(self, url: str, **fields: Any) -> dict[str, Any]:
        hook: dict[str, Any] = self.api("POST", "/v1/webhooks", {"url": url, "events": ["*"], **fields})
        return hook

    def webhook(self, wid: str) -> dict[str, Any]:
        hook: dict[str, Any] = self.api("GET", f"/v1/webhooks/{wid}")
        return hook

    def deliveries(self, **query: str) -> list[dict[str, Any]]:
        qs = urllib.parse.urlencode(query)
        rows: list[dict[str, Any]] = self.api("GET", f"/v1/deliveries?{qs}")["deliveries"]
        return rows

    def submit(self, *message_ids: str, kind: str = "delivered") -> None:
        events = [{"event": kind, "data": {"message_id": m, "to": "someone@example.org",
                                           "metadata": {"order_id": "12345"}}} for m in message_ids]
        req = urllib.request.Request(f"http://127.0.0.1:{self.proc.port}/v1/events", method="POST",
                                     data=json.dumps(events).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202

    def wait_deliveries(self, what: str, check: Callable[[list[dict[str, Any]]], bool],
                        **query: str) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]] | None:
            rows = self.deliveries(**query)
            return rows if check(rows) else None

        found: list[dict[str, Any]] = wait_until(matching, timeout=10, what=what)
        return found

    def delete_all(self) -> None:
        for hook in self.api("GET", "/v1/webhooks")["webhooks"]:
            self.api("DELETE", f"/v1/webhooks/{hook['id']}")


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is missing (apt-get install chromium); never a downloaded browser"
        if REQUIRE_BROWSER:
            pytest.fail(message + ", and WEBHOOKD_REQUIRE_BROWSER=1 requires it")
        pytest.skip(message)
    pw: Playwright = sync_playwright().start()
    try:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        expect.set_options(timeout=WAIT_MS)
        yield b
        b.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    r = Receivers()
    yield r
    r.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("ui-browser")
    run = Path(tempfile.mkdtemp(prefix="whd", dir="/tmp"))  # short: Unix socket paths
    proc = Proc(root, run)
    admin_port = free_port()
    proc.write_config(DELIVERY, tables=(
        f'[admin]\nhttp_listen = "127.0.0.1:{admin_port}"\ntoken = "{TOKEN}"\n'
    ))
    try:
        proc.start()
        yield Daemon(proc, admin_port)
    finally:
        proc.stop()
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def d(daemon: Daemon) -> Iterator[Daemon]:
    """The daemon, with every webhook deleted after the test: events fan out to every
    subscribed webhook, so a test's webhooks must not see the next test's events."""
    yield daemon
    daemon.delete_all()


def new_context(browser: Browser, daemon: Daemon, **options: Any) -> BrowserContext:
    ctx = browser.new_context(**{"base_url": daemon.base, "viewport": {"width": 1280, "height": 800}, **options})
    ctx.set_default_timeout(WAIT_MS)
    return ctx


@pytest.fixture(scope="module")
def logged_in(browser: Browser, daemon: Daemon) -> Any:
    """The cookies of one log-in with the admin token, for the tests that start logged in
    (the log-in tests log in themselves)."""
    ctx = new_context(browser, daemon)
    try:
        log_in(ctx.new_page())
        return ctx.storage_state()
    finally:
        ctx.close()


@pytest.fixture
def context(browser: Browser, daemon: Daemon) -> Iterator[BrowserContext]:
    """A browser context with no session."""
    ctx = new_context(browser, daemon)
    yield ctx
    ctx.close()


@pytest.fixture
def anon(context: BrowserContext) -> Page:
    """A page with no session."""
    return context.new_page()


@pytest.fixture
def page(browser: Browser, daemon: Daemon, logged_in: Any) -> Iterator[Page]:
    """A page on the overview, in a fresh context that holds the module's session cookie."""
    ctx = new_context(browser, daemon, storage_state=logged_in)
    page = ctx.new_page()
    page.goto("/ui/")
    expect(heading(page, "Overview")).to_be_visible()
    yield page
    ctx.close()


def log_in(page: Page) -> None:
    page.goto("/ui/login")
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()


def heading(page: Page, name: str | re.Pattern[str], level: int = 1) -> Locator:
    return page.get_by_role("heading", name=name, level=level)


def pwned(page: Page) -> Any:
    return page.evaluate("() => window.__pwned")


# -- log-in and log-out ------------------------------------------------------------------------
def test_token_log_in_and_log_out(anon: Page, d: Daemon) -> None:
    page = anon
    page.goto("/ui/")
    expect(page).to_have_url(f"{d.base}/ui/login")
    expect(heading(page, "Log in to the dashboard")).to_be_visible()
    page.get_by_label("Admin token").fill("not-the-token-at-all")
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.get_by_role("alert")).to_have_text("That is not the admin token.")

    log_in(page)
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Overview")).to_have_attribute("aria-current", "page")
    nav.get_by_role("link", name="Webhooks").click()
    expect(heading(page, "Webhooks")).to_be_visible()

    page.get_by_role("button", name="Log out", exact=True).click()
    expect(page).to_have_url(f"{d.base}/ui/login")
    # Back to a page seen while logged in asks the server again (no-store), which refuses
    page.go_back()
    expect(page).to_have_url(f"{d.base}/ui/login")
    expect(heading(page, "Webhooks")).to_have_count(0)
    for path in ("/ui/", "/ui/webhooks", "/ui/deliveries"):
        page.goto(path)
        expect(page).to_have_url(f"{d.base}/ui/login")
        expect(heading(page, "Log in to the dashboard")).to_be_visible()


def test_log_in_with_a_one_time_link_from_the_cli(context: BrowserContext, browser: Browser, d: Daemon) -> None:
    out = d.proc.cli("dashboard")
    assert out.returncode == 0, out.stderr
    link = out.stdout.decode().splitlines()[0]
    assert link.startswith(f"{d.base}/ui/login/"), link  # admin.http_listen's host and port, as printed
    page = context.new_page()
    page.goto(link)
    expect(page).to_have_url(f"{d.base}/ui/")
    expect(heading(page, "Overview")).to_be_visible()
    # single use: another browser (no cookies) gets the log-in page with the reason
    other = new_context(browser, d)
    try:
        second = other.new_page()
        second.goto(link)
        expect(second.get_by_role("alert")).to_contain_text("already used")
        expect(second.get_by_label("Admin token")).to_be_visible()
    finally:
        other.close()


def test_keyboard_only_log_in(anon: Page, d: Daemon) -> None:
    page = anon
    page.goto("/ui/login")
    field = page.get_by_label("Admin token")
    expect(field).to_be_focused()  # autofocus
    # the tab order from the top of the page: the skip link (visible when focused), the
    # brand link, the field, the button
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("link", name="webhookd", exact=True)).to_be_focused()
    page.keyboard.press("Shift+Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(field).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Tab")
    button = page.get_by_role("button", name="Log in", exact=True)
    expect(button).to_be_focused()
    # the focus is visible: :focus-visible draws an outline for keyboard users
    assert button.evaluate("el => getComputedStyle(el).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(heading(page, "Overview")).to_be_visible()
    expect(page).to_have_url(f"{d.base}/ui/")


# -- webhooks -----------------------------------------------------------------------------------
def test_create_shows_the_secret_once_and_test_verifies_the_signature(
    page: Page, d: Daemon, receivers: Receivers
) -> None:
    ep = receivers.add()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Webhooks").click()
    page.get_by_role("link", name="Create webhook").click()
    expect(heading(page, "Create webhook")).to_be_visible()
    page.get_by_label("Endpoint URL").fill(ep.url)
    expect(page.get_by_label("All events")).to_be_checked()
    page.get_by_label("Description").fill("Order system")
    page.get_by_role("button", name="Create webhook", exact=True).click()

    expect(page.get_by_role("status").filter(has_text="created")).to_be_visible()
    expect(heading(page, "Your signing secret", 2)).to_be_visible()
    secret = page.locator("#secret-value").inner_text().strip()
    assert secret.startswith("whsec_") and len(secret) > 40
    expect(page.get_by_role("button", name="Copy secret")).to_be_visible()  # shown by app.js
    python = page.locator("#snippet-python").inner_text()
    assert DOC_SNIPPET.search(python) and f"WEBHOOK_SECRET = '{secret}'" in python
    wid = page.url.rsplit("/", 1)[1]
    assert d.webhook(wid)["url"] == ep.url

    # Back to the page that showed it does not show it again (no-store: the browser keeps
    # no copy, and the server showed it once), and the page holds it nowhere: only masked
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Deliveries").click()
    expect(heading(page, "Deliveries")).to_be_visible()
    page.go_back()
    expect(heading(page, re.compile(rf"^{wid}"))).to_be_visible()
    expect(heading(page, "Your signing secret", 2)).to_have_count(0)
    expect(page.get_by_label("hidden secret")).to_have_text(re.compile(r"^whsec_•+$"))
    assert secret not in page.content()
    # nor does a reload
    page.reload()
    expect(heading(page, re.compile(rf"^{wid}"))).to_be_visible()
    expect(page.get_by_label("hidden secret")).to_be_visible()
    assert secret not in page.content()

    # Test: the receiver answers 200 only if the signature verifies with the doc's snippet
    receivers.set(ep, secret=secret)
    page.get_by_label("Event type").select_option("bounced")
    page.get_by_role("button", name="Send test event", exact=True).click()
    result = page.get_by_role("region", name=re.compile(r"^Test event bounced"))
    expect(result).to_contain_text("succeeded")
    facts = result.locator("dl")
    expect(facts).to_contain_text("HTTP 200")
    expect(facts).to_contain_text(re.compile(r"Duration\s*\d+(\.\d)? ms"))
    got = receivers.wait(ep, lambda g: len(g) == 1, "the test event")
    assert got[0].status == 200 and verify_signature(got[0].body, got[0].headers["X-Webhook-Signature"], secret)
    assert got[0].json["event"] == "bounced" and got[0].json["data"]["message_id"].startswith("test-")
    # and a wrong secret would have been refused: the check is real
    assert not verify_signature(got[0].body, got[0].headers["X-Webhook-Signature"], secret + "x")


def test_disabled_by_failures_then_re_enabled_sends_the_paused_deliveries(
    page: Page, d: Daemon, receivers: Receivers
) -> None:
    ep = receivers.add(status=500)
    hook = d.create(ep.url, description="Failing CRM")
    wid = hook["id"]
    d.submit(*(f"<fail-{i}@example.com>" for i in range(6)))
    wait_until(lambda: not d.webhook(wid)["enabled"], timeout=10, what="the webhook to be disabled")
    rows = d.wait_deliveries("the rest to be paused", lambda rows: all(r["status"] != "pending" for r in rows),
                             webhook_id=wid)
    paused = [r for r in rows if r["status"] == "paused"]
    assert paused, rows

    page.reload()  # the overview lists it
    disabled = page.get_by_role("region", name="Disabled webhooks")
    expect(disabled).to_contain_text("Disabled automatically after 3 consecutive failures.")
    disabled.get_by_role("link", name=wid).click()
    expect(heading(page, f"{wid} disabled")).to_be_visible()
    page.get_by_role("link", name="Re-enable webhook…").click()

    expect(heading(page, f"Re-enable webhook {wid}")).to_be_visible()
    n = len(paused)
    expect(page.locator("#paused-count")).to_have_text(f"{n} paused deliver{'y' if n == 1 else 'ies'}")
    expect(page.get_by_label(re.compile(rf"Drop the {n} paused"))).not_to_be_checked()
    receivers.set(ep, status=200)
    page.get_by_role("button", name="Re-enable webhook", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="Webhook enabled")).to_have_text(
        f"Webhook enabled; {n} paused deliver{'y' if n == 1 else 'ies'} resumed.")
    expect(heading(page, f"{wid} active")).to_be_visible()

    wanted = {p["message_id"] for p in paused}
    got = receivers.wait(ep, lambda g: wanted <= {x.json["data"]["message_id"] for x in g if x.status == 200},
                         "the paused deliveries")
    assert len([x for x in got if x.status == 200]) == n
    d.wait_deliveries("the resumed deliveries to succeed",
                      lambda rows: {r["message_id"] for r in rows} >= wanted, webhook_id=wid, status="succeeded")


# -- deliveries ---------------------------------------------------------------------------------
def test_search_by_message_id_and_the_detail_opens_in_a_new_tab(page: Page, d: Daemon, receivers: Receivers) -> None:
    ep = receivers.add()
    wid = d.create(ep.url)["id"]
    ids = [f"<search-{i}@shop.example.com>" for i in range(3)]
    d.submit(*ids)
    d.wait_deliveries("3 succeeded", lambda rows: len(rows) == 3, webhook_id=wid, status="succeeded")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Deliveries").click()
    search = page.get_by_role("search", name="Filter deliveries")
    search.get_by_label("Message id").fill(ids[1])
    search.get_by_role("button", name="Apply filters").click()
    expect(page).to_have_url(re.compile(r"message_id="))
    expect(search.get_by_label("Message id")).to_have_value(ids[1])
    table = page.get_by_role("table", name="Newest deliveries")
    rows = table.locator("tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(ids[1])
    expect(rows.first).to_contain_text("succeeded")

    link = rows.first.get_by_role("link", name=re.compile(r"^dlv_\d+$"))
    expect(link).to_have_attribute("target", "_blank")
    did = link.inner_text()
    with page.context.expect_page() as opened:
        link.click()
    tab = opened.value
    tab.wait_for_load_state()
    expect(heading(tab, f"{did} succeeded")).to_be_visible()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
    assert query["message_id"] == [ids[1]]  # the list stays where it was, in its own tab
    request = tab.get_by_role("region", name="Request")
    payload = json.loads(request.locator("pre.body").inner_text())
    assert payload["event"] == "delivered" and payload["data"]["message_id"] == ids[1]
    assert payload["data"]["metadata"] == {"order_id": "12345"}
    expect(request.get_by_role("table", name=re.compile("^Headers"))).to_contain_text("X-Webhook-Signature")
    attempts = tab.get_by_role("region", name="Attempts").get_by_role("listitem")
    expect(attempts).to_have_count(1)
    expect(attempts.first).to_contain_text("#1")
    expect(attempts.first).to_contain_text("HTTP 200")


def test_retry_a_failed_delivery_from_its_page(page: Page, d: Daemon, receivers: Receivers) -> None:
    ep = receivers.add(plan=[503, 503])  # max_attempts = 2: failed for good, then 200
    wid = d.create(ep.url)["id"]
    d.submit("<retry-me@example.com>")
    [row] = d.wait_deliveries("a failed delivery", lambda rows: len(rows) == 1, webhook_id=wid, status="failed")
    did = row["id"]

    page.goto(f"/ui/deliveries/{did}")
    expect(heading(page, f"{did} failed")).to_be_visible()
    attempts = page.get_by_role("region", name="Attempts").get_by_role("listitem")
    expect(attempts).to_have_count(2)
    expect(attempts.first).to_contain_text("HTTP 503")
    page.get_by_role("button", name="Retry now", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("The delivery is queued for an attempt now.")
    receivers.wait(ep, lambda g: len(g) == 3, "the retried attempt")
    d.wait_deliveries("the retry to succeed", lambda rows: len(rows) == 1, webhook_id=wid, status="succeeded")
    page.reload()
    expect(heading(page, f"{did} succeeded")).to_be_visible()
    expect(attempts).to_have_count(3)
    expect(attempts.last).to_contain_text("HTTP 200")


# -- hostile text and forged forms ----------------------------------------------------------------
def test_hostile_text_is_shown_as_text(page: Page, d: Daemon, receivers: Receivers) -> None:
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    ep = receivers.add(status=500, body=HOSTILE.encode(), content_type="text/html")
    page.goto("/ui/webhooks/new")
    page.get_by_label("Endpoint URL").fill(ep.url)
    page.get_by_label("Description").fill(HOSTILE)
    page.get_by_role("button", name="Create webhook", exact=True).click()
    wid = page.url.rsplit("/", 1)[1]
    expect(page.locator("main > p.muted").get_by_text(HOSTILE, exact=True)).to_be_visible()

    page.get_by_role("button", name="Send test event", exact=True).click()
    result = page.get_by_role("region", name=re.compile(r"^Test event"))
    expect(result).to_contain_text("HTTP 500")
    expect(result.locator("pre.body")).to_have_text(HOSTILE)

    page.goto("/ui/webhooks")
    expect(page.get_by_role("table").get_by_text(HOSTILE, exact=True)).to_be_visible()

    d.submit("<hostile@example.com>")
    [row] = d.wait_deliveries("a failed delivery", lambda rows: len(rows) == 1, webhook_id=wid, status="failed")
    page.goto(f"/ui/deliveries/{row['id']}")
    attempts = page.get_by_role("region", name="Attempts")
    attempts.get_by_text("Start of the response body").first.click()
    body = attempts.locator("pre.body").first
    expect(body).to_be_visible()
    expect(body).to_have_text(HOSTILE)
    for p in ("/ui/", "/ui/webhooks", f"/ui/deliveries?webhook_id={wid}", f"/ui/deliveries/{row['id']}",
              f"/ui/webhooks/{wid}"):
        page.goto(p)
        assert pwned(page) is None, p
        assert page.locator("img[src='x']").count() == 0, p
        assert page.locator("main script").count() == 0, p
    assert violations == []  # nothing even reached the CSP: the text was never markup


def test_a_post_without_the_csrf_token_is_refused(page: Page, d: Daemon, receivers: Receivers) -> None:
    wid = d.create(receivers.add().url)["id"]
    page.goto(f"/ui/webhooks/{wid}")
    expect(heading(page, f"{wid} active")).to_be_visible()
    post = """async ([url, fields]) => {
        const r = await fetch(url, {method: "POST", body: new URLSearchParams(fields)});
        return [r.status, await r.text()];
    }"""
    status, text = page.evaluate(post, [f"/ui/webhooks/{wid}/disable", {"x": "1"}])
    assert status == 403 and "security token is missing" in text
    status, text = page.evaluate(post, [f"/ui/webhooks/{wid}/disable", {"csrf": "forged-" + "a" * 40}])
    assert status == 403 and "security token is missing" in text
    assert d.webhook(wid)["enabled"] is True

    # the real form with its hidden field removed
    disable = page.locator(f"form[action='/ui/webhooks/{wid}/disable']")
    disable.locator("input[name='csrf']").evaluate("el => el.remove()")
    page.get_by_role("button", name="Disable webhook", exact=True).click()
    expect(heading(page, "Refused (403)")).to_be_visible()
    expect(page.get_by_text("security token is missing")).to_be_visible()
    assert d.webhook(wid)["enabled"] is True

    # the same fetch with the page's token goes through: what refused the others was the token
    page.goto(f"/ui/webhooks/{wid}")
    csrf = page.locator(f"form[action='/ui/webhooks/{wid}/disable'] input[name='csrf']").input_value()
    status, _ = page.evaluate(post, [f"/ui/webhooks/{wid}/disable", {"csrf": csrf}])
    assert status == 200 and d.webhook(wid)["enabled"] is False


# -- layout -----------------------------------------------------------------------------------------
OVERFLOW = """() => {
    const width = document.documentElement.clientWidth;
    const scrolls = el => { for (let p = el.parentElement; p; p = p.parentElement) {
        if (getComputedStyle(p).overflowX !== "visible") return true; } return false; };
    const over = [];
    for (const el of document.body.querySelectorAll("*")) {
        const r = el.getBoundingClientRect();
        if (r.width > 0 && r.right > width + 1 && !scrolls(el)) over.push(el.outerHTML.slice(0, 80));
    }
    const wraps = Array.from(document.querySelectorAll(".table-wrap"), w => w.scrollWidth > w.clientWidth);
    return {scroll: document.documentElement.scrollWidth, width, over, wraps};
}"""


def test_phone_width_has_no_page_overflow_and_dark_mode_changes_colours(
    browser: Browser, d: Daemon, receivers: Receivers
) -> None:
    ep = receivers.add()
    wid = d.create(ep.url, description="A webhook with a rather long description for a narrow screen")["id"]
    d.submit("<a-rather-long-message-id-0123456789@mail.example.com>")
    [row] = d.wait_deliveries("a delivery", lambda rows: len(rows) == 1, webhook_id=wid, status="succeeded")
    ctx = new_context(browser, d, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = ctx.new_page()
        page.goto("/ui/login")
        layout = page.evaluate(OVERFLOW)
        assert layout["width"] == 390
        assert layout["scroll"] <= layout["width"] and not layout["over"], ("/ui/login", layout)
        log_in(page)
        for path in ("/ui/", "/ui/webhooks", "/ui/webhooks/new", f"/ui/webhooks/{wid}", "/ui/deliveries",
                     f"/ui/deliveries/{row['id']}"):
            page.goto(path)
            layout = page.evaluate(OVERFLOW)
            assert layout["scroll"] <= layout["width"] and not layout["over"], (path, layout)
            if path in ("/ui/webhooks", "/ui/deliveries"):
                assert any(layout["wraps"]), (path, layout)  # the wide table scrolls inside its wrapper

        colours = "() => [getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color]"
        page.emulate_media(color_scheme="light")
        light_bg, light_ink = page.evaluate(colours)
        page.emulate_media(color_scheme="dark")
        dark_bg, dark_ink = page.evaluate(colours)
        assert light_bg != dark_bg and light_ink != dark_ink
        assert luminance(dark_bg) < 0.05 < 0.8 < luminance(light_bg)
        for bg, ink in ((light_bg, light_ink), (dark_bg, dark_ink)):
            assert contrast(bg, ink) >= 7, (bg, ink)  # body text: WCAG AAA
    finally:
        ctx.close()


def luminance(css: str) -> float:
    """Relative luminance (WCAG) of an `rgb(r, g, b)` colour."""
    channels = [int(c) / 255 for c in re.findall(r"\d+", css)[:3]]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)
