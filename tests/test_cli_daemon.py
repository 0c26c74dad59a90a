"""The command line, in-process, against a real daemon started in the test's event loop.

`main` blocks, so it runs in a thread (`asyncio.to_thread`) while the daemon keeps serving
on the loop. The CLI finds the daemon's sockets through a config file naming the same
state_dir and runtime_dir.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

import webhookd.config as config_module
from tests.conftest import Harness, Receiver, event, eventually
from webhookd import __version__
from webhookd.cli import main

MakeReceiver = Callable[..., Awaitable[Receiver]]
StartDaemon = Callable[..., Awaitable[Harness]]


@pytest.fixture(autouse=True)
def quiet_daemon_logs() -> Iterator[None]:
    """The in-process daemon logs through structlog (to stdout by default): keep that out of capsys."""
    with capture_logs():
        yield


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        assert self.out.count("\n") == 1, self.out
        return json.loads(self.out)

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


@dataclass
class Cli:
    config: Path
    capsys: pytest.CaptureFixture[str]

    async def __call__(self, *args: str) -> Result:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(self.config), *args])
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    async def ok(self, *args: str) -> Result:
        result = await self(*args)
        assert result.code == 0, result
        assert result.err == "", result
        return result


def write_config(path: Path, state_dir: Path, runtime_dir: Path, extra: str = "") -> Path:
    path.write_text(
        'environment = "development"\n'
        f'state_dir = "{state_dir}"\n'
        f'runtime_dir = "{runtime_dir}"\n' + extra
    )
    return path


@pytest.fixture
async def h(start_daemon: StartDaemon) -> Harness:
    return await start_daemon()


@pytest.fixture
def cli(h: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(write_config(tmp_path / "cli.toml", h.config.state_dir, h.config.runtime_dir), capsys)


@pytest.fixture
def no_daemon(tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """A config pointing at an empty directory: nothing listens on its sockets."""
    return Cli(write_config(tmp_path / "nodaemon.toml", short_dir, short_dir), capsys)


def without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


async def api(h: Harness, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
    status, data = await h.api(method, path, body)
    assert status == expect, data
    return data


URL = "http://127.0.0.1:9/hook"


# -- webhooks ---------------------------------------------------------------------------------------
async def test_create_json_is_exactly_the_api_document(cli: Cli, h: Harness) -> None:
    r = await cli.ok("webhooks", "create", "--url", URL, "--events", "delivered,bounced",
                     "--description", "d", "--json")
    hook = r.json
    assert r.out == orjson.dumps(hook).decode() + "\n"  # the daemon's own bytes (it writes with orjson)
    assert hook["id"].startswith("wh_")
    assert hook["url"] == URL
    assert hook["events"] == ["delivered", "bounced"]
    assert hook["description"] == "d"
    assert hook["enabled"] is True
    assert hook["disabled_reason"] is None
    assert hook["consecutive_failures"] == 0
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", hook["secret"])
    assert without(hook, "secret") == await api(h, "GET", f"/v1/webhooks/{hook['id']}")
    assert (await api(h, "GET", f"/v1/webhooks/{hook['id']}/secret"))["secret"] == hook["secret"]


async def test_create_defaults_to_all_events(cli: Cli) -> None:
    hook = (await cli.ok("webhooks", "create", "--url", URL, "--json")).json
    assert hook["events"] == ["*"]
    assert hook["description"] == ""


async def test_create_table_shows_the_secret_with_a_reminder(cli: Cli, h: Harness) -> None:
    r = await cli.ok("webhooks", "create", "--url", URL, "--events", "bounced", "--description", "CRM")
    m = re.search(r"^secret: (whsec_\S+)$", r.out, re.MULTILINE)
    assert m, r.out
    hook = (await api(h, "GET", "/v1/webhooks"))["webhooks"][0]
    assert re.search(rf"^id:\s+{hook['id']}$", r.out, re.MULTILINE)
    assert re.search(rf"^url:\s+{re.escape(URL)}$", r.out, re.MULTILINE)
    assert re.search(r"^description:\s+CRM$", r.out, re.MULTILINE)
    assert (await api(h, "GET", f"/v1/webhooks/{hook['id']}/secret"))["secret"] == m.group(1)
    assert "Store the secret now" in r.out
    assert f"webhookd webhooks secret {hook['id']}" in r.out
    assert r.out.count("whsec_") == 1


async def test_create_refused_by_the_daemon_is_exit_1(cli: Cli) -> None:
    r = await cli("webhooks", "create", "--url", "ftp://example.com/x")
    assert r.code == 1
    assert r.out == ""
    assert len(r.err.splitlines()) == 1 and "url" in r.err
    r = await cli("webhooks", "create", "--url", URL, "--events", "delivered,sent")
    assert r.code == 1 and "'sent'" in r.err


async def test_list_is_a_table_and_json(cli: Cli, h: Harness) -> None:
    r = await cli.ok("webhooks", "list")
    assert r.lines[0].startswith("no webhooks")
    assert (await cli.ok("webhooks", "list", "--json")).json == {"webhooks": []}

    a = await h.create_webhook(URL, ["delivered", "bounced"])
    b = await h.create_webhook("http://127.0.0.1:9/other")
    await api(h, "POST", f"/v1/webhooks/{b['id']}/disable")
    r = await cli.ok("webhooks", "list")
    header, *rows = r.lines
    assert header.split() == ["ID", "STATE", "FAILS", "EVENTS", "FILTER", "URL"]
    assert len(rows) == 2
    row_a = next(row for row in rows if row.startswith(a["id"]))
    row_b = next(row for row in rows if row.startswith(b["id"]))
    assert "enabled" in row_a and "delivered,bounced" in row_a and row_a.endswith(URL)
    assert "disabled (manual)" in row_b and " all " in row_b and row_b.endswith("/other")
    # columns line up: each URL starts where the header's URL column starts
    assert all(row.index("http://") == header.index("URL") for row in rows)
    assert "whsec_" not in r.out
    listed = (await cli.ok("webhooks", "list", "--json")).json
    assert listed == await api(h, "GET", "/v1/webhooks")


async def test_show(cli: Cli, h: Harness) -> None:
    hook = await h.create_webhook(URL, ["delivered", "bounced"])
    r = await cli.ok("webhooks", "show", hook["id"])
    assert re.search(rf"^id:\s+{hook['id']}$", r.out, re.MULTILINE)
    assert re.search(r"^events:\s+delivered,bounced$", r.out, re.MULTILINE)
    assert re.search(r"^enabled:\s+yes$", r.out, re.MULTILINE)
    assert re.search(r"^disabled_reason:\s+-$", r.out, re.MULTILINE)
    assert "whsec_" not in r.out
    shown = (await cli.ok("webhooks", "show", hook["id"], "--json")).json
    assert shown == await api(h, "GET", f"/v1/webhooks/{hook['id']}")
    assert "secret" not in shown


async def test_filters_from_the_command_line(cli: Cli, h: Harness) -> None:
    made = (await cli.ok("webhooks", "create", "--url", URL, "--from-domain", "Shop.Example,*.shop.example",
                         "--tag", "vip", "--metadata", "plan=gold", "--json")).json
    assert made["filter"] == {"from_domains": ["shop.example", "*.shop.example"], "to_domains": [], "tags": ["vip"],
                              "metadata": {"plan": "gold"}}
    wid = made["id"]
    r = await cli.ok("webhooks", "list")
    assert " from shop.example,*.shop.example; tags …  http://" in r.out  # short: at most 40 characters
    r = await cli.ok("webhooks", "show", wid)
    assert re.search(r"^filter:\s+from shop.example,\*.shop.example; tags vip; metadata plan=gold$", r.out, re.M)
    # each flag given replaces its field; the others stay
    updated = (await cli.ok("webhooks", "update", wid, "--to-domain", "gmail.example", "--tag", "", "--json")).json
    assert updated["filter"] == {"from_domains": ["shop.example", "*.shop.example"], "to_domains": ["gmail.example"],
                                 "tags": [], "metadata": {"plan": "gold"}}
    cleared = (await cli.ok("webhooks", "update", wid, "--clear-filter", "--json")).json
    assert cleared["filter"] == {"from_domains": [], "to_domains": [], "tags": [], "metadata": {}}
    assert re.search(r"^filter:\s+-$", (await cli.ok("webhooks", "show", wid)).out, re.M)
    r = await cli("webhooks", "update", wid, "--from-domain", "not a domain")
    assert r.code == 1 and r.err.startswith("webhookd: filter.from_domains[0]: 'not a domain' is not a domain name")
    r = await cli("webhooks", "update", "wh_nope", "--tag", "x")
    assert r.code == 1 and "wh_nope" in r.err


async def test_update(cli: Cli, h: Harness) -> None:
    hook = await h.create_webhook(URL, ["delivered"])
    updated = (await cli.ok("webhooks", "update", hook["id"], "--events", "all", "--json")).json
    assert updated["events"] == ["*"]
    assert updated == await api(h, "GET", f"/v1/webhooks/{hook['id']}")

    r = await cli.ok("webhooks", "update", hook["id"], "--url", "http://127.0.0.1:9/new",
                     "--description", "new text", "--events", "bounced,complained")
    assert re.search(r"^events:\s+bounced,complained$", r.out, re.MULTILINE)
    now = await api(h, "GET", f"/v1/webhooks/{hook['id']}")
    assert (now["url"], now["description"], now["events"]) == (
        "http://127.0.0.1:9/new", "new text", ["bounced", "complained"])

    r = await cli.ok("webhooks", "update", hook["id"], "--events", "all")
    assert re.search(r"^events:\s+all$", r.out, re.MULTILINE)


async def test_update_with_nothing_to_change_is_a_usage_error(cli: Cli, h: Harness) -> None:
    hook = await h.create_webhook(URL, ["delivered"])
    before = await api(h, "GET", f"/v1/webhooks/{hook['id']}")
    r = await cli("webhooks", "update", hook["id"])
    assert r.code == 2
    assert r.out == ""
    assert "nothing to update" in r.err
    assert await api(h, "GET", f"/v1/webhooks/{hook['id']}") == before


async def test_disable_then_enable_dropping_the_backlog(cli: Cli, h: Harness, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    hook = await h.create_webhook(receiver.url, ["delivered", "bounced"])
    disabled = (await cli.ok("webhooks", "disable", hook["id"], "--json")).json
    assert disabled["enabled"] is False
    assert disabled["disabled_reason"] == "manual"
    answers = await h.submit(event("delivered", 1), event("bounced", 2), event("opened", 3))
    assert all(a["ok"] for a in answers), answers
    assert [d["status"] for d in await h.deliveries(webhook_id=hook["id"])] == ["paused", "paused"]

    enabled = (await cli.ok("webhooks", "enable", hook["id"], "--drop-backlog", "--json")).json
    assert enabled["enabled"] is True
    assert enabled["disabled_reason"] is None
    assert enabled["dropped"] == 2
    assert [d["status"] for d in await h.deliveries(webhook_id=hook["id"])] == ["failed", "failed"]
    await asyncio.sleep(0.1)
    assert receiver.requests == []


async def test_disable_and_enable_tables(cli: Cli, h: Harness) -> None:
    hook = await h.create_webhook(URL, ["delivered"])
    r = await cli.ok("webhooks", "disable", hook["id"])
    assert re.search(r"^enabled:\s+no$", r.out, re.MULTILINE)
    assert re.search(r"^disabled_reason:\s+manual$", r.out, re.MULTILINE)
    r = await cli.ok("webhooks", "enable", hook["id"])
    assert re.search(r"^enabled:\s+yes$", r.out, re.MULTILINE)
    assert re.search(r"^resumed:\s+0$", r.out, re.MULTILINE)


async def test_secret_and_rotate_secret(cli: Cli, h: Harness) -> None:
    hook = await h.create_webhook(URL, ["delivered"])
    old = hook["secret"]
    assert (await cli.ok("webhooks", "secret", hook["id"], "--json")).json == {"id": hook["id"], "secret": old}
    r = await cli.ok("webhooks", "secret", hook["id"])
    assert re.search(rf"^secret:\s+{re.escape(old)}$", r.out, re.MULTILINE)

    rotated = (await cli.ok("webhooks", "rotate-secret", hook["id"], "--json")).json
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old
    assert rotated["id"] == hook["id"]
    assert rotated["previous_secret_expires_at"]
    assert (await cli.ok("webhooks", "secret", hook["id"], "--json")).json["secret"] == new

    r = await cli.ok("webhooks", "rotate-secret", hook["id"])
    m = re.search(r"^secret: (whsec_\S+)$", r.out, re.MULTILINE)
    assert m and m.group(1) not in (old, new)
    assert "Store the secret now" in r.out
    assert old not in r.out


async def test_delete(cli: Cli, h: Harness) -> None:
    a = await h.create_webhook(URL, ["delivered"])
    b = await h.create_webhook(URL, ["delivered"])
    r = await cli.ok("webhooks", "delete", a["id"])
    assert r.out == f"deleted {a['id']}\n"
    assert (await cli.ok("webhooks", "delete", b["id"], "--json")).json == {"deleted": b["id"]}
    assert (await api(h, "GET", "/v1/webhooks"))["webhooks"] == []
    r = await cli("webhooks", "show", a["id"])
    assert r.code == 1 and a["id"] in r.err


@pytest.mark.parametrize("args", [
    ["webhooks", "show", "wh_nope"],
    ["webhooks", "update", "wh_nope", "--description", "x"],
    ["webhooks", "delete", "wh_nope"],
    ["webhooks", "enable", "wh_nope"],
    ["webhooks", "disable", "wh_nope"],
    ["webhooks", "test", "wh_nope"],
    ["webhooks", "secret", "wh_nope"],
    ["webhooks", "rotate-secret", "wh_nope", "--json"],
])
async def test_unknown_webhook_is_exit_1_with_one_line(cli: Cli, args: list[str]) -> None:
    r = await cli(*args)
    assert r.code == 1
    assert r.out == ""
    assert len(r.err.splitlines()) == 1
    assert r.err.startswith("webhookd: ")
    assert "wh_nope" in r.err


# -- deliveries -------------------------------------------------------------------------------------
async def paused_deliveries(h: Harness, receiver: Receiver) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A disabled webhook with three paused deliveries (and one event it does not take)."""
    hook = await h.create_webhook(receiver.url, ["delivered", "bounced"])
    await api(h, "POST", f"/v1/webhooks/{hook['id']}/disable")
    answers = await h.submit(event("delivered", 1), event("bounced", 2), event("opened", 3), event("delivered", 4))
    assert all(a["ok"] for a in answers), answers
    deliveries = await h.deliveries(webhook_id=hook["id"])
    assert len(deliveries) == 3
    return hook, deliveries


