"""Misbehaving receivers: each is a real server on 127.0.0.1, and after each the daemon must
record a readable failure (or a bounded success) and keep delivering to healthy receivers.

Receivers that break HTTP are raw `asyncio.start_server` handlers; timeouts and backoffs are
milliseconds so that every test settles well within a second or two.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import pytest

from tests.conftest import Harness, Receiver, event, eventually
from tests.test_metrics import scrape

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GIGABYTE = 1 << 30


@dataclass
class RawServer:
    """A TCP server on loopback that runs `handler` for each connection."""

    url: str = ""
    connections: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[Any]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: Handler) -> RawServer:
        state = RawServer()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            writers.append(writer)
            state.connections += 1
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the daemon hung up: that is what these receivers provoke
            finally:
                state.finished.set()
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        state.url = f"http://127.0.0.1:{port}/hook"
        return state

    yield start
    for server in servers:
        server.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for writer in writers:
        writer.close()
    for server in servers:
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 request (head and Content-Length body); return the body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return await reader.readexactly(length)


async def wait_for_peer_close(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def settled_delivery(h: Harness, url: str) -> dict[str, Any]:
    """Subscribe `url` to bounces, submit one, and return the settled delivery with its attempt log."""
    hook = await h.create_webhook(url, ["bounced"])
    [ack] = await h.submit(event("bounced", 1))
    assert ack["ok"] is True, ack

    async def settled() -> Any:
        ds = await h.deliveries(webhook_id=hook["id"])
        return ds[0] if ds and ds[0]["status"] in ("failed", "succeeded") else None

    d = await eventually(settled, timeout=3, what="the delivery to settle")
    status, shown = await h.api("GET", f"/v1/deliveries/{d['id']}")
    assert status == 200, shown
    return dict(shown)


async def assert_still_healthy(h: Harness, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    """The daemon answers its admin API and a following event reaches a healthy receiver."""
    status, body = await h.api("GET", "/healthz")
    assert status == 200 and body == {"ok": True}
    healthy = await make_receiver()
    await h.create_webhook(healthy.url, ["delivered"])
    [ack] = await h.submit(event("delivered", 2))
    assert ack["ok"] is True, ack
    [req] = await healthy.wait_for(1, timeout=2)
    assert req.json["data"]["to"] == "customer2@example.org"


# -- no answer, slow answers ---------------------------------------------------------------------
async def test_receiver_that_never_answers_times_out(
    start_daemon: Any, make_receiver: Any, raw_server: Any
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await wait_for_peer_close(reader)  # accept, read, and never say a word

    server = await raw_server(silent)
    h = await start_daemon(delivery={"timeout": "300ms", "max_attempts": 1})
    d = await settled_delivery(h, server.url)
    assert d["status"] == "failed"
    assert d["last_status_code"] is None
    assert d["last_error"] == "timeout after 0.3s"
    [attempt] = d["attempt_log"]
    assert 250 <= attempt["duration_ms"] < 1000
    assert attempt["status_code"] is None and attempt["error"] == "timeout after 0.3s"
    assert server.connections == 1
    await asyncio.wait_for(server.finished.wait(), 1)  # the daemon dropped the connection
    await assert_still_healthy(h, make_receiver)


async def test_receiver_that_trickles_its_body_times_out(
    start_daemon: Any, make_receiver: Any, raw_server: Any
) -> None:
    trickled = 0

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal trickled
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n")
        while True:  # one byte every 100 ms, forever: each read makes progress, the whole never ends
            await writer.drain()
            await asyncio.sleep(0.1)
            if writer.is_closing() or reader.at_eof():
                return
            writer.write(b"x")
            trickled += 1

    server = await raw_server(trickle)
    h = await start_daemon(delivery={"timeout": "300ms", "max_attempts": 1})
    d = await settled_delivery(h, server.url)
    assert d["status"] == "failed"
    assert d["last_error"] == "timeout after 0.3s"
    [attempt] = d["attempt_log"]
    assert attempt["duration_ms"] < 1000, "the total timeout bounds the whole attempt, body included"
    await asyncio.wait_for(server.finished.wait(), 1)
    assert trickled <= 5
    await assert_still_healthy(h, make_receiver)


# -- broken connections ----------------------------------------------------------------------------
def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def resetting(sent_before_reset: bytes) -> Handler:
    """A receiver that reads the request, sends `sent_before_reset`, then resets the connection."""

    async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if sent_before_reset:
            writer.write(sent_before_reset)
            await writer.drain()
            await asyncio.sleep(0.05)  # let the daemon read the partial response first
        reset(writer)

    return rst


BEFORE_RESPONSE = b""
IN_STATUS_LINE = b"HTTP/1.1 200 O"
IN_HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
IN_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"received\": "
RESET_IDS = ["before-response", "status-line", "headers", "body"]


@pytest.mark.parametrize(
    "sent_before_reset", [BEFORE_RESPONSE, IN_STATUS_LINE, IN_HEADERS, IN_BODY], ids=RESET_IDS
)
async def test_connection_reset_mid_response_is_a_failure(
    start_daemon: Any, make_receiver: Any, raw_server: Any, sent_before_reset: bytes
) -> None:
    server = await raw_server(resetting(sent_before_reset))
    h = await start_daemon(delivery={"timeout": "1s", "max_attempts": 1})
    d = await settled_delivery(h, server.url)
    assert d["status"] == "failed"
    assert d["last_status_code"] is None
    error = d["last_error"]
    assert error and not error.startswith(("unexpected error", "timeout")), error
    assert any(word in error for word in ("disconnected", "reset", "broken", "closed")), error
    await assert_still_healthy(h, make_receiver)


@pytest.mark.parametrize(
    "sent_before_reset",
    [
        BEFORE_RESPONSE,
        IN_STATUS_LINE,
        IN_HEADERS,
        IN_BODY,
    ],
    ids=RESET_IDS,
)
async def test_connection_reset_reads_like_a_documented_error(
    start_daemon: Any, raw_server: Any, sent_before_reset: bytes
) -> None:
    """docs/behaviour.md lists the readable forms of last_error and the metric outcomes; a reset must
    map onto one of them ("connection" or "protocol"), not onto a Python class name and "other"."""
    server = await raw_server(resetting(sent_before_reset))
    h = await start_daemon(delivery={"timeout": "1s", "max_attempts": 1})
    d = await settled_delivery(h, server.url)
    assert d["status"] == "failed"
    assert d["last_error"].startswith(
        ("connection failed", "server disconnected", "response body broken", "invalid HTTP response")
    ), d["last_error"]
    m = await scrape(h)
    outcomes = {
        dict(labels)["outcome"]: n for (name, labels), n in m.items() if name == "webhookd_delivery_attempts_total"
    }
    assert len(outcomes) == 1 and set(outcomes) <= {"connection", "protocol"}, (outcomes, d["last_error"])


# -- huge responses -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % GIGABYTE,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",  # read until close
    ],
    ids=["content-length", "chunked", "until-close"],
)
async def test_gigabyte_response_is_not_read(
    start_daemon: Any, make_receiver: Any, raw_server: Any, head: bytes
) -> None:
    sent = 0
    chunked = b"chunked" in head

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(head)
        block = b"x" * 65536
        if chunked:
            block = b"%x\r\n" % len(block) + block + b"\r\n"
        while sent < GIGABYTE:  # lazily: 64 KiB at a time, until the daemon hangs up
            writer.write(block)
            await writer.drain()
            sent += 65536

    server = await raw_server(flood)
    h = await start_daemon(delivery={"timeout": "2s", "max_attempts": 1, "max_response_bytes": 65536})
    d = await settled_delivery(h, server.url)
    await asyncio.wait_for(server.finished.wait(), 2)
    # What left the server before the daemon hung up is bounded by max_response_bytes plus the
    # socket buffers of both kernels and aiohttp's read-ahead: megabytes, never the gigabyte.
    assert sent < 64 * 1024 * 1024, f"{sent} bytes were sent before the daemon hung up"
    assert d["status"] == "succeeded", d
    assert d["last_status_code"] == 200
    [attempt] = d["attempt_log"]
    assert attempt["response_body"] == "x" * 1024
    assert attempt["duration_ms"] < 2000
    await assert_still_healthy(h, make_receiver)


# -- not HTTP at all -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6p1 Debian-3\r\n",
        b"220 mail.example.com ESMTP Postfix\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)),
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nthis header has no colon\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["ssh", "smtp", "binary", "bad-status", "bad-length", "bad-header"],
)
async def test_garbage_instead_of_http(
    start_daemon: Any, make_receiver: Any, raw_server: Any, garbage: bytes
) -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(garbage)
        await writer.drain()
        await wait_for_peer_close(reader)  # keep the connection open: the daemon must notice by itself

    server = await raw_server(babble)
    h = await start_daemon(delivery={"timeout": "1s", "max_attempts": 1})
    d = await settled_delivery(h, server.url)
    assert d["status"] == "failed"
    assert d["last_status_code"] is None
    assert d["last_error"].startswith("invalid HTTP response"), d["last_error"]
    assert d["attempt_log"][0]["duration_ms"] < 900, "recognised as garbage, not left to time out"
    await assert_still_healthy(h, make_receiver)


@pytest.mark.parametrize(
    ("head", "unit"),
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Header: value\r\n"),  # headers without end
        (b"HTTP/1.1 200 OK\r\nX-Big: ", b"a" * 4096),  # one header line without end
        (b"HTTP/1.1 200 ", b"O" * 4096),  # a status line without end
    ],
    ids=["endless-headers", "endless-header-line", "endless-status-line"],
)
async def test_endless_response_head_is_refused(
    start_daemon: Any, make_receiver: Any, raw_server: Any, head: bytes, unit: bytes
) -> None:
    """max_response_bytes bounds the body; the head is bounded by the HTTP parser's own limits."""
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(head)
        block = unit * (65536 // len(unit))
        while sent < GIGABYTE:
            writer.write(block)
            await writer.drain()
            sent += len(block)

    server = await raw_server(endless)
    h = await start_daemon(delivery={"timeout": "2s", "max_attempts": 1})
    d = await settled_delivery(h, server.url)
    await asyncio.wait_for(server.finished.wait(), 2)
    assert sent < 64 * 1024 * 1024, f"{sent} bytes were sent before the daemon hung up"
    assert d["status"] == "failed"
    assert d["last_error"].startswith("invalid HTTP response"), d["last_error"]
    assert d["attempt_log"][0]["duration_ms"] < 1500, "refused by the parser, not left to time out"
    await assert_still_healthy(h, make_receiver)


# -- Retry-After -----------------------------------------------------------------------------------
async def gap_between_first_two_requests(receiver: Receiver) -> float:
    loop = asyncio.get_running_loop()
    await receiver.wait_for(1, timeout=2)
    first = loop.time()
    await receiver.wait_for(2, timeout=3)
    return loop.time() - first


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_capped_by_retry_max(
    start_daemon: Any, make_receiver: Any, status: int, form: str
) -> None:
    value = "3600" if form == "seconds" else formatdate(time.time() + 3600, usegmt=True)
    receiver = await make_receiver(plan=[status], headers={"Retry-After": value})
    h = await start_daemon(delivery={"retry_base": "10ms", "retry_max": "400ms"})
    hook = await h.create_webhook(receiver.url)
    await h.submit(event())
    gap = await gap_between_first_two_requests(receiver)
    # an hour asked for, 400 ms allowed: the retry comes after ~0.4 s (not after 10-20 ms, not in an hour)
    assert 0.35 <= gap < 1.5, gap

    async def succeeded() -> Any:
        ds = await h.deliveries(webhook_id=hook["id"])
        return ds[0] if ds[0]["status"] == "succeeded" else None

    d = await eventually(succeeded, timeout=2)
    _, shown = await h.api("GET", f"/v1/deliveries/{d['id']}")
    assert [a["status_code"] for a in shown["attempt_log"]] == [status, 200]
    assert shown["attempt_log"][0]["error"] == f"HTTP {status}"
    assert (await h.webhook(hook["id"]))["consecutive_failures"] == 0


async def test_429_retry_after_below_the_cap_is_honoured(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(plan=[429], headers={"Retry-After": "1"})
    h = await start_daemon(delivery={"retry_base": "10ms", "retry_max": "5s"})
    await h.create_webhook(receiver.url)
    await h.submit(event())
    gap = await gap_between_first_two_requests(receiver)
    assert 0.95 <= gap < 2.0, gap


@pytest.mark.parametrize(
    "value",
    ["soon", "-5", "1.5", "", "9" * 400, "Thu, 99 Foo 2026 99:99:99 GMT", "Mon, 01 Jan 0001 00:00:00 GMT"],
)
async def test_unusable_retry_after_falls_back_to_the_backoff(
    start_daemon: Any, make_receiver: Any, value: str
) -> None:
    receiver = await make_receiver(plan=[503], headers={"Retry-After": value})
    h = await start_daemon(delivery={"retry_base": "10ms", "retry_max": "300ms"})
    hook = await h.create_webhook(receiver.url)
    await h.submit(event())
    gap = await gap_between_first_two_requests(receiver)
    assert gap < 1.0, gap  # at most retry_max (+ jitter), whatever the header says
    d = (await h.deliveries(webhook_id=hook["id"]))[0]
    _, shown = await h.api("GET", f"/v1/deliveries/{d['id']}")
    assert shown["attempt_log"][0]["status_code"] == 503
    assert shown["attempt_log"][0]["error"] == "HTTP 503"


async def test_non_ascii_digit_retry_after_keeps_the_status(start_daemon: Any, raw_server: Any) -> None:
    async def superscript(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: \xc2\xb2\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await wait_for_peer_close(reader)

    server = await raw_server(superscript)
    h = await start_daemon(delivery={"timeout": "1s", "max_attempts": 1})
    d = await settled_delivery(h, server.url)
    assert d["status"] == "failed"
    assert (d["last_status_code"], d["last_error"]) == (503, "HTTP 503")
