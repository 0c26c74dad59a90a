"""Bounce classification from SMTP replies and delivery status codes (RFC 3463).

One pure function for every MTA bridge: the enhanced status code decides when there
is one, the SMTP reply code otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# A reply code stands alone: not part of an IP address ("192.0.2.250"), a name
# ("user552@...") or a longer number, and followed by a space, a dash or the end.
_REPLY = re.compile(r"(?<![\w.])([245]\d\d)(?=[ -]|$)")

BounceType = Literal["hard", "soft"]


@dataclass(frozen=True, slots=True)
class Classification:
    bounce_type: BounceType
    reason: str  # why, in a few words (the MTA's text goes into error_message unchanged)
    mailbox_full: bool = False


def find_codes(text: str) -> tuple[str | None, int | None]:
    """The first enhanced status code ("5.1.1") and SMTP reply code (550) in a text."""
    enhanced = _ENHANCED.search(text)
    reply = _REPLY.search(text)
    return (enhanced.group(0) if enhanced else None, int(reply.group(1)) if reply else None)


def classify(text: str = "", *, enhanced: str | None = None, reply: int | None = None) -> Classification:
    """Hard or soft, from the enhanced code first, then the SMTP reply code.

    5.1.x (bad address) and 5.4.x (bad domain/routing) are hard; x.2.2 (mailbox full) is
    soft; 4.x.x is soft; policy and spam blocks (x.7.x) are soft, their reason kept in
    error_message by the caller; other 5.x.x are hard. Without an enhanced code: 4xx and
    552 (storage exceeded) are soft, other 5xx hard. With no code at all: soft.
    """
    found_enhanced, found_reply = find_codes(text)
    enhanced = enhanced or found_enhanced
    reply = reply if reply is not None else found_reply
    if enhanced:
        cls, subject, detail = (int(part) for part in enhanced.split("."))
        if subject == 2 and detail == 2:
            return Classification("soft", "mailbox full", mailbox_full=True)
        if subject == 7:
            return Classification("soft", "rejected by policy or as spam")
        if cls == 4:
            return Classification("soft", "temporary failure")
        if cls == 5 and subject == 1:
            return Classification("hard", "bad recipient address")
        if cls == 5 and subject == 4:
            return Classification("hard", "bad domain or routing")
        if cls == 5:
            return Classification("hard", "permanent failure")
    if reply is not None:
        if reply == 552:
            return Classification("soft", "mailbox full", mailbox_full=True)
        if 400 <= reply < 500:
            return Classification("soft", "temporary failure")
        if 500 <= reply < 600:
            return Classification("hard", "permanent failure")
    return Classification("soft", "no status code")