async def test_deliveries_list(cli: Cli, h: Harness, make_receiver: MakeReceiver) -> None:
    hook, expected = await paused_deliveries(h, await make_receiver())
    r = await cli.ok("deliveries", "list", "--webhook", hook["id"], "--status", "paused", "--limit", "5", "--json")
    listed = r.json["deliveries"]
    assert listed == expected
    assert [d["status"] for d in listed] == ["paused"] * 3
    assert {d["webhook_id"] for d in listed} == {hook["id"]}
    assert [d["event"] for d in listed] == ["delivered", "bounced", "delivered"]  # newest first
    assert all(re.fullmatch(r"dlv_\d+", d["id"]) for d in listed)

    limited = (await cli.ok("deliveries", "list", "--webhook", hook["id"], "--limit", "2", "--json")).json
    assert limited["deliveries"] == expected[:2]
    pending = (await cli.ok("deliveries", "list", "--webhook", hook["id"], "--status", "pending", "--json")).json
    assert pending == {"deliveries": [], "next_before": None}
    everything = (await cli.ok("deliveries", "list", "--json")).json
    assert everything == await api(h, "GET", "/v1/deliveries")

    r = await cli.ok("deliveries", "list", "--webhook", hook["id"])
    header, *rows = r.lines
    assert header.split()[:4] == ["ID", "STATUS", "ATTEMPTS", "EVENT"]
    assert "WEBHOOK" in header and "NEXT ATTEMPT" in header
    assert [row.split()[0] for row in rows] == [d["id"] for d in expected]
    assert all(" paused " in row and hook["id"] in row for row in rows)

    r = await cli.ok("deliveries", "list", "--status", "failed")
    assert r.out == "no deliveries match\n"


