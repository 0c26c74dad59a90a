"""Scoped API tokens: who a request on the admin HTTP listener is (a `Principal`).

A token is ``wht_`` + 32 random bytes (base64url), shown once when made. Only its
SHA-256 is stored: the token carries 256 bits of entropy, so no password hash (bcrypt,
scrypt, argon2) is needed to make a stolen table useless; a slow hash protects guessable
secrets, and these are not guessable. A presented token is hashed and looked up by that
hash; the stored hash is then compared with `hmac.compare_digest`. (The index lookup's
timing can only reveal something about the SHA-256 of the guess, which says nothing about
any valid token.)

The admin token and the admin Unix socket are the `ADMIN` principal (every right). A
scoped token is a principal with sender domains D and maybe read-only; what it may see
and do is decided in webhookd/admin.py (`ROUTES` and `Scope`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from webhookd.filters import WebhookFilter, lies_within
from webhookd.store.base import Storage
from webhookd.store.model import ApiToken
from webhookd.webhooks import Webhook

log = structlog.get_logger("webhookd.tokens")

PREFIX = "wht_"
TOUCH_EVERY = 60.0  # last_used_at is written at most once a minute per token


def new_token() -> str:
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: the admin (every right), or a scoped token."""

    admin: bool
    domains: tuple[str, ...] = ()
    read_only: bool = False
    token_id: str | None = None

    def sees(self, wh: Webhook) -> bool:
        return self.admin or self.covers(wh.filter)

    def covers(self, f: WebhookFilter) -> bool:
        """May this principal own a webhook with filter `f`? (Its sender domains lie within D.)"""
        return self.admin or lies_within(f, self.domains)


ADMIN = Principal(admin=True)
NOBODY = Principal(admin=False)  # sees nothing (no domains)


class TokenAuth:
    """Checks presented scoped tokens against the storage, and records their last use in
    batches: at most one write a minute per token, whatever the request rate."""

    def __init__(self, storage: Storage, clock: Callable[[], float]) -> None:
        self.storage = storage
        self.clock = clock
        self._touched: dict[str, float] = {}  # token id → when last_used_at was last written
        self._pending: dict[str, float] = {}
        self._flush: asyncio.Task[None] | None = None

    async def principal(self, presented: str) -> Principal | None:
        """The principal of a presented token, or None (unknown, malformed or revoked)."""
        if not presented.startswith(PREFIX) or len(presented) > 256:
            return None
        return await self.principal_by_hash(token_hash(presented))

    async def principal_by_hash(self, digest: str) -> Principal | None:
        """The same, from the token's SHA-256 (what a dashboard session keeps, to see a
        revocation at its next request)."""
        found = await self.storage.token_by_hash(digest)
        if found is None or not hmac.compare_digest(found.hash.encode(), digest.encode()):
            return None
        if found.revoked_at is not None:
            return None
        self._used(found)
        return Principal(admin=False, domains=found.domains, read_only=found.read_only, token_id=found.id)

    def _used(self, token: ApiToken) -> None:
        now = self.clock()
        last = self._touched.get(token.id)
        if last is not None and now - last < TOUCH_EVERY:
            return
        self._touched[token.id] = now
        self._pending[token.id] = now
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        await asyncio.sleep(0)  # gather every use of this loop turn into one write
        while self._pending:  # and the uses that came while it was being written
            used, self._pending = list(self._pending.items()), {}
            try:
                await self.storage.touch_tokens(used)
            except Exception as exc:
                log.warning("token last use not recorded", error=str(exc))

    async def drain(self) -> None:
        """Wait for the last-use write in flight (tests, shutdown)."""
        if self._flush is not None:
            await self._flush


def token_json(t: ApiToken) -> dict[str, object]:
    from webhookd.events import format_timestamp

    return {
        "id": t.id, "domains": list(t.domains), "read_only": t.read_only, "description": t.description,
        "created_at": format_timestamp(t.created_at),
        "last_used_at": format_timestamp(t.last_used_at) if t.last_used_at is not None else None,
        "revoked_at": format_timestamp(t.revoked_at) if t.revoked_at is not None else None,
    }
