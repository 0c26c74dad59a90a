"""Webhooks as code through the real `webhookd serve` process: webhooks declared in the config
file and in webhooks.d/ appear at start, change and are disabled through SIGHUP alone (deliveries
follow the new URL, a removed one keeps its history and comes back when declared again),
`check-config --plan` shows each change first without applying it, and declared webhooks are
read-only through the admin API and the CLI (enable and disable still work)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_process import Proc, ThreadReceiver, wait_until
from webhookd.signing import generate_secret, legacy_signature


@pytest.fixture
def receivers() -> Iterator[Callable[[], ThreadReceiver]]:
    made: list[ThreadReceiver] = []

    def make() -> ThreadReceiver:
        r = ThreadReceiver()
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def entry(name: str, url: str, events: str = '"all"', extra: str = "") -> str:
    return f'[[webhooks]]\nname = "{name}"\nurl = "{url}"\nevents = {events}\n{extra}'


def declare(d: Proc, *entries: str, shop: str | None = None) -> None:
    """The config file's [[webhooks]] `entries`; webhooks.d/shop.toml holds `shop` (None: no file)."""
    d.write_config(tables="".join(entries))
    path = d.root / "webhooks.d" / "shop.toml"
    path.parent.mkdir(exist_ok=True)
    if shop is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(shop)


def plan(d: Proc) -> list[str]:
    p = d.cli("check-config", "--plan")
    assert p.returncode == 0, p.stderr
    return p.stdout.decode().splitlines()[1:]


def hooks(d: Proc) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in d.json("webhooks", "list")["webhooks"] if h["name"]}


def submit(d: Proc, mid: str, sender: str = "shop@shop.example", kind: str = "delivered") -> None:
    data: dict[str, Any] = {"message_id": f"<{mid}@x>", "from": sender, "tags": ["vip"]}
    if kind == "bounced":
        data["bounce_type"] = "hard"
    line = json.dumps({"event": kind, "data": data})
    p = d.cli("submit", line)
    assert p.returncode == 0, p.stdout + p.stderr


def reload(d: Proc) -> dict[str, Any]:
    line = d.reload()
    assert line["event"] == "config reloaded", line
    return line


