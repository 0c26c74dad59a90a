"""Take the dashboard screenshots of docs/dashboard.md: docs/img/dashboard-<name>.png.

    .venv/bin/python docs/screenshots.py [--out docs/img] [--chromium /usr/bin/chromium]

Starts a real `webhookd serve` (development mode, in a temporary directory, admin API and
dashboard on a free loopback port) with receivers on 127.0.0.1, makes some demo data
(webhooks that succeed, one whose receiver sometimes answers an HTML error page, one
disabled by consecutive failures with paused deliveries, one backing off with pending
retries), logs in with Playwright and Debian's chromium (never a downloaded browser)
and saves one PNG per screen at 1280x800, plus the overview at phone width in dark mode.
Everything it starts is stopped at the end; the data is thrown away.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, ViewportSize, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "screenshot-admin-token-0123456789"  # noqa: S105 - the throw-away daemon's admin.token
FAST = {"retry_base": "10ms", "retry_max": "40ms"}
SLOW = {"retry_base": "10m", "retry_max": "1h"}  # after the reload: failures stay pending
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}

ERROR_PAGE = b"""<!DOCTYPE html>
<html><head><title>502 Bad Gateway</title></head>
<body><h1>502 Bad Gateway</h1><p>The CRM backend did not answer in time.</p>
<hr><address>nginx/1.24.0</address></body></html>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    """One request to 127.0.0.1:port; (status, body)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"screenshots: timed out waiting for {what}")


# -- receivers -----------------------------------------------------------------------------------
class Receivers:
    """One HTTP server on loopback; the path picks the behaviour."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, ctype, reply = Receivers.answer(self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(path: str, body: bytes) -> tuple[int, str, bytes]:
        if path.startswith("/legacy"):
            return 500, "text/plain", b"Internal Server Error\n"
        if path.startswith("/analytics"):
            return 503, "application/json", b'{"error": "warehouse is loading, try later"}'
        if path.startswith("/crm") and b"crm-down" in body:
            return 502, "text/html", ERROR_PAGE
        return 200, "application/json", b'{"received": true}'

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the daemon ------------------------------------------------------------------------------------
class Daemon:
    def __init__(self, root: Path, run: Path) -> None:
        self.root = root
        self.run = run
        self.intake_port = free_port()
        self.admin_port = free_port()
        self.base = f"http://127.0.0.1:{self.admin_port}"
        self.config = root / "config.toml"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, delivery: dict[str, str]) -> None:
        keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in delivery.items())
        self.config.write_text(
            f'environment = "development"\nstate_dir = "{self.root / "state"}"\nruntime_dir = "{self.run}"\n'
            f'[intake]\nhttp_listen = "127.0.0.1:{self.intake_port}"\n'
            f'[admin]\nhttp_listen = "127.0.0.1:{self.admin_port}"\ntoken = "{TOKEN}"\n'
            '[log]\nformat = "json"\n'
            '[delivery]\nmax_attempts = 3\ndisable_after = 4\ntimeout = "5s"\nshutdown_grace = "1s"\n' + keys
        )

    def start(self) -> None:
        self.write_config(FAST)
        env = {**os.environ, "WEBHOOKD_CONFIG": str(self.config)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "webhookd", "serve"], env=env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"webhookd serve exited {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                return bool(self.api("GET", "/v1/status"))
            except OSError:
                return False

        wait_until(up, "the daemon to answer")

    def reload(self, delivery: dict[str, str]) -> None:
        assert self.proc is not None
        before = self.log.read_text().count('"config reloaded"')
        self.write_config(delivery)
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.log.read_text().count('"config reloaded"') > before, "the reload")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        status, raw = call(self.admin_port, method, path, data, {"Authorization": f"Bearer {TOKEN}"})
        if status >= 300:
            raise SystemExit(f"screenshots: {method} {path} answered {status}: {raw[:500]!r}")
        return json.loads(raw) if raw else None

    def create(self, url: str, events: list[str], description: str, filter: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"url": url, "events": events, "description": description}
        if filter:
            body["filter"] = filter
        hook = self.api("POST", "/v1/webhooks", body)
        return str(hook["id"])

    def submit(self, events: list[dict[str, Any]]) -> None:
        status, raw = call(self.intake_port, "POST", "/v1/events", json.dumps(events).encode(),
                           {"Content-Type": "application/json"})
        if status != 202:
            raise SystemExit(f"screenshots: the intake answered {status}: {raw[:500]!r}")

    def count(self, wid: str, status: str) -> int:
        return int(self.api("GET", f"/v1/deliveries/count?webhook_id={wid}&status={status}")["count"])

    def settled(self, wid: str, **want: int) -> None:
        """Wait until the webhook's deliveries have these counts by status."""
        wait_until(lambda: all(self.count(wid, s) == n for s, n in want.items()), f"{wid} to reach {want}")


