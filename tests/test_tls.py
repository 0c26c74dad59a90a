"""HTTPS receivers with a private CA (trustme): `delivery.ca_file`, certificate errors, `webhooks test`.

Every receiver listens on 127.0.0.1 only. Loopback targets need `environment = "development"`, or
production with `delivery.allow_targets`; both are exercised.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.conftest import Harness, Receiver, event, eventually

MakeTLSReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "internal-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def tls_receiver(ca: trustme.CA) -> AsyncIterator[MakeTLSReceiver]:
    """`await tls_receiver(*names, host="localhost", **cert_kwargs)`: an HTTPS receiver on 127.0.0.1
    whose certificate (issued by `ca`) names `names`; its url uses `host`."""
    runners: list[web.AppRunner] = []

    async def make(*names: str, host: str = "localhost", **cert_kwargs: Any) -> Receiver:
        cert = ca.issue_cert(*(names or ("localhost", "127.0.0.1")), **cert_kwargs)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        receiver = Receiver()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = runner.addresses[0][1]
        receiver.url = f"https://{host}:{port}/hook"
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()


async def settled(h: Harness, webhook_id: str) -> dict[str, Any]:
    async def done() -> Any:
        ds = await h.deliveries(webhook_id=webhook_id)
        return ds[0] if ds and ds[0]["status"] in ("succeeded", "failed") else None

    return dict(await eventually(done, timeout=3, what="the delivery to settle"))


async def deliver_one(h: Harness, url: str) -> dict[str, Any]:
    hook = await h.create_webhook(url)
    [ack] = await h.submit(event())
    assert ack["ok"] is True, ack
    return await settled(h, hook["id"])


# -- trusted ------------------------------------------------------------------------------------
async def test_ca_file_makes_an_internal_ca_trusted(
    start_daemon: Any, tls_receiver: MakeTLSReceiver, ca_file: Path
) -> None:
    receiver = await tls_receiver()
    h = await start_daemon(delivery={"max_attempts": 1, "ca_file": str(ca_file)})
    d = await deliver_one(h, receiver.url)
    assert (d["status"], d["last_status_code"], d["last_error"]) == ("succeeded", 200, None)
    [req] = receiver.requests
    assert req.json["event"] == "delivered"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_production_with_allow_targets_delivers_over_tls(
    start_daemon: Any, tls_receiver: MakeTLSReceiver, ca_file: Path, host: str
) -> None:
    receiver = await tls_receiver(host=host)
    h = await start_daemon(
        environment="production",
        delivery={"max_attempts": 1, "ca_file": str(ca_file), "allow_targets": ["127.0.0.0/8"]},
    )
    d = await deliver_one(h, receiver.url)
    assert (d["status"], d["last_status_code"], d["last_error"]) == ("succeeded", 200, None)
    assert len(receiver.requests) == 1


# -- not trusted ---------------------------------------------------------------------------------
@pytest.mark.parametrize("environment", ["development", "production"])
async def test_unknown_ca_fails_with_a_certificate_error(
    start_daemon: Any, tls_receiver: MakeTLSReceiver, environment: str
) -> None:
    receiver = await tls_receiver()
    # no ca_file: the system CAs do not know trustme's CA
    h = await start_daemon(environment=environment, delivery={"max_attempts": 1, "allow_targets": ["127.0.0.0/8"]})
    d = await deliver_one(h, receiver.url)
    assert d["status"] == "failed"
    assert d["last_status_code"] is None
    assert d["last_error"].startswith("TLS certificate error: "), d["last_error"]
    assert "certificate verify failed" in d["last_error"]
    assert "issuer" in d["last_error"]  # "unable to get local issuer certificate"
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("names", "host", "words"),
    [
        (("other.example",), "localhost", ("Hostname mismatch", "localhost")),
        (("localhost",), "127.0.0.1", ("IP address mismatch", "127.0.0.1")),
    ],
    ids=["host-name", "ip-address"],
)
async def test_certificate_for_another_name_fails(
    start_daemon: Any, tls_receiver: MakeTLSReceiver, ca_file: Path,
    names: tuple[str, ...], host: str, words: tuple[str, ...],
) -> None:
    receiver = await tls_receiver(*names, host=host)
    h = await start_daemon(delivery={"max_attempts": 1, "ca_file": str(ca_file)})
    d = await deliver_one(h, receiver.url)
    assert d["status"] == "failed"
    error = d["last_error"]
    assert error.startswith("TLS certificate error: "), error
    for word in words:
        assert word in error, error
    assert receiver.requests == []


async def test_expired_certificate_fails(
    start_daemon: Any, tls_receiver: MakeTLSReceiver, ca_file: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    receiver = await tls_receiver(
        not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    h = await start_daemon(delivery={"max_attempts": 1, "ca_file": str(ca_file)})
    d = await deliver_one(h, receiver.url)
    assert d["status"] == "failed"
    assert d["last_error"].startswith("TLS certificate error: "), d["last_error"]
    assert "expired" in d["last_error"]


async def test_https_url_to_a_plain_http_receiver_is_a_tls_error(
    start_daemon: Any, make_receiver: Any
) -> None:
    receiver = await make_receiver()
    port = receiver.url.split(":")[2].split("/")[0]
    h = await start_daemon(delivery={"max_attempts": 1, "timeout": "1s"})
    d = await deliver_one(h, f"https://127.0.0.1:{port}/hook")
    assert d["status"] == "failed"
    assert d["last_error"].startswith("TLS"), d["last_error"]
    assert receiver.requests == []


async def test_tls_handshake_that_never_completes_times_out(start_daemon: Any) -> None:
    """A server that accepts the TCP connection and never answers the ClientHello."""
    connections: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        h = await start_daemon(delivery={"max_attempts": 1, "timeout": "500ms", "connect_timeout": "200ms"})
        d = await deliver_one(h, f"https://localhost:{port}/hook")
        assert d["status"] == "failed"
        # aiohttp counts the handshake as part of connecting; the total timeout would bound it too
        assert d["last_error"] in ("connect timeout after 0.2s", "timeout after 0.5s"), d["last_error"]
        _, shown = await h.api("GET", f"/v1/deliveries/{d['id']}")
        assert shown["attempt_log"][0]["duration_ms"] < 1000
        assert len(connections) == 1
    finally:
        server.close()
        for writer in connections:
            writer.close()
        await server.wait_closed()


# -- webhooks test ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("names", "with_ca", "words"),
    [
        (("localhost",), False, ("certificate verify failed",)),
        (("other.example",), True, ("Hostname mismatch", "localhost")),
    ],
    ids=["unknown-ca", "host-name"],
)
async def test_webhooks_test_reports_the_tls_error(
    start_daemon: Any, tls_receiver: MakeTLSReceiver, ca_file: Path,
    names: tuple[str, ...], with_ca: bool, words: tuple[str, ...],
) -> None:
    receiver = await tls_receiver(*names)
    delivery: dict[str, Any] = {"max_attempts": 1}
    if with_ca:
        delivery["ca_file"] = str(ca_file)
    h = await start_daemon(delivery=delivery)
    hook = await h.create_webhook(receiver.url)
    status, result = await h.api("POST", f"/v1/webhooks/{hook['id']}/test", {})
    assert status == 200, result
    assert result["ok"] is False
    assert result["status_code"] is None
    assert result["error"].startswith("TLS certificate error: "), result["error"]
    for word in words:
        assert word in result["error"], result["error"]
    assert result["response_body"] == ""
    assert receiver.requests == []
    assert (await h.webhook(hook["id"]))["consecutive_failures"] == 0


async def test_webhooks_test_succeeds_with_the_ca_file(
    start_daemon: Any, tls_receiver: MakeTLSReceiver, ca_file: Path
) -> None:
    receiver = await tls_receiver()
    h = await start_daemon(delivery={"ca_file": str(ca_file)})
    hook = await h.create_webhook(receiver.url)
    status, result = await h.api("POST", f"/v1/webhooks/{hook['id']}/test", {})
    assert status == 200, result
    assert (result["ok"], result["status_code"], result["error"]) == (True, 200, None)
    assert result["response_body"] == '{"received": true}'
    [req] = receiver.requests
    assert req.json["data"]["message_id"].startswith("test-")
