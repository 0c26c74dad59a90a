"""Machine-open and bot heuristics (webhookd.tracking.classify): a table of real-world requests.

Advisory only, so the interesting failures are a person flagged as a machine (a normal
browser open), a machine let through, and the wrong label when several signals apply.
"""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from webhookd.tracking.classify import classify

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/17.5 Mobile/15E148 Safari/604.1")
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
THUNDERBIRD = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.12.0"
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
PERSON_IP = "198.51.100.23"


def verdict(kind: str = "open", *, method: str = "GET", ua: str = FIREFOX, headers: dict[str, str] | None = None,
            ip: str = PERSON_IP, since: float | None = None, links: int = 1, machine_click: float = 10.0) -> Any:
    return classify(
        kind=kind,  # type: ignore[arg-type]
        method=method, user_agent=ua, headers=CIMultiDict(headers or {}), ip=ip,
        seconds_since_delivered=since, links_in_last_second=links, machine_click_seconds=machine_click,
    )


# (id, arguments, expected bot) — one signal each
SINGLE: list[tuple[str, dict[str, Any], str | None]] = [
    ("firefox open", {}, None),
    ("chrome open", {"ua": CHROME}, None),
    ("iphone open", {"ua": IPHONE}, None),
    ("outlook open", {"ua": OUTLOOK}, None),
    ("thunderbird open", {"ua": THUNDERBIRD}, None),
    ("firefox click", {"kind": "click"}, None),
    ("chrome click an hour after delivery", {"kind": "click", "ua": CHROME, "since": 3600}, None),
    ("open seconds after delivery is a person reading at once", {"since": 1}, None),
    ("click exactly at the limit", {"kind": "click", "since": 10}, None),
    ("ipv6 person", {"ip": "2001:db8::17"}, None),
    ("address that is no address", {"ip": "not-an-ip"}, None),
    ("HEAD", {"method": "HEAD"}, "head"),
    ("head lower case", {"method": "head"}, "head"),
    ("HEAD click", {"kind": "click", "method": "HEAD"}, "head"),
    ("Purpose: prefetch", {"headers": {"Purpose": "prefetch"}}, "prefetch"),
    ("purpose lower-case name", {"headers": {"purpose": "prefetch"}}, "prefetch"),
    ("Sec-Purpose: prefetch", {"headers": {"Sec-Purpose": "prefetch"}}, "prefetch"),
    ("Sec-Purpose: prefetch;prerender", {"headers": {"Sec-Purpose": "prefetch;prerender"}}, "prefetch"),
    ("X-Purpose: preview", {"headers": {"X-Purpose": "preview"}}, "prefetch"),
    ("X-Moz: prefetch", {"headers": {"X-Moz": "prefetch"}}, "prefetch"),
    ("Purpose: PREFETCH", {"headers": {"Purpose": "PREFETCH"}}, "prefetch"),
    ("bare Mozilla/5.0", {"ua": "Mozilla/5.0"}, "apple_mpp"),
    ("bare Mozilla/5.0 with spaces", {"ua": "  Mozilla/5.0 "}, "apple_mpp"),
    ("Apple address", {"ip": "17.58.0.1"}, "apple_mpp"),
    ("Apple address edge", {"ip": "17.255.255.255"}, "apple_mpp"),
    ("GoogleImageProxy", {"ua": GMAIL_PROXY}, "google_proxy"),
    ("curl", {"ua": "curl/8.5.0"}, "scanner"),
    ("wget", {"ua": "Wget/1.21.4"}, "scanner"),
    ("python-requests", {"ua": "python-requests/2.31.0"}, "scanner"),
    ("aiohttp", {"ua": "Python/3.11 aiohttp/3.9.5"}, "scanner"),
    ("Go", {"ua": "Go-http-client/1.1"}, "scanner"),
    ("Barracuda", {"ua": "Mozilla/5.0 (compatible; Barracuda Sentinel)"}, "scanner"),
    ("Mimecast", {"ua": "Mimecast URL Protect"}, "scanner"),
    ("Proofpoint", {"ua": "Mozilla/5.0 Proofpoint URL Defense"}, "scanner"),
    ("Safe Links", {"ua": "Microsoft Office SafeLinks"}, "scanner"),
    ("headless chrome", {"ua": CHROME.replace("Chrome/", "HeadlessChrome/")}, "scanner"),
    ("Googlebot", {"ua": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"}, "scanner"),
    ("Slack unfurl", {"ua": "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)"}, "scanner"),
    ("empty user agent", {"ua": ""}, "scanner"),
    ("blank user agent", {"ua": "   "}, "scanner"),
    ("two links in a second", {"kind": "click", "links": 2}, "scanner"),
    ("nine links in a second", {"kind": "click", "links": 9}, "scanner"),
    ("click 3 s after delivery", {"kind": "click", "since": 3}, "scanner"),
    ("click 0 s after delivery", {"kind": "click", "since": 0}, "scanner"),
    ("click just under a custom limit", {"kind": "click", "since": 29, "machine_click": 30}, "scanner"),
]


@pytest.mark.parametrize(("args", "bot"), [pytest.param(a, b, id=i) for i, a, b in SINGLE])
def test_one_signal(args: dict[str, Any], bot: str | None) -> None:
    v = verdict(**args)
    assert v.bot == bot
    assert v.machine is (bot is not None)
    if bot is None:
        assert v.reasons == ()
    else:
        assert len(v.reasons) == 1, v.reasons
        assert all(isinstance(r, str) and r for r in v.reasons)


def test_a_normal_open_and_click_are_a_person() -> None:
    for ua in (FIREFOX, CHROME):
        for kind in ("open", "click"):
            v = verdict(kind, ua=ua, since=86400)
            assert (v.machine, v.bot, v.reasons) == (False, None, ())


def test_click_only_signals_do_not_apply_to_opens() -> None:
    assert verdict("open", links=5).bot is None  # several pixels: the same image in several parts
    assert verdict("open", since=0).bot is None  # an open at once is plausible
    assert verdict("click", since=-5).bot is None  # a clock step, not a scanner
    assert verdict("click", since=None).bot is None  # no delivered event known


def test_prefetch_headers_without_prefetch_are_nothing() -> None:
    assert verdict(headers={"Purpose": "", "Sec-Purpose": "anything", "X-Moz": "x"}).bot is None
    assert verdict(headers={"Sec-Fetch-Purpose": "prefetch"}).bot is None  # not one of the four names


def test_the_gmail_proxy_is_not_also_a_scanner() -> None:
    v = verdict(ua=GMAIL_PROXY)
    assert v.reasons == ("Gmail image proxy (GoogleImageProxy)",)


def test_reasons_say_what_was_seen() -> None:
    assert "HEAD" in verdict(method="HEAD").reasons[0]
    assert "Sec-Purpose: prefetch" in verdict(headers={"Sec-Purpose": "prefetch"}).reasons[0]
    assert "17.0.0.0/8" in verdict(ip="17.1.2.3").reasons[0]
    assert "curl/" in verdict(ua="curl/8.5.0").reasons[0]
    assert "3 links" in verdict("click", links=3).reasons[0]
    assert "3 s after delivery" in verdict("click", since=3).reasons[0]
    # a hostile header value is cut short in the reason
    long = verdict(headers={"Purpose": "prefetch" + "x" * 500}).reasons[0]
    assert len(long) < 80


# precedence: what the request says of itself first — head, prefetch, apple_mpp, google_proxy, scanner
PRECEDENCE: list[tuple[str, dict[str, Any], str, int]] = [
    ("HEAD beats everything", {"kind": "click", "method": "HEAD", "headers": {"Purpose": "prefetch"},
                               "ua": "Mozilla/5.0", "ip": "17.0.0.9", "links": 3, "since": 1}, "head", 6),
    ("prefetch beats Apple", {"headers": {"Sec-Purpose": "prefetch"}, "ua": "Mozilla/5.0"}, "prefetch", 2),
    ("Apple beats a scanner UA", {"ip": "17.1.1.1", "ua": "curl/8.0"}, "apple_mpp", 2),
    ("Apple UA and address: both reasons", {"ip": "17.1.1.1", "ua": "Mozilla/5.0"}, "apple_mpp", 2),
    ("Google beats the fast click", {"kind": "click", "ua": GMAIL_PROXY, "since": 2}, "google_proxy", 2),
    ("scanner UA and fast clicks: three reasons", {"kind": "click", "ua": "python-requests/2", "links": 4,
                                                   "since": 0}, "scanner", 3),
    ("HEAD from curl", {"method": "HEAD", "ua": "curl/8.0"}, "head", 2),
    ("empty UA on a HEAD prefetch", {"method": "HEAD", "ua": "", "headers": {"Purpose": "prefetch"}}, "head", 3),
]


@pytest.mark.parametrize(("args", "bot", "n"), [pytest.param(a, b, n, id=i) for i, a, b, n in PRECEDENCE])
def test_precedence_and_every_reason_listed(args: dict[str, Any], bot: str, n: int) -> None:
    v = verdict(**args)
    assert v.machine is True
    assert v.bot == bot
    assert len(v.reasons) == n, v.reasons
    assert len(set(v.reasons)) == n


def test_reasons_are_in_precedence_order() -> None:
    v = verdict("click", method="HEAD", headers={"Purpose": "prefetch"}, ua="Mozilla/5.0", ip="17.0.0.9",
                links=3, since=1)
    assert v.reasons[0].startswith("HEAD")
    assert v.reasons[1].startswith("Purpose")
    assert all("Apple" in r for r in v.reasons[2:4])
    assert "links" in v.reasons[4] and "after delivery" in v.reasons[5]


def test_an_ipv4_mapped_apple_address_is_apple() -> None:
    assert verdict(ip="::ffff:17.58.0.1", ua=FIREFOX).bot == "apple_mpp"


def test_a_phone_whose_name_ends_in_bot_is_a_person() -> None:
    ua = ("Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Mobile Safari/537.36")
    assert verdict(ua=ua).bot is None
