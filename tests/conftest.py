"""Shared fixtures: a real daemon in-process, real receivers on loopback, real sockets."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.pg import pg_cluster  # noqa: F401 - one private PostgreSQL cluster per session (tests/pg.py)
from webhookd.config import Config, parse_config
from webhookd.daemon import Daemon

if TYPE_CHECKING:
    from tests.test_process import Proc

FAST_DELIVERY: dict[str, Any] = {
    "retry_base": "20ms",
    "retry_max": "100ms",
    "timeout": "2s",
    "connect_timeout": "1s",
    "shutdown_grace": "1s",
}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="whd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(state: Path, run: Path, *, delivery: dict[str, Any] | None = None,
                intake: dict[str, Any] | None = None, **top: Any) -> Config:
    data: dict[str, Any] = {
        "environment": "development",
        "state_dir": str(state),
        "runtime_dir": str(run),
        "intake": {"http_listen": f"127.0.0.1:{free_port()}", **(intake or {})},
        "delivery": {**FAST_DELIVERY, **(delivery or {})},
        "log": {"level": "warning", "format": "json"},
        **top,
    }
    return parse_config(data, env={})


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now, and never one this test run handed out before:
    the kernel may give the same free port to two binds in a row (two `free_port()` in one
    config were once the same port, and the daemon could not listen on the second)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


# -- receivers ---------------------------------------------------------------------------------
@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """An aiohttp endpoint on loopback: `plan` statuses first, then `default`."""

    url: str = ""
    default: int = 200
    plan: list[int] = field(default_factory=list)
    delay: float = 0.0
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reply: bytes = b'{"received": true}'
    headers: dict[str, str] = field(default_factory=dict)
    active: int = 0  # requests being answered now
    max_active: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body))
        self.arrived.set()
        status = self.plan.pop(0) if self.plan else self.default
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.hang:
                await asyncio.sleep(3600)
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        return web.Response(status=status, body=self.reply, content_type="application/json",
                            headers=self.headers)

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        async def enough() -> None:
            while len(self.requests) < n:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout)
        return self.requests


@pytest.fixture
async def make_receiver() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def make(**kwargs: Any) -> Receiver:
        receiver = Receiver(**kwargs)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        receiver.url = f"http://127.0.0.1:{port}/hook"
        runners.append(runner)
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()


# -- the daemon in-process -----------------------------------------------------------------------
def db_rows(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run a read-only query on a database file, beside the daemon (WAL: it never blocks it)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.execute(query, params).fetchall())
    finally:
        conn.close()


class Harness:
    """A started Daemon plus clients for its sockets."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.session: aiohttp.ClientSession | None = None

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self.session is None:
            assert self.config.admin.socket is not None
            self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(self.config.admin.socket)))
        data = orjson.dumps(body) if body is not None else None
        async with self.session.request(method, f"http://admin{path}", data=data) as resp:
            raw = await resp.read()
            return resp.status, orjson.loads(raw) if raw else None

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """What the daemon's database holds (tests only: webhookd itself has no raw SQL outside
        its SQLite backend)."""
        return db_rows(self.config.storage.path, query, params)

    async def create_webhook(self, url: str, events: list[str] | None = None) -> dict[str, Any]:
        status, hook = await self.api("POST", "/v1/webhooks", {"url": url, "events": events or ["*"]})
        assert status == 201, hook
        return dict(hook)

    async def webhook(self, wid: str) -> dict[str, Any]:
        status, hook = await self.api("GET", f"/v1/webhooks/{wid}")
        assert status == 200, hook
        return dict(hook)

    async def deliveries(self, **query: Any) -> list[dict[str, Any]]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        status, body = await self.api("GET", f"/v1/deliveries?{qs}")
        assert status == 200, body
        return list(body["deliveries"])

    async def submit_raw(self, payload: bytes, *, half_close: bool = True) -> list[dict[str, Any]]:
        assert self.config.intake.socket is not None
        reader, writer = await asyncio.open_unix_connection(str(self.config.intake.socket))
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return [orjson.loads(line) for line in data.splitlines() if line.strip()]

    async def submit(self, *events: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.submit_raw(b"".join(orjson.dumps(e) + b"\n" for e in events))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.daemon.stop()


@pytest.fixture
async def start_daemon(tmp_path: Path, short_dir: Path) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    harnesses: list[Harness] = []

    async def start(**kwargs: Any) -> Harness:
        config = make_config(tmp_path / "state", short_dir, **kwargs)
        daemon = Daemon(config)
        await daemon.start()
        harness = Harness(daemon)
        harnesses.append(harness)
        return harness

    yield start
    for harness in harnesses:
        await harness.close()


def event(kind: str = "delivered", n: int = 0, **data: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "message_id": f"<msg-{n}@mail.example.com>",
        "from": "shop@example.com",
        "to": f"customer{n}@example.org",
        "subject": "Order Confirmation",
        "tags": ["order"],
        "metadata": {"order_id": str(12345 + n)},
    }
    if kind == "bounced":
        payload.update(bounce_type="hard", error_message="550 5.1.1 User unknown")
    payload.update(data)
    return {"event": kind, "data": payload}


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll an async predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- the real-MTA tests (tests/mta.py) -------------------------------------------------------------
@pytest.fixture
def smtp_sink() -> Iterator[tuple[Any, int]]:
    """The SMTP sink of tests/mta.py on a free loopback port: (its record, the port)."""
    from tests.mta import Sink

    handler, port = Sink(), free_port()
    controller = handler.start(port)
    yield handler, port
    controller.stop()


@pytest.fixture
def proc(tmp_path: Path, short_dir: Path) -> Iterator[Callable[..., Proc]]:
    """`webhookd serve` as a real process (tests/test_process.py's Proc); killed at the end."""
    from tests.test_process import Proc

    made: list[Proc] = []

    def make(delivery: dict[str, Any] | None = None) -> Proc:
        p = Proc(tmp_path, short_dir, delivery)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def thread_receiver() -> Iterator[Any]:
    """A webhook receiver in a thread (tests/test_process.py), for tests with no event loop."""
    from tests.test_process import ThreadReceiver

    r = ThreadReceiver()
    yield r
    r.close()
