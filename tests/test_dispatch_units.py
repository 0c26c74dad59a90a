"""Pure parts of delivery: outcome classification, Retry-After, the address guard."""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest

from webhookd.dispatcher import Failure, Outcome, classify_exception, classify_status, parse_retry_after
from webhookd.netguard import TargetGuard, TargetRefused, refusal_reason
from webhookd.policy import water_level
from webhookd.reasons import Reason


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_success(status: int) -> None:
    assert classify_status(status) is None


@pytest.mark.parametrize(
    ("status", "reason"),
    [(500, "HTTP 500"), (404, "HTTP 404"), (418, "HTTP 418"), (199, "HTTP 199")],
)
def test_other_statuses_fail(status: int, reason: str) -> None:
    assert classify_status(status) == Failure(Reason.HTTP_STATUS, reason)


def test_redirect_names_its_target() -> None:
    assert classify_status(301, "https://x/y") == Failure(
        Reason.REDIRECT, "HTTP 301: redirect to https://x/y not followed"
    )
    assert classify_status(307) == Failure(Reason.REDIRECT, "HTTP 307: redirect not followed")


def test_exceptions_read_well() -> None:
    assert classify_exception(TimeoutError(), 10, 5) == Failure(Reason.TIMEOUT, "timeout after 10s")
    assert classify_exception(aiohttp.ServerDisconnectedError(), 10, 5).text.startswith("server disconnected")
    assert classify_exception(TargetRefused("127.0.0.1 is loopback"), 10, 5).text.startswith("target refused")
    assert classify_exception(RuntimeError("boom"), 10, 5) == Failure(
        Reason.OTHER, "unexpected error: RuntimeError: boom"
    )


def test_outcome_reason_is_none_exactly_on_success() -> None:
    ok = Outcome(success=True, status_code=204, error=None, duration_ms=1.0, response_body=b"")
    assert ok.reason is None
    # a failure built the old way, without its reason, still counts as a failure
    old = Outcome(success=False, status_code=500, error="HTTP 500", duration_ms=1.0, response_body=b"")
    assert old.reason is Reason.OTHER
    with pytest.raises(ValueError, match="no failure reason"):
        Outcome(success=True, status_code=200, error=None, duration_ms=1.0, response_body=b"",
                reason=Reason.TIMEOUT)


def test_retry_after_forms() -> None:
    assert parse_retry_after("120", 0) == 120.0
    assert parse_retry_after(None, 0) is None
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60.0


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
        "::1", "::", "fe80::1", "fc00::1", "ff02::1",
        "::ffff:127.0.0.1",        # IPv4-mapped
        "2002:7f00:1::1",          # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",       # 6to4 of 169.254.169.254
        "64:ff9b::a00:1",          # NAT64 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo client 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is not None
    with pytest.raises(TargetRefused):
        TargetGuard().check(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"])
def test_public_addresses_pass(address: str) -> None:
    TargetGuard().check(address)


def test_allow_targets_exempt_networks() -> None:
    guard = TargetGuard(["10.1.0.0/16", "hooks.internal"])
    guard.check("10.1.2.3")
    with pytest.raises(TargetRefused):
        guard.check("10.2.0.1")
    assert guard.host_allowed("HOOKS.internal.")


@pytest.mark.parametrize(
    ("total", "wants", "level"),
    [
        (512, [], 512),  # nobody busy: nothing binds
        (512, [32], 512),
        (512, [4] * 50 + [32], 512),  # 232 wanted: every want fits
        (512, [32] * 51, 10),  # all busy and healthy: an equal split
        (40, [4, 4, 4, 4, 16], 40),
        (8, [4, 4, 4, 4], 2),  # hanging webhooks and a healthy one on few slots
        (20, [2, 2, 30, 30], 8),  # the small wants are served, the rest shared
        (10, [1, 1, 1, 100], 7),
        (3, [5, 5, 5, 5, 5], 1),  # never below one slot
        (100, [60, 60], 50),
    ],
)
def test_water_level_is_max_min_fair(total: int, wants: list[int], level: int) -> None:
    assert water_level(total, wants) == level
    if sum(wants) > total:
        assert sum(min(w, level) for w in wants) <= total or level == 1
