"""Configuration: defaults, paths, durations, every validation rule, and finding/loading the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import webhookd.config as config_module
from webhookd.config import (
    Config,
    ConfigError,
    find_config_path,
    load_config,
    parse_config,
    parse_duration,
)

TOKEN = "t0k3n-abcdefghijklmnop"  # 22 characters: long enough
OTHER_TOKEN = "adm1n-qrstuvwxyz012345"


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder; return its resolved path."""
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder.resolve()


def parse(data: dict[str, Any], **env: str) -> Config:
    return parse_config(data, env=env)


def refused(data: dict[str, Any], **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env)
    return info.value


# -- defaults ----------------------------------------------------------------------------------------
def test_defaults_without_file_or_environment(cwd: Path) -> None:
    config = load_config(None, env={})
    state = cwd / "webhookd-data"
    assert config.source is None
    assert config.environment == "production"
    assert config.dev is False
    assert config.state_dir == state
    assert config.runtime_dir == state
    assert config.storage.path == state / "webhookd.db"
    assert config.storage.durability == "full"
    assert config.storage.retention == 7 * 86400
    assert config.intake.socket == state / "intake.sock"
    assert config.admin.socket == state / "admin.sock"
    assert config.intake.http_listen == ("127.0.0.1", 8025)
    assert config.admin.http_listen is None
    assert config.intake.socket_mode == 0o660
    assert config.admin.socket_mode == 0o600
    assert config.intake.socket_group == ""
    assert config.intake.http_token == ""
    assert config.admin.token == ""
    assert config.intake.max_event_bytes == 262144
    assert config.intake.max_connections == 1024
    assert config.notify.command == ""
    assert (config.log.level, config.log.format) == ("info", "auto")


def test_delivery_defaults_are_the_spec_values_in_seconds(cwd: Path) -> None:
    d = parse({}).delivery
    assert d.concurrency == 512
    assert d.per_webhook_concurrency == 32
    assert d.timeout == 10.0
    assert d.connect_timeout == 5.0
    assert d.retry_base == 30.0
    assert d.retry_max == 4 * 3600.0
    assert d.max_attempts == 12
    assert d.disable_after == 10
    assert d.max_response_bytes == 65536
    assert d.shutdown_grace == 10.0
    assert d.allow_targets == ()
    assert d.ca_file is None


def test_every_key_given_is_used(cwd: Path) -> None:
    config = parse({
        "environment": "development",
        "storage": {"durability": "normal", "retention": "2d"},
        "intake": {"socket_mode": "0640", "socket_group": "mail", "http_listen": "0.0.0.0:9000",
                   "http_token": TOKEN, "max_event_bytes": 4096, "max_connections": 8},
        "admin": {"socket_mode": "600", "http_listen": "127.0.0.1:8026", "token": OTHER_TOKEN},
        "delivery": {"concurrency": 4, "per_webhook_concurrency": 2, "timeout": "3s", "connect_timeout": 1,
                     "retry_base": "1m", "retry_max": "2h", "max_attempts": 3, "disable_after": 5,
                     "max_response_bytes": 0, "shutdown_grace": 0, "allow_targets": ["10.0.0.0/8", "hooks.lan"]},
        "notify": {"command": "/usr/local/bin/page-me"},
        "log": {"level": "debug", "format": "json"},
    })
    assert config.dev is True
    assert (config.storage.durability, config.storage.retention) == ("normal", 2 * 86400)
    assert config.intake.socket_mode == 0o640
    assert config.intake.socket_group == "mail"
    assert config.intake.http_listen == ("0.0.0.0", 9000)
    assert config.intake.http_token == TOKEN
    assert (config.intake.max_event_bytes, config.intake.max_connections) == (4096, 8)
    assert config.admin.socket_mode == 0o600
    assert config.admin.http_listen == ("127.0.0.1", 8026)
    assert config.admin.token == OTHER_TOKEN
    d = config.delivery
    assert (d.concurrency, d.per_webhook_concurrency, d.max_attempts, d.disable_after) == (4, 2, 3, 5)
    assert (d.timeout, d.connect_timeout, d.retry_base, d.retry_max) == (3.0, 1.0, 60.0, 7200.0)
    assert (d.max_response_bytes, d.shutdown_grace) == (0, 0.0)
    assert d.allow_targets == ("10.0.0.0/8", "hooks.lan")
    assert config.notify.command == "/usr/local/bin/page-me"
    assert (config.log.level, config.log.format) == ("debug", "json")


