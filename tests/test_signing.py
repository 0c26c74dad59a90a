"""Request signatures (webhookd.signing), checked with the receivers' own verification code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from webhookd import batching
from webhookd.events import parse_event
from webhookd.signing import SECRET_PREFIX, Signer, generate_secret, legacy_signature, standard_signature

SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks documentation's example
SECRET_B = generate_secret()
SECRET_C = generate_secret()

# Bodies as webhookd sends them: orjson output, so UTF-8 with non-ASCII characters kept as is.
BODIES: list[bytes] = [
    b'{"event":"delivered","timestamp":"2026-02-23T10:30:02Z","data":{"message_id":"<a@b>"}}',
    parse_event(
        rb'{"event":"bounced","timestamp":"2026-02-23T12:30:02+02:00","data":{"message_id":"\u00e9\ud83d\ude00",'
        rb'"subject":"Gr\u00fc\u00dfe \"quoted\" \\ \u2028 \u0000","to":"\u7528\u6237@example.cn",'
        rb'"bounce_type":"hard","x":"\u00e9"}}',
        now=0,
    ).body,
    orjson.dumps({"event": "opened", "timestamp": "2026-02-23T10:30:02Z",
                  "data": {"message_id": "m", "subject": "Ünïcödé 🎉 ✓", "metadata": {"ключ": "значение"}}}),
    b"",
    b"\n \t",
]
assert any(b >= 0x80 for b in BODIES[1]) and b"\\u" in BODIES[1]  # non-ASCII and escapes both present
# A batch body as a batching webhook gets it (webhookd.batching): the three payloads above, each with
# its event id, in one JSON array; inserted fourth, so every test of BODIES[:N_JSON] signs a batch too.
BATCH = batching.body([(f"evt_01jb{i}", body) for i, body in enumerate(BODIES[:3])])
BODIES.insert(3, BATCH)
N_JSON = 4  # BODIES[:N_JSON] are JSON


def doc_python_verify(payload_body: bytes, signature: str, secret: str) -> bool:
    # The original documentation's Python snippet, verbatim.
    expected = hmac.new(
        secret.encode(),
        payload_body,
        hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, signature)


NODE_SNIPPET = """\
const crypto = require('crypto');

