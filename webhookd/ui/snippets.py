"""What the pages show about the wire: the receivers' verification snippets (the original
webhook documentation's Python, Node.js and PHP functions, filled in for one webhook)
and the request headers a delivery was sent with, signatures elided.

The headers are rebuilt by the same `Signer.headers` the scheduler's attempts use, so
the names, order and values cannot drift from what receivers get.
"""

from __future__ import annotations

from dataclasses import dataclass

from webhookd.batching import EVENT_TYPE
from webhookd.scheduler import USER_AGENT
from webhookd.signing import Signer, generate_secret
from webhookd.store.model import Delivery

ELIDED = "…elided…"
SIGNATURE_HEADERS = ("X-Webhook-Signature", "webhook-signature")


@dataclass(frozen=True, slots=True)
class Snippet:
    key: str  # element id suffix
    language: str
    code: str


def _literal(value: str) -> str:
    """`value` as a quoted string literal valid in Python, JavaScript and PHP (secrets are
    base64, ids are base32: nothing needs escaping, but nothing is trusted either)."""
    return "'" + "".join(c for c in value if c.isalnum() or c in "+/=_-") + "'"


def verification_snippets(webhook_id: str, secret: str) -> list[Snippet]:
    s = _literal(secret)
    wid = "".join(c for c in webhook_id if c.isalnum() or c == "_")
    python = f"""import hmac, hashlib

# The signing secret of webhook {wid}: keep it in your configuration, not in code.
WEBHOOK_SECRET = {s}

def verify_signature(payload_body, signature, secret):
    expected = hmac.new(
        secret.encode(),
        payload_body,
        hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, signature)

# payload_body is the raw request body (bytes), before any JSON parsing:
# verify_signature(payload_body, request.headers["X-Webhook-Signature"], WEBHOOK_SECRET)
"""
    node = f"""const crypto = require('crypto');

// The signing secret of webhook {wid}: keep it in your configuration, not in code.
const WEBHOOK_SECRET = {s};

function verifySignature(body, signature, secret) {{
  const expected = crypto
    .createHmac('sha256', secret)
    .update(body)
    .digest('hex');
  return crypto.timingSafeEqual(
    Buffer.from(expected), Buffer.from(signature)
  );
}}

// body is the raw request body (a Buffer), before any JSON parsing:
// verifySignature(body, req.headers['x-webhook-signature'], WEBHOOK_SECRET)
"""
    php = f"""<?php
// The signing secret of webhook {wid}: keep it in your configuration, not in code.
$webhookSecret = {s};

function verifySignature($body, $signature, $secret) {{
    $expected = hash_hmac('sha256', $body, $secret);
    return hash_equals($expected, $signature);
}}

// $body = file_get_contents('php://input');
// verifySignature($body, $_SERVER['HTTP_X_WEBHOOK_SIGNATURE'] ?? '', $webhookSecret);
"""
    return [Snippet("python", "Python", python), Snippet("node", "Node.js", node), Snippet("php", "PHP", php)]


def sent_headers(d: Delivery, attempt_at: float | None, batch_id: str | None = None) -> list[tuple[str, str]]:
    """The headers of the delivery's request at `attempt_at` (None: not attempted yet),
    with every signature value replaced by ELIDED; a batch attempt's carry the batch's id."""
    ts = int(attempt_at) if attempt_at is not None else 0
    headers = Signer([generate_secret()]).headers(
        event_id=batch_id or d.event_uid, event_type=EVENT_TYPE if batch_id else d.event_type, body=b"",
        timestamp=ts, user_agent=USER_AGENT,
    )
    for name in SIGNATURE_HEADERS:
        headers[name] = ELIDED
    if attempt_at is None:
        headers["webhook-timestamp"] = "(the time of each attempt)"
    return list(headers.items())
