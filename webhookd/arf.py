"""Spam complaints: an RFC 5965 feedback report (ARF) → a `complained` event.

Mailbox providers send a multipart/report (report-type=feedback-report) with a
human-readable part, a message/feedback-report part (Feedback-Type,
Original-Mail-From, Original-Rcpt-To, ...) and the original message or its
headers (message/rfc822 or text/rfc822-headers). Standard library only: this
runs from an alias pipe once per report.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
from email.message import Message
from typing import Any


class ArfError(ValueError):
    """Not a usable feedback report; the message says why."""


def _addr(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value or None


def _fields(part: Message) -> Message:
    """The feedback-report fields, parsed as a header block."""
    payload = part.get_payload()
    if isinstance(payload, list):  # some parsers already split it into header blocks
        block = "\n".join(str(p) for p in payload)
    else:
        raw = part.get_payload(decode=True)
        block = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
    return email.message_from_string(block.strip() + "\n\n", policy=email.policy.compat32)


def _original(part: Message) -> Message | None:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner:
            first = inner[0]
            return first if isinstance(first, Message) else None
        return inner if isinstance(inner, Message) else None
    raw = part.get_payload(decode=True)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(part.get_payload())
    return email.message_from_string(text.strip() + "\n\n", policy=email.policy.compat32)


def parse_report(raw: bytes) -> dict[str, Any]:
    """The `complained` event object for one feedback report."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if msg.get_content_type() != "multipart/report" or msg.get_param("report-type") != "feedback-report":
        raise ArfError(
            f"not a feedback report: Content-Type is {msg.get_content_type()}"
            f" (expected multipart/report; report-type=feedback-report)"
        )
    report: Message | None = None
    original: Message | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/feedback-report" and report is None:
            report = _fields(part)
        elif ctype in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = _original(part)
    if report is None:
        raise ArfError("no message/feedback-report part")
    if original is None:
        raise ArfError("no original message or headers (message/rfc822 or text/rfc822-headers part)")
    message_id = (original.get("Message-ID") or "").strip()
    if not message_id:
        raise ArfError("the original message has no Message-ID header")
    data: dict[str, Any] = {"message_id": message_id}
    sender = _addr(report.get("Original-Mail-From")) or _addr(_first_address(original.get("From")))
    recipient = _addr(report.get("Original-Rcpt-To")) or _addr(_first_address(original.get("To")))
    if sender:
        data["from"] = sender
    if recipient:
        data["to"] = recipient
    subject = original.get("Subject")
    if subject:
        data["subject"] = str(email.header.make_header(email.header.decode_header(subject)))
    for field, key in (("Feedback-Type", "feedback_type"), ("User-Agent", "reported_by"),
                       ("Arrival-Date", "arrival_date"), ("Source-IP", "source_ip")):
        value = report.get(field)
        if value:
            data[key] = " ".join(str(value).split())
    # The same report delivered twice (providers retry) is one event.
    key = f"arf:{message_id}:{recipient or ''}:{data.get('feedback_type', '')}"
    return {"event": "complained", "id": key[:255], "data": data}


def _first_address(value: str | None) -> str | None:
    if not value:
        return None
    addresses = email.utils.getaddresses([value])
    return addresses[0][1] if addresses and addresses[0][1] else None