def test_declared_webhooks_appear_change_and_are_disabled_through_sighup(
    proc: Callable[..., Proc], receivers: Callable[[], ThreadReceiver],
) -> None:
    old, new, other = receivers(), receivers(), receivers()
    d = proc()
    secret_file = d.root / "shop.secret"
    secret = generate_secret()
    secret_file.write_text(secret + "\n")
    os.chmod(secret_file, 0o600)
    shop_toml = entry("shop", other.url, '["delivered"]', 'secret_file = "../shop.secret"\n')
    declare(d, entry("main", old.url, '["delivered"]', 'filter = { from_domains = ["shop.example"] }\n'),
            shop=shop_toml)

    # the plan before the first start: both to create, nothing applied (no database yet)
    assert plan(d) == [f"+ create main {old.url} delivered (filter from shop.example; secret generated)",
                       f"+ create shop {other.url} delivered (secret from {secret_file})",
                       "plan: 2 to create, 0 to update, 0 to disable"]
    assert not (d.root / "state" / "webhookd.db").exists()

    d.start()
    found = hooks(d)
    assert set(found) == {"main", "shop"}
    main, shop = found["main"], found["shop"]
    assert (main["url"], main["events"], main["filter"]["from_domains"], main["declared_in"]) == (
        old.url, ["delivered"], ["shop.example"], str(d.config))
    assert shop["declared_in"] == str(d.root / "webhooks.d" / "shop.toml")
    assert d.json("webhooks", "secret", shop["id"])["secret"] == secret  # from its file
    assert plan(d) == ["no changes"]

    submit(d, "m1")
    submit(d, "m2", sender="a@elsewhere.example")  # the filter keeps it from main
    wait_until(lambda: old.delivered() == {"<m1@x>"} and other.delivered() == {"<m1@x>", "<m2@x>"},
               what="the first deliveries")
    body, headers = other.bodies[0], other.headers[0]
    assert headers["x-webhook-signature"].endswith(legacy_signature(secret, body).split("=", 1)[-1])

    # change url, events and filter in the file: the plan shows it, nothing changes until SIGHUP
    declare(d, entry("main", new.url, '["delivered", "bounced"]', 'filter = { tags = ["vip"] }\n'), shop=shop_toml)
    assert plan(d) == [
        f"~ update main: url {old.url} → {new.url}",
        "~ update main: events delivered → delivered,bounced",
        "~ update main: filter from shop.example → tag vip",
        "plan: 0 to create, 1 to update, 0 to disable",
    ]
    assert hooks(d)["main"]["url"] == old.url
    line = reload(d)
    assert line["webhooks"] == {"create": 0, "update": 1, "disable": 0}
    main2 = hooks(d)["main"]
    assert main2["id"] == main["id"]
    assert (main2["url"], main2["events"], main2["filter"]["tags"], main2["filter"]["from_domains"]) == (
        new.url, ["delivered", "bounced"], ["vip"], [])
    submit(d, "m3", sender="a@elsewhere.example", kind="bounced")  # the new filter and events let it through
    wait_until(lambda: new.delivered() == {"<m3@x>"}, what="the delivery to the new URL")
    assert old.delivered() == {"<m1@x>"}
    assert plan(d) == ["no changes"]

    # remove shop.toml: the plan says disable; after SIGHUP it is disabled, its history kept
    declare(d, entry("main", new.url, '["delivered", "bounced"]', 'filter = { tags = ["vip"] }\n'))
    assert plan(d) == ["- disable shop (removed from config)", "plan: 0 to create, 0 to update, 1 to disable"]
    assert hooks(d)["shop"]["enabled"] is True
    assert reload(d)["webhooks"] == {"create": 0, "update": 0, "disable": 1}
    gone = hooks(d)["shop"]
    assert (gone["id"], gone["enabled"], gone["disabled_reason"], gone["declared_in"]) == (
        shop["id"], False, "removed_from_config", None)
    history = d.json("deliveries", "list", "--webhook", shop["id"])["deliveries"]
    assert len(history) == 2 and {h["status"] for h in history} == {"succeeded"}  # m1, m2 (m3 bounced)
    submit(d, "m4")  # a disabled webhook's delivery waits, paused
    wait_until(lambda: new.delivered() == {"<m3@x>", "<m4@x>"}, what="m4 to main")
    statuses = [h["status"] for h in d.json("deliveries", "list", "--webhook", shop["id"])["deliveries"]]
    assert statuses[0] == "paused" and len(statuses) == 3
    assert plan(d) == ["no changes"]

    # declared again: the same webhook is enabled again and its paused delivery goes out
    declare(d, entry("main", new.url, '["delivered", "bounced"]', 'filter = { tags = ["vip"] }\n'), shop=shop_toml)
    assert plan(d)[-2:] == ["~ update shop: enable (declared again after removed_from_config)",
                            "plan: 0 to create, 1 to update, 0 to disable"]
    reload(d)
    back = hooks(d)["shop"]
    assert (back["id"], back["enabled"], back["declared_in"]) == (shop["id"], True, shop["declared_in"])
    wait_until(lambda: "<m4@x>" in other.delivered(), what="the paused delivery after re-enabling")

    # a new secret in its file is rotated in (the old one stays valid for the grace period)
    rotated = generate_secret()
    secret_file.write_text(rotated)
    assert plan(d) == [f"~ update shop: secret changed (from {secret_file})",
                       "plan: 0 to create, 1 to update, 0 to disable"]
    assert rotated not in " ".join(plan(d)) and secret not in " ".join(plan(d))
    reload(d)
    assert d.json("webhooks", "secret", shop["id"])["secret"] == rotated

    # a restart changes nothing more
    d.stop()
    d.start()
    assert plan(d) == ["no changes"]
    assert set(hooks(d)) == {"main", "shop"}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("admin")
        self.path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