# -- paths ----------------------------------------------------------------------------------------------
def test_state_directory_from_systemd(cwd: Path, tmp_path: Path) -> None:
    config = parse({}, STATE_DIRECTORY=str(tmp_path / "lib"))
    assert config.state_dir == tmp_path / "lib"
    assert config.runtime_dir == tmp_path / "lib"
    assert config.storage.path == tmp_path / "lib" / "webhookd.db"
    assert config.intake.socket == tmp_path / "lib" / "intake.sock"


def test_runtime_directory_from_systemd(cwd: Path, tmp_path: Path) -> None:
    config = parse({}, STATE_DIRECTORY=str(tmp_path / "lib"), RUNTIME_DIRECTORY=str(tmp_path / "run"))
    assert config.state_dir == tmp_path / "lib"
    assert config.runtime_dir == tmp_path / "run"
    assert config.storage.path == tmp_path / "lib" / "webhookd.db"
    assert config.intake.socket == tmp_path / "run" / "intake.sock"
    assert config.admin.socket == tmp_path / "run" / "admin.sock"


def test_runtime_directory_alone_keeps_state_in_cwd(cwd: Path, tmp_path: Path) -> None:
    config = parse({}, RUNTIME_DIRECTORY=str(tmp_path / "run"))
    assert config.state_dir == cwd / "webhookd-data"
    assert config.runtime_dir == tmp_path / "run"


def test_colon_separated_directories_use_the_first_entry(cwd: Path) -> None:
    config = parse({}, STATE_DIRECTORY="/var/lib/webhookd:/var/lib/other",
                   RUNTIME_DIRECTORY="/run/webhookd:/run/other")
    assert config.state_dir == Path("/var/lib/webhookd")
    assert config.runtime_dir == Path("/run/webhookd")


def test_empty_environment_variables_are_ignored(cwd: Path) -> None:
    config = parse({}, STATE_DIRECTORY="", RUNTIME_DIRECTORY="")
    assert config.state_dir == cwd / "webhookd-data"
    assert config.runtime_dir == cwd / "webhookd-data"


def test_explicit_keys_win_over_systemd_directories(cwd: Path, tmp_path: Path) -> None:
    config = parse({"state_dir": str(tmp_path / "mine"), "runtime_dir": str(tmp_path / "sock")},
                   STATE_DIRECTORY="/var/lib/webhookd", RUNTIME_DIRECTORY="/run/webhookd")
    assert config.state_dir == tmp_path / "mine"
    assert config.runtime_dir == tmp_path / "sock"
    assert config.storage.path == tmp_path / "mine" / "webhookd.db"
    assert config.admin.socket == tmp_path / "sock" / "admin.sock"


def test_explicit_state_dir_is_also_the_runtime_dir(cwd: Path, tmp_path: Path) -> None:
    config = parse({"state_dir": str(tmp_path / "mine")})
    assert config.runtime_dir == tmp_path / "mine"
    assert config.intake.socket == tmp_path / "mine" / "intake.sock"


def test_relative_directories_are_resolved_against_cwd(cwd: Path) -> None:
    config = parse({"state_dir": "data", "runtime_dir": "./run/../sockets"})
    assert config.state_dir == cwd / "data"
    assert config.runtime_dir == cwd / "sockets"
    assert config.state_dir.is_absolute() and config.runtime_dir.is_absolute()


def test_relative_file_paths_are_resolved_against_their_directory(cwd: Path) -> None:
    config = parse({
        "state_dir": "/srv/state",
        "runtime_dir": "/srv/run",
        "storage": {"path": "db/events.sqlite"},
        "intake": {"socket": "in/intake.sock"},
        "admin": {"socket": "ctl.sock"},
    })
    assert config.storage.path == Path("/srv/state/db/events.sqlite")
    assert config.intake.socket == Path("/srv/run/in/intake.sock")
    assert config.admin.socket == Path("/srv/run/ctl.sock")


def test_absolute_file_paths_are_kept(cwd: Path) -> None:
    config = parse({
        "state_dir": "/srv/state",
        "storage": {"path": "/data/w.db"},
        "intake": {"socket": "/tmp/i.sock"},
        "admin": {"socket": "/tmp/a.sock"},
    })
    assert config.storage.path == Path("/data/w.db")
    assert config.intake.socket == Path("/tmp/i.sock")
    assert config.admin.socket == Path("/tmp/a.sock")


