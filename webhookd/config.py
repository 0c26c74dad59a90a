"""Typed configuration: TOML loading and validation in one step.

Every error is a `ConfigError` naming the dotted key, with a one-line reason.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlsplit

from webhookd.declared import DeclaredError, DeclaredWebhook, parse_declared

DEFAULT_CONFIG_PATH = Path("/etc/webhookd/config.toml")
TRACKING_KEYS_FILE = "tracking-keys.json"  # in state_dir unless tracking.key_file says otherwise


class ConfigError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path  # the SQLite file (backend = "sqlite")
    durability: Literal["full", "normal"] = "full"
    retention: float = 7 * 86400.0
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # backend = "postgresql": a postgresql:// URI without a password; the password is read from
    # password_file (or libpq's PGPASSWORD / PGPASSFILE / ~/.pgpass) when connecting
    dsn: str = ""
    password_file: Path | None = None
    # backend = "postgresql": how long a daemon's claims on deliveries outlive its last renewal
    # (a killed daemon's deliveries go to the others after this; webhookd/store/postgres_cluster.py)
    lease: float = 30.0


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    socket: Path | None
    socket_mode: int = 0o660
    socket_group: str = ""
    http_listen: tuple[str, int] | None = ("127.0.0.1", 8025)
    http_token: str = field(default="", repr=False)
    max_event_bytes: int = 262144
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class AdminConfig:
    socket: Path | None
    socket_mode: int = 0o600
    http_listen: tuple[str, int] | None = None
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    concurrency: int = 512
    per_webhook_concurrency: int = 32
    timeout: float = 10.0
    connect_timeout: float = 5.0
    retry_base: float = 30.0
    retry_max: float = 4 * 3600.0
    max_attempts: int = 12
    disable_after: int = 10
    max_response_bytes: int = 65536
    shutdown_grace: float = 10.0
    allow_targets: tuple[str, ...] = ()
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    enabled: bool = True
    # Host header values the dashboard answers (DNS rebinding guard); a port is ignored.
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    session_ttl: float = 12 * 3600.0
    login_link_ttl: float = 300.0


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    """Opens and clicks (docs/tracking.md); off by default."""

    enabled: bool = False
    listen: tuple[str, int] | None = ("127.0.0.1", 8027)
    base_url: str = ""  # what links point at, e.g. https://t.example.com (the TLS proxy)
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")  # whose X-Forwarded-For is believed
    include_recipient: bool = True
    emit: Literal["all", "first"] = "all"
    track_opens: bool = True
    track_clicks: bool = True
    queue_size: int = 10000  # hits waiting for the writer; past it they are dropped (counted)
    bad_tokens_per_minute: int = 60  # per client address; past it /c/ answers 429
    machine_click_seconds: float = 10.0  # a click this soon after delivery is flagged
    remember: float = 400 * 86400.0  # how long "first" hits are remembered
    key_file: Path | None = None  # state_dir/tracking-keys.json unless set
    milter_socket: str = "inet:8892@127.0.0.1"


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    command: str = ""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"


@dataclass(frozen=True, slots=True)
class Config:
    environment: Literal["production", "development"]
    state_dir: Path
    runtime_dir: Path
    storage: StorageConfig
    intake: IntakeConfig
    admin: AdminConfig
    delivery: DeliveryConfig
    notify: NotifyConfig
    log: LogConfig
    source: Path | None = None
    dashboard: DashboardConfig = DashboardConfig()
    tracking: TrackingConfig = TrackingConfig()
    # [[webhooks]] here and in webhooks.d/*.toml beside the file (webhookd/declared.py)
    webhooks: tuple[DeclaredWebhook, ...] = ()

    @property
    def tracking_key_file(self) -> Path:
        """The tracking key ring's file (tracking.key_file is always set by parse_config)."""
        return self.tracking.key_file or self.state_dir / TRACKING_KEYS_FILE

    @property
    def dev(self) -> bool:
        return self.environment == "development"


# -- value parsers -----------------------------------------------------------------------------
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number or a string like "500ms", "30s", "5m", "4h", "7d"."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as \"30s\", got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ConfigError(key, f"expected a duration such as 500ms, 30s, 5m, 4h or 7d, got {value!r}")


