"""Webhooks as code: `[[webhooks]]` tables in the config file and in `webhooks.d/*.toml`
next to it, and the plan that brings the stored webhooks in line with them (pure).

`parse_declared` validates the tables (called by `webhookd.config`, errors are
`ConfigError` naming the file and the dotted key); `plan` compares what is declared
with the stored webhooks and lists the changes a sync makes (`Operations.sync` applies
them, `webhookd check-config --plan` prints them). A webhook is matched to its entry by
`name`, which never changes; an entry removed from the files disables its webhook
(`disabled_reason = "removed_from_config"`, history kept), and the same name declared
again re-enables it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from webhookd.batching import FIELDS as BATCH_FIELDS
from webhookd.batching import OFF, Batching, BatchingError
from webhookd.filters import FilterError, WebhookFilter
from webhookd.signing import SECRET_PREFIX

REMOVED_FROM_CONFIG = "removed_from_config"
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
FIELDS = ("name", "url", "events", "filter", "description", "secret_file", *BATCH_FIELDS)
DIR_NAME = "webhooks.d"
MIN_SECRET_BYTES = 24


class DeclaredError(ValueError):
    """One entry was refused: `key` is its dotted key (`webhooks[2].url`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class DeclaredWebhook:
    """One `[[webhooks]]` entry, validated."""

    name: str
    url: str
    events: tuple[str, ...]
    description: str
    filter: WebhookFilter
    source: str  # the file it is declared in (absolute)
    secret: str | None = field(default=None, repr=False)  # from secret_file; None: generated, then kept
    secret_file: str | None = None
    batching: Batching = OFF  # batch_max_events, batch_max_bytes, batch_linger (webhookd.batching)


# -- parsing ---------------------------------------------------------------------------------------
def read_secret_file(path: Path, key: str) -> str:
    """A whsec_ secret from a file that only its owner may read (mode 0600 or stricter)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise DeclaredError(key, f"cannot read secret file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeclaredError(key, f"secret file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise DeclaredError(
            key, f"secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must not be readable or writable"
            f" by group or others (chmod 0600 {path})",
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DeclaredError(key, f"cannot read secret file {path}: {reason}") from None
    return validate_secret(text, f"secret file {path}", key)


def validate_secret(text: str, what: str, key: str) -> str:
    """`whsec_` + base64 of at least 24 bytes (what `webhookd` generates has 32). Never echoes it."""
    if not text.startswith(SECRET_PREFIX) or any(c.isspace() for c in text):
        raise DeclaredError(key, f"{what} must hold one {SECRET_PREFIX}<base64> secret")
    encoded = text.removeprefix(SECRET_PREFIX)
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise DeclaredError(key, f"{what}: the part after {SECRET_PREFIX} is not base64") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise DeclaredError(key, f"{what}: the secret must decode to at least {MIN_SECRET_BYTES} bytes, got {len(raw)}")
    return text


def _entry(raw: object, key: str, source: Path, *, production: bool) -> DeclaredWebhook:
    from webhookd.apimodel import ApiError, validate_description, validate_events, validate_url

    if not isinstance(raw, Mapping):
        raise DeclaredError(key, "expected a table")
    for k in raw:
        if k not in FIELDS:
            raise DeclaredError(f"{key}.{k}", f"unknown key (expected one of {', '.join(FIELDS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DeclaredError(f"{key}.name", f"required: lower-case letters, digits, _ and - (at most 63,"
                                            f" starting with a letter or digit), got {name!r}")
    if "url" not in raw:
        raise DeclaredError(f"{key}.url", "required")
    try:
        url = validate_url(raw["url"], production=production)
    except ApiError as exc:
        raise DeclaredError(f"{key}.url", exc.message) from None
    events_raw = raw.get("events", "all")
    try:
        events = validate_events(events_raw)
    except ApiError as exc:
        raise DeclaredError(f"{key}.events", exc.message + ' (or "all")') from None
    try:
        description = validate_description(raw.get("description", ""))
    except ApiError as exc:
        raise DeclaredError(f"{key}.description", exc.message) from None
    try:
        filter_ = WebhookFilter.parse(raw.get("filter"))
    except FilterError as exc:
        raise DeclaredError(f"{key}.filter", str(exc)) from None
    try:
        batching = OFF.updated(raw, prefix=f"{key}.")
    except BatchingError as exc:
        raise DeclaredError(exc.field, exc.reason) from None
    secret = secret_file = None
    if "secret_file" in raw:
        text = raw["secret_file"]
        if not isinstance(text, str) or not text:
            raise DeclaredError(f"{key}.secret_file", f"expected a path, got {text!r}")
        path = Path(os.path.normpath(source.parent / text))
        secret, secret_file = read_secret_file(path, f"{key}.secret_file"), str(path)
    return DeclaredWebhook(name=name, url=url, events=events, description=description, filter=filter_,
                           source=str(source), secret=secret, secret_file=secret_file, batching=batching)


def parse_entries(value: object, source: Path, prefix: str, *, production: bool) -> list[DeclaredWebhook]:
    """The `webhooks` array of one file; keys are `{prefix}webhooks[i]...`."""
    if not isinstance(value, list):
        raise DeclaredError(f"{prefix}webhooks", "expected an array of tables: [[webhooks]]")
    return [_entry(raw, f"{prefix}webhooks[{i}]", source, production=production) for i, raw in enumerate(value)]


def parse_declared(
    data: Mapping[str, Any], source: Path | None, *, production: bool
) -> tuple[DeclaredWebhook, ...]:
    """The config file's `[[webhooks]]`, then each `webhooks.d/*.toml` beside it (sorted by
    name; other files are ignored). Names are unique across all of them."""
    found: list[DeclaredWebhook] = []
    keys: dict[str, str] = {}

    def add(entries: list[DeclaredWebhook], prefix: str) -> None:
        for i, d in enumerate(entries):
            if d.name in keys:
                raise DeclaredError(f"{prefix}webhooks[{i}].name", f"{d.name!r} is already declared ({keys[d.name]})")
            keys[d.name] = f"{prefix}webhooks[{i}]"
        found.extend(entries)

    if "webhooks" in data:
        if source is None:
            raise DeclaredError("webhooks", "declared webhooks need a config file")
        add(parse_entries(data["webhooks"], source, "", production=production), "")
    directory = source.parent / DIR_NAME if source is not None else None
    if directory is not None and directory.is_dir():
        for path in sorted(p for p in directory.iterdir() if p.suffix == ".toml" and p.is_file()):
            prefix = f"{DIR_NAME}/{path.name}: "
            try:
                doc = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise DeclaredError(f"{DIR_NAME}/{path.name}", f"cannot read: {exc}") from None
            except tomllib.TOMLDecodeError as exc:
                raise DeclaredError(f"{DIR_NAME}/{path.name}", str(exc)) from None
            for k in doc:
                if k != "webhooks":
                    raise DeclaredError(f"{prefix}{k}",
                                        "unknown key (a webhooks.d file holds only [[webhooks]] tables)")
            add(parse_entries(doc.get("webhooks", []), path, prefix, production=production), prefix)
    return tuple(found)


# -- the plan --------------------------------------------------------------------------------------
class Stored(Protocol):
    """What the plan reads of a stored webhook (a `WebhookRecord` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def declared_in(self) -> str | None: ...
    @property
    def url(self) -> str: ...
    @property
    def events(self) -> tuple[str, ...]: ...
    @property
    def description(self) -> str: ...
    @property
    def filter(self) -> WebhookFilter: ...
    @property
    def batching(self) -> Batching: ...
    @property
    def secret(self) -> str: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def disabled_reason(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Change:
    """One step of a sync: "create", "update" or "disable"."""

    kind: str
    name: str
    webhook_id: str | None = None
    declared: DeclaredWebhook | None = None
    # (field, old, new) of url, events, description, filter, batching, declared_in
    fields: tuple[tuple[str, Any, Any], ...] = ()
    secret_changed: bool = False
    enable: bool = False  # re-enable a webhook disabled as removed_from_config

    def fieldnames(self) -> tuple[str, ...]:
        return tuple(f for f, _old, _new in self.fields)


def plan(declared: Sequence[DeclaredWebhook], stored: Sequence[Stored]) -> list[Change]:
    """The changes that make `stored` match `declared`: creates and updates in declared order,
    then disables in stored order."""
    by_name = {s.name: s for s in stored if s.name is not None}
    changes: list[Change] = []
    for d in declared:
        s = by_name.get(d.name)
        if s is None:
            changes.append(Change("create", d.name, declared=d))
            continue
        fields = tuple(
            (name, old, new) for name, old, new in (
                ("url", s.url, d.url), ("events", s.events, d.events), ("description", s.description, d.description),
                ("filter", s.filter, d.filter), ("batching", s.batching, d.batching),
                ("declared_in", s.declared_in, d.source),
            ) if old != new
        )
        secret_changed = d.secret is not None and d.secret != s.secret
        enable = not s.enabled and s.disabled_reason == REMOVED_FROM_CONFIG
        if fields or secret_changed or enable:
            changes.append(Change("update", d.name, s.id, d, fields, secret_changed, enable))
    names = {d.name for d in declared}
    for s in stored:
        if s.name is not None and s.declared_in is not None and s.name not in names:
            changes.append(Change("disable", s.name, s.id))
    return changes


def _show(field_name: str, value: Any) -> str:
    if value is None:
        return "(none)"
    if field_name == "events":
        return "all" if value == ("*",) else ",".join(value)
    if isinstance(value, WebhookFilter):
        return value.summary(limit=100) or "(none)"
    if isinstance(value, Batching):
        return value.describe()
    if field_name == "description":
        return repr(value)
    return str(value)


def render(changes: Sequence[Change]) -> list[str]:
    """`terraform plan`-like lines; secrets are only ever said to change."""
    if not changes:
        return ["no changes"]
    lines: list[str] = []
    for c in changes:
        if c.kind == "create":
            assert c.declared is not None
            d = c.declared
            line = f"+ create {c.name} {d.url} {_show('events', d.events)}"
            extra = [f"filter {d.filter.summary(limit=100)}"] if not d.filter.empty else []
            if d.batching.on:
                extra.append(f"batching {d.batching.describe()}")
            extra.append("secret from " + d.secret_file if d.secret_file else "secret generated")
            lines.append(line + f" ({'; '.join(extra)})")
        elif c.kind == "update":
            for name, old, new in c.fields:
                lines.append(f"~ update {c.name}: {name} {_show(name, old)} → {_show(name, new)}")
            if c.secret_changed:
                source = c.declared.secret_file if c.declared else None
                lines.append(f"~ update {c.name}: secret changed (from {source})")
            if c.enable:
                lines.append(f"~ update {c.name}: enable (declared again after removed_from_config)")
        else:
            lines.append(f"- disable {c.name} (removed from config)")
    n = {k: sum(1 for c in changes if c.kind == k) for k in ("create", "update", "disable")}
    lines.append(f"plan: {n['create']} to create, {n['update']} to update, {n['disable']} to disable")
    return lines


def to_json(changes: Sequence[Change]) -> list[dict[str, Any]]:
    def value(name: str, v: Any) -> Any:
        if isinstance(v, WebhookFilter | Batching):
            return v.to_json()
        return list(v) if isinstance(v, tuple) else v

    out: list[dict[str, Any]] = []
    for c in changes:
        doc: dict[str, Any] = {"action": c.kind, "name": c.name, "id": c.webhook_id}
        if c.kind == "create" and c.declared is not None:
            d = c.declared
            doc.update(url=d.url, events=list(d.events), description=d.description, filter=d.filter.to_json(),
                       **d.batching.to_json(), declared_in=d.source,
                       secret="from_file" if d.secret_file else "generated")
        elif c.kind == "update":
            doc["changes"] = {n: {"old": value(n, o), "new": value(n, v)} for n, o, v in c.fields}
            doc["secret"] = "changed" if c.secret_changed else "unchanged"
            doc["enable"] = c.enable
        out.append(doc)
    return out
