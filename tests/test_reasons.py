"""One Reason per refusal and failed attempt: the answer text, the metric label and the
`webhookd submit` verdict all come from it, and rewording a text cannot move a label.

The intake tables drive the real intakes (LineProtocol on a fake transport, the HTTP
application on a test server); the attempt table feeds real exception objects and statuses
to the dispatcher's classification, and a few cases go through a real `Dispatcher.post`.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

import webhookd.dispatcher
from webhookd.cli import _answer_verdict
from webhookd.config import DeliveryConfig
from webhookd.dispatcher import Dispatcher, Failure, classify_exception, classify_status
from webhookd.events import Event
from webhookd.intake import IntakeStats, LineProtocol, http_app
from webhookd.metrics import Metrics
from webhookd.netguard import TargetRefused
from webhookd.reasons import ATTEMPT_REASONS, INTAKE_REASONS, Lead, Reason
from webhookd.store import StoreError
from webhookd.store.sqlite import describe
from webhookd.store.writer import SHUTTING_DOWN

MAX_LINE = 1024
GOOD = orjson.dumps({"event": "delivered", "data": {"message_id": "m1"}})


# -- helpers --------------------------------------------------------------------------------
class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


Submit = Callable[[Event], "asyncio.Future[str]"]


def committing(_event: Event) -> asyncio.Future[str]:
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    fut.set_result("evt_1")
    return fut


def failing(exc: BaseException) -> Submit:
    def submit(_event: Event) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        fut.set_exception(exc)
        return fut

    return submit


def rejection_labels(stats: IntakeStats) -> dict[str, float]:
    """webhookd_intake_rejections_total as /metrics prints it."""
    metrics = Metrics()
    metrics.rejected = lambda: stats.rejected
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "webhookd_intake_rejections_total":
                out[sample.labels["reason"]] = sample.value
    return out


def attempt_labels(metrics: Metrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "webhookd_delivery_attempts_total":
                out[sample.labels["outcome"]] = sample.value
    return out


async def socket_answer(
    data: bytes, *, submit: Submit = committing, max_connections: int = 10
) -> tuple[bytes, IntakeStats]:
    """Feed `data` to one intake connection, half-close, and return its one answer line."""
    stats = IntakeStats()
    proto = LineProtocol(submit, max_line=MAX_LINE, max_connections=max_connections, stats=stats)
    transport = FakeTransport()
    proto.connection_made(cast(asyncio.Transport, transport))
    proto.data_received(data)
    proto.eof_received()
    for _ in range(3):  # commit callbacks run on the next loop turns
        await asyncio.sleep(0)
    lines = bytes(transport.out).splitlines()
    assert len(lines) == 1, lines
    assert transport.closed
    return lines[0], stats


# -- intake, Unix socket: every text, label and verdict ---------------------------------------
@dataclass(frozen=True)
class SocketCase:
    reason: Reason
    label: str  # the metric label, spelled out: a changed value must fail here
    verdict: str  # what `webhookd submit` makes of the answer (75 = tempfail, 65 = rejected)
    text: str  # the exact answer text (a trailing "..." means: starts with)
    data: bytes = b""
    submit: Submit = committing
    max_connections: int = 10


SOCKET_CASES = [
    SocketCase(Reason.INVALID_JSON, "invalid_json", "rejected", "invalid JSON: ...", b"{nope\n"),
    SocketCase(Reason.INVALID_JSON, "invalid_json", "rejected", "invalid UTF-8 at byte 10", b'{"event": \xff}\n'),
    SocketCase(Reason.INVALID_JSON, "invalid_json", "rejected", "empty line", b"\n"),
    SocketCase(Reason.INVALID_JSON, "invalid_json", "rejected", "invalid UTF-8 at byte 6", b"event=\xff\n"),  # logfmt
    SocketCase(Reason.INVALID_EVENT, "invalid_event", "rejected",
               'unknown event "x" (expected one of delivered, bounced, opened, clicked, complained, failed)',
               b'{"event": "x", "data": {"message_id": "m"}}\n'),
    SocketCase(Reason.INVALID_EVENT, "invalid_event", "rejected",
               "logfmt: expected key=value at column 17, got 'stray'", b"event=delivered stray\n"),
    SocketCase(Reason.INVALID_EVENT, "invalid_event", "rejected",
               "integer 123456789012345678901 does not fit in 64 bits; send it as a string",
               b'{"event": "delivered", "data": {"message_id": "m", "n": 123456789012345678901}}\n'),
    SocketCase(Reason.TOO_LONG, "too_long", "rejected",
               f"line longer than intake.max_event_bytes ({MAX_LINE} bytes); skipped", b"x" * (MAX_LINE + 1) + b"\n"),
    SocketCase(Reason.TOO_MANY_CONNECTIONS, "too_many_connections", "tempfail",
               "temporarily unavailable: too many connections (intake.max_connections = 0)", GOOD + b"\n",
               max_connections=0),
    SocketCase(Reason.STORAGE, "storage", "tempfail", "storage full: cannot commit (database or disk is full)",
               GOOD + b"\n", failing(StoreError(describe(sqlite3.OperationalError("database or disk is full"))))),
    SocketCase(Reason.STORAGE, "storage", "tempfail", "storage error: disk I/O error",
               GOOD + b"\n", failing(StoreError(describe(sqlite3.OperationalError("disk I/O error"))))),
    SocketCase(Reason.UNAVAILABLE, "unavailable", "tempfail", "temporarily unavailable: daemon is shutting down",
               GOOD + b"\n", failing(StoreError(SHUTTING_DOWN, Reason.UNAVAILABLE))),
    SocketCase(Reason.INTERNAL, "internal", "tempfail", "internal error: boom",
               GOOD + b"\n", failing(RuntimeError("boom"))),
]


def _matches(text: str, expected: str) -> bool:
    return text.startswith(expected[:-3]) if expected.endswith("...") else text == expected


@pytest.mark.parametrize("case", SOCKET_CASES, ids=lambda c: f"{c.reason.name}:{c.text[:24]}")
async def test_socket_rejection(case: SocketCase) -> None:
    answer, stats = await socket_answer(case.data, submit=case.submit, max_connections=case.max_connections)
    doc = orjson.loads(answer)
    assert set(doc) == {"ok", "error"} and doc["ok"] is False  # the wire format: nothing added
    assert _matches(doc["error"], case.text), doc["error"]
    assert stats.rejected == {case.reason: 1}
    assert rejection_labels(stats) == {case.label: 1}
    assert _answer_verdict(answer) == case.verdict
    assert Reason.of_intake_message(doc["error"]) is case.reason  # the CLI reads the same reason back
    assert case.reason.tempfail is (case.verdict == "tempfail")


async def test_socket_accepts_without_counting_a_rejection() -> None:
    answer, stats = await socket_answer(GOOD + b"\n")
    assert orjson.loads(answer) == {"ok": True, "id": "evt_1"}
    assert _answer_verdict(answer) == "ok"
    assert stats.accepted == 1 and not stats.rejected


# -- intake, HTTP ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpCase:
    reason: Reason
    label: str
    status: int
    text: str
    body: bytes = GOOD
    token: str | None = "t"
    submit: Submit = committing


_EVENT = {"event": "delivered", "data": {"message_id": "m"}}

HTTP_CASES = [
    HttpCase(Reason.UNAUTHORIZED, "unauthorized", 401, "missing or wrong bearer token", token="wrong"),
    HttpCase(Reason.UNAUTHORIZED, "unauthorized", 401, "missing or wrong bearer token", token=None),
    HttpCase(Reason.INVALID_JSON, "invalid_json", 400, "invalid JSON: ...", b"{nope"),
    HttpCase(Reason.INVALID_JSON, "invalid_json", 400, "empty line", b""),
    HttpCase(Reason.INVALID_EVENT, "invalid_event", 400, "empty array: no events", b"[]"),
    HttpCase(Reason.INVALID_EVENT, "invalid_event", 400, "events[1]: data.message_id is required",
             orjson.dumps([_EVENT, {"event": "delivered", "data": {}}])),
    HttpCase(Reason.TOO_LONG, "too_long", 413, f"body larger than {1000 * MAX_LINE} bytes",
             b" " * (1000 * MAX_LINE + 1)),
    HttpCase(Reason.TOO_LONG, "too_long", 413, "more than 1000 events in one request", orjson.dumps([_EVENT] * 1001)),
    HttpCase(Reason.TOO_LONG, "too_long", 413, f"event larger than intake.max_event_bytes ({MAX_LINE})",
             orjson.dumps({"event": "delivered", "data": {"message_id": "m", "subject": "x" * MAX_LINE}})),
    HttpCase(Reason.STORAGE, "storage", 503, "storage error: disk I/O error",
             submit=failing(StoreError(describe(sqlite3.OperationalError("disk I/O error"))))),
    HttpCase(Reason.UNAVAILABLE, "unavailable", 503, "temporarily unavailable: daemon is shutting down",
             submit=failing(StoreError(SHUTTING_DOWN, Reason.UNAVAILABLE))),
]


@pytest.fixture
async def http_intake() -> AsyncIterator[Callable[[HttpCase], Any]]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def post(case: HttpCase) -> tuple[int, Any, IntakeStats]:
        stats = IntakeStats()
        app = http_app(case.submit, token="t", max_event_bytes=MAX_LINE, stats=stats)
        client = TestClient(TestServer(app))
        clients.append(client)
        await client.start_server()
        headers = {"Authorization": f"Bearer {case.token}"} if case.token else {}
        async with client.post("/v1/events", data=case.body, headers=headers) as resp:
            return resp.status, await resp.json(), stats

    yield post
    for client in clients:
        await client.close()


@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda c: f"{c.reason.name}:{c.text[:24]}")
async def test_http_rejection(case: HttpCase, http_intake: Callable[[HttpCase], Any]) -> None:
    status, doc, stats = await http_intake(case)
    assert status == case.status
    assert set(doc) == {"error"} and _matches(doc["error"], case.text), doc
    assert stats.rejected == {case.reason: 1}
    assert rejection_labels(stats) == {case.label: 1}


def test_every_intake_reason_has_a_case() -> None:
    covered = {c.reason for c in SOCKET_CASES} | {c.reason for c in HTTP_CASES}
    assert covered == set(INTAKE_REASONS)
    assert {r.value for r in INTAKE_REASONS} == {c.label for c in SOCKET_CASES} | {c.label for c in HTTP_CASES}


# -- the lead table and reading an answer back --------------------------------------------------
def test_every_lead_stands_for_an_intake_reason() -> None:
    for lead in Lead:
        assert lead.reason in INTAKE_REASONS, lead
        assert Reason.of_intake_message(lead.text(" and more")) is lead.reason, lead
    # the documented promises (docs/behaviour.md) that MTAs rely on
    assert Lead.STORAGE.words == "storage"
    assert Lead.UNAVAILABLE.words == Lead.TOO_MANY_CONNECTIONS.words.split(":")[0] == "temporarily unavailable"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Storage full: cannot commit", Reason.STORAGE),  # case aside, as the CLI always did
        ("INTERNAL ERROR: x", Reason.INTERNAL),
        ("temporarily unavailable: daemon is shutting down", Reason.UNAVAILABLE),
        ("temporarily unavailable: too many connections (intake.max_connections = 3)", Reason.TOO_MANY_CONNECTIONS),
        ("unknown event \"x\"", Reason.INVALID_EVENT),
        ("empty array: no events", Reason.INVALID_EVENT),
        ("", Reason.INVALID_EVENT),
    ],
)
def test_of_intake_message(text: str, reason: Reason) -> None:
    assert Reason.of_intake_message(text) is reason


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (b'{"ok": true, "id": "evt_1"}', "ok"),
        (b'{"ok": false, "error": "invalid JSON: x"}', "rejected"),
        (b'{"ok": false, "error": "storage error: disk I/O error"}', "tempfail"),
        (b'{"ok": false}', "rejected"),
        (b"not json", "tempfail"),  # garbled: nothing says it was committed
        (b"[1]", "tempfail"),
    ],
)
def test_answer_verdicts(answer: bytes, verdict: str) -> None:
    assert _answer_verdict(answer) == verdict


# -- delivery attempts: every failure's reason, text and label -------------------------------------
KEY = ConnectionKey("example.org", 443, True, True, None, None, None)
REQUEST = RequestInfo(URL("https://example.org/"), "POST", CIMultiDictProxy(CIMultiDict()), URL("https://example.org/"))


@dataclass(frozen=True)
class AttemptCase:
    reason: Reason
    label: str
    cause: int | BaseException  # an HTTP status or the exception the request raised
    text: str  # exact, or "..." at the end for "starts with"


ATTEMPT_CASES = [
    AttemptCase(Reason.HTTP_STATUS, "http_status", 500, "HTTP 500"),
    AttemptCase(Reason.HTTP_STATUS, "http_status", 429, "HTTP 429"),
    AttemptCase(Reason.REDIRECT, "redirect", 302, "HTTP 302: redirect to https://elsewhere.example/ not followed"),
    AttemptCase(Reason.TIMEOUT, "timeout", TimeoutError(), "timeout after 10s"),
    AttemptCase(Reason.TIMEOUT, "timeout", aiohttp.ServerTimeoutError(), "timeout after 10s"),
    AttemptCase(Reason.TIMEOUT, "timeout", aiohttp.SocketTimeoutError(), "timeout after 10s"),
    AttemptCase(Reason.CONNECT_TIMEOUT, "connect_timeout", aiohttp.ConnectionTimeoutError(),
                "connect timeout after 5s"),
    AttemptCase(Reason.CONNECTION, "connection",
                aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")),
                "connection failed: Connection refused"),
    AttemptCase(Reason.CONNECTION, "connection", aiohttp.ClientOSError(104, "Connection reset by peer"),
                "connection failed: Connection reset by peer"),
    AttemptCase(Reason.TLS, "tls",
                aiohttp.ClientConnectorCertificateError(
                    KEY, ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")),
                "TLS certificate error: certificate verify failed: self-signed certificate"),
    AttemptCase(Reason.TLS, "tls", aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "wrong version number")),
                "TLS error: ..."),
    AttemptCase(Reason.REFUSED, "refused", TargetRefused("10.0.0.5 is private"), "target refused: 10.0.0.5 is private"),
    AttemptCase(Reason.REFUSED, "refused", aiohttp.ClientConnectorError(KEY, TargetRefused("10.0.0.5 is private")),
                "target refused: 10.0.0.5 is private"),
    AttemptCase(Reason.PROTOCOL, "protocol", aiohttp.ServerDisconnectedError(),
                "server disconnected without a complete response"),
    AttemptCase(Reason.PROTOCOL, "protocol", aiohttp.ClientPayloadError("Response payload is not completed"),
                "response body broken: Response payload is not completed"),
    AttemptCase(Reason.PROTOCOL, "protocol", aiohttp.ClientResponseError(REQUEST, (), message="Bad status\nline 2"),
                "invalid HTTP response: Bad status"),
    AttemptCase(Reason.INVALID_URL, "invalid_url", aiohttp.InvalidURL("nope"), "invalid URL: nope"),
    AttemptCase(Reason.OTHER, "other", aiohttp.ClientConnectionError("x"), "ClientConnectionError: x"),
    AttemptCase(Reason.OTHER, "other", RuntimeError("boom"), "unexpected error: RuntimeError: boom"),
]


def _classify(cause: int | BaseException) -> Failure | None:
    if isinstance(cause, int):
        return classify_status(cause, "https://elsewhere.example/" if 300 <= cause < 400 else None)
    return classify_exception(cause, 10, 5)


@pytest.mark.parametrize("case", ATTEMPT_CASES, ids=lambda c: f"{c.reason.name}:{c.text[:24]}")
def test_attempt_failure(case: AttemptCase) -> None:
    failure = _classify(case.cause)
    assert failure is not None
    assert failure.reason is case.reason
    assert _matches(failure.text, case.text), failure.text
    metrics = Metrics()
    metrics.observe_attempt(failure.reason, 0.01)
    assert attempt_labels(metrics) == {case.label: 1}


def test_every_attempt_reason_has_a_case() -> None:
    assert {c.reason for c in ATTEMPT_CASES} == set(ATTEMPT_REASONS)
    assert {c.label for c in ATTEMPT_CASES} | {"success"} == {r.value for r in ATTEMPT_REASONS} | {"success"}


@pytest.mark.parametrize("status", [200, 204, 299])
def test_success_has_no_reason(status: int) -> None:
    assert classify_status(status) is None
    metrics = Metrics()
    metrics.observe_attempt(None, 0.01)
    assert attempt_labels(metrics) == {"success": 1}


# -- a real dispatcher ---------------------------------------------------------------------------
@pytest.fixture
async def dispatcher() -> AsyncIterator[Dispatcher]:
    d = Dispatcher(DeliveryConfig(timeout=5, connect_timeout=2))
    await d.start()
    yield d
    await d.close()


@pytest.fixture
async def receiver() -> AsyncIterator[str]:
    async def answer(request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        headers = {"Location": "https://elsewhere.example/"} if 300 <= status < 400 else {}
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/{status}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/"))
    await server.close()


@pytest.mark.parametrize(
    ("status", "reason", "error"),
    [
        (204, None, None),
        (500, Reason.HTTP_STATUS, "HTTP 500"),
        (307, Reason.REDIRECT, "HTTP 307: redirect to https://elsewhere.example/ not followed"),
    ],
)
async def test_real_post_carries_its_reason(
    dispatcher: Dispatcher, receiver: str, status: int, reason: Reason | None, error: str | None
) -> None:
    outcome = await dispatcher.post(f"{receiver}{status}", b"{}", {})
    assert (outcome.success, outcome.status_code, outcome.reason, outcome.error) == (
        reason is None, status, reason, error
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_real_connection_refused_carries_its_reason(dispatcher: Dispatcher) -> None:
    outcome = await dispatcher.post(f"http://127.0.0.1:{_closed_port()}/", b"{}", {})
    assert outcome.reason is Reason.CONNECTION
    assert outcome.error is not None and outcome.error.startswith("connection failed: ")


# -- rewording cannot move a label -------------------------------------------------------------------
async def test_rewording_an_intake_text_keeps_its_label_and_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Lead.TOO_MANY_CONNECTIONS, "words", "zu viele Verbindungen")
    monkeypatch.setattr(Lead.NOT_JSON, "words", "kein JSON")
    answer, stats = await socket_answer(GOOD + b"\n", max_connections=0)
    assert orjson.loads(answer)["error"] == "zu viele Verbindungen (intake.max_connections = 0)"
    assert rejection_labels(stats) == {"too_many_connections": 1}
    assert _answer_verdict(answer) == "tempfail"  # the CLI reads the same table: still 75

    answer, stats = await socket_answer(b"{nope\n")
    assert orjson.loads(answer)["error"].startswith("kein JSON: ")
    assert rejection_labels(stats) == {"invalid_json": 1}
    assert _answer_verdict(answer) == "rejected"


async def test_rewording_an_attempt_text_keeps_its_label(
    monkeypatch: pytest.MonkeyPatch, dispatcher: Dispatcher
) -> None:
    original = webhookd.dispatcher.classify_exception

    def reworded(exc: BaseException, timeout: float, connect_timeout: float) -> Failure:
        failure = original(exc, timeout, connect_timeout)
        return Failure(failure.reason, "Verbindung abgelehnt")  # a text no prefix table knew

    monkeypatch.setattr(webhookd.dispatcher, "classify_exception", reworded)
    outcome = await dispatcher.post(f"http://127.0.0.1:{_closed_port()}/", b"{}", {})
    assert outcome.error == "Verbindung abgelehnt"
    metrics = Metrics()
    metrics.observe_attempt(outcome.reason, outcome.duration_ms / 1000)
    assert attempt_labels(metrics) == {"connection": 1}
