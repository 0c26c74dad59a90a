"""HTTP side of a delivery: one shared aiohttp session, bounded reads, and the
one place where an attempt's result is classified as success or failure."""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from webhookd.config import DeliveryConfig
from webhookd.netguard import TargetGuard, TargetRefused, host_exempt
from webhookd.reasons import Reason


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed: its kind (the metric label) and the text stored as last_error."""

    reason: Reason
    text: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to. `reason` is None exactly when the attempt succeeded."""

    success: bool
    status_code: int | None
    error: str | None
    duration_ms: float
    response_body: bytes
    retry_after: float | None = None
    reason: Reason | None = None

    def __post_init__(self) -> None:
        if self.success:
            if self.reason is not None:
                raise ValueError(f"a successful outcome has no failure reason, got {self.reason!r}")
        elif self.reason is None:
            object.__setattr__(self, "reason", Reason.OTHER)  # a failure built without its reason


def classify_status(status: int, location: str | None = None) -> Failure | None:
    """None for success (any 2xx); otherwise why the attempt failed."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        where = f" to {location}" if location else ""
        return Failure(Reason.REDIRECT, f"HTTP {status}: redirect{where} not followed")
    return Failure(Reason.HTTP_STATUS, f"HTTP {status}")


def classify_exception(exc: BaseException, timeout: float, connect_timeout: float) -> Failure:
    """Why an attempt that produced no HTTP status failed, with a readable text."""
    if isinstance(exc, TargetRefused):
        return Failure(Reason.REFUSED, f"target refused: {exc}")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Failure(Reason.CONNECT_TIMEOUT, f"connect timeout after {connect_timeout:g}s")
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return Failure(Reason.TIMEOUT, f"timeout after {timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return Failure(Reason.TLS, f"TLS certificate error: {exc.certificate_error}")
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return Failure(Reason.TLS, f"TLS error: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, TargetRefused):
            return Failure(Reason.REFUSED, f"target refused: {cause}")
        return Failure(Reason.CONNECTION, f"connection failed: {cause.strerror or cause}")
    if isinstance(exc, aiohttp.ClientOSError):  # e.g. reset after connecting, before the response
        return Failure(Reason.CONNECTION, f"connection failed: {exc.strerror or exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Failure(Reason.PROTOCOL, "server disconnected without a complete response")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Failure(Reason.PROTOCOL, f"response body broken: {_first_line(str(exc))}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return Failure(Reason.PROTOCOL, f"invalid HTTP response: {_first_line(str(exc.message))}")
    if isinstance(exc, aiohttp.InvalidURL):
        return Failure(Reason.INVALID_URL, f"invalid URL: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return Failure(Reason.OTHER, f"{type(exc).__name__}: {exc}")
    return Failure(Reason.OTHER, f"unexpected error: {type(exc).__name__}: {exc}")


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= 12 else None
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


class Dispatcher:
    """POSTs payloads; never raises for a receiver's misbehaviour."""

    def __init__(self, cfg: DeliveryConfig, *, guard: TargetGuard | None = None) -> None:
        self.cfg = cfg
        self.guard = guard
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        ssl_ctx = ssl.create_default_context()
        if self.cfg.ca_file is not None:
            ssl_ctx.load_verify_locations(cafile=str(self.cfg.ca_file))
        kwargs: dict[str, Any] = {}
        if self.guard is not None:
            kwargs["socket_factory"] = self.guard.socket_factory
        connector = aiohttp.TCPConnector(
            limit=self.cfg.concurrency,
            limit_per_host=0,
            ssl=ssl_ctx,
            ttl_dns_cache=60,
            keepalive_timeout=30,
            **kwargs,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout, sock_connect=self.cfg.connect_timeout),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        session = self._session
        assert session is not None, "dispatcher not started"
        cfg = self.cfg
        started = time.perf_counter()
        limit = cfg.max_response_bytes
        timeout = _timeout(cfg.timeout, cfg.connect_timeout)
        token = None
        if self.guard is not None and self.guard.hosts and self.guard.host_allowed(_host(url)):
            token = host_exempt.set(True)
        try:
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as resp:
                chunks: list[bytes] = []
                size = 0
                while size < limit:
                    chunk = await resp.content.read(limit - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                if not resp.content.at_eof():
                    resp.close()  # never read past the limit; drop the connection instead
                reply = b"".join(chunks)
                failure = classify_status(resp.status, resp.headers.get("Location"))
                retry_after = None
                if resp.status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                return Outcome(
                    success=failure is None,
                    status_code=resp.status,
                    error=None if failure is None else failure.text,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    response_body=reply,
                    retry_after=retry_after,
                    reason=None if failure is None else failure.reason,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = classify_exception(exc, cfg.timeout, cfg.connect_timeout)
            return Outcome(
                success=False,
                status_code=None,
                error=failure.text,
                duration_ms=(time.perf_counter() - started) * 1000,
                response_body=b"",
                reason=failure.reason,
            )
        finally:
            if token is not None:
                host_exempt.reset(token)


@functools.lru_cache(maxsize=16)
def _timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    """One ClientTimeout per setting (a reload may change it), not one per attempt."""
    return aiohttp.ClientTimeout(total=total, sock_connect=connect)


@functools.lru_cache(maxsize=4096)
def _host(url: str) -> str:
    return urlsplit(url).hostname or ""
