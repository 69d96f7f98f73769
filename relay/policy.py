"""Which targets a remote may dial (the egress policy). Pure code.

By default a remote dials only globally routable addresses: it refuses loopback, private,
link-local, unspecified, multicast and reserved addresses, carrier-grade NAT (100.64.0.0/10,
where some clouds keep their metadata service) and anything else that is not global, so that an
open port cannot be used to reach the server's own network. IPv4 addresses wrapped in IPv6
(IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4, Teredo) are judged by the IPv4 address
they carry as well. Names are judged by every address they resolve to ("localhost", "127.1",
"0x7f000001" and other spellings resolve to loopback and are refused with it).

An ACL (config ``"egress": {"allow": [...], "deny": [...]}``) opens or closes more: entries are
CIDR networks or domain suffixes. deny wins over allow, and allow over the default policy; an
allowed domain may resolve to private addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import ConfigError, TargetRefused

__all__ = ["forbidden_reason", "EgressPolicy"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Check = Callable[[str], "str | None"]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def forbidden_reason(ip: str | IPAddress) -> str | None:
    """Why ``ip`` must not be dialled by default, or ``None`` when it may be."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the IPv4 address itself, spelled in IPv6
            return forbidden_reason(ip.ipv4_mapped)
        if ip in _NAT64:  # a NAT64 gateway would dial the IPv4 address it carries
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            reason = forbidden_reason(embedded)
            return f"{reason} inside {ip}" if reason else None
        for wrapped in _embedded_ipv4(ip):
            if reason := forbidden_reason(wrapped):
                return f"{reason} inside {ip}"
        if ip in _NAT64_LOCAL:
            return "NAT64 local-use address"
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


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.append(ip.teredo[1])
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


@dataclass(frozen=True)
class EgressPolicy:
    """The default policy, ``allow_private``, and the ACL, as one object handlers consult."""

    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    allow_domains: tuple[str, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()
    deny_domains: tuple[str, ...] = ()
    # (name allowed?, ip) -> the verdict: parsing and classifying an address costs more than
    # the rest of a short session's setup, and the same addresses come back again and again.
    _verdicts: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # host -> its check (for hosts no deny entry names): a remote connects to the same few
    # targets again and again, and the check is the same every time.
    _checks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, allow_private: bool, egress: object) -> EgressPolicy:
        """From config ``"egress": {"allow": [...], "deny": [...]}``; ConfigError naming the entry."""
        if egress is None:
            return cls(allow_private)
        if not isinstance(egress, dict) or set(egress) - {"allow", "deny"}:
            raise ConfigError('"egress" must be an object with "allow" and/or "deny" lists')
        allow = _entries(egress.get("allow", []), "allow")
        deny = _entries(egress.get("deny", []), "deny")
        return cls(allow_private, allow[0], allow[1], deny[0], deny[1])

    def for_target(self, host: str) -> Check:
        """The check for the addresses ``host`` resolves to; TargetRefused for a denied name."""
        check = self._checks.get(host)
        if check is None:
            if len(self._checks) >= VERDICT_CACHE_SIZE:
                self._checks.clear()
            check = self._checks[host] = self._check_for(host)
        return check

    def _check_for(self, host: str) -> Check:
        name = host.lower().rstrip(".")
        if _matches(name, self.deny_domains):
            raise TargetRefused(f"{host} is denied by the egress ACL")
        name_allowed = _matches(name, self.allow_domains)
        verdicts = self._verdicts

        def check(ip: str) -> str | None:
            key = (name_allowed, ip)
            verdict = verdicts.get(key, _UNKNOWN)
            if verdict is _UNKNOWN:
                verdict = self._verdict(ip, name_allowed)
                if len(verdicts) >= VERDICT_CACHE_SIZE:
                    verdicts.clear()
                verdicts[key] = verdict
            return verdict  # type: ignore[return-value]

        return check

    def _verdict(self, ip: str, name_allowed: bool) -> str | None:
        address = ipaddress.ip_address(ip.partition("%")[0])
        candidates = [address, *(_embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else ())]
        for network in self.deny_networks:
            if any(candidate.version == network.version and candidate in network for candidate in candidates):
                return f"denied by the egress ACL ({network})"
        if name_allowed or self.allow_private:
            return None
        if any(address.version == network.version and address in network for network in self.allow_networks):
            return None
        return forbidden_reason(address)


VERDICT_CACHE_SIZE = 4096
_UNKNOWN = object()


def _matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def _entries(values: object, key: str) -> tuple[tuple[IPNetwork, ...], tuple[str, ...]]:
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f'"egress"."{key}" must be a list of CIDR networks and domain suffixes')
    networks: list[IPNetwork] = []
    domains: list[str] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            domain = value.lower().strip(".")
            if not domain or any(c in domain for c in "/ :"):
                raise ConfigError(f'"egress"."{key}": {value!r} is neither a CIDR network nor a domain suffix') from None
            domains.append(domain)
    return tuple(networks), tuple(domains)
