"""Webhooks as code (webhookd/declared.py): parsing `[[webhooks]]` in the config file and in
webhooks.d/*.toml, its errors (ConfigError naming the file and the dotted key), and the plan
(the diff a sync applies and `check-config --plan` prints), table-driven."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from webhookd.batching import OFF, Batching
from webhookd.config import ConfigError, load_config
from webhookd.declared import REMOVED_FROM_CONFIG, DeclaredWebhook, plan, render, to_json
from webhookd.filters import EMPTY_FILTER, WebhookFilter
from webhookd.signing import generate_secret
from webhookd.store import WebhookRecord

SECRET = generate_secret()


def write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        os.chmod(path, mode)
    return path


def config(tmp_path: Path, body: str, *, production: bool = False) -> Path:
    env = "" if production else 'environment = "development"\n'
    return write(tmp_path / "config.toml", env + f'state_dir = "{tmp_path / "state"}"\n' + body)


def load(path: Path) -> tuple[DeclaredWebhook, ...]:
    return load_config(path, env={}).webhooks


# -- parsing ---------------------------------------------------------------------------------------
def test_config_file_and_webhooks_d_entries_in_order(tmp_path: Path) -> None:
    path = config(tmp_path, '[[webhooks]]\nname = "main"\nurl = "http://127.0.0.1/a"\n')
    write(tmp_path / "webhooks.d" / "b-shop.toml",
          '[[webhooks]]\nname = "shop"\nurl = "https://hooks.shop.example/m"\nevents = ["delivered", "bounced"]\n'
          'description = "shop"\nsecret_file = "shop.secret"\n'
          '[webhooks.filter]\nfrom_domains = ["Shop.Example", "*.shop.example"]\ntags = ["vip"]\n')
    write(tmp_path / "webhooks.d" / "shop.secret", SECRET + "\n", 0o600)
    write(tmp_path / "webhooks.d" / "a-other.toml", '[[webhooks]]\nname = "other"\nurl = "https://o.example/"\n')
    write(tmp_path / "webhooks.d" / "README.md", "not toml [[")  # ignored
    write(tmp_path / "webhooks.d" / "c.toml.bak", "not toml [[")  # ignored
    main, other, shop = load(path)
    assert (main.name, main.url, main.events, main.filter, main.secret, main.source) == (
        "main", "http://127.0.0.1/a", ("*",), EMPTY_FILTER, None, str(path))
    assert (other.name, other.source) == ("other", str(tmp_path / "webhooks.d" / "a-other.toml"))
    assert shop.events == ("delivered", "bounced") and shop.description == "shop"
    assert shop.filter == WebhookFilter.parse({"from_domains": ["shop.example", "*.shop.example"], "tags": ["vip"]})
    assert shop.secret == SECRET and shop.secret_file == str(tmp_path / "webhooks.d" / "shop.secret")
    assert SECRET not in repr(shop)


def test_no_webhooks_without_a_config_file_or_entries(tmp_path: Path) -> None:
    assert load_config(None, env={}).webhooks == ()
    assert load(config(tmp_path, "")) == ()


@pytest.mark.parametrize(("entry", "key", "words"), [
    ('name = "Main"\nurl = "https://a.example/"', "webhooks[0].name", "lower-case"),
    ('url = "https://a.example/"', "webhooks[0].name", "required"),
    ('name = "-x"\nurl = "https://a.example/"', "webhooks[0].name", "starting with"),
    ('name = "' + "a" * 64 + '"\nurl = "https://a.example/"', "webhooks[0].name", "at most 63"),
    ('name = "a"', "webhooks[0].url", "required"),
    ('name = "a"\nurl = "ftp://a.example/"', "webhooks[0].url", "http(s) URL"),
    ('name = "a"\nurl = "https://u:p@a.example/"', "webhooks[0].url", "credentials"),
    ('name = "a"\nurl = "https://a.example/"\nevents = ["nope"]', "webhooks[0].events", "unknown event"),
    ('name = "a"\nurl = "https://a.example/"\nevents = []', "webhooks[0].events", "non-empty"),
    ('name = "a"\nurl = "https://a.example/"\nfilter = { tags = "vip" }', "webhooks[0].filter", "filter.tags"),
    ('name = "a"\nurl = "https://a.example/"\nfilter = { from_domains = ["not a domain"] }',
     "webhooks[0].filter", "not a domain"),
    ('name = "a"\nurl = "https://a.example/"\nfilter = { color = "red" }', "webhooks[0].filter", "unknown field"),
    ('name = "a"\nurl = "https://a.example/"\ndescription = 3', "webhooks[0].description", "string"),
    ('name = "a"\nurl = "https://a.example/"\nsecret = "whsec_x"', "webhooks[0].secret", "unknown key"),
    ('name = "a"\nurl = "https://a.example/"\nsecret_file = "missing"', "webhooks[0].secret_file", "cannot read"),
    ('name = "a"\nurl = "https://a.example/"\nbatch_max_events = 1001', "webhooks[0].batch_max_events",
     "must be between 0 and 1000, got 1001"),
    ('name = "a"\nurl = "https://a.example/"\nbatch_max_events = "100"', "webhooks[0].batch_max_events",
     "must be an integer"),
    ('name = "a"\nurl = "https://a.example/"\nbatch_max_bytes = 99999999999999', "webhooks[0].batch_max_bytes",
     "between 1024 and 4194304"),
    ('name = "a"\nurl = "https://a.example/"\nbatch_linger = "1h"', "webhooks[0].batch_linger",
     "must be a duration"),
    ('name = "a"\nurl = "https://a.example/"\nbatch_linger = 10', "webhooks[0].batch_linger",
     "between 0ms and 5s"),
    ('name = "a"\nurl = "https://a.example/"\nbatch_linger = true', "webhooks[0].batch_linger",
     "must be a duration"),
])
def test_entry_errors_name_the_dotted_key(tmp_path: Path, entry: str, key: str, words: str) -> None:
    path = config(tmp_path, '[[webhooks]]\nname = "ok"\nurl = "https://ok.example/"\n[[webhooks]]\n'
                  + entry.replace("webhooks[0]", "") + "\n")
    want = key.replace("webhooks[0]", "webhooks[1]")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == want and words in caught.value.message, str(caught.value)


def test_http_urls_are_refused_in_production(tmp_path: Path) -> None:
    path = config(tmp_path, '[[webhooks]]\nname = "a"\nurl = "http://a.example/"\n', production=True)
    with pytest.raises(ConfigError, match=r"^webhooks\[0\]\.url: url must use https:// in production"):
        load(path)


def test_webhooks_must_be_an_array_of_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^webhooks: expected an array of tables"):
        load(config(tmp_path, 'webhooks = "x"\n'))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_a_secret_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    write(tmp_path / "s", SECRET, mode)
    path = config(tmp_path, '[[webhooks]]\nname = "a"\nurl = "https://a.example/"\nsecret_file = "s"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == "webhooks[0].secret_file"
    assert f"secret file {tmp_path / 's'} has mode {mode:04o}" in caught.value.message
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_secret_file_is_read(tmp_path: Path, mode: int) -> None:
    write(tmp_path / "secrets" / "a", f"  {SECRET}\n", mode)
    path = config(tmp_path, '[[webhooks]]\nname = "a"\nurl = "https://a.example/"\nsecret_file = "secrets/a"\n')
    [hook] = load(path)
    assert hook.secret == SECRET


@pytest.mark.parametrize("content", ["", "whsec_", "s3cr3t-value", "whsec_!!!", "whsec_" + "QUFB" * 4,
                                     SECRET + " " + SECRET])
def test_a_secret_file_must_hold_one_whsec_secret(tmp_path: Path, content: str) -> None:
    write(tmp_path / "s", content, 0o600)
    path = config(tmp_path, '[[webhooks]]\nname = "a"\nurl = "https://a.example/"\nsecret_file = "s"\n')
    with pytest.raises(ConfigError, match=r"^webhooks\[0\]\.secret_file: secret file .*s") as caught:
        load(path)
    if content:
        assert content not in caught.value.message.replace(str(tmp_path / "s"), "")


def test_duplicate_names_are_refused_across_all_sources(tmp_path: Path) -> None:
    path = config(tmp_path, '[[webhooks]]\nname = "a"\nurl = "https://a.example/"\n'
                            '[[webhooks]]\nname = "b"\nurl = "https://b.example/"\n')
    write(tmp_path / "webhooks.d" / "shop.toml", '[[webhooks]]\nname = "c"\nurl = "https://c.example/"\n'
                                                '[[webhooks]]\nname = "b"\nurl = "https://b.example/"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == "webhooks.d/shop.toml: webhooks[1].name"
    assert caught.value.message == "'b' is already declared (webhooks[1])"
    assert str(caught.value).startswith("webhooks.d/shop.toml: webhooks[1].name: 'b' is already declared")

    path = config(tmp_path, '[[webhooks]]\nname = "a"\nurl = "https://a.example/"\n'
                            '[[webhooks]]\nname = "a"\nurl = "https://b.example/"\n')
    with pytest.raises(ConfigError, match=r"^webhooks\[1\]\.name: 'a' is already declared \(webhooks\[0\]\)"):
        load(path)


def test_webhooks_d_file_errors_name_the_file(tmp_path: Path) -> None:
    path = config(tmp_path, "")
    shop = write(tmp_path / "webhooks.d" / "shop.toml", '[[webhooks]]\nname = "a"\nurl = "nope"\n')
    with pytest.raises(ConfigError, match=r"^webhooks\.d/shop\.toml: webhooks\[0\]\.url: url must be"):
        load(path)
    shop.write_text('[storage]\npath = "x"\n')
    with pytest.raises(ConfigError, match=r"^webhooks\.d/shop\.toml: storage: unknown key"):
        load(path)
    shop.write_text("[[webhooks]\n")
    with pytest.raises(ConfigError, match=r"^webhooks\.d/shop\.toml: "):
        load(path)


def test_batch_settings_are_declared(tmp_path: Path) -> None:
    path = config(tmp_path, '[[webhooks]]\nname = "plain"\nurl = "https://a.example/"\n'
                  '[[webhooks]]\nname = "bulk"\nurl = "https://b.example/"\nbatch_max_events = 100\n'
                  'batch_max_bytes = 262144\nbatch_linger = "50ms"\n')
    write(tmp_path / "webhooks.d" / "more.toml",
          '[[webhooks]]\nname = "more"\nurl = "https://c.example/"\nbatch_max_events = 10\n')
    plain, bulk, more = load(path)
    assert plain.batching == OFF
    assert bulk.batching == Batching(100, 262144, 0.05)
    assert more.batching == Batching(10, 1048576, 0.0)


# -- the plan ---------------------------------------------------------------------------------------
def declared(name: str, **kw: Any) -> DeclaredWebhook:
    base: dict[str, Any] = dict(name=name, url=f"https://{name}.example/h", events=("*",), description="",
                                filter=EMPTY_FILTER, source="/etc/webhookd/config.toml")
    return DeclaredWebhook(**{**base, **kw})


def stored(name: str | None, **kw: Any) -> WebhookRecord:
    wid = f"wh_{name or 'api'}"
    base: dict[str, Any] = dict(
        id=wid, url=f"https://{name}.example/h", events=("*",), description="", enabled=True, disabled_reason=None,
        consecutive_failures=0, backoff_until=0.0, secret="whsec_old", previous_secret=None,
        previous_secret_expires_at=None, created_at=1.0, updated_at=1.0, filter=EMPTY_FILTER, name=name,
        declared_in="/etc/webhookd/config.toml" if name else None,
    )
    return WebhookRecord(**{**base, **kw})


VIP = WebhookFilter.parse({"tags": ["vip"]})
CASES: list[tuple[str, list[DeclaredWebhook], list[WebhookRecord], list[str]]] = [
    ("nothing", [], [], ["no changes"]),
    ("in step", [declared("a")], [stored("a")], ["no changes"]),
    ("api webhooks are left alone", [], [stored(None)], ["no changes"]),
    ("create", [declared("a", events=("delivered", "bounced"))], [],
     ["+ create a https://a.example/h delivered,bounced (secret generated)"]),
    ("create with a filter and a secret file", [declared("a", filter=VIP, secret=SECRET, secret_file="/s/a")], [],
     ["+ create a https://a.example/h all (filter tag vip; secret from /s/a)"]),
    ("url", [declared("a", url="https://new.example/h")], [stored("a")],
     ["~ update a: url https://a.example/h → https://new.example/h"]),
    ("events and filter", [declared("a", events=("opened",), filter=VIP)], [stored("a")],
     ["~ update a: events all → opened", "~ update a: filter (none) → tag vip"]),
    ("batching", [declared("a", batching=Batching(100, 65536, 0.05))], [stored("a")],
     ["~ update a: batching off → 100 events, 65536 bytes, linger 50ms"]),
    ("create batching", [declared("a", batching=Batching(10))], [],
     ["+ create a https://a.example/h all (batching 10 events, 1048576 bytes, linger 0ms; secret generated)"]),
    ("batching in step", [declared("a", batching=Batching(10))], [stored("a", batching=Batching(10))],
     ["no changes"]),
    ("description", [declared("a", description="new")], [stored("a", description="old")],
     ["~ update a: description 'old' → 'new'"]),
    ("moved to another file", [declared("a", source="/etc/webhookd/webhooks.d/a.toml")], [stored("a")],
     ["~ update a: declared_in /etc/webhookd/config.toml → /etc/webhookd/webhooks.d/a.toml"]),
    ("secret from its file changed", [declared("a", secret=SECRET, secret_file="/s/a")], [stored("a")],
     ["~ update a: secret changed (from /s/a)"]),
    ("secret from its file unchanged", [declared("a", secret="whsec_old", secret_file="/s/a")], [stored("a")],
     ["no changes"]),
    ("generated secret kept", [declared("a")], [stored("a", secret="whsec_generated")], ["no changes"]),
    ("removed", [], [stored("a")], ["- disable a (removed from config)"]),
    ("already removed", [], [stored("a", enabled=False, disabled_reason=REMOVED_FROM_CONFIG, declared_in=None)],
     ["no changes"]),
    ("declared again", [declared("a")],
     [stored("a", enabled=False, disabled_reason=REMOVED_FROM_CONFIG, declared_in=None)],
     ["~ update a: declared_in (none) → /etc/webhookd/config.toml",
      "~ update a: enable (declared again after removed_from_config)"]),
    ("disabled after failures stays disabled", [declared("a")],
     [stored("a", enabled=False, disabled_reason="consecutive_failures")], ["no changes"]),
    ("all three", [declared("b"), declared("c", url="https://c2.example/h")], [stored("a"), stored("c")],
     ["+ create b https://b.example/h all (secret generated)", "~ update c: url https://c.example/h → https://c2.example/h",
      "- disable a (removed from config)"]),
]


@pytest.mark.parametrize(("case", "want", "have", "lines"), CASES, ids=[c[0] for c in CASES])
def test_plan(case: str, want: list[DeclaredWebhook], have: list[WebhookRecord], lines: list[str]) -> None:
    changes = plan(want, have)
    shown = render(changes)
    if lines == ["no changes"]:
        assert changes == [] and shown == ["no changes"]
    else:
        assert shown[:-1] == lines
        assert shown[-1].startswith("plan: ")
    for text in shown:
        assert SECRET not in text and "whsec_old" not in text


def test_plan_json_never_holds_a_secret() -> None:
    changes = plan([declared("a", secret=SECRET, secret_file="/s/a", url="https://n.example/"),
                    declared("b", secret=SECRET, secret_file="/s/b")], [stored("a"), stored("c")])
    docs = to_json(changes)
    assert [d["action"] for d in docs] == ["update", "create", "disable"]
    assert docs[0]["changes"] == {"url": {"old": "https://a.example/h", "new": "https://n.example/"}}
    assert docs[0]["secret"] == "changed" and docs[1]["secret"] == "from_file"
    assert SECRET not in repr(docs) and "whsec_old" not in repr(docs)


def test_plan_json_shows_batch_settings() -> None:
    docs = to_json(plan([declared("a", batching=Batching(10)), declared("b", batching=Batching(5, 4096, 1.0))],
                        [stored("a")]))
    assert docs[0]["changes"] == {"batching": {"old": OFF.to_json(), "new": Batching(10).to_json()}}
    assert (docs[1]["batch_max_events"], docs[1]["batch_max_bytes"], docs[1]["batch_linger"]) == (5, 4096, "1000ms")


def test_plan_matches_by_name_not_url() -> None:
    """Two entries may point at one URL; a webhook made through the API with a declared
    webhook's URL is not adopted."""
    api = replace(stored(None), url="https://a.example/h")
    changes = plan([declared("a"), declared("b", url="https://a.example/h")], [api])
    assert [(c.kind, c.name) for c in changes] == [("create", "a"), ("create", "b")]
