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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to."""

    success: bool
    status_code: int | None
    error: str | None
    duration_ms: float
    response_body: bytes
    retry_after: float | None = None


def classify_status(status: int, location: str | None = None) -> str | None:
    """None for success (any 2xx); otherwise the reason the attempt failed."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        where = f" to {location}" if location else ""
        return f"HTTP {status}: redirect{where} not followed"
    return f"HTTP {status}"


def classify_exception(exc: BaseException, timeout: float, connect_timeout: float) -> str:
    """A readable reason for a failed attempt that produced no HTTP status."""
    if isinstance(exc, TargetRefused):
        return f"target refused: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"connect timeout after {connect_timeout:g}s"
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate error: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, TargetRefused):
            return f"target refused: {cause}"
        return f"connection failed: {cause.strerror or cause}"
    if isinstance(exc, aiohttp.ClientOSError):  # e.g. reset after connecting, before the response
        return f"connection failed: {exc.strerror or exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected without a complete response"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"response body broken: {_first_line(str(exc))}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"invalid HTTP response: {_first_line(str(exc.message))}"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"invalid URL: {exc}"
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected error: {type(exc).__name__}: {exc}"


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
                error = classify_status(resp.status, resp.headers.get("Location"))
                retry_after = None
                if resp.status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                return Outcome(
                    success=error is None,
                    status_code=resp.status,
                    error=error,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    response_body=reply,
                    retry_after=retry_after,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Outcome(
                success=False,
                status_code=None,
                error=classify_exception(exc, cfg.timeout, cfg.connect_timeout),
                duration_ms=(time.perf_counter() - started) * 1000,
                response_body=b"",
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
