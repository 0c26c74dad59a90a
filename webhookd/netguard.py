"""The private-network guard for production deliveries (SSRF protection).

The check runs on the address actually connected to: aiohttp hands every
address it tries to `TargetGuard.socket_factory`, including IP-literal URLs,
which skip the resolver. A host name that resolves to a private address is
therefore refused just like the literal address.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")

# Set around a request whose URL host is exempt by name (`allow_targets`).
host_exempt: contextvars.ContextVar[bool] = contextvars.ContextVar("webhookd_host_exempt", default=False)


class TargetRefused(OSError):
    """Connecting to this address is not allowed."""


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, 6to4, Teredo, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def refusal_reason(addr: IPAddress) -> str | None:
    """Why this address is not a public unicast address, or None if it is."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return f"{addr} is a scoped (link-local) address"
        inner = embedded_ipv4(addr)
        if inner is not None:
            why = refusal_reason(inner)
            return f"{addr} carries {why}" if why else None
        if addr in _NAT64_LOCAL:
            return f"{addr} is a local-use NAT64 address"
    if addr.is_unspecified:
        return f"{addr} is unspecified"
    if addr.is_loopback:
        return f"{addr} is loopback"
    if addr.is_link_local:
        return f"{addr} is link-local"
    if addr.is_multicast:
        return f"{addr} is multicast"
    if addr.is_private:
        return f"{addr} is private"
    if isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.IPv4Network("100.64.0.0/10"):
        return f"{addr} is shared address space (CGNAT)"
    if addr.is_reserved:
        return f"{addr} is reserved"
    if not addr.is_global:
        return f"{addr} is not a public address"
    return None


class TargetGuard:
    """Refuses non-public addresses unless exempted by `allow_targets`."""

    def __init__(self, allow_targets: Iterable[str] = ()) -> None:
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for target in allow_targets:
            try:
                self.networks.append(ipaddress.ip_network(target, strict=False))
            except ValueError:
                self.hosts.add(target.lower().rstrip("."))

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def check(self, address: str) -> None:
        """Raise TargetRefused if connecting to `address` is not allowed."""
        if host_exempt.get():
            return
        addr = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and "%" in address:
            addr = ipaddress.IPv6Address(address)
        if any(addr in net for net in self.networks):
            return
        reason = refusal_reason(addr)
        if reason is not None:
            raise TargetRefused(f"{reason}; add it to delivery.allow_targets to permit it")

    def socket_factory(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _canon, sockaddr = addr_info
        self.check(str(sockaddr[0]))
        sock = socket.socket(family=family, type=type_, proto=proto)
        sock.setblocking(False)
        return sock
