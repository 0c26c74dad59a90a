"""logfmt intake lines, for MTA configuration languages and shell scripts that cannot
build JSON safely:

    event=bounced message_id=<a@b> to=x@example.org bounce_type=hard
    error_message="550 5.1.1 User unknown" tags=order,eu metadata.order_id=12345

`event`, `timestamp` and `id` are the event's top-level fields; `tags` is a
comma-separated list; `metadata.KEY` goes into `data.metadata`; every other key
goes into `data` as a string. Values are bare (no spaces) or double-quoted with
`\\"`, `\\\\`, `\\n`, `\\r` and `\\t` escapes (what Exim's `${quote:}` emits).
The result is validated exactly like a JSON line.
"""

from __future__ import annotations

import re
from typing import Any

from webhookd.reasons import Lead, Reason

TOP_LEVEL = ("event", "timestamp", "id")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_LOOKS_LIKE = re.compile(rb"\s*[A-Za-z_][A-Za-z0-9_.\-]*=")


class LogfmtError(ValueError):
    """The line is not valid logfmt; the message names the problem, ``reason`` its kind
    (`Reason.INVALID_JSON` for bytes that are not UTF-8, `INVALID_EVENT` for bad syntax)."""

    def __init__(self, message: str, reason: Reason = Reason.INVALID_EVENT) -> None:
        super().__init__(message)
        self.reason = reason


def looks_like_logfmt(raw: bytes) -> bool:
    """True when a line starts with `key=` (a JSON text never does)."""
    return _LOOKS_LIKE.match(raw) is not None


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """Split a logfmt line into (key, value) pairs."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return pairs
        m = _KEY.match(text, i)
        if m is None or m.end() >= n or text[m.end()] != "=":
            word = text[i:].split(None, 1)[0] if text[i:].strip() else text[i:]
            raise LogfmtError(f"expected key=value at column {i + 1}, got {word[:40]!r}")
        key = m.group()
        i = m.end() + 1
        if i < n and text[i] == '"':
            value, i = _quoted(text, i + 1, key)
        else:
            start = i
            while i < n and text[i] not in " \t":
                if text[i] == '"':
                    raise LogfmtError(f"{key}: a quote inside a bare value; quote the whole value")
                i += 1
            value = text[start:i]
        pairs.append((key, value))


def _quoted(text: str, i: int, key: str) -> tuple[str, int]:
    out: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            if i + 1 < n and text[i + 1] not in " \t":
                raise LogfmtError(f"{key}: expected a space after the closing quote")
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            esc = text[i + 1]
            if esc not in _ESCAPES:
                raise LogfmtError(f"{key}: unknown escape \\{esc} (use \\\", \\\\, \\n, \\r or \\t)")
            out.append(_ESCAPES[esc])
            i += 2
            continue
        out.append(c)
        i += 1
    raise LogfmtError(f"{key}: unterminated quoted value")


def to_event(raw: bytes) -> dict[str, Any]:
    """The event object a logfmt line stands for (validated afterwards like JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LogfmtError(Lead.NOT_UTF8.text(f" at byte {exc.start}"), Reason.INVALID_JSON) from None
    text = text.strip()
    event: dict[str, Any] = {}
    data: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in parse_pairs(text):
        if key in seen:
            raise LogfmtError(f"duplicate key {key!r}")
        seen.add(key)
        if key in TOP_LEVEL:
            event[key] = value
        elif key == "tags":
            data["tags"] = [t for t in value.split(",") if t]
        elif key.startswith("metadata."):
            name = key[len("metadata."):]
            if not name:
                raise LogfmtError("metadata. needs a name after the dot (metadata.order_id=...)")
            metadata = data.setdefault("metadata", {})
            metadata[name] = value
        elif key == "metadata":
            raise LogfmtError("metadata takes named fields: metadata.KEY=VALUE")
        else:
            data[key] = value
    event["data"] = data
    return event