async def test_deliveries_list_refusals_are_exit_1(cli: Cli) -> None:
    r = await cli("deliveries", "list", "--status", "lost")
    assert r.code == 1 and "'lost'" in r.err and len(r.err.splitlines()) == 1
    r = await cli("deliveries", "list", "--limit", "0")
    assert r.code == 1 and "limit" in r.err
    r = await cli("deliveries", "list", "--limit", "many")
    assert r.code == 2 and r.out == ""


async def test_delivery_show_retry_and_attempt_log(cli: Cli, h: Harness, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    hook, deliveries = await paused_deliveries(h, receiver)
    did = deliveries[-1]["id"]

    shown = (await cli.ok("deliveries", "show", did, "--json")).json
    assert shown == {**deliveries[-1], "attempt_log": []}
    r = await cli.ok("deliveries", "show", did)
    assert re.search(rf"^id:\s+{did}$", r.out, re.MULTILINE)
    assert re.search(r"^status:\s+paused$", r.out, re.MULTILINE)
    assert r.lines[-1] == "no attempts yet"

    # retrying a delivery of a disabled webhook keeps it paused
    retried = (await cli.ok("deliveries", "retry", did, "--json")).json
    assert retried["id"] == did and retried["status"] == "paused"
    await asyncio.sleep(0.1)
    assert receiver.requests == []

    enabled = (await cli.ok("webhooks", "enable", hook["id"], "--json")).json
    assert enabled["resumed"] == 3
    await receiver.wait_for(3)

    async def all_succeeded() -> bool:
        return all(d["status"] == "succeeded" for d in await h.deliveries(webhook_id=hook["id"]))

    await eventually(all_succeeded, what="the resumed deliveries to succeed")
    shown = (await cli.ok("deliveries", "show", did, "--json")).json
    assert shown["status"] == "succeeded" and shown["attempts"] == 1
    [attempt] = shown["attempt_log"]
    assert set(attempt) == {"at", "duration_ms", "status_code", "error", "response_body", "batch_id"}
    assert attempt["batch_id"] is None  # a single-event attempt
    assert attempt["status_code"] == 200
    assert attempt["error"] is None
    assert attempt["response_body"] == '{"received": true}'
    r = await cli.ok("deliveries", "show", did)
    table = r.lines[r.lines.index("") + 1:]
    assert table[0].split() == ["AT", "MS", "CODE", "ERROR", "RESPONSE"]
    assert " 200 " in table[1] and '{"received": true}' in table[1]

    # retrying a succeeded delivery sends it again
    receiver.delay = 0.5  # keep the attempt in flight while the CLI reads the status
    retried = (await cli.ok("deliveries", "retry", did, "--json")).json
    assert retried["status"] == "pending"
    await receiver.wait_for(4)

    async def two_attempts() -> bool:
        status, body = await h.api("GET", f"/v1/deliveries/{did}")
        return status == 200 and len(body["attempt_log"]) == 2 and body["status"] == "succeeded"

    await eventually(two_attempts, what="the retried attempt")


@pytest.mark.parametrize("args", [["deliveries", "show", "dlv_999999"], ["deliveries", "retry", "dlv_999999"],
                                  ["deliveries", "show", "nope"]])
async def test_unknown_delivery_is_exit_1(cli: Cli, args: list[str]) -> None:
    r = await cli(*args)
    assert r.code == 1
    assert r.out == ""
    assert len(r.err.splitlines()) == 1
    assert args[-1] in r.err


# -- status and test -----------------------------------------------------------------------------------
async def test_status(cli: Cli, h: Harness, make_receiver: MakeReceiver) -> None:
    await paused_deliveries(h, await make_receiver())
    await h.create_webhook(URL, ["complained"])

    doc = (await cli.ok("status", "--json")).json
    assert doc["version"] == __version__
    assert doc["deliveries"] == {"pending": 0, "paused": 3, "succeeded": 0, "failed": 0}
    assert doc["webhooks"] == {"enabled": 1, "disabled": 1}
    assert isinstance(doc["uptime_s"], int | float)
    assert without(doc, "uptime_s") == without(await api(h, "GET", "/v1/status"), "uptime_s")

    # --json before the command works too
    r = await asyncio.to_thread(main, ["--json", "--config", str(cli.config), "status"])
    assert r == 0
    assert json.loads(cli.capsys.readouterr().out)["webhooks"] == {"enabled": 1, "disabled": 1}

    r2 = await cli.ok("status")
    assert r2.lines[0].startswith(f"webhookd {__version__}, up ")
    assert "deliveries: 0 pending, 3 paused, 0 succeeded, 0 failed" in r2.lines
    assert "webhooks: 1 enabled, 1 disabled" in r2.lines


async def test_webhook_test_against_a_receiver(cli: Cli, h: Harness, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    hook = await h.create_webhook(receiver.url, ["bounced"])
    r = await cli.ok("webhooks", "test", hook["id"])
    assert re.match(r"test event accepted: HTTP 200 in \d+ ms$", r.lines[0]), r.out
    assert 'response: {"received": true}' in r.lines
    [sent] = receiver.requests
    assert sent.headers["X-Webhook-Event"] == "delivered"
    assert sent.json["data"]["message_id"].startswith("test-")
    assert sent.json["data"]["tags"] == ["test"]

    result = (await cli.ok("webhooks", "test", hook["id"], "--event", "bounced", "--json")).json
    assert result["ok"] is True
    assert result["status_code"] == 200
    assert result["error"] is None
    assert result["response_body"] == '{"received": true}'
    assert isinstance(result["duration_ms"], int | float)
    assert receiver.requests[-1].json["event"] == "bounced"
    # the test event is not a delivery
    assert await h.deliveries() == []


async def test_webhook_test_reports_a_refusal_and_changes_no_counter(
    cli: Cli, h: Harness, make_receiver: MakeReceiver
) -> None:
    receiver = await make_receiver(default=503)
    hook = await h.create_webhook(receiver.url, ["delivered"])
    await api(h, "POST", f"/v1/webhooks/{hook['id']}/disable")
    r = await cli("webhooks", "test", hook["id"])
    assert r.code == 0, r
    assert r.lines[0].startswith("test event NOT accepted: HTTP 503")
    after = await api(h, "GET", f"/v1/webhooks/{hook['id']}")
    assert after["consecutive_failures"] == 0
    assert after["enabled"] is False
    r = await cli("webhooks", "test", hook["id"], "--event", "sent")
    assert r.code == 1 and "'sent'" in r.err


# -- daemon not running ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["status"], ["webhooks", "list", "--json"], ["deliveries", "show", "dlv_1"]])
async def test_admin_socket_missing_is_69_naming_the_socket(no_daemon: Cli, short_dir: Path,
                                                             args: list[str]) -> None:
    r = await no_daemon(*args)
    assert r.code == 69
    assert r.out == ""
    assert len(r.err.splitlines()) == 1
    assert str((short_dir / "admin.sock").resolve()) in r.err


async def test_stale_admin_socket_is_69(no_daemon: Cli, short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(short_dir / "admin.sock"))  # a socket file nobody listens on, as after kill -9
    r = await no_daemon("status")
    assert r.code == 69
    assert "admin.sock" in r.err


async def test_disabled_admin_socket_is_a_config_error(tmp_path: Path, short_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "c.toml", short_dir, short_dir, '[admin]\nsocket = ""\n')
    r = await Cli(path, capsys)("status")
    assert r.code == 78
    assert "admin.socket" in r.err


# -- submit ---------------------------------------------------------------------------------------------
def line(kind: str = "delivered", n: int = 0, **data: Any) -> str:
    return json.dumps(event(kind, n, **data))


async def test_submit_arguments(cli: Cli, h: Harness) -> None:
    hook = await h.create_webhook(URL, ["delivered", "bounced"])
    await api(h, "POST", f"/v1/webhooks/{hook['id']}/disable")
    r = await cli.ok("submit", line("delivered", 1), line("bounced", 2))
    assert len(r.lines) == 2
    assert all(out.startswith('{"ok":true,') for out in r.lines), r.out
    ids = [json.loads(out)["id"] for out in r.lines]
    assert len(set(ids)) == 2
    deliveries = await h.deliveries(webhook_id=hook["id"])
    assert sorted(d["event_id"] for d in deliveries) == sorted(ids)


async def test_submit_is_idempotent_by_key(cli: Cli) -> None:
    doc = {**event("delivered", 1), "id": "mta-queue-1A2B3C"}
    first = (await cli.ok("submit", json.dumps(doc))).json
    again = (await cli.ok("submit", json.dumps(doc))).json
    assert first == again and first["ok"] is True


async def test_submit_rejected_event_is_65(cli: Cli) -> None:
    r = await cli("submit", line("delivered", 1), '{"event": "sent", "data": {"message_id": "<m@x>"}}')
    assert r.code == 65
    assert r.err == ""
    first, second = (json.loads(out) for out in r.lines)
    assert first["ok"] is True
    assert second["ok"] is False and "sent" in second["error"]


async def test_submit_without_a_daemon_is_75(no_daemon: Cli, short_dir: Path) -> None:
    r = await no_daemon("submit", line("delivered", 1))
    assert r.code == 75
    assert r.out == ""
    assert len(r.err.splitlines()) == 1
    assert str((short_dir / "intake.sock").resolve()) in r.err


def feed_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


async def test_submit_stdin_answers_each_line_in_order(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [
        line("delivered", 1),
        "{not json",
        line("bounced", 2),
        '{"event": "bounced", "data": {"message_id": "<m@x>"}}',
        line("clicked", 3, url="https://example.com/"),
    ]
    feed_stdin(monkeypatch, "\n".join(lines).encode() + b"\n")
    r = await cli("submit")
    assert r.code == 65, r
    answers = [json.loads(out) for out in r.lines]
    assert [a["ok"] for a in answers] == [True, False, True, False, True]
    assert "JSON" in answers[1]["error"]
    assert "bounce_type" in answers[3]["error"]
    assert len({a["id"] for a in answers if a["ok"]}) == 3


async def test_submit_stdin_all_good_is_0(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    feed_stdin(monkeypatch, b"".join(line("delivered", n).encode() + b"\r\n" for n in range(20)))
    r = await cli.ok("submit")
    assert len(r.lines) == 20
    assert all(json.loads(out)["ok"] for out in r.lines)


async def test_submit_empty_stdin_is_0_and_prints_nothing(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    feed_stdin(monkeypatch, b"\n  \n")
    r = await cli.ok("submit")
    assert r.out == ""


# -- local commands ---------------------------------------------------------------------------------------
def test_check_config_ok(tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "ok.toml", short_dir, short_dir, '[delivery]\nretry_base = "1m"\n')
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"config OK: {path.resolve()}\n"
    assert err == ""
    assert main(["check-config", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "config": str(path.resolve())}


def test_check_config_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WEBHOOKD_CONFIG", raising=False)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.chdir(tmp_path)
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out == "config OK: built-in defaults\n"


def test_check_config_uses_webhookd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[log]\nlevel = 'loud'\n")
    monkeypatch.setenv("WEBHOOKD_CONFIG", str(path))
    assert main(["check-config"]) == 78
    assert "log.level" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "key"), [
    ('[delivery]\nretry_bse = "1s"\n', "delivery.retry_bse"),
    ("[intake]\nsocket_mode = 660\n", "intake.socket_mode"),
    ('delivery_typo = 1\n', "delivery_typo"),
])
@pytest.mark.parametrize("command", [["check-config"], ["status"], ["submit", "{}"]])
def test_bad_config_is_78_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str,
                                         command: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main([*command, "--config", str(path)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert key in err


def test_unparsable_or_missing_config_is_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[delivery\n")
    assert main(["check-config", "--config", str(path)]) == 78
    err = capsys.readouterr().err
    assert str(path) in err and len(err.splitlines()) == 1
    assert main(["check-config", "--config", str(tmp_path / "absent.toml")]) == 78
    assert "absent.toml" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"webhookd {__version__}\n"


def test_usage_errors_are_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["webhooks"]) == 2
    assert main(["webhooks", "show"]) == 2
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().out == ""