def _int(value: object, key: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(key, f"must be {bound}, got {value}")
    return value


def _str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _choice(value: object, key: str, choices: tuple[str, ...], *, fold: bool = False) -> str:
    text = value.lower() if fold and isinstance(value, str) else value
    if not isinstance(text, str) or text not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return text


def _mode(value: object, key: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    hint = " (quote it: \"0660\")" if isinstance(value, int) and not isinstance(value, bool) else ""
    raise ConfigError(key, f"expected an octal file mode string such as \"0660\", got {value!r}{hint}")


def _is_host_name(text: str) -> bool:
    """An RFC 1123 host name (a trailing dot allowed), not an all-numeric dotted string."""
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    if not text or len(text) > 253 or all(label.isdigit() for label in labels):
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in labels)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _listen(value: object, key: str) -> tuple[str, int] | None:
    text = _str(value, key).strip()
    if not text:
        return None
    m = re.fullmatch(r"\[([^\]]*)\]:([0-9]{1,5})", text) or re.fullmatch(r"([^:\[\]]+):([0-9]{1,5})", text)
    if not m:
        raise ConfigError(key, f"expected HOST:PORT or [IPv6]:PORT, got {text!r}")
    host, port = m.group(1), int(m.group(2))
    valid = _is_ip(host, 6) if text.startswith("[") else _is_ip(host, 4) or _is_host_name(host)
    if not valid:
        raise ConfigError(key, f"expected an IP address or host name before the port, got {host!r}")
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"port must be between 1 and 65535, got {port}")
    return host, port


def _token(value: object, key: str) -> str:
    if not isinstance(value, str):  # never echo what may be a secret
        raise ConfigError(key, f"expected a string, got a {type(value).__name__}")
    text = value
    if text and len(text) < 16:
        raise ConfigError(key, f"must be at least 16 characters when set, got {len(text)}")
    return text


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _hosts(value: object, key: str) -> tuple[str, ...]:
    """Host names or IP addresses (no ports, no wildcards) for the dashboard's Host check."""
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a non-empty list of host names or IP addresses")
    hosts: list[str] = []
    for item in value:
        text = item.strip().lower().strip("[]") if isinstance(item, str) else None
        if not text or not (_is_host_name(text) or _is_ip(text, 4) or _is_ip(text, 6)):
            raise ConfigError(key, f"expected a host name or IP address, got {item!r}")
        hosts.append(text.rstrip("."))
    return tuple(dict.fromkeys(hosts))


