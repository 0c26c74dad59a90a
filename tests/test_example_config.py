"""config.example.toml documents every key (test_config.py checks its values are the defaults)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from webhookd.config import TOP_LEVEL, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_lists_every_key_and_is_valid() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == set(TOP_LEVEL)
    config = parse_config(data, env={})
    for section in ("storage", "intake", "admin", "dashboard", "delivery", "tracking", "notify", "log"):
        fields = {f.name for f in dataclasses.fields(getattr(config, section))}
        assert set(data[section]) == fields, section


def test_example_tracking_values_are_the_defaults() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    example = parse_config({"tracking": data["tracking"]}, env={}).tracking
    assert example == parse_config({}, env={}).tracking

