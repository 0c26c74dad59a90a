"""The dashboard as the daemon serves it: mounted under /ui/ on the admin socket and on
admin.http_listen (where the bearer token guards the API but not the dashboard, which has
its own log-in), the one-time link from `webhookd dashboard`, and its config section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Harness, free_port
from tests.test_cli_daemon import Cli, StartDaemon, cli, h, quiet_daemon_logs
from webhookd.config import ConfigError, parse_config
from webhookd.ui.security import SESSION_COOKIE

__all__ = ["cli", "h", "quiet_daemon_logs"]  # fixtures shared with the CLI tests

TOKEN = "t" * 32


async def test_login_link_from_the_cli_opens_a_session_once(cli: Cli, h: Harness) -> None:
    out = (await cli.ok("dashboard")).out.splitlines()
    url = out[0]
    assert url.startswith("http://localhost:8026/ui/login/") and "one use" in out[-1]
    path = url.removeprefix("http://localhost:8026")
    assert h.config.admin.socket is not None
    conn = aiohttp.UnixConnector(str(h.config.admin.socket))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(f"http://localhost{path}", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].endswith("/ui/")
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        async with s.get("http://localhost/ui/", allow_redirects=False) as r:
            assert r.status == 200 and "Overview" in await r.text()
        other = aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(h.config.admin.socket)))
        async with other, other.get(f"http://localhost{path}", allow_redirects=False) as r:
            assert r.status == 403 and "already used" in await r.text()  # single use
            assert SESSION_COOKIE not in r.cookies


async def test_dashboard_on_tcp_needs_no_bearer_token_but_the_api_does(start_daemon: StartDaemon) -> None:
    port = free_port()
    hd = await start_daemon(admin={"http_listen": f"127.0.0.1:{port}", "token": TOKEN})
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/webhooks") as r:
            assert r.status == 401
        async with s.get(f"{base}/ui/", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].startswith("/ui/login")
        async with s.get(f"{base}/ui/login", allow_redirects=False) as r:
            assert r.status == 200 and "text/html" in r.headers["Content-Type"]
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        # another Host (DNS rebinding) is refused before anything else
        async with s.get(f"{base}/ui/login", headers={"Host": "evil.example"}, allow_redirects=False) as r:
            assert r.status == 421
    await hd.close()


async def test_dashboard_can_be_switched_off(start_daemon: StartDaemon) -> None:
    hd = await start_daemon(dashboard={"enabled": False})
    status, _ = await hd.api("GET", "/ui/login")
    assert status == 404
    status, body = await hd.api("POST", "/v1/dashboard/links")
    assert status == 404 and "dashboard is disabled" in body["error"]


def cfg(tmp_path: Path, **dashboard: Any) -> Any:
    return parse_config({"state_dir": str(tmp_path), "dashboard": dashboard}, env={})


def test_dashboard_config(tmp_path: Path) -> None:
    c = cfg(tmp_path, allowed_hosts=["MX.Example.com.", "[::1]", "10.0.0.5"], session_ttl="1h")
    assert c.dashboard.allowed_hosts == ("mx.example.com", "::1", "10.0.0.5")
    assert c.dashboard.session_ttl == 3600.0 and c.dashboard.enabled is True


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("enabled", "yes", "expected true or false"),
        ("allowed_hosts", [], "non-empty list"),
        ("allowed_hosts", ["*.example.com"], "host name or IP address"),
        ("allowed_hosts", ["mx.example.com:8026"], "host name or IP address"),
        ("session_ttl", "0s", ""),
        ("login_link_ttl", "soon", ""),
        ("colour", "blue", "unknown key"),
    ],
)
def test_bad_dashboard_config_names_the_key(tmp_path: Path, key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(tmp_path, **{key: value})
    assert f"dashboard.{key}" in str(err.value) and message in str(err.value)