def test_empty_socket_disables_it(cwd: Path) -> None:
    config = parse({"intake": {"socket": "", "http_listen": ""}, "admin": {"socket": ""}})
    assert config.intake.socket is None
    assert config.admin.socket is None
    assert config.intake.http_listen is None


def test_empty_storage_path_means_the_default_file(cwd: Path) -> None:
    assert parse({"storage": {"path": ""}}).storage.path == cwd / "webhookd-data" / "webhookd.db"


# -- durations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "seconds"), [
    ("500ms", 0.5),
    ("30s", 30.0),
    ("5m", 300.0),
    ("4h", 14400.0),
    ("7d", 604800.0),
    ("1.5s", 1.5),
    ("0s", 0.0),
    (" 10s ", 10.0),
    (30, 30.0),
    (0.25, 0.25),
    (0, 0.0),
])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "delivery.timeout") == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10", "5 minutes", "5min", "1e3s", "-5s", "", -1, -0.5, True, False, [], {}, None])
def test_bad_durations_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "delivery.timeout")
    assert info.value.key == "delivery.timeout"
    assert str(info.value).startswith("delivery.timeout: ")


def test_durations_in_a_document_are_seconds(cwd: Path) -> None:
    d = parse({"delivery": {"timeout": "500ms", "retry_base": 2, "retry_max": "1.5h"}}).delivery
    assert (d.timeout, d.retry_base, d.retry_max) == (0.5, 2.0, 5400.0)


@pytest.mark.parametrize("key", ["timeout", "connect_timeout", "retry_base", "retry_max"])
def test_zero_is_refused_where_a_wait_is_needed(cwd: Path, key: str) -> None:
    err = refused({"delivery": {key: "0s"}})
    assert err.key == f"delivery.{key}"


