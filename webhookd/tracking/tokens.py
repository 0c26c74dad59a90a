"""Tracking tokens: signed, self-contained, no database.

A token is ``base64url(version | key id | payload | mac)`` without padding, where

- ``version`` is one byte (1),
- ``key id`` two bytes, big-endian: which key of the key ring signed it,
- ``payload`` a compact JSON array ``[kind, message_id, to, url, issued_at, to_hash]``
  (``kind`` "o" for the pixel, "c" for a link; empty strings for absent values),
- ``mac`` the first 16 bytes (128 bits) of HMAC-SHA256 under that key, over
  ``LABEL | version | key id | payload``. The label separates these MACs from any other
  use of the same key.

Links never expire and never name a webhook: a link in a mail read years later still
redirects, whatever the webhooks are by then. Keys live in one JSON file in
``state_dir`` (mode 0600, written atomically); `KeyRing.rotate` adds a key and signs
with it from then on; every older key still verifies. Comparisons are constant-time.

When the recipient is left out of tokens (``tracking.include_recipient = false``),
the token carries a keyed hash of the address instead, so that opt-outs still apply
and the address cannot be read back from the link.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import orjson

from webhookd.config import TRACKING_KEYS_FILE

VERSION = 1
LABEL = b"webhookd/tracking-token/v1\x00"
MAC_BYTES = 16
KEY_BYTES = 32
MAX_TOKEN_CHARS = 4096  # longer tokens are refused before decoding
MAX_URL_CHARS = 2048
MAX_MESSAGE_ID_CHARS = 998  # the longest a header line may be
KEYS_FILE = TRACKING_KEYS_FILE

Kind = Literal["open", "click"]
_KIND_CODE: dict[str, str] = {"open": "o", "click": "c"}
_CODE_KIND: dict[str, Kind] = {"o": "open", "c": "click"}


class TokenError(ValueError):
    """A token that does not verify; the message says why (for logs, never for visitors)."""


class KeyFileError(Exception):
    """The key file cannot be read, parsed or written; the message names the file."""


@dataclass(frozen=True, slots=True)
class Claims:
    kind: Kind
    message_id: str
    to: str = ""  # the recipient, when tokens include it
    url: str = ""  # clicks only
    issued_at: int = 0
    to_hash: str = ""  # hex keyed hash of the recipient when `to` is left out

    @property
    def recipient_key(self) -> str:
        """What identifies the recipient without revealing it: the hash, or the address folded."""
        return self.to_hash or self.to.lower()


_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def check_url(url: str) -> str:
    """A URL a link may redirect to: absolute http(s) with a host, no control characters."""
    if not isinstance(url, str) or not url:
        raise ValueError("url must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"url is longer than {MAX_URL_CHARS} characters")
    if not _VISIBLE_ASCII.fullmatch(url):
        raise ValueError("url contains spaces, control or non-ASCII characters (percent-encode them)")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError("url must start with http:// or https://")
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if not host or host.startswith(("@", ":")) or "\\" in url:
        raise ValueError("url has no host")
    return url


def ascii_url(url: str) -> str:
    """Non-ASCII characters percent-encoded as UTF-8 (what a browser sends for an IRI)."""
    if url.isascii():
        return url
    return "".join(ch if ch.isascii() else quote(ch, safe="") for ch in url)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64decode(text: str) -> bytes:
    if not text or len(text) > MAX_TOKEN_CHARS or not _B64_ALPHABET.issuperset(text) or len(text) % 4 == 1:
        raise TokenError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None


class KeyRing:
    """The signing keys (id → secret), the current one, and the opt-out hash salt."""

    def __init__(self, keys: dict[int, bytes], current: int, salt: bytes, path: Path | None = None) -> None:
        if current not in keys:
            raise KeyFileError("the current key is not in the key ring")
        self.keys = dict(keys)
        self.current = current
        self.salt = salt
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0

    # -- files --------------------------------------------------------------------------------
    @classmethod
    def generate(cls, path: Path | None = None) -> KeyRing:
        return cls({1: secrets.token_bytes(KEY_BYTES)}, 1, secrets.token_bytes(KEY_BYTES), path)

    @classmethod
    def load(cls, path: Path, *, create: bool = False) -> KeyRing:
        """The key ring in `path`; with `create`, a new one is written when there is none."""
        try:
            raw = path.read_bytes()
            st = os.stat(path)
        except FileNotFoundError:
            if not create:
                raise KeyFileError(
                    f"no tracking key file at {path} (`webhookd tracking rotate-key` creates one)"
                ) from None
            ring = cls.generate(path)
            try:
                ring.save(exclusive=True)
            except FileExistsError:  # another process made it first: use theirs
                return cls.load(path)
            return ring
        except OSError as exc:
            raise KeyFileError(f"cannot read tracking key file {path}: {exc.strerror}") from None
        ring = cls._parse(raw, path)
        ring._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return ring

    @classmethod
    def _parse(cls, raw: bytes, path: Path) -> KeyRing:
        try:
            doc = orjson.loads(raw)
            keys = {int(k["id"]): base64.b64decode(k["secret"], validate=True) for k in doc["keys"]}
            current = int(doc["current"])
            salt = base64.b64decode(doc["opt_out_salt"], validate=True)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error):
            raise KeyFileError(f"tracking key file {path} is not a valid key file") from None
        if not keys or any(len(s) < 16 for s in keys.values()) or len(salt) < 16:
            raise KeyFileError(f"tracking key file {path} holds a key shorter than 16 bytes")
        if any(not 0 < k < 65536 for k in keys):
            raise KeyFileError(f"tracking key file {path} holds a key id outside 1..65535")
        if current not in keys:
            raise KeyFileError(f"tracking key file {path} signs with key {current}, which it does not hold")
        return cls(keys, current, salt, path)

    def save(self, *, exclusive: bool = False) -> None:
        """Write atomically (temporary file, fsync, rename), mode 0600 — or, for an
        existing file, its own mode and group (an operator may have granted a group read)."""
        if self.path is None:
            raise KeyFileError("this key ring has no file")
        path = self.path
        doc = {
            "version": 1,
            "current": self.current,
            "keys": [{"id": k, "secret": base64.b64encode(v).decode()} for k, v in sorted(self.keys.items())],
            "opt_out_salt": base64.b64encode(self.salt).decode(),
        }
        mode, gid = 0o600, -1
        try:
            st = os.stat(path)
            mode, gid = stat.S_IMODE(st.st_mode) & 0o640, st.st_gid
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise KeyFileError(f"cannot read tracking key file {path}: {exc.strerror}") from None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                if gid != -1:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)
                os.write(fd, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(tmp, path)  # fails with FileExistsError if someone else made it
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise KeyFileError(f"cannot write tracking key file {path}: {exc.strerror}") from None
        st = os.stat(path)
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def rotate(self) -> int:
        """Add a key, sign with it from now on, save. Returns its id."""
        new = max(self.keys) + 1
        if new >= 65536:
            raise KeyFileError("no key ids left (65535 keys)")
        self.keys[new] = secrets.token_bytes(KEY_BYTES)
        self.current = new
        self.save()
        return new

    def refresh(self, *, now: float | None = None, every: float = 1.0) -> bool:
        """Reload when the file changed (another process rotated); at most once per `every`
        seconds. Returns whether keys were reloaded. Errors keep the keys in memory."""
        if self.path is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._checked < every:
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
            if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
                return False
            fresh = KeyRing.load(self.path)
        except (OSError, KeyFileError):
            return False
        self.keys, self.current, self.salt, self._stamp = fresh.keys, fresh.current, fresh.salt, fresh._stamp
        return True

    # -- tokens -------------------------------------------------------------------------------
    def recipient_hash(self, address: str) -> str:
        """A keyed hash of an address (case folded): what opt-outs store and tokens may carry."""
        return hmac.new(self.salt, address.strip().lower().encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def sign(self, claims: Claims) -> str:
        payload = orjson.dumps([
            _KIND_CODE[claims.kind], claims.message_id, claims.to, claims.url, int(claims.issued_at), claims.to_hash,
        ])
        head = bytes([VERSION]) + self.current.to_bytes(2, "big") + payload
        mac = hmac.new(self.keys[self.current], LABEL + head, hashlib.sha256).digest()[:MAC_BYTES]
        return _b64encode(head + mac)

    def claims(
        self, kind: Kind, message_id: str, *, to: str = "", url: str = "", include_recipient: bool = True,
        now: float | None = None,
    ) -> Claims:
        """Claims for a new token, checked: a message id, an http(s) URL for clicks."""
        if not message_id.strip() or len(message_id) > MAX_MESSAGE_ID_CHARS:
            raise ValueError(f"message id must be 1 to {MAX_MESSAGE_ID_CHARS} characters")
        if kind == "click":
            url = check_url(ascii_url(url.strip()))
        elif url:
            raise ValueError("a pixel carries no url")
        issued = int(time.time() if now is None else now)
        if to and not include_recipient:
            return Claims(kind, message_id, "", url, issued, self.recipient_hash(to))
        return Claims(kind, message_id, to, url, issued)

    def verify(self, token: str, kind: Kind) -> Claims:
        """The claims of a token of `kind`, or TokenError. Never trusts anything unsigned."""
        raw = _b64decode(token)
        if len(raw) < 3 + MAC_BYTES + 2:
            raise TokenError("too short")
        if raw[0] != VERSION:
            raise TokenError(f"unknown version {raw[0]}")
        key_id = int.from_bytes(raw[1:3], "big")
        key = self.keys.get(key_id)
        if key is None and self.refresh(every=0.0):  # a rotation by another process: look now
            key = self.keys.get(key_id)
        if key is None:
            raise TokenError(f"unknown key id {key_id}")
        head, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        expected = hmac.new(key, LABEL + head, hashlib.sha256).digest()[:MAC_BYTES]
        if not hmac.compare_digest(mac, expected):
            raise TokenError("bad signature")
        # Signed by us: the payload is ours, but check its shape anyway.
        try:
            code, message_id, to, url, issued, to_hash = orjson.loads(head[3:])
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise TokenError("malformed payload") from None
        if not (isinstance(code, str) and isinstance(message_id, str) and isinstance(to, str)
                and isinstance(url, str) and isinstance(issued, int) and isinstance(to_hash, str)):
            raise TokenError("malformed payload")
        if _CODE_KIND.get(code) != kind:
            raise TokenError(f"not a {kind} token")
        if not message_id:
            raise TokenError("no message id")
        if kind == "click":
            try:
                check_url(url)
            except ValueError as exc:
                raise TokenError(f"refused url: {exc}") from None
        return Claims(kind, message_id, to, url, issued, to_hash)


def key_file(state_dir: Path) -> Path:
    return state_dir / KEYS_FILE
