"""The event model: validation, timestamp normalisation and the payload bytes.

An event arrives as a JSON object (one intake line, or one element of an HTTP
intake array), is validated here, and leaves as an :class:`Event` whose
``body`` is the exact byte string POSTed to every subscribed webhook:
``{"event": ..., "timestamp": ..., "data": {...}}`` in that key order.

This is on the intake hot path: one ``orjson.loads``, a handful of type checks,
one ``orjson.dumps``. Everything slower (UTF-8 error positions, the big-integer
check) runs only when a cheap test says it is needed.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from math import floor
from typing import Any, Final

import orjson

from webhookd import logfmt
from webhookd.reasons import Lead, Reason

__all__ = [
    "BOUNCE_TYPES",
    "EVENT_TYPES",
    "Event",
    "EventError",
    "decode_json",
    "format_timestamp",
    "normalise_timestamp",
    "parse_event",
    "synthetic_event",
    "validate_event",
]

EVENT_TYPES: tuple[str, ...] = ("delivered", "bounced", "opened", "clicked", "complained", "failed")
BOUNCE_TYPES: tuple[str, ...] = ("hard", "soft", "complaint")

_EVENT_SET: Final = frozenset(EVENT_TYPES)
_BOUNCE_SET: Final = frozenset(BOUNCE_TYPES)
_TOP_FIELDS: Final = frozenset(("event", "timestamp", "id", "data"))
_MAX_ID_CHARS: Final = 255
# orjson.dumps refuses more than 254 nested containers; the payload wraps `data` in one more.
_MAX_DATA_DEPTH: Final = 253

# Optional `data` fields that must be strings when present (SPEC §2).
_STRING_FIELDS: Final = ("from", "to", "subject", "error_message", "user_agent", "ip", "url")

_EVENT_LIST: Final = ", ".join(EVENT_TYPES)
_UNKNOWN_FIELD: Final = "unknown top-level field {} (allowed: event, timestamp, id, data)"
_BAD_BOUNCE: Final = "data.bounce_type must be one of " + ", ".join(BOUNCE_TYPES)

# An integer outside orjson's range (i64 and u64) is "-" + 19 digits or 20+ digits (JSON has no
# leading zeros), and a number inside an array or object follows "[", "," or ":" and optional
# whitespace. The pre-check maps digits to "0", those separators and whitespace to " ", "-" to
# itself and everything else to "x" with one bytes.translate, then does two substring searches
# (all in C). Only a text that has such a run goes through the exact check in _check_big_ints;
# digit runs inside strings (a nanosecond Unix time in a message id, ...) rarely do.
_DIGIT_MAP: Final = bytes(
    0x30 if 0x30 <= b <= 0x39 else 0x2D if b == 0x2D else 0x20 if b in b"[,: \t\r\n" else 0x78
    for b in range(256)
)
_RUN_20: Final = b" " + b"0" * 20
_NEG_RUN_19: Final = b" -" + b"0" * 19
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1

# RFC 3339 date-time (section 5.6). "t"/"z" may be lowercase (5.6 NOTE), and a space may replace "T"
# (the NOTE allows it "for the sake of readability"). ASCII digits only: no re.UNICODE `\d`.
_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


class EventError(ValueError):
    """An event was refused; ``str(e)`` is the text given to the client, ``reason`` its kind
    (`Reason.INVALID_JSON` when the line is not a JSON text at all, else `INVALID_EVENT`)."""

    def __init__(self, message: str, reason: Reason = Reason.INVALID_EVENT) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    timestamp: str  # normalised "YYYY-MM-DDTHH:MM:SSZ"
    idempotency_key: str | None  # the optional top-level "id"
    body: bytes  # orjson.dumps({"event": type, "timestamp": timestamp, "data": data})
    message_id: str = ""  # data.message_id, stored in its own indexed column for search
    recipient: str = ""  # data.to ("" when absent), likewise


# -- timestamps -----------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _format_second(sec: int) -> str:
    t = time.gmtime(sec)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}Z"


def format_timestamp(epoch: float) -> str:
    """Unix time → ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, fraction truncated towards the past)."""
    return _format_second(floor(epoch))


def _bad_timestamp(value: object) -> EventError:
    if isinstance(value, str):
        reason = f"timestamp must be an RFC 3339 time, got {_quote(_shorten(value))}"
        if _RFC3339.fullmatch(value + "Z") is not None:
            reason += " (no UTC offset: add Z or +HH:MM)"
        return EventError(reason)
    return EventError(f"timestamp must be an RFC 3339 time string, got {_json_type(value)}")


def normalise_timestamp(value: str) -> str:
    """Any RFC 3339 date-time → UTC, second precision, ``Z`` suffix.

    Fractional seconds are truncated; ``-00:00`` counts as UTC; a leap second (``:60``) becomes
    ``:59`` of the same minute. A time without an offset is refused: it names no instant.
    """
    return _normalise(value)


@lru_cache(maxsize=1024)  # events in a burst share timestamps; failures raise and are not cached
def _normalise(value: str) -> str:
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise _bad_timestamp(value)
    year, month, day, hour, minute, second, sign, off_h, off_m = m.groups()
    sec = int(second)
    if sec == 60:
        sec = 59
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute), sec)  # naive, in UTC
        if sign is not None:
            oh, om = int(off_h), int(off_m)
            if oh > 23 or om > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=oh, minutes=om)
            dt = dt - offset if sign == "+" else dt + offset
    except (ValueError, OverflowError):
        raise _bad_timestamp(value) from None
    if sign is None and len(value) == 20 and value[10] == "T" and value[19] == "Z" and second != "60":
        return value  # already canonical: the common case
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}Z"
    )


# -- helpers ----------------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quote(value: str) -> str:
    """A JSON string literal, for quoting client input inside a reason."""
    return json.dumps(value, ensure_ascii=False)


def _shorten(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


class _BigInt(Exception):
    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.literal = literal


def _check_int(literal: str) -> int:
    digits = literal[1:] if literal[0] == "-" else literal
    # More than 20 digits is out of range whatever they are (and int() of huge literals is slow).
    if len(digits) > 20:
        raise _BigInt(literal)
    value = int(literal)
    if value < _INT_MIN or value > _INT_MAX:
        raise _BigInt(literal)
    return 0  # the value is discarded: the parse only looks for out-of-range literals


def _check_big_ints(raw: bytes | str) -> None:
    """Refuse integer literals that orjson would have turned into floats.

    orjson parses integers only within the i64/u64 range; wider ones silently become floats, which
    would alter the number sent to receivers. Re-parsing with the stdlib parser (whose parse_int
    hook sees every integer literal's text, and never fractions or exponents) finds them exactly.
    Callers run this only when the text contains a long enough digit run after a separator (or is
    a bare number), so the normal path pays one translate and two substring searches.
    """
    try:
        json.loads(raw, parse_int=_check_int)
    except _BigInt as exc:
        raise EventError(
            f"integer {_shorten(exc.literal, 40)} does not fit in 64 bits; send it as a string"
        ) from None
    except RecursionError:
        raise EventError(f"JSON nested too deeply (data may have at most {_MAX_DATA_DEPTH} levels)") from None
    except ValueError:  # pragma: no cover - orjson accepted the text, so the stdlib parser does too
        pass


def decode_json(raw: bytes | str) -> Any:
    """Parse one JSON text with orjson, turning every failure into an :class:`EventError`.

    Also refuses integers wider than 64 bits (which orjson would silently turn into floats).
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(raw, exc) from None
    mapped = (raw.encode() if isinstance(raw, str) else raw).translate(_DIGIT_MAP)
    if _RUN_20 in mapped or _NEG_RUN_19 in mapped or type(obj) is float:
        _check_big_ints(raw)
    return obj


def _decode_error(raw: bytes | str, exc: orjson.JSONDecodeError) -> EventError:
    # Error path only: work out a precise reason.
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as uexc:
            return EventError(f"invalid Unicode (lone surrogate) at character {uexc.start}")
        if not raw.strip():
            return EventError(Lead.EMPTY_LINE.text(), Reason.INVALID_JSON)
    else:
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as uexc:
            return EventError(Lead.NOT_UTF8.text(f" at byte {uexc.start}"), Reason.INVALID_JSON)
        if not raw.strip():
            return EventError(Lead.EMPTY_LINE.text(), Reason.INVALID_JSON)
    return EventError(Lead.NOT_JSON.text(f": {exc}"), Reason.INVALID_JSON)


# -- validation -------------------------------------------------------------------------------------


def parse_event(raw: bytes | str, *, now: float) -> Event:
    """Validate one intake line (without its newline): a JSON text, or logfmt
    (`event=delivered message_id=...`, see webhookd.logfmt). Raises only EventError."""
    if not isinstance(raw, str) and logfmt.looks_like_logfmt(raw):
        try:
            obj = logfmt.to_event(bytes(raw))
        except logfmt.LogfmtError as exc:
            if exc.reason is Reason.INVALID_JSON:  # not UTF-8: the same answer as for JSON
                raise EventError(str(exc), exc.reason) from None
            raise EventError(f"logfmt: {exc}", exc.reason) from None
        return validate_event(obj, now=now)
    return validate_event(decode_json(raw), now=now)


def validate_event(obj: object, *, now: float) -> Event:
    """Validate an already-decoded event object and build its payload. Raises only EventError."""
    if not isinstance(obj, dict):
        raise EventError(f"event must be a JSON object, got {_json_type(obj)}")
    if not _TOP_FIELDS.issuperset(obj):
        for name in obj:
            if name not in _TOP_FIELDS:
                shown = _quote(_shorten(name)) if isinstance(name, str) else repr(name)
                raise EventError(_UNKNOWN_FIELD.format(shown))

    event_type = obj.get("event")
    if not isinstance(event_type, str):
        if "event" not in obj:
            raise EventError('missing "event"')
        raise EventError(f"event must be a string, got {_json_type(event_type)}")
    if event_type not in _EVENT_SET:
        raise _unknown_event(event_type)

    ts_value = obj.get("timestamp")  # null counts as absent
    if ts_value is None:
        timestamp = format_timestamp(now)
    elif isinstance(ts_value, str):
        timestamp = normalise_timestamp(ts_value)
    else:
        raise _bad_timestamp(ts_value)

    key = obj.get("id")  # null counts as absent
    if key is not None and (not isinstance(key, str) or not key or len(key) > _MAX_ID_CHARS):
        raise EventError(f"id must be a non-empty string of at most {_MAX_ID_CHARS} characters")

    data = obj.get("data")
    if not isinstance(data, dict):
        if "data" not in obj:
            raise EventError('missing "data"')
        raise EventError(f"data must be an object, got {_json_type(data)}")
    _validate_data(event_type, data)

    try:
        # orjson's bytes keep their 4 KiB allocation; a copy sized to the body keeps
        # memory proportional to what is queued (20,000 bodies: 79 MiB → 5 MiB).
        body = memoryview(orjson.dumps({"event": event_type, "timestamp": timestamp, "data": data})).tobytes()
    except orjson.JSONEncodeError as exc:
        raise _encode_error(exc) from None
    return Event(event_type, timestamp, key, body, data["message_id"], data.get("to") or "")


def _unknown_event(name: str) -> EventError:
    return EventError(f"unknown event {_quote(_shorten(name))} (expected one of {_EVENT_LIST})")


def _validate_data(event_type: str, data: dict[Any, Any]) -> None:
    message_id = data.get("message_id")
    if message_id is None:
        if "message_id" not in data:
            raise EventError("data.message_id is required")
        raise EventError("data.message_id must be a non-empty string")
    if not isinstance(message_id, str) or not message_id or message_id.isspace():
        raise EventError("data.message_id must be a non-empty string")

    for name in _STRING_FIELDS:
        value = data.get(name, "")
        if not isinstance(value, str):
            raise EventError(f"data.{name} must be a string, got {_json_type(value)}")

    bounce_type = data.get("bounce_type")
    if bounce_type is None and "bounce_type" not in data:
        if event_type == "bounced":
            raise EventError("data.bounce_type is required for bounced events")
    elif not isinstance(bounce_type, str) or bounce_type not in _BOUNCE_SET:
        raise EventError(_BAD_BOUNCE)

    if "tags" in data:
        tags = data["tags"]
        if not isinstance(tags, list):
            raise EventError("data.tags must be a list of strings")
        for tag in tags:
            if not isinstance(tag, str):
                raise EventError("data.tags must be a list of strings")

    if "metadata" in data and not isinstance(data["metadata"], dict):
        raise EventError(f"data.metadata must be an object, got {_json_type(data['metadata'])}")


def _encode_error(exc: orjson.JSONEncodeError) -> EventError:
    msg = str(exc)
    if "ecursion" in msg:
        return EventError(f"data is nested too deeply (at most {_MAX_DATA_DEPTH} levels)")
    if "64-bit" in msg:
        return EventError("data contains an integer that does not fit in 64 bits; send it as a string")
    return EventError(f"data cannot be encoded as JSON: {msg}")


# -- test events ------------------------------------------------------------------------------------


def synthetic_event(event_type: str, *, now: float) -> Event:
    """A plausible event of ``event_type`` for ``webhooks test`` (SPEC §4.3)."""
    if event_type not in _EVENT_SET:
        raise _unknown_event(event_type)
    data: dict[str, Any] = {
        "message_id": f"test-{secrets.token_hex(12)}",
        "from": "webhookd@example.com",
        "to": "recipient@example.org",
        "subject": "webhookd test event",
        "tags": ["test"],
        "metadata": {},
    }
    if event_type == "bounced":
        data["bounce_type"] = "hard"
        data["error_message"] = "550 5.1.1 <recipient@example.org>: Recipient address rejected: User unknown"
    elif event_type == "failed":
        data["error_message"] = "Delivery abandoned after all retries: connection timed out"
    elif event_type in ("opened", "clicked"):
        if event_type == "clicked":
            data["url"] = "https://example.com/welcome?utm_source=webhookd-test"
        data["user_agent"] = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
        data["ip"] = "192.0.2.10"
    return validate_event({"event": event_type, "data": data}, now=now)
