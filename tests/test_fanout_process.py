"""Deferred fan-out through the real `webhookd serve`: 50 webhooks that cannot deliver (25 disabled,
25 whose receiver accepts and never answers) beside a healthy one, all subscribed to every event.

The healthy one gets every event; the others get no delivery rows (their deliveries are deferred,
webhookd/store/sqlite_fanout.py) while the status, the counts and the listings stay exact; after a
kill -9 and a restart the hanging receiver answers and the disabled webhooks are enabled, and every
event then reaches every one of them exactly once."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.test_process import Proc, ThreadReceiver, lines, wait_until

EVENTS = 400  # past the backlog at which an enabled webhook's deliveries are deferred (256)
CHUNK = 50  # submitted in runs: the storage decides to defer at the start of each run
HANGING = 25
DISABLED = 25


class HangingReceiver:
    """Accepts every request and answers none while `hanging`; afterwards answers 200 and counts
    each delivery by (path, message id). Requests received while hanging are never counted."""

    def __init__(self) -> None:
        self.hanging = True
        self.release = threading.Event()
        self.got: Counter[tuple[str, str]] = Counter()
        self.held = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if outer.hanging:
                    with outer.lock:
                        outer.held += 1
                    outer.release.wait()
                    self.close_connection = True
                    return  # no answer at all
                with outer.lock:
                    outer.got[(self.path, json.loads(body)["data"]["message_id"])] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self) -> None:
        self.hanging = False
        self.release.set()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hanging() -> Iterator[HangingReceiver]:
    r = HangingReceiver()
    yield r
    r.close()


def admin(d: Proc, method: str, path: str, body: Any = None) -> Any:
    """One admin API call over the daemon's Unix socket."""
    async def call() -> Any:
        connector = aiohttp.UnixConnector(path=str(d.run / "admin.sock"))
        async with (aiohttp.ClientSession(connector=connector) as session,
                    session.request(method, f"http://localhost{path}", json=body) as r):
            assert r.status < 300, (r.status, await r.text())
            return await r.json()

    return asyncio.run(call())


def rows_by_webhook(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT webhook_id, count(*) FROM deliveries GROUP BY webhook_id").fetchall())
    finally:
        conn.close()


def counts(d: Proc) -> dict[str, int]:
    return dict(admin(d, "GET", "/v1/status")["deliveries"])


@pytest.mark.timeout(240)  # 20,000 deliveries on a shared machine
def test_webhooks_that_cannot_deliver_cost_no_rows_and_later_get_every_event_once(
        proc: Callable[..., Proc], thread_receiver: ThreadReceiver, hanging: HangingReceiver) -> None:
    receiver = thread_receiver
    d = proc({"timeout": "60s", "retry_base": "50ms", "retry_max": "200ms"}).start()
    db = d.root / "state" / "webhookd.db"
    healthy = admin(d, "POST", "/v1/webhooks", {"url": receiver.url, "events": ["*"]})["id"]
    hung = [admin(d, "POST", "/v1/webhooks", {"url": f"{hanging.base}/h{i}", "events": ["*"]})["id"]
            for i in range(HANGING)]
    off = [admin(d, "POST", "/v1/webhooks", {"url": f"{hanging.base}/d{i}", "events": ["*"]})["id"]
           for i in range(DISABLED)]
    for wid in off:
        admin(d, "POST", f"/v1/webhooks/{wid}/disable")

    every = lines(EVENTS, "f").splitlines(keepends=True)
    for start in range(0, EVENTS, CHUNK):
        p = d.cli("submit", stdin=b"".join(every[start:start + CHUNK]))
        assert p.returncode == 0 and p.stdout.count(b'"ok":true') == CHUNK, p.stderr
    expected = {f"<f-{i}@x>" for i in range(EVENTS)}
    wait_until(lambda: receiver.delivered() >= expected, timeout=60, what="the healthy webhook's deliveries")
    assert len(receiver.bodies) == EVENTS  # each once
    # their outcomes committed (so the kill below sends none of them again), the hanging ones open
    wait_until(lambda: counts(d)["succeeded"] == EVENTS, timeout=60, what="the healthy outcomes recorded")
    wait_until(lambda: hanging.held >= HANGING, timeout=60, what="every hanging webhook to have attempts open")

    rows = rows_by_webhook(db)
    assert rows[healthy] == EVENTS
    assert not any(wid in rows for wid in off)  # nothing written for the disabled ones
    assert all(rows[wid] <= 256 + CHUNK for wid in hung)  # past the backlog: deferred
    assert counts(d) == {"pending": HANGING * EVENTS, "paused": DISABLED * EVENTS, "succeeded": EVENTS,
                         "failed": 0}
    # a person's read of one webhook's deliveries makes them rows, and sees each event once
    listed = admin(d, "GET", f"/v1/deliveries?webhook_id={off[0]}&limit=1000")["deliveries"]
    assert len(listed) == EVENTS and {x["status"] for x in listed} == {"paused"}
    assert admin(d, "GET", f"/v1/deliveries/count?webhook_id={hung[0]}")["count"] == EVENTS
    assert counts(d)["paused"] == DISABLED * EVENTS

    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    hanging.answer()  # from now on the "hanging" receiver answers
    d.start()
    assert counts(d)["paused"] == DISABLED * EVENTS  # the deferred state survived the kill
    for wid in off:
        assert admin(d, "POST", f"/v1/webhooks/{wid}/enable")["resumed"] == EVENTS

    def arrived() -> bool:
        with hanging.lock:
            return len(hanging.got) == (HANGING + DISABLED) * EVENTS

    wait_until(arrived, timeout=120, what="every event at every other webhook")
    wait_until(lambda: counts(d)["succeeded"] == (1 + HANGING + DISABLED) * EVENTS, timeout=60,
               what="every outcome recorded")
    assert counts(d) == {"pending": 0, "paused": 0, "succeeded": (1 + HANGING + DISABLED) * EVENTS, "failed": 0}
    with hanging.lock:
        assert set(hanging.got.values()) == {1}  # exactly once each
        paths = Counter(path for path, _ in hanging.got)
    assert set(paths.values()) == {EVENTS} and len(paths) == HANGING + DISABLED
    for wid in (hung[1], off[1]):
        assert admin(d, "GET", f"/v1/deliveries/count?webhook_id={wid}")["count"] == EVENTS
    assert len(receiver.bodies) == EVENTS