function verifySignature(body, signature, secret) {
  const expected = crypto
    .createHmac('sha256', secret)
    .update(body)
    .digest('hex');
  return crypto.timingSafeEqual(
    Buffer.from(expected), Buffer.from(signature)
  );
}
"""

NODE_DRIVER = """
const fs = require('fs');
const path = require('path');
const dir = process.argv[2];
const out = [];
for (const name of fs.readdirSync(dir).sort()) {
  const c = path.join(dir, name);
  const secret = fs.readFileSync(path.join(c, 'secret'), 'utf8');
  const signature = fs.readFileSync(path.join(c, 'signature'), 'utf8');
  const raw = fs.readFileSync(path.join(c, 'body'));            // a Buffer, as with a raw-body parser
  const text = fs.readFileSync(path.join(c, 'body'), 'utf8');   // a string, as with a text parser
  out.push([verifySignature(raw, signature, secret), verifySignature(text, signature, secret)]);
}
console.log(JSON.stringify(out));
"""

PHP_SNIPPET = """\
function verifySignature($body, $signature, $secret) {
    $expected = hash_hmac('sha256', $body, $secret);
    return hash_equals($expected, $signature);
}
"""

PHP_DRIVER = """
$out = [];
$dir = $argv[1];
$names = scandir($dir);
sort($names);
foreach ($names as $name) {
    if ($name === '.' || $name === '..') continue;
    $c = $dir . '/' . $name;
    $out[] = verifySignature(file_get_contents("$c/body"), file_get_contents("$c/signature"),
                             file_get_contents("$c/secret"));
}
echo json_encode($out), "\\n";
"""

# (secret, body, signature, expected verdict): correct ones and near misses.
SECRETS = [SECRET_A, SECRET_B, "plain-secret-without-prefix", "sécret ✓ non-ascii"]


def cases() -> list[tuple[str, bytes, str, bool]]:
    out: list[tuple[str, bytes, str, bool]] = []
    for secret in SECRETS:
        for body in BODIES:
            sig = legacy_signature(secret, body)
            out.append((secret, body, sig, True))
            flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
            out.append((secret, body, flipped, False))
            out.append((secret + "x", body, sig, False))
            out.append((secret, body + b" ", sig, False))
    return out


def write_cases(root: Path, items: list[tuple[str, bytes, str, bool]]) -> Path:
    base = root / "cases"
    for i, (secret, body, sig, _) in enumerate(items):
        c = base / f"{i:04d}"
        c.mkdir(parents=True)
        (c / "secret").write_text(secret, encoding="utf-8")
        (c / "body").write_bytes(body)
        (c / "signature").write_text(sig, encoding="ascii")
    return base


# -- secrets ----------------------------------------------------------------------------------------


def test_generate_secret_shape() -> None:
    secrets = {generate_secret() for _ in range(100)}
    assert len(secrets) == 100
    for s in secrets:
        assert s.startswith(SECRET_PREFIX) and SECRET_PREFIX == "whsec_"
        raw = base64.b64decode(s[len(SECRET_PREFIX):], validate=True)
        assert len(raw) == 32
        assert base64.b64encode(raw).decode() == s[len(SECRET_PREFIX):]  # standard, padded base64


# -- legacy X-Webhook-Signature ---------------------------------------------------------------------


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_legacy_signature_is_accepted_by_the_documented_python_snippet(secret: str, body: bytes) -> None:
    sig = legacy_signature(secret, body)
    assert len(sig) == 64 and sig == sig.lower() and int(sig, 16) >= 0
    assert doc_python_verify(body, sig, secret)
    assert not doc_python_verify(body + b"x", sig, secret)
    assert not doc_python_verify(body, sig, secret + "x")


def test_legacy_signature_known_value() -> None:
    # RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    assert legacy_signature("Jefe", b"what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_legacy_signature_is_accepted_by_the_documented_node_snippet(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: cannot run the documentation's Node.js snippet")
    items = cases()
    base = write_cases(tmp_path, items)
    script = tmp_path / "verify.js"
    script.write_text(NODE_SNIPPET + NODE_DRIVER, encoding="utf-8")
    result = subprocess.run([node, str(script), str(base)], capture_output=True, text=True, timeout=30,
                            check=True)
    verdicts = json.loads(result.stdout)
    assert verdicts == [[expected, expected] for *_, expected in items]


def test_legacy_signature_is_accepted_by_the_documented_php_snippet(tmp_path: Path) -> None:
    php = shutil.which("php")
    if php is None:
        pytest.skip("php is not on PATH: cannot run the documentation's PHP snippet")
    items = cases()
    base = write_cases(tmp_path, items)
    script = tmp_path / "verify.php"
    script.write_text("<?php\n" + PHP_SNIPPET + PHP_DRIVER, encoding="utf-8")
    result = subprocess.run([php, str(script), str(base)], capture_output=True, text=True, timeout=30,
                            check=True)
    assert json.loads(result.stdout) == [expected for *_, expected in items]


# -- Standard Webhooks ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", BODIES[:N_JSON], ids=range(N_JSON))
def test_standard_signature_matches_the_reference_library(body: bytes) -> None:
    ts = 1771842602
    ours = standard_signature(SECRET_A, "evt_01jb", ts, body)
    theirs = Webhook(SECRET_A).sign("evt_01jb", datetime.fromtimestamp(ts, tz=UTC), body.decode())
    assert ours == theirs
    assert ours.startswith("v1,") and len(base64.b64decode(ours[3:], validate=True)) == 32


def test_standard_signature_accepts_a_secret_without_prefix_or_padding() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    sig = standard_signature("whsec_" + key, "id", 1, b"{}")
    assert standard_signature(key, "id", 1, b"{}") == sig
    assert standard_signature("whsec_" + key.rstrip("="), "id", 1, b"{}") == sig


@pytest.mark.parametrize("bad", ["whsec_", "whsec_!!!notbase64", "whsec_a"])
def test_standard_signature_refuses_unusable_secrets(bad: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        standard_signature(bad, "id", 1, b"{}")
    with pytest.raises(ValueError, match="secret"):
        Signer([bad])


def headers_for(signer: Signer, body: bytes, *, ts: int | None = None) -> dict[str, str]:
    return signer.headers(event_id="evt_01jbtest", event_type="bounced", body=body,
                          timestamp=int(time.time()) if ts is None else ts, user_agent="webhookd/0.1.0")


@pytest.mark.parametrize("body", BODIES[:N_JSON], ids=range(N_JSON))
def test_signer_headers_verify_with_standardwebhooks(body: bytes) -> None:
    headers = headers_for(Signer([SECRET_B]), body)
    assert Webhook(SECRET_B).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_C).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(body + b" ", headers)
    tampered = {**headers, "webhook-id": "evt_other"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(body, tampered)


@pytest.mark.parametrize("body", BODIES[:N_JSON], ids=range(N_JSON))
def test_during_rotation_each_secret_alone_verifies(body: bytes) -> None:
    signer = Signer([SECRET_C, SECRET_B, SECRET_A])  # newest first
    headers = headers_for(signer, body)
    sigs = headers["webhook-signature"].split(" ")
    assert len(sigs) == 3 and all(s.startswith("v1,") for s in sigs)
    for secret in (SECRET_A, SECRET_B, SECRET_C):
        assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)
    # The legacy header has room for one signature: the newest secret's.
    assert doc_python_verify(body, headers["X-Webhook-Signature"], SECRET_C)
    assert not doc_python_verify(body, headers["X-Webhook-Signature"], SECRET_B)


def test_signer_headers_are_complete() -> None:
    body = BODIES[1]
    headers = headers_for(Signer([SECRET_B, SECRET_A]), body, ts=1771842602)
    assert headers == {
        "Content-Type": "application/json",
        "User-Agent": "webhookd/0.1.0",
        "X-Webhook-Signature": legacy_signature(SECRET_B, body),
        "X-Webhook-Event": "bounced",
        "X-Webhook-Id": "evt_01jbtest",
        "webhook-id": "evt_01jbtest",
        "webhook-timestamp": "1771842602",
        "webhook-signature": standard_signature(SECRET_B, "evt_01jbtest", 1771842602, body) + " "
        + standard_signature(SECRET_A, "evt_01jbtest", 1771842602, body),
    }
    assert all(isinstance(v, str) and "\n" not in v for v in headers.values())


def test_signer_reuses_its_keys_without_carrying_state_between_calls() -> None:
    signer = Signer([SECRET_B, SECRET_A])
    first = headers_for(signer, BODIES[0], ts=100)
    headers_for(signer, BODIES[1], ts=200)
    assert headers_for(signer, BODIES[0], ts=100) == first
    assert headers_for(Signer([SECRET_B, SECRET_A]), BODIES[0], ts=100) == first


def test_signer_timestamp_is_part_of_the_signature() -> None:
    signer = Signer([SECRET_B])
    a = headers_for(signer, BODIES[0], ts=100)
    b = headers_for(signer, BODIES[0], ts=101)
    assert a["webhook-signature"] != b["webhook-signature"]
    assert a["X-Webhook-Signature"] == b["X-Webhook-Signature"]  # the legacy one covers the body only


def test_signer_rejects_timestamps_outside_tolerance_via_the_library() -> None:
    headers = headers_for(Signer([SECRET_B]), BODIES[0], ts=int(time.time()) - 3600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET_B).verify(BODIES[0], headers)


@pytest.mark.parametrize("bad", [[], (), "whsec_abc="])
def test_signer_needs_at_least_one_secret(bad: list[str] | tuple[str, ...] | str) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Signer(bad)


def test_a_batch_body_is_signed_like_any_body_and_each_element_keeps_its_payload() -> None:
    batch_id = batching.batch_id("wh_1", ["evt_01jb0", "evt_01jb1", "evt_01jb2"])
    headers = Signer([SECRET_B]).headers(event_id=batch_id, event_type=batching.EVENT_TYPE, body=BATCH,
                                         timestamp=int(time.time()), user_agent="webhookd/0.1.0")
    assert headers["webhook-id"] == headers["X-Webhook-Id"] == batch_id
    assert doc_python_verify(BATCH, headers["X-Webhook-Signature"], SECRET_B)
    elements = Webhook(SECRET_B).verify(BATCH, headers)
    assert [e["id"] for e in elements] == ["evt_01jb0", "evt_01jb1", "evt_01jb2"]
    assert [{k: v for k, v in e.items() if k != "id"} for e in elements] == [json.loads(b) for b in BODIES[:3]]
    with pytest.raises(WebhookVerificationError):  # the batch id is signed: another id does not verify
        Webhook(SECRET_B).verify(BATCH, {**headers, "webhook-id": "evt_01jb0"})
