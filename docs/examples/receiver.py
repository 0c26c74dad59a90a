"""A minimal webhook receiver for trying webhookd out (standard library only).

    python3 docs/examples/receiver.py 8080 'whsec_...'

Prints each request and whether its X-Webhook-Signature verifies, using the
verification code from the original webhook documentation.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def verify_signature(payload_body: bytes, signature: str, secret: str) -> bool:
    expected = hmac.new(secret.encode(), payload_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


class Handler(BaseHTTPRequestHandler):
    secret = ""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        ok = verify_signature(body, self.headers.get("X-Webhook-Signature", ""), self.secret)
        print(f"{self.headers.get('X-Webhook-Event')} id={self.headers.get('webhook-id')} "
              f"signature={'valid' if ok else 'INVALID'}\n  {body.decode()}", flush=True)
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port, Handler.secret = int(sys.argv[1]), sys.argv[2]
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