def _allow_targets(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of CIDRs or host names, got {value!r}")
    out: list[str] = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        text = _str(item, k).strip()
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not _is_host_name(text):
                raise ConfigError(k, f"expected a CIDR (10.0.0.0/8) or a host name, got {text!r}") from None
        out.append(text)
    return tuple(out)


# -- sections -------------------------------------------------------------------------------------
Parser = Callable[[object, str], Any]


def _section(data: Mapping[str, Any], name: str, parsers: Mapping[str, Parser]) -> dict[str, Any]:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        raise ConfigError(name, f"expected a table [{name}], got {raw!r}")
    for key in raw:
        if key not in parsers:
            raise ConfigError(f"{name}.{key}", f"unknown key (expected one of {', '.join(parsers)})")
    return {key: parsers[key](raw[key], f"{name}.{key}") for key in raw}


_DSN_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def _dsn(value: object, key: str) -> str:
    """A postgresql:// URI without a password. Its text is never echoed in an error: it is
    the one value in the file that a careless user may have put a password in."""
    if not isinstance(value, str):
        raise ConfigError(key, "expected a postgresql:// URI (a string)")
    text = value.strip()
    if not text:
        return ""
    try:
        parts = urlsplit(text)
        password = parts.password
        params = {name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    except ValueError:
        raise ConfigError(key, "expected a postgresql:// URI such as postgresql://webhookd@db.example/webhookd"
                          " (the value is not shown)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(key, "expected a postgresql:// URI such as postgresql://webhookd@db.example/webhookd"
                          " (the value is not shown)")
    if password is not None or params & _DSN_SECRET_PARAMS:
        raise ConfigError(key, "must not contain a password (the value is not shown): put it in"
                          " storage.password_file, or give it through PGPASSWORD or ~/.pgpass")
    return text


def validate_dsn(value: str, key: str = "--to") -> str:
    """A PostgreSQL DSN as storage.dsn takes it (for the CLI's options); raises ConfigError."""
    return _dsn(value, key)


def _readable_file(base: Path, what: str = "a readable file") -> Parser:
    """A path under `base` to a file this process can read (a password, a CA bundle), or None."""
    def parse(value: object, key: str) -> Path | None:
        text = _str(value, key)
        if not text:
            return None
        path = _under(base, text)
        if not path.is_file():
            problem = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(key, f"expected {what}, got {str(path)!r}, which {problem}")
        if not os.access(path, os.R_OK):
            raise ConfigError(key, f"expected {what}, got {str(path)!r}, which cannot be read")
        return path

    return parse


def _positive_duration(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(key, f"must be greater than zero, got {value!r}")
    return seconds


def _first_path(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(":", 1)[0] or None


def _under(base: Path, value: str) -> Path:
    """`value` made absolute against `base`; ".." is folded, symlinks are kept."""
    return Path(os.path.normpath(base / value))


TOP_LEVEL = (
    "environment", "state_dir", "runtime_dir", "storage", "intake", "admin", "dashboard", "delivery", "tracking",
    "notify", "log", "webhooks",
)


def parse_config(
    data: Mapping[str, Any],
    *,
    dev: bool = False,
    env: Mapping[str, str] | None = None,
    source: Path | None = None,
    declared: bool = True,
) -> Config:
    """Validate a decoded TOML document into a Config. With `declared=False` the declared
    webhooks are not read (their secret files may be readable only by the daemon's user): the
    CLI's clients of the admin API need none of them; `webhooks` is then empty."""
    env = os.environ if env is None else env
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(key, f"unknown key (expected one of {', '.join(TOP_LEVEL)})")
    environment = _choice(data.get("environment", "production"), "environment", ("production", "development"))
    if dev:
        environment = "development"

    cwd = Path.cwd()
    state_raw = data.get("state_dir")
    state_text = _str(state_raw, "state_dir") if state_raw is not None else None
    state_dir = _under(cwd, state_text or _first_path(env.get("STATE_DIRECTORY")) or "webhookd-data")
    run_raw = data.get("runtime_dir")
    run_text = _str(run_raw, "runtime_dir") if run_raw is not None else None
    run_default = _first_path(env.get("RUNTIME_DIRECTORY"))
    runtime_dir = _under(cwd, run_text) if run_text else (_under(cwd, run_default) if run_default else state_dir)

    def socket_path(value: object, key: str) -> Path | None:
        text = _str(value, key)
        return _under(runtime_dir, text) if text else None

    storage = _section(data, "storage", {
        "backend": lambda v, k: _choice(v, k, ("sqlite", "postgresql")),
        "path": lambda v, k: _under(state_dir, _str(v, k) or "webhookd.db"),
        "durability": lambda v, k: _choice(v, k, ("full", "normal")),
        "retention": _positive_duration,
        "dsn": _dsn,
        "password_file": _readable_file(source.parent if source is not None else cwd),
        "lease": _positive_duration,
    })
    storage.setdefault("path", _under(state_dir, "webhookd.db"))
    if storage.get("backend", "sqlite") == "postgresql":
        if not storage.get("dsn"):
            raise ConfigError("storage.dsn", 'required when storage.backend = "postgresql"'
                              " (a URI such as postgresql://webhookd@db.example/webhookd)")
    else:
        for key in ("dsn", "password_file"):
            if storage.get(key):
                raise ConfigError(f"storage.{key}", 'only with storage.backend = "postgresql"')

    intake = _section(data, "intake", {
        "socket": socket_path,
        "socket_mode": _mode,
        "socket_group": _str,
        "http_listen": _listen,
        "http_token": _token,
        "max_event_bytes": lambda v, k: _int(v, k, 1024, 16 * 1024 * 1024),
        "max_connections": lambda v, k: _int(v, k, 1),
    })
    intake.setdefault("socket", _under(runtime_dir, "intake.sock"))

    admin = _section(data, "admin", {
        "socket": socket_path,
        "socket_mode": _mode,
        "http_listen": _listen,
        "token": _token,
    })
    admin.setdefault("socket", _under(runtime_dir, "admin.sock"))
    if admin.get("http_listen") and not admin.get("token"):
        raise ConfigError("admin.token", "required when admin.http_listen is set")

    base = source.parent if source is not None else cwd

    ca_file = _readable_file(base, "a readable CA bundle (PEM)")

    delivery = _section(data, "delivery", {
        "concurrency": lambda v, k: _int(v, k, 1),
        "per_webhook_concurrency": lambda v, k: _int(v, k, 1),
        "timeout": _positive_duration,
        "connect_timeout": _positive_duration,
        "retry_base": _positive_duration,
        "retry_max": _positive_duration,
        "max_attempts": lambda v, k: _int(v, k, 1),
        "disable_after": lambda v, k: _int(v, k, 1),
        "max_response_bytes": lambda v, k: _int(v, k, 0, 64 * 1024 * 1024),
        "shutdown_grace": parse_duration,
        "allow_targets": _allow_targets,
        "ca_file": ca_file,
    })
    defaults = DeliveryConfig()
    retry_base = delivery.get("retry_base", defaults.retry_base)
    retry_max = delivery.get("retry_max", defaults.retry_max)
    if retry_max < retry_base:
        raise ConfigError("delivery.retry_max",
                          f"must be at least delivery.retry_base ({retry_base:g}s), got {retry_max:g}s")

    dashboard = _section(data, "dashboard", {
        "enabled": _bool,
        "allowed_hosts": _hosts,
        "session_ttl": _positive_duration,
        "login_link_ttl": _positive_duration,
    })
    tracking = _tracking(data, state_dir, production=environment == "production")
    notify = _section(data, "notify", {"command": _str})
    log = _section(data, "log", {
        "level": lambda v, k: _choice(v, k, ("debug", "info", "warning", "error"), fold=True),
        "format": lambda v, k: _choice(v, k, ("json", "console", "auto")),
    })
    try:
        webhooks = parse_declared(data, source, production=environment == "production") if declared else ()
    except DeclaredError as exc:
        raise ConfigError(exc.key, exc.message) from None
    return Config(
        environment=cast(Literal["production", "development"], environment),
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        storage=StorageConfig(**storage),
        intake=IntakeConfig(**intake),
        admin=AdminConfig(**admin),
        delivery=DeliveryConfig(**delivery),
        notify=NotifyConfig(**notify),
        log=LogConfig(**log),
        source=source,
        dashboard=DashboardConfig(**dashboard),
        tracking=tracking,
        webhooks=webhooks,
    )


def _networks(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of IP addresses or CIDRs, got {value!r}")
    out: list[str] = []
    for i, item in enumerate(value):
        text = _str(item, f"{key}[{i}]").strip()
        try:
            out.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f"expected an IP address or CIDR, got {text!r}") from None
    return tuple(out)


def _base_url(value: object, key: str) -> str:
    text = _str(value, key).strip().rstrip("/")
    if not text:
        return ""
    m = re.fullmatch(r"(https?)://([^/?#@\s]+)(/[^?#\s]*)?", text, re.IGNORECASE)
    authority = m.group(2) if m else ""
    if authority.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, port = authority[1:].partition("]")
        host = host if not port or re.fullmatch(r":[0-9]{1,5}", port) else ""
    else:
        host, _, port = authority.partition(":")
        host = host if not port or port.isdigit() else ""
    if not m or not (_is_host_name(host) or _is_ip(host, 4) or _is_ip(host, 6)):
        raise ConfigError(key, f"expected an http(s) URL such as https://t.example.com, got {text!r}")
    return text


def _milter_socket(value: object, key: str) -> str:
    text = _str(value, key).strip()
    if not re.fullmatch(r"(inet:[0-9]{1,5}@\S+|inet6:[0-9]{1,5}@\S+|unix:\S+|local:\S+)", text):
        raise ConfigError(key, f"expected inet:PORT@HOST or unix:/PATH (Postfix's milter syntax), got {text!r}")
    return text


def _tracking(data: Mapping[str, Any], state_dir: Path, *, production: bool) -> TrackingConfig:
    raw = _section(data, "tracking", {
        "enabled": _bool,
        "listen": _listen,
        "base_url": _base_url,
        "trusted_proxies": _networks,
        "include_recipient": _bool,
        "emit": lambda v, k: _choice(v, k, ("all", "first")),
        "track_opens": _bool,
        "track_clicks": _bool,
        "queue_size": lambda v, k: _int(v, k, 1, 10_000_000),
        "bad_tokens_per_minute": lambda v, k: _int(v, k, 1),
        "machine_click_seconds": parse_duration,
        "remember": _positive_duration,
        "key_file": lambda v, k: _under(state_dir, _str(v, k) or TRACKING_KEYS_FILE),
        "milter_socket": _milter_socket,
    })
    raw.setdefault("key_file", state_dir / TRACKING_KEYS_FILE)
    if raw.get("enabled"):
        if not raw.get("base_url"):
            raise ConfigError("tracking.base_url", "required when tracking.enabled is true (e.g. https://t.example.com)")
        if "listen" in raw and raw["listen"] is None:
            raise ConfigError("tracking.listen", "required when tracking.enabled is true (e.g. 127.0.0.1:8027)")
    if production and raw.get("base_url", "").lower().startswith("http://"):
        raise ConfigError("tracking.base_url", "must be https:// in production (links and pixels travel in mail)")
    return TrackingConfig(**raw)


def find_config_path(explicit: str | Path | None, env: Mapping[str, str]) -> Path | None:
    """--config, else $WEBHOOKD_CONFIG, else /etc/webhookd/config.toml if it exists."""
    if explicit:
        return Path(explicit)
    if env.get("WEBHOOKD_CONFIG"):
        return Path(env["WEBHOOKD_CONFIG"])
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


def load_config(
    path: str | Path | None = None, *, dev: bool = False, env: Mapping[str, str] | None = None,
    declared: bool = True,
) -> Config:
    env = os.environ if env is None else env
    found = find_config_path(path, env)
    if found is None:
        return parse_config({}, dev=dev, env=env)
    try:
        text = found.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("", f"cannot read config file {found}: {reason}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{found}: {exc}") from exc
    return parse_config(data, dev=dev, env=env, source=_under(Path.cwd(), str(found)), declared=declared)
