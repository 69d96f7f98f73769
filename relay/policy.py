"""Which resolved addresses a remote may dial (the egress policy). Pure code.

By default a remote refuses loopback, private, link-local, unspecified, multicast and reserved
addresses, so that an open port cannot be used to reach the server's own network. IPv4 addresses
wrapped in IPv6 (IPv4-mapped ::ffff:a.b.c.d) are judged as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress

__all__ = ["forbidden_reason"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def forbidden_reason(ip: str | IPAddress) -> str | None:
    """Why ``ip`` must not be dialled, or ``None`` when it may be."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if ip.is_private:
        return "private address"
    if ip.is_reserved:
        return "reserved address"
    return None
