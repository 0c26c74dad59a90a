"""Batched delivery, opt-in per webhook: its settings, their validation, and the pure parts
of a batch (how many due deliveries go together, its body and its id). No I/O, no clock.

A webhook with `batch_max_events` > 1 gets a JSON array of the usual payload objects in
one POST: up to `batch_max_events` deliveries and `batch_max_bytes` of body (a single
event larger than that still goes, alone), sent when full or `batch_linger` after its
first delivery became due. Each element is the stored payload with the event's id as its
first member: `{"id":"evt_...",` followed by the stored bytes after their `{` (a single
delivery carries the id in its headers; in a batch the id must be inside). Nothing is
serialised again: the rest of each element is byte for byte what a single-event delivery
POSTs, and the elements are joined by `,` inside `[` `]`.

The batch's id (its `webhook-id` / `X-Webhook-Id`) names its content: the same webhook
and the same events give the same id, so a retry of a batch carries the id of its first
attempt, and two different sets of events never share one (a receiver that dedupes on
`webhook-id` can never drop events it has not seen).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_EVENTS = 1000
MIN_BYTES = 1024
MAX_BYTES = 4 * 1024 * 1024
DEFAULT_BYTES = 1024 * 1024
MAX_LINGER = 5.0
FIELDS = ("batch_max_events", "batch_max_bytes", "batch_linger")
EVENT_TYPE = "batch"  # X-Webhook-Event of a batch: its elements carry their own types

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s)\s*")
_UNITS = {"ms": 0.001, "s": 1.0}


class BatchingError(ValueError):
    """An invalid batch setting: `str()` is the field and what is wrong with it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason[:300]
        super().__init__(f"{field} {self.reason}")


@dataclass(frozen=True, slots=True)
class Batching:
    """A webhook's batch settings (a value, like its filter). `max_events` 0 or 1: off."""

    max_events: int = 0
    max_bytes: int = DEFAULT_BYTES
    linger: float = 0.0  # seconds, whole milliseconds

    @property
    def on(self) -> bool:
        return self.max_events > 1

    def to_json(self) -> dict[str, Any]:
        return {"batch_max_events": self.max_events, "batch_max_bytes": self.max_bytes,
                "batch_linger": format_linger(self.linger)}

    def describe(self) -> str:
        """One line for people: `off`, or `100 events, 1048576 bytes, linger 50ms`."""
        if not self.on:
            return "off"
        return f"{self.max_events} events, {self.max_bytes} bytes, linger {format_linger(self.linger)}"

    def updated(self, fields: Mapping[str, object], *, prefix: str = "") -> Batching:
        """These settings with the batch_* fields given replaced (validated; BatchingError
        naming `prefix` + the field). Other keys are ignored."""
        events, size, linger = self.max_events, self.max_bytes, self.linger
        if "batch_max_events" in fields:
            events = _int(fields["batch_max_events"], prefix + "batch_max_events", 0, MAX_EVENTS)
        if "batch_max_bytes" in fields:
            size = _int(fields["batch_max_bytes"], prefix + "batch_max_bytes", MIN_BYTES, MAX_BYTES)
        if "batch_linger" in fields:
            linger = parse_linger(fields["batch_linger"], prefix + "batch_linger")
        return Batching(events, size, linger)


OFF = Batching()


def _int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BatchingError(name, f"must be an integer between {lo} and {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise BatchingError(name, f"must be between {lo} and {hi}, got {value}")
    return value


def parse_linger(value: object, name: str = "batch_linger") -> float:
    """Seconds from "50ms", "1.5s" or a number of seconds; 0 .. MAX_LINGER, kept in whole ms."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and len(value) <= 32:
        m = _DURATION.fullmatch(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is None or not math.isfinite(seconds):
        raise BatchingError(name, f"must be a duration such as \"50ms\" or \"1s\", got {value!r}")
    if not 0 <= seconds <= MAX_LINGER:
        raise BatchingError(name, f"must be between 0ms and {MAX_LINGER:g}s, got {value!r}")
    return round(seconds * 1000) / 1000


def format_linger(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def take(sizes: Sequence[int], settings: Batching) -> int:
    """How many of the due deliveries, in order (their element sizes), make one batch: at most
    max_events, and no more bytes than max_bytes in the array (`[`, `,`, `]` counted), but
    always at least the first."""
    total = 1  # "["
    n = 0
    for size in sizes:
        if n >= settings.max_events:
            break
        grown = total + size + 1  # the element and its "," (or the closing "]")
        if n and grown > settings.max_bytes:
            break
        total = grown
        n += 1
    return n


def full(count: int, size: int, settings: Batching) -> bool:
    """A batch of `count` deliveries and `size` bytes of array is as large as it may grow."""
    return count >= settings.max_events or size >= settings.max_bytes


def array_size(sizes: Sequence[int]) -> int:
    return 1 + sum(sizes) + max(1, len(sizes))


def element(event_uid: str, payload: bytes) -> bytes:
    """One element: `{"id":"<event id>",` + the stored payload after its `{`. Event ids are
    `evt_` + a ULID (nothing to escape); the payload is the JSON object intake built."""
    plain_id = event_uid.isascii() and event_uid.replace("_", "").isalnum()
    if payload[:1] != b"{" or payload[1:2] == b"}" or not plain_id:
        raise ValueError(f"cannot batch event {event_uid!r}: its payload is not a non-empty JSON object")
    return b'{"id":"' + event_uid.encode() + b'",' + payload[1:]


def element_size(event_uid: str, payload: bytes) -> int:
    return len(payload) + len(event_uid) + 8


def body(events: Sequence[tuple[str, bytes]]) -> bytes:
    """The batch's body: `[` element `,` element ... `]` of (event id, stored payload)."""
    return b"[" + b",".join([element(uid, payload) for uid, payload in events]) + b"]"


def batch_id(webhook_id: str, event_uids: Sequence[str]) -> str:
    """`batch_` + 26 base32 characters naming (webhook, events in order): the same batch
    sent again has the same id; any other content has another."""
    h = hashlib.blake2b(digest_size=16, person=b"webhookd-batch")
    h.update(webhook_id.encode())
    for uid in event_uids:
        raw = uid.encode()
        h.update(len(raw).to_bytes(4, "big"))
        h.update(raw)
    return "batch_" + base64.b32encode(h.digest()).decode().rstrip("=").lower()
