"""HTML rendering: one Jinja2 environment (autoescape on, undefined names are errors), the
filters the templates share, and the static files, held in memory under versioned paths.

Every stored or received text reaches a template as a plain string and is escaped
there; nothing here marks text safe except the static `<time>` markup built from numbers.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from webhookd.events import format_timestamp

HERE = Path(__file__).resolve().parent
PREFIX = "/ui"

CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    name: str
    version: str
    body: bytes
    content_type: str

    @property
    def url(self) -> str:
        return f"{PREFIX}/static/{self.version}/{self.name}"


def load_static(folder: Path = HERE / "static") -> dict[str, StaticFile]:
    files: dict[str, StaticFile] = {}
    for path in sorted(folder.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        files[path.name] = StaticFile(path.name, hashlib.sha256(body).hexdigest()[:12], body, content_type)
    return files


def utc(ts: float | None) -> str:
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def iso(ts: float | None) -> str:
    return format_timestamp(ts) if ts is not None else ""


def ago(ts: float | None, now: float) -> str:
    """'3 min ago', 'in 2 h', 'just now'."""
    if ts is None:
        return ""
    delta = now - ts
    future = delta < 0
    d = abs(delta)
    if d < 5:
        return "just now"
    if d < 60:
        text = f"{int(d)} s"
    elif d < 3600:
        text = f"{int(d // 60)} min"
    elif d < 86400:
        text = f"{int(d // 3600)} h"
    else:
        text = f"{int(d // 86400)} d"
    return f"in {text}" if future else f"{text} ago"


def percent(rate: float | None) -> str:
    if rate is None:
        return "—"
    value = rate * 100
    return f"{value:.0f} %" if value in (0, 100) else f"{value:.1f} %"


def duration(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


class Renderer:
    def __init__(self, static: dict[str, StaticFile] | None = None) -> None:
        self.static = static if static is not None else load_static()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(utc=utc, iso=iso, ago=ago, percent=percent, duration=duration)
        self.env.globals.update(static=self.static_url, prefix=PREFIX)

    def static_url(self, name: str) -> str:
        return self.static[name].url

    def text(self, template: str, ctx: dict[str, Any]) -> str:
        return self.env.get_template(template).render(ctx)

    def page(self, template: str, ctx: dict[str, Any], *, status: int = 200,
             headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=status, text=self.text(template, ctx), content_type="text/html", charset="utf-8",
            headers=headers,
        )