def event(kind: str, n: int, who: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "message_id": f"<{who}-{n:04d}@mail.shop.example.com>",
        "from": "orders@shop.example.com",
        "to": f"customer{n}@example.org",
        "subject": "Your order has shipped",
        "tags": ["order"],
        "metadata": {"order_id": str(12345 + n)},
        **extra,
    }
    if kind == "bounced":
        data.update(bounce_type="hard", error_message="550 5.1.1 User unknown")
    return {"event": kind, "data": data}


def demo_data(d: Daemon, r: Receivers) -> dict[str, str]:
    """The webhooks and deliveries the screenshots show; their ids by role."""
    ids = {
        "orders": d.create(f"{r.base}/orders", ["delivered", "opened", "clicked"], "Order system: delivery receipts"),
        "crm": d.create(f"{r.base}/crm", ["bounced", "complained"], "CRM sync: bounces and complaints",
                        {"from_domains": ["shop.example.com", "*.shop.example.com"], "tags": ["order"]}),
        "legacy": d.create(f"{r.base}/legacy", ["failed"], "Legacy alerting endpoint"),
    }
    d.submit([event(kind, n, "ord") for n, kind in enumerate(["delivered"] * 9 + ["opened"] * 4 + ["clicked"] * 3)])
    d.settled(ids["orders"], succeeded=16)
    # one CRM delivery fails for good (its receiver answers an HTML error page), then it recovers
    d.submit([event("bounced", 1, "crm-down")])
    d.settled(ids["crm"], failed=1)
    d.submit([event("bounced", n, "crm") for n in range(2, 5)] + [event("complained", 5, "crm")])
    d.settled(ids["crm"], succeeded=4)
    # the legacy endpoint always fails: disabled after 4 consecutive failures, the rest paused
    d.submit([event("failed", n, "alert", error_message="450 4.2.0 Mailbox busy") for n in range(7)])
    wait_until(lambda: not d.api("GET", f"/v1/webhooks/{ids['legacy']}")["enabled"], "legacy to be disabled")
    wait_until(lambda: d.count(ids["legacy"], "pending") == 0, "legacy's deliveries to pause")
    # slow retries from now on: a failing receiver leaves pending deliveries behind
    d.reload(SLOW)
    ids["analytics"] = d.create(f"{r.base}/analytics", ["opened"], "Analytics warehouse")
    d.submit([event("opened", n, "ana") for n in range(20, 23)])
    d.settled(ids["orders"], succeeded=19)
    wait_until(lambda: d.api("GET", f"/v1/webhooks/{ids['analytics']}")["consecutive_failures"] > 0,
               "analytics to back off")
    return ids


# -- the screenshots -------------------------------------------------------------------------------
@contextmanager
def running() -> Iterator[tuple[Daemon, Receivers]]:
    root = Path(tempfile.mkdtemp(prefix="webhookd-shots-"))
    run = Path(tempfile.mkdtemp(prefix="whd", dir="/tmp"))  # short: Unix socket paths
    receivers = Receivers()
    daemon = Daemon(root, run)
    try:
        daemon.start()
        yield daemon, receivers
    finally:
        daemon.stop()
        receivers.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)


