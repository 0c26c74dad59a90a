"""Was it a person? Machine-open and bot heuristics for tracking hits.

Advisory only: a hit flagged here is still recorded and delivered, with `machine`,
`bot` and `bot_reasons` so the receiver decides. The signals come from what is seen
in the field:

- Apple Mail Privacy Protection fetches every pixel through Apple's proxies as soon
  as the mail arrives, with the bare user agent ``Mozilla/5.0`` (and from Apple's
  17.0.0.0/8 or its relay partners' ranges);
- Gmail fetches images through its proxy (``GoogleImageProxy`` via ggpht.com) when the
  mail is opened: a real open, but the address and user agent are Google's;
- browsers announce prefetches (``Purpose: prefetch``, ``Sec-Purpose: prefetch``,
  ``X-Purpose: preview``, ``X-Moz: prefetch``);
- link checkers often send HEAD;
- security scanners and chat unfurlers name themselves in the user agent, or follow
  several links of one mail within a second, or click within seconds of delivery.

Pure functions; the recorder (webhookd.tracking.listener) supplies the history.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Bot = Literal["apple_mpp", "google_proxy", "prefetch", "head", "scanner"]

# Precedence when several apply: what the request says of itself first.
_ORDER: tuple[Bot, ...] = ("head", "prefetch", "apple_mpp", "google_proxy", "scanner")

_APPLE_NETWORK = ipaddress.ip_network("17.0.0.0/8")
_SCANNER_UA = re.compile(
    r"(?<![a-z])bot\b|bot[/;)-]|crawler|spider|scanner|preview|headless|phantomjs|python-requests|python-urllib|aiohttp|"
    r"\bcurl/|\bwget/|go-http-client|libwww-perl|okhttp|java/|apache-httpclient|"
    r"barracuda|mimecast|proofpoint|urldefense|safelinks|trend ?micro|sophos|forcepoint|fortiguard|"
    r"symantec|messagelabs|cisco|ironport|zscaler|paloalto|checkpoint|"
    r"facebookexternalhit|slackbot|twitterbot|linkedinbot|whatsapp|telegrambot|discordbot|skypeuripreview|"
    r"bingpreview|yahoo! slurp",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Verdict:
    machine: bool
    bot: Bot | None
    reasons: tuple[str, ...]


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """An address, IPv4-mapped IPv6 ones (a dual-stack proxy's ::ffff:a.b.c.d) as IPv4; None if not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_apple(ip: str) -> bool:
    address = parse_ip(ip)
    return address is not None and address in _APPLE_NETWORK


def classify(
    *,
    kind: Literal["open", "click"],
    method: str,
    user_agent: str,
    headers: Mapping[str, str],
    ip: str,
    seconds_since_delivered: float | None,
    links_in_last_second: int = 1,
    machine_click_seconds: float = 10.0,
) -> Verdict:
    """`headers` is case-insensitive (aiohttp's CIMultiDict); `links_in_last_second` is how
    many distinct links of this message and recipient were followed in the last second,
    this one included."""
    found: dict[Bot, list[str]] = {}

    def flag(bot: Bot, reason: str) -> None:
        found.setdefault(bot, []).append(reason)

    if method.upper() == "HEAD":
        flag("head", "HEAD request")
    for name in ("Purpose", "Sec-Purpose", "X-Purpose", "X-Moz"):
        value = headers.get(name, "")
        if "prefetch" in value.lower() or "preview" in value.lower():
            flag("prefetch", f"{name}: {value.strip()[:40]}")
    ua = user_agent.strip()
    if ua == "Mozilla/5.0":
        flag("apple_mpp", "bare user agent Mozilla/5.0 (Apple Mail Privacy Protection)")
    if _is_apple(ip):
        flag("apple_mpp", "address in Apple's 17.0.0.0/8")
    if "googleimageproxy" in ua.lower() or "ggpht.com" in ua.lower():
        flag("google_proxy", "Gmail image proxy (GoogleImageProxy)")
    if not ua:
        flag("scanner", "no user agent")
    elif "googleimageproxy" not in ua.lower():
        m = _SCANNER_UA.search(ua)
        if m:
            flag("scanner", f"user agent names a bot or scanner ({m.group(0).strip()})")
    if kind == "click":
        if links_in_last_second >= 2:
            flag("scanner", f"{links_in_last_second} links of this message followed within 1 s")
        if seconds_since_delivered is not None and 0 <= seconds_since_delivered < machine_click_seconds:
            flag("scanner", f"clicked {seconds_since_delivered:.0f} s after delivery")
    bot = next((b for b in _ORDER if b in found), None)
    reasons = tuple(reason for b in _ORDER for reason in found.get(b, ()))
    return Verdict(machine=bot is not None, bot=bot, reasons=reasons)
