"""Request signatures: the legacy ``X-Webhook-Signature`` and the Standard Webhooks headers.

``X-Webhook-Signature`` is what the original documentation's Python, Node.js and PHP snippets
verify: lowercase hex HMAC-SHA256 of the raw body, keyed with the secret string's UTF-8 bytes.
``webhook-signature`` follows https://www.standardwebhooks.com/: ``v1,`` + base64 HMAC-SHA256 of
``"{webhook-id}.{webhook-timestamp}.{body}"``, keyed with the base64-decoded part of the secret after
``whsec_``; during a secret rotation there is one signature per valid secret, space-separated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Final

__all__ = ["SECRET_PREFIX", "Signer", "generate_secret", "legacy_signature", "standard_signature"]

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a format prefix, not a secret
_SECRET_BYTES: Final = 32


def generate_secret() -> str:
    """A new signing secret: ``whsec_`` + standard base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


def _standard_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks scheme: the base64 after ``whsec_``, decoded."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    encoded += "=" * (-len(encoded) % 4)  # tolerate unpadded base64, as the reference library does
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"signing secret is not {SECRET_PREFIX}<base64>: {exc}") from None
    if not key:
        raise ValueError("signing secret is empty")
    return key


def legacy_signature(secret: str, body: bytes) -> str:
    """``X-Webhook-Signature``: lowercase hex HMAC-SHA256 of ``body``, key = ``secret.encode()``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``webhook-signature`` entry: ``v1,`` + base64 HMAC-SHA256 of ``"{id}.{ts}.{body}"``."""
    mac = hmac.new(_standard_key(secret), f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


class Signer:
    """Signs requests for one webhook. ``secrets`` is newest first (rotation keeps older ones)."""

    __slots__ = ("_legacy", "_standard")

    def __init__(self, secrets: Sequence[str]) -> None:
        if isinstance(secrets, str) or not secrets:
            raise ValueError("Signer needs a non-empty sequence of secrets")
        # Keyed HMAC states, computed once; each request signs a .copy() (skips the key schedule).
        self._legacy = hmac.new(secrets[0].encode(), digestmod=hashlib.sha256)
        self._standard = tuple(hmac.new(_standard_key(s), digestmod=hashlib.sha256) for s in secrets)

    def headers(
        self, *, event_id: str, event_type: str, body: bytes, timestamp: int, user_agent: str
    ) -> dict[str, str]:
        legacy = self._legacy.copy()
        legacy.update(body)
        prefix = f"{event_id}.{timestamp}.".encode()
        signatures = []
        for base in self._standard:
            mac = base.copy()
            mac.update(prefix)
            mac.update(body)
            signatures.append("v1," + base64.b64encode(mac.digest()).decode("ascii"))
        return {
            "Content-Type": "application/json",
            "User-Agent": user_agent,
            "X-Webhook-Signature": legacy.hexdigest(),
            "X-Webhook-Event": event_type,
            "X-Webhook-Id": event_id,
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(signatures),
        }