def test_nan_duration_is_refused(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "nan.toml"
    path.write_text("[delivery]\ntimeout = nan\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == "delivery.timeout"


# -- validation rules: each names its key --------------------------------------------------------------
RULES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", {"delivery_typo": {}}, "delivery_typo"),
    ("unknown section key", {"delivery": {"retry_bse": "1s"}}, "delivery.retry_bse"),
    ("unknown intake key", {"intake": {"socket_mod": "0660"}}, "intake.socket_mod"),
    ("nested table", {"delivery": {"extra": {"a": 1}}}, "delivery.extra"),
    ("section not a table", {"delivery": 5}, "delivery"),
    ("section is an array", {"log": ["info"]}, "log"),
    ("bad environment", {"environment": "prod"}, "environment"),
    ("environment not a string", {"environment": 1}, "environment"),
    ("state_dir not a string", {"state_dir": 5}, "state_dir"),
    ("runtime_dir not a string", {"runtime_dir": ["/run"]}, "runtime_dir"),
    ("bool for int", {"delivery": {"concurrency": True}}, "delivery.concurrency"),
    ("float for int", {"delivery": {"max_attempts": 3.0}}, "delivery.max_attempts"),
    ("string for int", {"intake": {"max_connections": "10"}}, "intake.max_connections"),
    ("concurrency 0", {"delivery": {"concurrency": 0}}, "delivery.concurrency"),
    ("per-webhook concurrency 0", {"delivery": {"per_webhook_concurrency": 0}}, "delivery.per_webhook_concurrency"),
    ("max_attempts 0", {"delivery": {"max_attempts": 0}}, "delivery.max_attempts"),
    ("disable_after 0", {"delivery": {"disable_after": 0}}, "delivery.disable_after"),
    ("negative response bytes", {"delivery": {"max_response_bytes": -1}}, "delivery.max_response_bytes"),
    ("max_event_bytes too small", {"intake": {"max_event_bytes": 100}}, "intake.max_event_bytes"),
    ("max_event_bytes too large", {"intake": {"max_event_bytes": 1 << 30}}, "intake.max_event_bytes"),
    ("max_connections 0", {"intake": {"max_connections": 0}}, "intake.max_connections"),
    ("retry_max below retry_base", {"delivery": {"retry_base": "1m", "retry_max": "30s"}}, "delivery.retry_max"),
    ("retry_base above default max", {"delivery": {"retry_base": "5h"}}, "delivery.retry_max"),
    ("bad duration", {"storage": {"retention": "a week"}}, "storage.retention"),
    ("negative grace", {"delivery": {"shutdown_grace": -1}}, "delivery.shutdown_grace"),
    ("zero retention", {"storage": {"retention": 0}}, "storage.retention"),
    ("bad durability", {"storage": {"durability": "fast"}}, "storage.durability"),
    ("socket_mode as int", {"intake": {"socket_mode": 660}}, "intake.socket_mode"),
    ("socket_mode not octal", {"intake": {"socket_mode": "0999"}}, "intake.socket_mode"),
    ("admin socket_mode too long", {"admin": {"socket_mode": "00600"}}, "admin.socket_mode"),
    ("socket not a string", {"intake": {"socket": 1}}, "intake.socket"),
    ("listen without port", {"intake": {"http_listen": "host"}}, "intake.http_listen"),
    ("listen without host", {"intake": {"http_listen": ":80"}}, "intake.http_listen"),
    ("listen port too large", {"intake": {"http_listen": "127.0.0.1:70000"}}, "intake.http_listen"),
    ("listen port 0", {"intake": {"http_listen": "127.0.0.1:0"}}, "intake.http_listen"),
    ("bare IPv6 listen", {"intake": {"http_listen": "::1:8025"}}, "intake.http_listen"),
    ("admin listen", {"admin": {"http_listen": "localhost", "token": OTHER_TOKEN}}, "admin.http_listen"),
    ("allow_targets not a list", {"delivery": {"allow_targets": "10.0.0.0/8"}}, "delivery.allow_targets"),
    ("allow_targets bad entry", {"delivery": {"allow_targets": ["10.0.0.0/8", "not a host!"]}},
     "delivery.allow_targets[1]"),
    ("allow_targets bad CIDR", {"delivery": {"allow_targets": ["hooks.lan", "10.0.0.0/33"]}},
     "delivery.allow_targets[1]"),
    ("allow_targets empty entry", {"delivery": {"allow_targets": ["10.0.0.1", ""]}}, "delivery.allow_targets[1]"),
    ("allow_targets non-string", {"delivery": {"allow_targets": ["10.0.0.1", 5]}}, "delivery.allow_targets[1]"),
    ("ca_file missing", {"delivery": {"ca_file": "/nonexistent/ca.pem"}}, "delivery.ca_file"),
    ("ca_file a directory", {"delivery": {"ca_file": "/"}}, "delivery.ca_file"),
    ("short intake token", {"intake": {"http_token": "short"}}, "intake.http_token"),
    ("short admin token", {"admin": {"token": "x" * 15}}, "admin.token"),
    ("admin listen without token", {"admin": {"http_listen": "127.0.0.1:8026"}}, "admin.token"),
    ("bad log level", {"log": {"level": "verbose"}}, "log.level"),
    ("log level not a string", {"log": {"level": 10}}, "log.level"),
    ("bad log format", {"log": {"format": "xml"}}, "log.format"),
    ("notify command not a string", {"notify": {"command": ["a", "b"]}}, "notify.command"),
]


@pytest.mark.parametrize(("data", "key"), [pytest.param(d, k, id=name) for name, d, k in RULES])
def test_each_rule_names_its_key(cwd: Path, data: dict[str, Any], key: str) -> None:
    err = refused(data)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert "\n" not in str(err)
    assert err.message and str(err) == f"{key}: {err.message}"


def test_unknown_keys_list_the_expected_ones(cwd: Path) -> None:
    assert "retry_base" in refused({"delivery": {"retry_bse": "1s"}}).message
    assert "delivery" in refused({"delivery_typo": 1}).message


def test_socket_mode_as_int_hints_to_quote_it(cwd: Path) -> None:
    err = refused({"admin": {"socket_mode": 600}})
    assert err.key == "admin.socket_mode"
    assert "quote" in err.message
    assert "quote" not in refused({"admin": {"socket_mode": "0999"}}).message


def test_retry_max_below_retry_base_says_why(cwd: Path) -> None:
    err = refused({"delivery": {"retry_base": "1m", "retry_max": "30s"}})
    assert "retry_base" in err.message


@pytest.mark.parametrize(("value", "expected"), [
    ("[::1]:8025", ("::1", 8025)),
    ("[2001:db8::5]:443", ("2001:db8::5", 443)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("localhost:65535", ("localhost", 65535)),
    (" 127.0.0.1:8025 ", ("127.0.0.1", 8025)),
    ("", None),
])
def test_listen_forms(cwd: Path, value: str, expected: tuple[str, int] | None) -> None:
    assert parse({"intake": {"http_listen": value}}).intake.http_listen == expected


def test_admin_listen_with_a_token_is_fine(cwd: Path) -> None:
    config = parse({"admin": {"http_listen": "[::1]:8026", "token": OTHER_TOKEN}})
    assert config.admin.http_listen == ("::1", 8026)


@pytest.mark.parametrize("mode", ["0660", "660", "0000", "0777"])
def test_socket_mode_strings(cwd: Path, mode: str) -> None:
    assert parse({"intake": {"socket_mode": mode}}).intake.socket_mode == int(mode, 8)


@pytest.mark.parametrize("targets", [
    ["10.0.0.0/8"], ["192.168.1.5"], ["fd00::/8"], ["::1"], ["hooks.internal"], ["hooks.internal."],
    ["localhost"], ["a-b.example.com", "127.0.0.0/8"],
])
def test_allow_targets_accepted(cwd: Path, targets: list[str]) -> None:
    assert parse({"delivery": {"allow_targets": targets}}).delivery.allow_targets == tuple(targets)


def test_allow_targets_refuses_a_mistyped_address(cwd: Path) -> None:
    err = refused({"delivery": {"allow_targets": ["10.0.0.0/8", "999.1.1.1"]}})
    assert err.key == "delivery.allow_targets[1]"


@pytest.mark.parametrize("target", ["a\n.example", "x" * 64 + ".example", ("a" * 60 + ".") * 5, "-bad.example",
                                    "under_score.example", "*.example.com", "1.2.3"])
def test_allow_targets_refuses_what_is_not_a_host_name(cwd: Path, target: str) -> None:
    assert refused({"delivery": {"allow_targets": [target]}}).key == "delivery.allow_targets[0]"


@pytest.mark.parametrize("listen", ["[1.2.3.4]:80", "[zz]:80", "[]:80", "bad host!:80", "999.1.1.1:80", "a\n.b:80",
                                    "127.0.0.1:\u0668\u0660", "127.0.0.1:080000", "127.0.0.1:-1", "host:port"])
def test_listen_refuses_a_bad_host_or_port(cwd: Path, listen: str) -> None:
    assert refused({"intake": {"http_listen": listen}}).key == "intake.http_listen"


@pytest.mark.parametrize("value", ["\u0663s", "30s\nx", "3\u0660s"])
def test_durations_take_ascii_digits_only(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(value, "storage.retention")


@pytest.mark.parametrize(("data", "expected", "given"), [
    ({"delivery": {"timeout": "0s"}}, "greater than zero", "'0s'"),
    ({"delivery": {"concurrency": 0}}, "at least 1", "got 0"),
    ({"intake": {"max_event_bytes": 100}}, "between 1024 and 16777216", "got 100"),
    ({"delivery": {"max_attempts": 2.5}}, "integer", "2.5"),
    ({"delivery": {"retry_base": "1m", "retry_max": "30s"}}, "at least delivery.retry_base (60s)", "got 30s"),
    ({"environment": 1}, "production, development", "got 1"),
    ({"log": {"level": "Verbose"}}, "debug, info, warning, error", "'Verbose'"),
    ({"storage": {"durability": "fast"}}, "full, normal", "'fast'"),
    ({"intake": {"socket_mode": "0999"}}, "octal", "'0999'"),
    ({"intake": {"http_listen": "nope"}}, "HOST:PORT", "'nope'"),
    ({"intake": {"http_listen": "127.0.0.1:0"}}, "between 1 and 65535", "got 0"),
    ({"intake": {"http_token": "short"}}, "at least 16 characters", "got 5"),
    ({"delivery": {"ca_file": "/nonexistent/ca.pem"}}, "readable", "does not exist"),
    ({"delivery": {"ca_file": "/"}}, "readable", "is not a file"),
    ({"delivery": {"allow_targets": ["bad!"]}}, "CIDR", "'bad!'"),
    ({"storage": []}, "table [storage]", "got []"),
])
def test_messages_say_what_was_expected_and_given(cwd: Path, data: dict[str, Any], expected: str, given: str) -> None:
    message = refused(data).message
    assert expected in message
    assert given in message


@pytest.mark.parametrize("key", ["intake.http_token", "admin.token"])
def test_a_token_of_the_wrong_type_is_not_echoed(cwd: Path, key: str) -> None:
    section, name = key.split(".")
    err = refused({section: {name: 12345678901234567890}})
    assert err.key == key
    assert "12345678901234567890" not in str(err)
    assert "short-secret" not in str(refused({section: {name: "short-secret"}}))


def test_paths_keep_symlinks_and_defaults_match_explicit_values(tmp_path: Path, cwd: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    state = str(tmp_path / "link")
    default = parse({"state_dir": state})
    explicit = parse({"state_dir": state, "storage": {"path": "webhookd.db"},
                      "intake": {"socket": "intake.sock"}, "admin": {"socket": "./admin.sock"}})
    assert explicit == default
    assert default.storage.path == tmp_path / "link" / "webhookd.db"


def test_tokens_of_sixteen_characters_are_enough(cwd: Path) -> None:
    config = parse({"intake": {"http_token": "x" * 16}, "admin": {"token": "y" * 16}})
    assert config.intake.http_token == "x" * 16
    assert config.admin.token == "y" * 16


@pytest.mark.parametrize(("given", "level"), [("INFO", "info"), ("Debug", "debug"), ("warning", "warning"),
                                              ("ERROR", "error")])
def test_log_level_is_case_insensitive(cwd: Path, given: str, level: str) -> None:
    assert parse({"log": {"level": given}}).log.level == level


def test_ca_file_relative_to_the_config_file(tmp_path: Path, cwd: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = folder / "config.toml"
    path.write_text('[delivery]\nca_file = "ca.pem"\n')
    assert load_config(path, env={}).delivery.ca_file == (folder / "ca.pem").resolve()


def test_ca_file_relative_to_cwd_without_a_file(cwd: Path) -> None:
    (cwd / "ca.pem").write_text("x")
    assert parse({"delivery": {"ca_file": "ca.pem"}}).delivery.ca_file == cwd / "ca.pem"
    assert parse({"delivery": {"ca_file": ""}}).delivery.ca_file is None


def test_ca_file_missing_names_the_path(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[delivery]\nca_file = "missing.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == "delivery.ca_file"
    assert str(tmp_path.resolve() / "missing.pem") in str(info.value)


# -- finding and loading the file ------------------------------------------------------------------------
@pytest.fixture
def etc_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "etc-webhookd" / "config.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", path)
    return path


def test_find_config_path_precedence(tmp_path: Path, etc_default: Path) -> None:
    explicit = tmp_path / "explicit.toml"
    from_env = tmp_path / "env.toml"
    env = {"WEBHOOKD_CONFIG": str(from_env)}
    assert find_config_path(explicit, env) == explicit
    assert find_config_path(str(explicit), env) == explicit
    assert find_config_path(None, env) == from_env
    assert find_config_path(None, {}) is None  # the /etc default does not exist
    etc_default.parent.mkdir()
    etc_default.write_text("")
    assert find_config_path(None, {}) == etc_default
    assert find_config_path(None, {"WEBHOOKD_CONFIG": ""}) == etc_default
    assert find_config_path(None, env) == from_env
    assert find_config_path(explicit, env) == explicit


def test_load_config_reads_each_source(tmp_path: Path, etc_default: Path, cwd: Path) -> None:
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[log]\nlevel = "debug"\n')
    from_env = tmp_path / "env.toml"
    from_env.write_text('[log]\nlevel = "error"\n')
    etc_default.parent.mkdir()
    etc_default.write_text('[log]\nlevel = "warning"\n')
    env = {"WEBHOOKD_CONFIG": str(from_env)}
    assert load_config(explicit, env=env).log.level == "debug"
    assert load_config(explicit, env=env).source == explicit.resolve()
    assert load_config(None, env=env).log.level == "error"
    assert load_config(None, env={}).log.level == "warning"
    assert load_config(None, env={}).source == etc_default.resolve()


def test_without_any_file_the_defaults_apply(etc_default: Path, cwd: Path) -> None:
    config = load_config(None, env={})
    assert config.source is None
    assert config.state_dir == cwd / "webhookd-data"


def test_load_config_passes_the_environment_on(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('environment = "development"\n')
    config = load_config(path, env={"STATE_DIRECTORY": "/var/lib/webhookd", "RUNTIME_DIRECTORY": "/run/webhookd"})
    assert config.state_dir == Path("/var/lib/webhookd")
    assert config.admin.socket == Path("/run/webhookd/admin.sock")


def test_toml_syntax_error_names_the_file(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[delivery\ntimeout = "10s"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == ""
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_validation_errors_from_a_file_name_the_key(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[delivery]\nretry_bse = "1s"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == "delivery.retry_bse"


def test_missing_explicit_file_is_an_error(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == ""
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_missing_file_from_the_environment_is_an_error(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"WEBHOOKD_CONFIG": str(path)})
    assert str(path) in str(info.value)


def test_a_directory_is_not_a_config_file(tmp_path: Path, cwd: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert info.value.key == ""
    assert str(tmp_path) in str(info.value)


def test_invalid_utf8_is_an_error(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[notify]\ncommand = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == ""
    assert str(path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_error(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
    finally:
        path.chmod(0o600)
    assert str(path) in str(info.value)
    assert "Permission denied" in str(info.value)


def test_empty_file_gives_the_defaults(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("# nothing set\n")
    config = load_config(path, env={})
    assert config.source == path.resolve()
    assert config == parse_config({}, env={}, source=path.resolve())


def test_dev_forces_development(tmp_path: Path, cwd: Path) -> None:
    path = tmp_path / "prod.toml"
    path.write_text('environment = "production"\n')
    assert load_config(path, env={}).environment == "production"
    assert load_config(path, dev=True, env={}).environment == "development"
    assert load_config(path, dev=True, env={}).dev is True
    assert load_config(None, dev=True, env={}).environment == "development"
    assert parse_config({}, dev=True, env={}).dev is True


def test_dev_does_not_hide_a_bad_environment(cwd: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"environment": "staging"}, dev=True, env={})
    assert info.value.key == "environment"


def test_tokens_are_not_in_the_repr(cwd: Path) -> None:
    config = parse({"intake": {"http_token": TOKEN},
                    "admin": {"http_listen": "127.0.0.1:8026", "token": OTHER_TOKEN}})
    assert config.intake.http_token == TOKEN and config.admin.token == OTHER_TOKEN
    for text in (repr(config), str(config), repr(config.intake), repr(config.admin)):
        assert TOKEN not in text
        assert OTHER_TOKEN not in text


def test_config_is_immutable(cwd: Path) -> None:
    config = parse({})
    with pytest.raises(AttributeError):
        config.environment = "development"  # type: ignore[misc]


def test_example_config_is_valid_and_lists_the_defaults(cwd: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    config = load_config(example, env={})
    defaults = parse_config({"state_dir": "/var/lib/webhookd", "runtime_dir": "/run/webhookd"}, env={},
                            source=example)
    assert config == defaults


# -- [tracking] --------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "https://t.example.com", "https://t.shop.example/", "https://t.example.com:8443/track",
    "https://[2001:db8::1]", "https://192.0.2.1",
])
def test_tracking_base_url_accepts_https_urls_and_drops_a_trailing_slash(cwd: Path, url: str) -> None:
    assert parse({"tracking": {"base_url": url}}).tracking.base_url == url.rstrip("/")


@pytest.mark.parametrize("url", [
    "ftp://t.example.com", "t.example.com", "https://", "https://a@t.example.com", "https://t.ex ample.com",
    "https://t.example.com/?q=1", "https://t.example.com/#x", "https://-bad-.example",
])
def test_tracking_base_url_refuses_what_is_not_a_plain_http_url(cwd: Path, url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse({"tracking": {"base_url": url}})
    assert exc.value.key == "tracking.base_url"


def test_tracking_needs_https_in_production_and_a_base_url_when_enabled(cwd: Path) -> None:
    with pytest.raises(ConfigError, match="https:// in production") as exc:
        parse({"tracking": {"base_url": "http://t.example.com"}})
    assert exc.value.key == "tracking.base_url"
    assert parse({"environment": "development", "tracking": {"base_url": "http://127.0.0.1:8027"}}).tracking.base_url
    with pytest.raises(ConfigError, match=r"required when tracking\.enabled") as exc:
        parse({"tracking": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"required when tracking\.enabled"):
        parse({"tracking": {"enabled": True, "base_url": "https://t.example.com", "listen": ""}})


@pytest.mark.parametrize("spec", [
    "inet:8892@127.0.0.1", "inet:8892@localhost", "inet6:8892@[::1]", "unix:/run/webhookd/milter.sock",
    "unix:webhookd/milter.sock", "local:/var/spool/postfix/webhookd/milter.sock",
])
def test_tracking_milter_socket_takes_libmilter_specs(cwd: Path, spec: str) -> None:
    assert parse({"tracking": {"milter_socket": spec}}).tracking.milter_socket == spec


@pytest.mark.parametrize("spec", ["8892", "inet:127.0.0.1:8892", "tcp:8892@x", "unix:", "inet:8892@"])
def test_tracking_milter_socket_refuses_other_spellings(cwd: Path, spec: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse({"tracking": {"milter_socket": spec}})
    assert exc.value.key == "tracking.milter_socket"


def test_tracking_trusted_proxies_and_key_file(cwd: Path) -> None:
    config = parse({"state_dir": "/var/lib/webhookd",
                    "tracking": {"trusted_proxies": ["10.0.0.1", "192.0.2.0/24", "::1"], "key_file": "keys.json"}})
    assert config.tracking.trusted_proxies == ("10.0.0.1/32", "192.0.2.0/24", "::1/128")
    assert config.tracking.key_file == Path("/var/lib/webhookd/keys.json")
    assert parse({"state_dir": "/var/lib/webhookd"}).tracking.key_file == Path("/var/lib/webhookd/tracking-keys.json")
    with pytest.raises(ConfigError) as exc:
        parse({"tracking": {"trusted_proxies": ["10.0.0.1", "proxy.example"]}})
    assert exc.value.key == "tracking.trusted_proxies[1]"


# -- storage.backend = "postgresql" ---------------------------------------------------------------------
def test_sqlite_stays_the_default_backend(cwd: Path) -> None:
    storage = parse({}).storage
    assert (storage.backend, storage.dsn, storage.password_file) == ("sqlite", "", None)


def test_postgresql_backend_with_a_dsn_and_a_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pg-password"
    secret.write_text("s3cr3t-Passw0rd\n")
    config = parse_config({"storage": {"backend": "postgresql", "dsn": "postgresql://webhookd@db.example:5433/hooks",
                                       "password_file": "pg-password"}},
                          env={}, source=tmp_path / "config.toml")
    assert config.storage.backend == "postgresql"
    assert config.storage.dsn == "postgresql://webhookd@db.example:5433/hooks"
    assert config.storage.password_file == secret  # relative to the config file
    assert "s3cr3t" not in repr(config)  # read when connecting, never held in the config


@pytest.mark.parametrize("dsn", [
    "postgresql://webhookd:s3cr3t-Passw0rd@db.example/hooks",
    "postgres://webhookd:s3cr3t-Passw0rd@/hooks?host=/run/postgresql",
    "postgresql://webhookd@db.example/hooks?password=s3cr3t-Passw0rd",
    "postgresql://webhookd@db.example/hooks?sslmode=require&PASSWORD=s3cr3t-Passw0rd",
    "host=db.example user=webhookd password=s3cr3t-Passw0rd",  # libpq's key=value form: not a URI
    "postgresql://webhookd:s3cr3t-Passw0rd@db1:5432,db2:5433/hooks",  # several hosts
])
def test_a_password_in_the_dsn_is_refused_and_never_echoed(cwd: Path, dsn: str) -> None:
    error = refused({"storage": {"backend": "postgresql", "dsn": dsn}})
    assert error.key == "storage.dsn"
    assert "s3cr3t" not in str(error) and "not shown" in str(error)


def test_a_multi_host_dsn_is_accepted_and_logged_without_its_query() -> None:
    dsn = "postgresql://webhookd@db1:5432,db2:5433/hooks?target_session_attrs=read-write"
    config = parse_config({"storage": {"backend": "postgresql", "dsn": dsn}}, env={})
    assert config.storage.dsn == dsn
    pytest.importorskip("asyncpg")
    from webhookd.store.postgres import redact_dsn

    assert redact_dsn(dsn) == "postgresql://webhookd@db1:5432,db2:5433/hooks"
    assert redact_dsn("postgresql://w:s3cr3t@db/h?password=x") == "postgresql://w@db/h"


def test_postgresql_needs_a_dsn_and_sqlite_takes_none(cwd: Path, tmp_path: Path) -> None:
    assert refused({"storage": {"backend": "postgresql"}}).key == "storage.dsn"
    assert refused({"storage": {"dsn": "postgresql://webhookd@db/hooks"}}).key == "storage.dsn"
    assert refused({"storage": {"backend": "mysql"}}).key == "storage.backend"
    error = refused({"storage": {"backend": "postgresql", "dsn": "postgresql://w@db/h",
                                 "password_file": str(tmp_path / "nope")}})
    assert error.key == "storage.password_file" and "does not exist" in str(error)
    assert parse({"storage": {"backend": "sqlite", "dsn": "", "password_file": ""}}).storage.dsn == ""