def shoot(page: Page, out: Path, name: str) -> None:
    page.wait_for_load_state("networkidle")
    path = out / f"dashboard-{name}.png"
    page.screenshot(path=str(path), animations="disabled", caret="hide")
    print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  {path.stat().st_size // 1024} KB")


def log_in(page: Page) -> None:
    page.goto("/ui/login")
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()


def screenshots(out: Path, chromium: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with running() as (d, r), sync_playwright() as pw:
        ids = demo_data(d, r)
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = pw.chromium.launch(executable_path=chromium, args=args)
        ctx = browser.new_context(base_url=d.base, viewport=DESKTOP, color_scheme="light", locale="en-GB",
                                  timezone_id="UTC")
        page = ctx.new_page()

        page.goto("/ui/login")
        shoot(page, out, "login")
        log_in(page)
        expect(page.get_by_role("img", name="Bar chart of delivery attempts")).to_be_visible()
        shoot(page, out, "overview")

        page.get_by_role("navigation", name="Main").get_by_role("link", name="Webhooks").click()
        shoot(page, out, "webhooks")

        page.get_by_role("link", name="Create webhook").click()
        page.get_by_label("Endpoint URL").fill(f"{r.base}/billing")
        page.get_by_label("All events").uncheck()
        page.get_by_label("delivered", exact=True).check()
        page.get_by_label("bounced", exact=True).check()
        page.get_by_label("Description").fill("Billing service: delivery receipts for invoices")
        page.get_by_label("Description").blur()
        shoot(page, out, "create")
        page.get_by_role("button", name="Create webhook", exact=True).click()
        expect(page.get_by_role("heading", name="Your signing secret")).to_be_visible()
        shoot(page, out, "secret")

        page.goto(f"/ui/webhooks/{ids['crm']}")
        page.get_by_role("button", name="Send test event", exact=True).click()
        expect(page.get_by_role("heading", name="Test event delivered")).to_be_visible()
        shoot(page, out, "webhook")

        page.goto(f"/ui/webhooks/{ids['legacy']}/enable")
        shoot(page, out, "enable")

        page.goto("/ui/deliveries")
        search = page.get_by_role("search", name="Filter deliveries")
        for status in ("pending", "failed", "paused"):
            search.get_by_label(status, exact=True).check()
        search.get_by_role("button", name="Apply filters").click()
        expect(page.get_by_label("Live refresh")).to_be_visible()  # shown by app.js
        shoot(page, out, "deliveries")

        failed = d.api("GET", f"/v1/deliveries?webhook_id={ids['crm']}&status=failed")["deliveries"][0]["id"]
        page.goto(f"/ui/deliveries/{failed}")
        shoot(page, out, "delivery")
        attempts = page.get_by_role("region", name="Attempts")
        attempts.get_by_text("Start of the response body").first.click()
        attempts.evaluate("el => window.scrollTo(0, el.getBoundingClientRect().top + window.scrollY - 16)")
        shoot(page, out, "delivery-attempts")

        phone = browser.new_context(base_url=d.base, viewport=PHONE, color_scheme="dark", is_mobile=True,
                                    has_touch=True, storage_state=ctx.storage_state(), timezone_id="UTC")
        small = phone.new_page()
        small.goto("/ui/")
        expect(small.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        shoot(small, out, "phone-dark")
        phone.close()
        ctx.close()
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (Debian's chromium)")
    args = parser.parse_args()
    if not os.access(args.chromium, os.X_OK):
        raise SystemExit(f"{args.chromium} is missing: apt-get install chromium (never a downloaded browser)")
    screenshots(args.out.resolve(), args.chromium)


if __name__ == "__main__":
    main()
