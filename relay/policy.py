"""Which resolved addresses a remote may dial (the egress policy). Pure code.

By default a remote dials only globally routable addresses: it refuses loopback, private,
link-local, unspecified, multicast and reserved addresses, carrier-grade NAT (100.64.0.0/10,
where some clouds keep their metadata service) and anything else that is not global, so that an
open port cannot be used to reach the server's own network. IPv4 addresses wrapped in IPv6
(IPv4-mapped, 6to4, Teredo) are judged by the IPv4 address they carry as well.
"""

from __future__ import annotations

import ipaddress

__all__ = ["forbidden_reason"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def forbidden_reason(ip: str | IPAddress) -> str | None:
    """Why ``ip`` must not be dialled, or ``None`` when it may be."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return forbidden_reason(ip.ipv4_mapped)
        for wrapped in (ip.sixtofour, ip.teredo[1] if ip.teredo else None):
            if wrapped is not None and (reason := forbidden_reason(wrapped)):
                return f"{reason} inside {ip}"
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
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local address"
    if ip.is_reserved:
        return "reserved address"
    if not ip.is_global:
        return "not a globally routable address"
    return None
