"""The dashboard's log-in state: sessions, one-time log-in links and the failed log-in limiter.

Everything lives in memory on the `Dashboard` (shared by every admin listener) and is
lost on restart, which only logs people out. Tokens are `secrets.token_urlsafe(32)`;
only their SHA-256 is kept, so a memory dump or a debug print of the tables reveals no
usable token. Every comparison with a secret value goes through `hmac.compare_digest`.
All times come from the injected clock.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from webhookd.tokens import ADMIN, Principal

MAX_SESSIONS = 1000
MAX_LINKS = 100
UNIX_BUCKET = "unix-socket"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time equality of two strings."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


@dataclass
class SecretFlash:
    """A signing secret to show once, on the next view of its webhook's page."""

    webhook_id: str
    secret: str
    kind: str  # "created", "rotated" or "revealed"
    previous_valid_until: float | None = None


@dataclass
class TestFlash:
    """The outcome of a test event, for the next view of its webhook's page."""

    webhook_id: str
    event_type: str
    ok: bool
    status_code: int | None
    duration_ms: float
    body: str
    error: str | None


@dataclass
class Session:
    key: str  # sha256 of the cookie's token
    csrf: str
    created_at: float
    expires_at: float
    flashes: list[tuple[str, str]] = field(default_factory=list)  # (level, text): "ok" or "error"
    secret: SecretFlash | None = None
    test: TestFlash | None = None
    principal: Principal = ADMIN  # a scoped API token's log-in: its domains and read-only
    token_hash: str | None = None  # that token's SHA-256: checked at each request (revocation)

    def flash(self, text: str, level: str = "ok") -> None:
        self.flashes.append((level, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        out, self.flashes = self.flashes, []
        return out

    def take_secret(self, webhook_id: str) -> SecretFlash | None:
        found = self.secret
        if found is None or found.webhook_id != webhook_id:
            return None
        self.secret = None
        return found

    def take_test(self, webhook_id: str) -> TestFlash | None:
        found = self.test
        if found is None or found.webhook_id != webhook_id:
            return None
        self.test = None
        return found


class Sessions:
    """Server-side sessions with an absolute expiry; the cookie carries only the token."""

    def __init__(self, ttl: float, clock: Callable[[], float], limit: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.clock = clock
        self.limit = limit
        self._by_key: OrderedDict[str, Session] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._by_key)

    def keys(self) -> list[str]:
        return list(self._by_key)

    def create(self, principal: Principal = ADMIN, token_hash: str | None = None) -> tuple[str, Session]:
        now = self.clock()
        self._prune(now)
        while len(self._by_key) >= self.limit:
            self._by_key.popitem(last=False)
        token = new_token()
        session = Session(key=digest(token), csrf=new_token(), created_at=now, expires_at=now + self.ttl,
                          principal=principal, token_hash=token_hash)
        self._by_key[session.key] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 256:
            return None
        key = digest(token)
        session = self._by_key.get(key)
        if session is None or not same(session.key, key):
            return None
        if self.clock() >= session.expires_at:
            del self._by_key[key]
            return None
        return session

    def revoke(self, token: str | None) -> bool:
        if not token:
            return False
        return self._by_key.pop(digest(token), None) is not None

    def _prune(self, now: float) -> None:
        for key in [k for k, s in self._by_key.items() if now >= s.expires_at]:
            del self._by_key[key]


class LoginLinks:
    """One-time log-in links: valid for `ttl` seconds, consumed by their first use."""

    def __init__(self, ttl: float, clock: Callable[[], float], limit: int = MAX_LINKS) -> None:
        self.ttl = ttl
        self.clock = clock
        self.limit = limit
        self._expiry: OrderedDict[str, float] = OrderedDict()  # sha256 of the token → expires at

    def __len__(self) -> int:
        return len(self._expiry)

    def keys(self) -> list[str]:
        return list(self._expiry)

    def create(self) -> tuple[str, float]:
        now = self.clock()
        for key in [k for k, exp in self._expiry.items() if now >= exp]:
            del self._expiry[key]
        while len(self._expiry) >= self.limit:
            self._expiry.popitem(last=False)
        token = new_token()
        expires = now + self.ttl
        self._expiry[digest(token)] = expires
        return token, expires

    def consume(self, token: str) -> bool:
        """Whether `token` is a valid link; it is spent either way."""
        if not token or len(token) > 256:
            return False
        key = digest(token)
        expires = self._expiry.pop(key, None)
        return expires is not None and self.clock() < expires


class FailedLogins:
    """Failed log-ins in a sliding window: at most `per_client` per client address and
    `overall` in all, per `window` seconds. Clients without an address (the admin Unix
    socket, and so every SSH tunnel to it) share one bucket."""

    def __init__(
        self, clock: Callable[[], float], *, per_client: int = 5, overall: int = 30, window: float = 60.0
    ) -> None:
        self.clock = clock
        self.per_client = per_client
        self.overall = overall
        self.window = window
        self._by_client: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _trim(self, now: float) -> None:
        cutoff = now - self.window
        while self._all and self._all[0] <= cutoff:
            self._all.popleft()
        for client in list(self._by_client):
            times = self._by_client[client]
            while times and times[0] <= cutoff:
                times.popleft()
            if not times:
                del self._by_client[client]

    def blocked(self, client: str) -> tuple[str, float] | None:
        """(which limit, seconds until a log-in may be tried again), or None if allowed."""
        now = self.clock()
        self._trim(now)
        times = self._by_client.get(client)
        if times is not None and len(times) >= self.per_client:
            return "client", max(1.0, times[0] + self.window - now)
        if len(self._all) >= self.overall:
            return "overall", max(1.0, self._all[0] + self.window - now)
        return None

    def failed(self, client: str) -> None:
        now = self.clock()
        self._trim(now)
        self._by_client.setdefault(client, deque()).append(now)
        self._all.append(now)


def client_bucket(remote: str | None) -> str:
    """The rate-limit bucket of a peer: its IP address, or one shared bucket for a Unix socket."""
    if not remote:
        return UNIX_BUCKET
    try:
        return str(ipaddress.ip_address(remote))
    except ValueError:
        return UNIX_BUCKET
