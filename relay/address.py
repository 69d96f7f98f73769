"""Target addresses in SOCKS5 form (RFC 1928 section 5), shared by SOCKS5 and Shadowsocks.

    +------+----------------------------------+----------+
    | ATYP | DST.ADDR                         | DST.PORT |
    +------+----------------------------------+----------+
    |  1   | 4 bytes IPv4                     | 2 bytes  |
    |  3   | 1 byte length N, N bytes of name | big      |
    |  4   | 16 bytes IPv6                    | endian   |
    +------+----------------------------------+----------+

Pure code: bytes in, values out.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from typing import NamedTuple

from .errors import ProtocolError, Socks5Error

__all__ = ["AddressType", "Address", "encode_address", "decode_address", "parse_host_port"]

ADDRESS_TYPE_NOT_SUPPORTED = 0x08  # RFC 1928 reply code, repeated here to keep the import graph flat


class AddressType(enum.IntEnum):
    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Address(NamedTuple):
    """A host (IP literal or domain name) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def type(self) -> AddressType:
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return AddressType.DOMAIN
        return AddressType.IPV4 if ip.version == 4 else AddressType.IPV6


@functools.lru_cache(maxsize=4096)
def encode_address(address: Address) -> bytes:
    """ATYP, address and port as they go on the wire (cached: a relay meets few addresses)."""
    kind = address.type
    port = address.port.to_bytes(2, "big")
    if kind is AddressType.DOMAIN:
        name = address.host.encode("idna") if not address.host.isascii() else address.host.encode()
        if not 0 < len(name) < 256:
            raise ProtocolError(f"domain name of {len(name)} bytes cannot be encoded")
        return bytes((kind, len(name))) + name + port
    return bytes((kind,)) + ipaddress.ip_address(address.host).packed + port


def decode_address(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Address, int] | None:
    """Decode an address starting at ``data[offset]``.

    Returns ``(address, end)`` where ``end`` is the offset just past the port, or ``None`` when
    ``data`` does not hold the whole address yet. Raises ``Socks5Error`` (reply code 8) for an
    unknown ATYP and ``ProtocolError`` for an address that cannot be valid.
    """
    available = len(data) - offset
    if available < 1:
        return None
    atyp = data[offset]
    if atyp == AddressType.IPV4:
        end = offset + 1 + 4 + 2
    elif atyp == AddressType.IPV6:
        end = offset + 1 + 16 + 2
    elif atyp == AddressType.DOMAIN:
        if available < 2:
            return None
        end = offset + 2 + data[offset + 1] + 2
    else:
        raise Socks5Error(ADDRESS_TYPE_NOT_SUPPORTED, f"unknown address type {atyp}")
    if len(data) < end:
        return None
    return _decoded(bytes(data[offset:end])), end


@functools.lru_cache(maxsize=4096)
def _decoded(raw: bytes) -> Address:
    """The Address of one whole wire address (cached: every datagram of a flow carries the same)."""
    atyp = raw[0]
    if atyp == AddressType.IPV4:
        host = "%d.%d.%d.%d" % (raw[1], raw[2], raw[3], raw[4])
    elif atyp == AddressType.IPV6:
        host = _ipv6_text(raw[1:17])
    else:
        length = raw[1]
        if length == 0:
            raise ProtocolError("empty domain name")
        try:
            host = raw[2 : 2 + length].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("domain name is not ASCII") from None
    return Address(host, int.from_bytes(raw[-2:], "big"))


@functools.lru_cache(maxsize=1024)
def _ipv6_text(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))


def parse_host_port(text: str, *, default_host: str | None = None, what: str = "address") -> Address:
    """Parse ``host:port``, ``[v6]:port`` or (with ``default_host``) a bare ``port``.

    Raises ``ValueError`` with a message fit for a config error.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":") or not _is_ipv6(host):
            raise ValueError(f"bad {what} {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.isdigit() and default_host is not None:
        host, port_text = default_host, text
    else:
        raise ValueError(f"bad {what} {text!r}: expected HOST:PORT")
    if not host:
        raise ValueError(f"bad {what} {text!r}: empty host")
    return Address(host, parse_port(port_text, what=what))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def parse_port(value: object, *, what: str = "port") -> int:
    """A TCP/UDP port from an int or a decimal string; ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"bad {what} {value!r}: not a port number")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"bad {what} {value!r}: a port is a number from 0 to 65535")
    return value
