"""config.example.toml documents every key (test_config.py checks its values are the defaults)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from webhookd.config import TOP_LEVEL, parse_config
from webhookd.signing import generate_secret

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_lists_every_key_and_is_valid() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) | {"webhooks"} == set(TOP_LEVEL)  # [[webhooks]] is shown commented out
    config = parse_config(data, env={})
    for section in ("storage", "intake", "admin", "dashboard", "delivery", "tracking", "notify", "log"):
        fields = {f.name for f in dataclasses.fields(getattr(config, section))}
        assert set(data[section]) == fields, section


def test_example_tracking_values_are_the_defaults() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    example = parse_config({"tracking": data["tracking"]}, env={}).tracking
    assert example == parse_config({}, env={}).tracking



def test_example_webhooks_entry_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# [[webhooks]]"):]
    entry = "\n".join(line.removeprefix("# ") for line in block.splitlines() if line.startswith("# "))
    entry = entry.replace("/etc/webhookd/secrets/shop-deliveries", str(tmp_path / "secret"))
    secret = tmp_path / "secret"
    secret.write_text(generate_secret() + "\n")
    secret.chmod(0o600)
    config = parse_config(tomllib.loads(entry), env={}, source=tmp_path / "config.toml")
    [hook] = config.webhooks
    assert (hook.name, hook.events, hook.filter.from_domains) == (
        "shop-deliveries", ("delivered", "bounced"), ("shop.example", "*.shop.example"))
    assert hook.secret == secret.read_text().strip()