def api(d: Proc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = UnixHTTPConnection(d.run / "admin.sock")
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_declared_webhooks_are_read_only_through_the_api_and_the_cli(
    proc: Callable[..., Proc], receivers: Callable[[], ThreadReceiver],
) -> None:
    r = receivers()
    d = proc()
    declare(d, shop=entry("shop", r.url))
    d.start()
    wid = hooks(d)["shop"]["id"]
    where = str(d.root / "webhooks.d" / "shop.toml")
    for method, path, body in [("PATCH", f"/v1/webhooks/{wid}", {"url": "http://127.0.0.1:1/x"}),
                               ("PATCH", f"/v1/webhooks/{wid}", {"description": "mine"}),
                               ("DELETE", f"/v1/webhooks/{wid}", None),
                               ("POST", f"/v1/webhooks/{wid}/rotate-secret", None)]:
        status, answer = api(d, method, path, body)
        assert status == 409, (method, path, answer)
        assert f"is declared in {where}" in answer["error"]
    for args in (["update", wid, "--url", "http://127.0.0.1:1/x"], ["update", wid, "--tag", "vip"],
                 ["delete", wid], ["rotate-secret", wid]):
        p = d.cli("webhooks", *args)
        assert p.returncode == 1, args
        assert f"is declared in {where}: change it there and reload" in p.stderr.decode(), p.stderr
    hook = hooks(d)["shop"]
    assert (hook["url"], hook["description"], hook["filter"]["tags"]) == (r.url, "", [])

    # state changes stay possible: an operator can disable and re-enable it
    assert d.json("webhooks", "disable", wid)["enabled"] is False
    assert reload(d)["webhooks"] == {"create": 0, "update": 0, "disable": 0}  # a manual disable is kept
    assert hooks(d)["shop"]["disabled_reason"] == "manual"
    assert d.json("webhooks", "enable", wid)["enabled"] is True
    # webhooks made through the API stay editable beside declared ones
    made = d.json("webhooks", "create", "--url", r.url)
    assert d.json("webhooks", "update", made["id"], "--description", "mine")["description"] == "mine"
    assert reload(d)["webhooks"] == {"create": 0, "update": 0, "disable": 0}
    assert made["id"] in {h["id"] for h in d.json("webhooks", "list")["webhooks"]}


def test_bad_declarations_are_refused_at_start_and_on_sighup(
    proc: Callable[..., Proc], receivers: Callable[[], ThreadReceiver],
) -> None:
    r = receivers()
    d = proc()
    secret_file = d.root / "s"
    secret_file.write_text(generate_secret())
    os.chmod(secret_file, 0o644)
    declare(d, entry("a", r.url, extra=f'secret_file = "{secret_file}"\n'))
    for args in (["check-config"], ["check-config", "--plan"], ["serve"]):
        p = d.cli(*args)
        assert p.returncode == 78, (args, p.stderr)
        assert f"webhooks[0].secret_file: secret file {secret_file} has mode 0644" in p.stderr.decode()

    declare(d, entry("a", r.url), shop=entry("b", r.url) + entry("a", r.url))
    p = d.cli("check-config", "--plan")
    assert p.returncode == 78
    assert "webhooks.d/shop.toml: webhooks[1].name: 'a' is already declared (webhooks[0])" in p.stderr.decode()

    declare(d, entry("a", r.url))
    d.start()
    before = hooks(d)
    for shop in (entry("b", r.url) + entry("a", "http://127.0.0.1:1/x"),  # a duplicate name
                 entry("b", r.url, extra=f'secret_file = "{secret_file}"\n')):  # mode 0644
        declare(d, entry("a", "http://127.0.0.1:1/changed"), shop=shop)
        line = d.reload()
        assert line["event"] == "config reload failed; keeping the running config", line
        assert hooks(d) == before  # nothing changed, nothing created
