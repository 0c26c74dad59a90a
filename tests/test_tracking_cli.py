"""`webhookd tracking ...`, the admin API's /v1/tracking routes, and the [tracking] config.

The signing commands run in-process (`main`) on a config file in tmp_path, with no daemon;
the API runs on a real in-process daemon (tests/conftest.py's start_daemon) over its
admin socket. `tracking rewrite` is only tried where it must fail open: whatever it
cannot or may not rewrite leaves stdin on stdout byte for byte, with exit status 0.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import webhookd.cli_tracking as cli_tracking
from tests.conftest import free_port
from webhookd.cli import main
from webhookd.config import ConfigError, parse_config
from webhookd.tracking.tokens import KeyRing, key_file

MID = "<order-7@shop.example>"
RCPT = "reader@example.org"
URL = "https://shop.example/orders/7?ref=mail"
BASE = "https://t.example.com"


@pytest.fixture(autouse=True)
def quiet_daemon_logs() -> Iterator[None]:
    with capture_logs():
        yield


@dataclass
class Result:
    code: int
    out: str
    err: str


def write_config(path: Path, state: Path, tracking: str = f'base_url = "{BASE}"\n', top: str = "") -> Path:
    path.write_text(
        f'environment = "development"\nstate_dir = "{state}"\nruntime_dir = "{state}"\n{top}'
        f"[tracking]\n{tracking}"
    )
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def config(tmp_path: Path, state: Path) -> Path:
    """A config with base_url, and the key file the daemon would have made."""
    KeyRing.load(key_file(state), create=True)
    return write_config(tmp_path / "config.toml", state)


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> Result:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return Result(code, out, err)


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1].removesuffix(".gif")


# -- url / pixel ---------------------------------------------------------------------------------------
def test_url_and_pixel_print_links_that_verify(capsys: pytest.CaptureFixture[str], config: Path, state: Path) -> None:
    r = run(capsys, config, "tracking", "url", "--message-id", MID, "--to", RCPT, "--url", URL)
    assert (r.code, r.err) == (0, "")
    link = r.out.strip()
    assert r.out == link + "\n" and link.startswith(BASE + "/c/")
    ring = KeyRing.load(key_file(state))
    claims = ring.verify(token_of(link), "click")
    assert (claims.message_id, claims.to, claims.url) == (MID, RCPT, URL)

    r = run(capsys, config, "tracking", "pixel", "--message-id", MID, "--to", RCPT)
    assert (r.code, r.err) == (0, "")
    pixel = r.out.strip()
    assert pixel.startswith(BASE + "/o/") and pixel.endswith(".gif")
    assert ring.verify(token_of(pixel), "open").to == RCPT
    # without --to
    r = run(capsys, config, "tracking", "pixel", "--message-id", MID)
    assert ring.verify(token_of(r.out.strip()), "open").to == ""


def test_signing_never_makes_a_key_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path) -> None:
    """A key only the CLI knew would sign links the daemon cannot verify."""
    config = write_config(tmp_path / "c.toml", state)
    for args in (("url", "--message-id", MID, "--url", URL), ("pixel", "--message-id", MID)):
        r = run(capsys, config, "tracking", *args)
        assert (r.code, r.out) == (1, ""), args
        assert str(key_file(state)) in r.err and "rotate-key" in r.err and r.err.count("\n") == 1
    assert not key_file(state).exists()


def test_include_recipient_false_puts_a_hash_in_the_cli_links(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    KeyRing.load(key_file(state), create=True)
    config = write_config(tmp_path / "c.toml", state, f'base_url = "{BASE}"\ninclude_recipient = false\n')
    r = run(capsys, config, "tracking", "url", "--message-id", MID, "--to", RCPT, "--url", URL)
    ring = KeyRing.load(key_file(state))
    claims = ring.verify(token_of(r.out.strip()), "click")
    assert claims.to == "" and claims.to_hash == ring.recipient_hash(RCPT)


@pytest.mark.parametrize("url", ["javascript:x", "javascript:alert(document.cookie)", "//evil.example",
                                 "https:evil", "data:text/html,x", "https://a.example/ x", "ftp://a.example/"])
def test_url_refuses_what_it_may_not_sign(capsys: pytest.CaptureFixture[str], config: Path, url: str) -> None:
    r = run(capsys, config, "tracking", "url", "--message-id", MID, "--url", url)
    assert r.code == 2
    assert r.out == ""
    assert r.err.startswith("webhookd: cannot sign: url ") and r.err.count("\n") == 1


def test_url_refuses_a_bad_message_id(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    for mid in ("", "   ", "x" * 999):
        r = run(capsys, config, "tracking", "url", "--message-id", mid, "--url", URL)
        assert (r.code, r.out) == (2, ""), mid
        assert "message id" in r.err


def test_without_base_url_signing_is_a_config_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    config = write_config(tmp_path / "c.toml", state, tracking="")
    for args in (("url", "--message-id", MID, "--url", URL), ("pixel", "--message-id", MID)):
        r = run(capsys, config, "tracking", *args)
        assert (r.code, r.out) == (78, "")
        assert r.err == "webhookd: tracking.base_url is not set: there is no address for tracked links\n"
    assert not key_file(state).exists()  # nothing was made for nothing


def test_a_corrupt_key_file_is_exit_1_naming_it(capsys: pytest.CaptureFixture[str], config: Path, state: Path) -> None:
    state.mkdir(exist_ok=True)
    key_file(state).write_text("{not json")
    for args in (("url", "--message-id", MID, "--url", URL), ("pixel", "--message-id", MID), ("rotate-key",)):
        r = run(capsys, config, "tracking", *args)
        assert (r.code, r.out) == (1, ""), args
        assert str(key_file(state)) in r.err and r.err.count("\n") == 1
    assert key_file(state).read_text() == "{not json"


# -- rotate-key --------------------------------------------------------------------------------------------
def test_rotate_key_prints_the_new_id(capsys: pytest.CaptureFixture[str], config: Path, state: Path) -> None:
    old = token_of(run(capsys, config, "tracking", "url", "--message-id", MID, "--url", URL).out.strip())
    r = run(capsys, config, "tracking", "rotate-key")
    assert (r.code, r.err) == (0, "")
    assert r.out == f"key 2 now signs new links; keys 1, 2 verify ({key_file(state)})\n"
    r = run(capsys, config, "tracking", "rotate-key")
    assert r.out.startswith("key 3 now signs new links; keys 1, 2, 3 verify")
    new = token_of(run(capsys, config, "tracking", "url", "--message-id", MID, "--url", URL).out.strip())
    ring = KeyRing.load(key_file(state))
    assert ring.current == 3
    assert ring.verify(old, "click").url == ring.verify(new, "click").url == URL
    assert stat.S_IMODE(key_file(state).stat().st_mode) == 0o600
    assert sorted(os.listdir(state)) == ["tracking-keys.json"]  # no temporary files left


def test_rotate_key_without_a_key_file_makes_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    config = write_config(tmp_path / "c.toml", state)
    r = run(capsys, config, "tracking", "rotate-key")
    assert r.code == 0 and r.out.startswith("key 2 now signs new links; keys 1, 2 verify")
    assert stat.S_IMODE(key_file(state).stat().st_mode) == 0o600


def test_rotate_key_uses_tracking_key_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path) -> None:
    config = write_config(tmp_path / "c.toml", state, f'base_url = "{BASE}"\nkey_file = "keys/k.json"\n')
    r = run(capsys, config, "tracking", "rotate-key")
    assert r.code == 0 and str(state / "keys" / "k.json") in r.out
    assert KeyRing.load(state / "keys" / "k.json").current == 2
    assert not key_file(state).exists()


def test_daemon_commands_without_a_daemon_are_exit_69(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    for args in (("status",), ("opt-out", RCPT), ("opt-in", RCPT)):
        r = run(capsys, config, "tracking", *args)
        assert (r.code, r.out) == (69, ""), args
        assert r.err.count("\n") == 1


# -- rewrite: fail open ------------------------------------------------------------------------------------
PLAIN = (b"From: shop@shop.example\r\nTo: reader@example.org\r\nMessage-ID: <p1@shop.example>\r\n"
         b"Subject: plain\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
         b"Visit https://shop.example/orders/7 \xe2\x80\x94 thanks\r\n")
HTML = (b"From: shop@shop.example\nTo: reader@example.org\nMessage-ID: <h1@shop.example>\nSubject: html\n"
        b"MIME-Version: 1.0\nContent-Type: text/html; charset=us-ascii\n\n"
        b'<html><body><a href="https://shop.example/orders/7">order</a></body></html>\n')
OPTED_OUT = HTML.replace(b"Subject: html\n", b"Subject: html\nX-Webhookd-Track: no\n")
SIGNED = (b"From: shop@shop.example\nMessage-ID: <s1@shop.example>\nMIME-Version: 1.0\n"
          b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="b"\n\n'
          b"--b\nContent-Type: text/html\n\n<html><body><a href=\"https://shop.example/\">x</a></body></html>\n"
          b"--b\nContent-Type: application/pkcs7-signature\n\nMIIB\n--b--\n")
GARBAGE: list[bytes] = [
    b"",
    b"\x00\xff\xfe garbage \x00" * 50,
    b"no headers at all, just words\n",
    b"Content-Type: multipart/mixed; boundary=\"never closed\"\n\n--never closed\nContent-Type: text/html\n\n<a href=",
    b"Content-Type: text/html; charset=x-no-such-charset\nMessage-ID: <g@x>\n\n<a href=\"https://a.example/\">a</a>",
    b"Content-Type: text/html\nContent-Transfer-Encoding: base64\nMessage-ID: <g@x>\n\n!!!not base64!!!\n",
    b"Content-Type: " + b"a" * 100_000 + b"\n\n",
    b"\r\n\r\n\r\n",
    bytes(range(256)) * 4,
]


@dataclass
class Piped:
    code: int
    out: bytes
    err: str


def rewrite(monkeypatch: pytest.MonkeyPatch, config: Path, data: bytes, *args: str) -> Piped:
    stdin = io.TextIOWrapper(io.BytesIO(data))
    stdout = io.TextIOWrapper(io.BytesIO())
    stderr = io.StringIO()
    with monkeypatch.context() as m:
        m.setattr(sys, "stdin", stdin)
        m.setattr(sys, "stdout", stdout)
        m.setattr(sys, "stderr", stderr)
        code = main(["--config", str(config), "tracking", "rewrite", *args])
        stdout.flush()
    return Piped(code, stdout.buffer.getvalue(), stderr.getvalue())  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", [PLAIN, OPTED_OUT, SIGNED], ids=["text-plain", "opt-out-header", "signed"])
def test_rewrite_leaves_what_it_may_not_touch_byte_identical(
    monkeypatch: pytest.MonkeyPatch, config: Path, message: bytes
) -> None:
    r = rewrite(monkeypatch, config, message, "--to", RCPT)
    assert r.code == 0
    assert r.out == message


@pytest.mark.parametrize("data", GARBAGE, ids=[f"garbage-{i}" for i in range(len(GARBAGE))])
def test_rewrite_passes_garbage_through_unchanged(monkeypatch: pytest.MonkeyPatch, config: Path, data: bytes) -> None:
    r = rewrite(monkeypatch, config, data)
    assert r.code == 0
    assert r.out == data


def test_rewrite_without_base_url_passes_the_message_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: Path
) -> None:
    config = write_config(tmp_path / "c.toml", state, tracking="")
    r = rewrite(monkeypatch, config, HTML, "--to", RCPT)
    assert (r.code, r.out) == (0, HTML)
    assert r.err.count("\n") == 1 and "tracking.base_url is not set" in r.err and "unchanged" in r.err


def test_rewrite_with_a_corrupt_key_file_passes_the_message(
    monkeypatch: pytest.MonkeyPatch, config: Path, state: Path
) -> None:
    state.mkdir(exist_ok=True)
    key_file(state).write_text("garbage")
    r = rewrite(monkeypatch, config, HTML, "--to", RCPT)
    assert (r.code, r.out) == (0, HTML)
    assert str(key_file(state)) in r.err and "unchanged" in r.err


@pytest.mark.parametrize("content", ['[tracking]\nbase_url = "not a url"\n', None], ids=["typo", "missing"])
def test_rewrite_with_a_bad_config_still_passes_the_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None
) -> None:
    config = tmp_path / "bad.toml"
    if content is not None:
        config.write_text(content)
    r = rewrite(monkeypatch, config, HTML)
    assert (r.code, r.out) == (0, HTML)


def test_rewrite_passes_an_oversized_message_whole(monkeypatch: pytest.MonkeyPatch, config: Path) -> None:
    monkeypatch.setattr(cli_tracking, "MAX_REWRITE_BYTES", 1000)
    big = HTML + b"x" * 5 * 1024 * 1024 + b"\n"  # past the limit: streamed through in chunks
    r = rewrite(monkeypatch, config, big)
    assert (r.code, r.out) == (0, big)
    assert "passed unchanged" in r.err


def test_rewrite_as_a_real_process_fails_open(tmp_path: Path, state: Path) -> None:
    """What Exim runs: a process reading stdin; garbage in, the same garbage out, exit 0."""
    config = write_config(tmp_path / "c.toml", state)
    data = GARBAGE[1] + PLAIN
    p = subprocess.run([sys.executable, "-m", "webhookd", "--config", str(config), "tracking", "rewrite"],
                       input=data, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == data


# -- the admin API ----------------------------------------------------------------------------------------
@pytest.fixture
async def tracked(start_daemon: Any) -> Any:
    port = free_port()
    return await start_daemon(tracking={"enabled": True, "listen": f"127.0.0.1:{port}", "base_url": BASE})


async def test_sign_returns_a_pixel_and_links_that_verify(tracked: Any) -> None:
    urls = [URL, "https://shop.example/help", "https://shop.example/caf\u00e9"]
    status, body = await tracked.api("POST", "/v1/tracking/sign",
                                     {"message_id": MID, "to": RCPT, "url": URL, "urls": urls})
    assert status == 200, body
    assert set(body) == {"pixel", "url", "urls"}
    ring = KeyRing.load(key_file(tracked.config.state_dir))
    assert body["pixel"].startswith(BASE + "/o/") and body["pixel"].endswith(".gif")
    assert ring.verify(token_of(body["pixel"]), "open").to == RCPT
    assert ring.verify(token_of(body["url"]), "click").url == URL
    assert [ring.verify(token_of(u), "click").url for u in body["urls"]] == [
        URL, "https://shop.example/help", "https://shop.example/caf%C3%A9"]
    status, body = await tracked.api("POST", "/v1/tracking/sign", {"message_id": MID})
    assert status == 200 and set(body) == {"pixel"}
    assert ring.verify(token_of(body["pixel"]), "open").to == ""


BAD_SIGN: list[tuple[dict[str, Any], str]] = [
    ({"message_id": MID, "url": "javascript:alert(1)"}, "url: url must start with http"),
    ({"message_id": MID, "urls": [URL, "javascript:alert(1)"]}, "urls[1]: "),
    ({"message_id": MID, "urls": ["//evil.example"]}, "urls[0]: "),
    ({"message_id": MID, "url": "https://a.example/\r\nX: y"}, "url: "),
    ({"url": URL}, "message_id"),
    ({"message_id": ""}, "message_id"),
    ({"message_id": "   "}, "message_id"),
    ({"message_id": 7}, "message_id"),
    ({"message_id": None}, "message_id"),
    ({"message_id": "x" * 999}, "message_id"),
    ({"message_id": MID, "urls": URL}, "urls must be a list"),
    ({"message_id": MID, "urls": {"a": URL}}, "urls must be a list"),
    ({"message_id": MID, "urls": [URL, 5]}, "urls must be a list"),
    ({"message_id": MID, "urls": [URL] * 1001}, "urls must be a list of at most 1000"),
    ({"message_id": MID, "url": [URL]}, "url must be a string"),
    ({"message_id": MID, "to": 5}, "to must be a string"),
    ({"message_id": MID, "to": "a" * 321}, "to must be a string"),
]


async def test_sign_refuses_bad_requests(tracked: Any) -> None:
    for doc, words in BAD_SIGN:  # one daemon for the whole table
        status, body = await tracked.api("POST", "/v1/tracking/sign", doc)
        assert status == 400, (doc, body)
        assert words in body["error"], (doc, body)


async def test_sign_refuses_a_body_that_is_not_an_object(tracked: Any) -> None:
    for raw in ([MID], "x", 5):
        status, body = await tracked.api("POST", "/v1/tracking/sign", raw)
        assert status == 400 and "JSON object" in body["error"]
    assert tracked.session is not None
    async with tracked.session.post("http://admin/v1/tracking/sign", data=b"{not json") as r:
        assert r.status == 400


async def test_sign_without_base_url_is_409(start_daemon: Any) -> None:
    h = await start_daemon()  # tracking off, no base_url
    status, body = await h.api("POST", "/v1/tracking/sign", {"message_id": MID, "url": URL})
    assert status == 409 and "tracking.base_url" in body["error"]
    status, body = await h.api("GET", "/v1/tracking")
    assert status == 200 and body["enabled"] is False and body["base_url"] is None


async def test_opt_outs_refuse_what_is_no_address(tracked: Any) -> None:
    hostile = ["..%2F..%2Fetc%2Fpasswd", "..%2F..", "nobody", "%20", "%00", "a" * 400 + "@example.org",
               "%40" * 321, "..", "%2E%2E%2F"]
    for address in hostile:
        for method in ("PUT", "DELETE"):
            status, body = await tracked.api(method, f"/v1/tracking/opt-outs/{address}")
            assert status in (400, 404, 405), (address, status, body)
            if status == 400:
                assert "email address" in body["error"]
    # the plainly hostile ones reach the handler and are refused by it, not by routing luck
    for address in ("..%2F..%2Fetc%2Fpasswd", "nobody", "a" * 400 + "@example.org"):
        assert (await tracked.api("PUT", f"/v1/tracking/opt-outs/{address}"))[0] == 400
    assert tracked.sql("SELECT count(*) FROM tracking_opt_outs") == [(0,)]


async def test_opt_outs_store_only_a_hash(tracked: Any) -> None:
    status, body = await tracked.api("PUT", "/v1/tracking/opt-outs/Reader%40Example.org")
    assert (status, body) == (200, {"opted_out": True, "changed": True})
    assert (await tracked.api("PUT", "/v1/tracking/opt-outs/reader@example.org"))[1]["changed"] is False
    [(digest,)] = tracked.sql("SELECT hash FROM tracking_opt_outs")
    assert digest == KeyRing.load(key_file(tracked.config.state_dir)).recipient_hash(RCPT)
    assert "reader" not in digest.lower() and re.fullmatch(r"[0-9a-f]{32}", digest)
    status, body = await tracked.api("GET", "/v1/tracking")
    assert body["opt_outs"] == 1
    assert (await tracked.api("DELETE", "/v1/tracking/opt-outs/READER@example.org"))[1] == {
        "opted_out": False, "changed": True}
    assert (await tracked.api("DELETE", "/v1/tracking/opt-outs/reader@example.org"))[1]["changed"] is False
    assert tracked.sql("SELECT count(*) FROM tracking_opt_outs") == [(0,)]


async def test_cli_opt_out_of_a_hostile_address_is_refused_by_the_daemon(
    tracked: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cli.toml"
    config.write_text(f'environment = "development"\nstate_dir = "{tracked.config.state_dir}"\n'
                      f'runtime_dir = "{tracked.config.runtime_dir}"\n')

    async def cli(*args: str) -> Result:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(config), "tracking", *args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    for address in ("../../etc/passwd", "nobody", "x" * 400 + "@example.org", "a/b"):
        r = await cli("opt-out", address)
        assert (r.code, r.out) == (1, ""), address
        assert "expected an email address" in r.err or "HTTP 404" in r.err
    r = await cli("opt-out", "o'brien+news@example.org")
    assert (r.code, r.out) == (0, "o'brien+news@example.org: opted out\n")
    assert tracked.sql("SELECT hash FROM tracking_opt_outs") == [
        (KeyRing.load(key_file(tracked.config.state_dir)).recipient_hash("o'brien+news@example.org"),)]
    r = await cli("status")
    assert r.code == 0 and "opted-out addresses: 1" in r.out and "tracking: on" in r.out


# -- config -------------------------------------------------------------------------------------------------
def test_enabled_without_base_url_is_exit_78_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    config = write_config(tmp_path / "c.toml", state, tracking="enabled = true\n")
    r = run(capsys, config, "check-config")
    assert (r.code, r.out) == (78, "")
    assert r.err.startswith("webhookd: config error: tracking.base_url: required when tracking.enabled")
    config = write_config(tmp_path / "c.toml", state, tracking=f'enabled = true\nbase_url = "{BASE}"\n')
    assert run(capsys, config, "check-config").code == 0


def test_http_base_url_is_refused_in_production_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    config = tmp_path / "prod.toml"
    config.write_text(f'environment = "production"\nstate_dir = "{state}"\n[tracking]\nbase_url = "http://t.example.com"\n')
    r = run(capsys, config, "check-config")
    assert r.code == 78 and "tracking.base_url: must be https:// in production" in r.err
    with pytest.raises(ConfigError) as info:
        parse_config({"environment": "production", "tracking": {"base_url": "HTTP://T.EXAMPLE.COM"}}, env={})
    assert info.value.key == "tracking.base_url"
    dev = parse_config({"environment": "development", "tracking": {"base_url": "http://127.0.0.1:8027/"}}, env={})
    assert dev.tracking.base_url == "http://127.0.0.1:8027"


@pytest.mark.parametrize(("tracking", "key"), [
    ({"trusted_proxies": ["127.0.0.1", "not-an-ip"]}, "tracking.trusted_proxies[1]"),
    ({"trusted_proxies": ["10.0.0.0/8", "::1", "10.0.0.0/33"]}, "tracking.trusted_proxies[2]"),
    ({"trusted_proxies": [5]}, "tracking.trusted_proxies[0]"),
    ({"trusted_proxies": "127.0.0.1"}, "tracking.trusted_proxies"),
    ({"base_url": "javascript:alert(1)"}, "tracking.base_url"),
    ({"base_url": "https://t.example.com?x=1"}, "tracking.base_url"),
    ({"base_url": "https://user@t.example.com"}, "tracking.base_url"),
    ({"base_url": "ftp://t.example.com"}, "tracking.base_url"),
    ({"enabled": True, "base_url": BASE, "listen": ""}, "tracking.listen"),
    ({"emit": "some"}, "tracking.emit"),
    ({"queue_size": 0}, "tracking.queue_size"),
    ({"bad_tokens_per_minute": 0}, "tracking.bad_tokens_per_minute"),
    ({"enabled": "yes"}, "tracking.enabled"),
    ({"unknown": 1}, "tracking.unknown"),
])
def test_tracking_rules_name_their_key(tracking: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"tracking": tracking}, env={})
    assert info.value.key == key, info.value
    assert str(info.value).startswith(key + ": ")


def test_tracking_settings_are_read(tmp_path: Path) -> None:
    t = parse_config({"state_dir": str(tmp_path), "tracking": {
        "enabled": True, "listen": "127.0.0.1:9027", "base_url": "https://t.example.com/track/",
        "trusted_proxies": ["10.1.2.3", "2001:db8::/32"], "emit": "first", "key_file": "k.json",
        "machine_click_seconds": "30s",
    }}, env={}).tracking
    assert t.listen == ("127.0.0.1", 9027) and t.base_url == "https://t.example.com/track"
    assert t.trusted_proxies == ("10.1.2.3/32", "2001:db8::/32")
    assert t.emit == "first" and t.key_file == tmp_path / "k.json" and t.machine_click_seconds == 30


@pytest.mark.parametrize("tracking", [
    {"base_url": "https://track.shop.example"},
    {"base_url": "https://t.example.com/s"},
    {"milter_socket": "inet:8892@localhost"},
    {"milter_socket": "unix:/var/spool/postfix/webhookd/milter.sock"},
], ids=["host-with-s", "path-with-s", "milter-localhost", "milter-unix"])
def test_ordinary_values_with_an_s_are_accepted(tracking: dict[str, Any]) -> None:
    """(A raw-string `\\\\s` once made these patterns refuse the letter s and accept spaces.)"""
    parse_config({"tracking": tracking}, env={})


@pytest.mark.parametrize("base_url", ["https://t.example.com/a b", "https://t.exa mple.com", "https://t.example.com/a\tb"])
def test_a_base_url_with_whitespace_is_refused(base_url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"tracking": {"base_url": base_url}}, env={})
    assert info.value.key == "tracking.base_url"


# -- --to-header: Exim's way to hand over the recipient ------------------------------------------------
def test_to_header_names_the_recipient_and_is_removed(monkeypatch: pytest.MonkeyPatch, config: Path,
                                                       state: Path) -> None:
    sent = HTML.replace(b"Subject: html\n", b"Subject: html\nX-Webhookd-To: forged@example.org\n")
    sent = sent.replace(b"MIME-Version", b"x-webhookd-to:\n  Reader@Example.org\nMIME-Version")  # the last, folded
    r = rewrite(monkeypatch, config, sent, "--to-header", "X-Webhookd-To")
    assert r.code == 0 and b"webhookd-to" not in r.out.lower()
    head, body = r.out.split(b"\n\n", 1)
    assert head == HTML.split(b"\n\n", 1)[0]  # every other header field as it was
    token = body.split(b'href="')[1].split(b'"')[0].decode().rsplit("/", 1)[1]
    claims = KeyRing.load(key_file(state)).verify(token, "click")
    assert claims.to == "Reader@Example.org" and claims.url == "https://shop.example/orders/7"


@pytest.mark.parametrize("broken", ["config", "key file"])
def test_to_header_is_removed_even_when_nothing_is_tracked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: Path, state: Path, broken: str
) -> None:
    if broken == "config":
        config = tmp_path / "missing.toml"
    else:
        key_file(state).write_bytes(b"garbage")
    sent = HTML.replace(b"Subject: html\n", b"Subject: html\nX-Webhookd-To: reader@example.org\n")
    r = rewrite(monkeypatch, config, sent, "--to-header", "X-Webhookd-To")
    assert (r.code, r.out) == (0, HTML)
    assert "unchanged" in r.err


def test_to_and_to_header_exclude_each_other(monkeypatch: pytest.MonkeyPatch, config: Path) -> None:
    r = rewrite(monkeypatch, config, HTML, "--to", RCPT, "--to-header", "X-Webhookd-To")
    assert r.code == 2
