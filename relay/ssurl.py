"""ss:// URLs (SIP002, with the legacy form before it), pure code.

SIP002 (https://shadowsocks.org/doc/sip002.html), after RFC 3986::

    ss://USERINFO@HOST:PORT[/][?plugin=PLUGIN][#TAG]

    +----------+-----------------------------------------------------------------+
    | USERINFO | base64url(method ":" password), padding optional; or the plain  |
    |          | form method ":" password, each percent-encoded. AEAD-2022        |
    |          | methods ("2022-...") MUST use the plain form.                    |
    | HOST     | a domain name, an IPv4 address, or an IPv6 address in brackets   |
    | PORT     | 1 to 65535                                                       |
    | PLUGIN   | form-encoded "name;opts" (SIP003): split at the first ";"        |
    |          | other query parameters are ignored, as SIP002 asks               |
    | TAG      | percent-encoded name of the server                               |
    +----------+-----------------------------------------------------------------+

The legacy form, still printed by QR-code generators (shadowsocks-rust's ``to_qrcode_url``)::

    ss://BASE64(method ":" password "@" host ":" port)[#TAG]

Parsing accepts what shadowsocks-rust's ``ServerConfig::from_url`` accepts: standard or URL-safe
base64, with or without padding (also padding percent-encoded as %3D), the plain userinfo form,
and the legacy form. Unlike shadowsocks-rust it requires the port (SIP002's grammar does) instead
of assuming 8388. Errors are ``ConfigError`` with one line that never quotes the password.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote

from .address import Address
from .errors import ConfigError

__all__ = ["ServerSpec", "check_host", "format_ss_url", "parse_ss_url"]

_FORBIDDEN_IN_HOST = frozenset(' "#%/<>?@[\\]^`{|}')


@dataclass(frozen=True)
class ServerSpec:
    """One remote relay as an ss:// URL or a SIP008 server list describes it.

    ``method`` is as written (not looked up among the registered ciphers). ``tag`` is the URL's
    fragment or SIP008's ``remarks``; ``id`` is SIP008's server UUID (None from a URL).
    """

    server: Address
    method: str
    password: str = field(repr=False)
    tag: str | None = None
    plugin: str | None = None
    plugin_opts: str | None = None
    id: str | None = None

    def to_url(self, *, plain: bool = False) -> str:
        """This server as an ss:// URL (see ``format_ss_url``); ``id`` has no place in it."""
        return format_ss_url(
            self.method,
            self.password,
            self.server,
            self.tag,
            plugin=self.plugin,
            plugin_opts=self.plugin_opts,
            plain=plain,
        )


def format_ss_url(
    method: str,
    password: str,
    server: Address,
    tag: str | None = None,
    *,
    plugin: str | None = None,
    plugin_opts: str | None = None,
    plain: bool = False,
) -> str:
    """An SIP002 URL: base64url userinfo without padding, or percent-encoded when ``plain``.

    Methods named ``2022-...`` always get the plain form: SIP002 forbids base64 for them.
    """
    if plugin_opts and not plugin:
        raise ValueError("plugin_opts given without a plugin")
    if plain or method.lower().startswith("2022-"):
        userinfo = f"{quote(method, safe='')}:{quote(password, safe='')}"
    else:
        userinfo = base64.urlsafe_b64encode(f"{method}:{password}".encode()).decode().rstrip("=")
    host = f"[{server.host}]" if ":" in server.host else server.host
    url = f"ss://{userinfo}@{host}:{server.port}"
    if plugin:
        url += "/?plugin=" + quote(f"{plugin};{plugin_opts}" if plugin_opts else plugin, safe="")
    if tag:
        url += "#" + quote(tag, safe="")
    return url


def parse_ss_url(url: str) -> ServerSpec:
    """Read an ss:// URL in SIP002's base64 or plain form, or the legacy all-base64 form."""
    text = url.strip()
    if text[:5].lower() != "ss://":
        raise ConfigError("not an ss:// URL: it must start with ss://")
    body, _, fragment = text[5:].partition("#")
    tag = unquote(fragment) or None
    body, _, query = body.partition("?")
    plugin, plugin_opts = _plugin(query)

    if "@" in body:
        userinfo, _, hostport = body.rpartition("@")
        method, password = _userinfo(userinfo)
        hostport = hostport.removesuffix("/")
    elif ":" in body:
        raise ConfigError("ss:// URL has no method and password: expected ss://USERINFO@HOST:PORT")
    else:
        method, password, hostport = _legacy(body)

    if not method:
        raise ConfigError("ss:// URL has an empty method")
    if not password:
        raise ConfigError("ss:// URL has an empty password")
    return ServerSpec(_host_port(hostport), method, password, tag, plugin, plugin_opts)


def check_host(host: str) -> str:
    """A server host as given in a URL or a server list, checked; brackets around IPv6 dropped.

    Raises ``ValueError`` saying what is wrong. Domain names are not resolved here.
    """
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
        return inner
    if not host:
        raise ValueError("empty host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad host {host!r}: neither a name nor an IPv6 address") from None
        return host
    if all(label.isdigit() for label in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"bad IPv4 address {host!r}") from None
        return host
    if any(c in _FORBIDDEN_IN_HOST or not c.isprintable() for c in host):
        raise ValueError(f"bad host {host!r}: not a host name or an IP address")
    if len(host.encode()) > 255:
        raise ValueError(f"host name of {len(host.encode())} bytes is too long (255 at most)")
    return host


def _userinfo(userinfo: str) -> tuple[str, str]:
    """(method, password) from SIP002 userinfo, plain or base64; the message never shows them."""
    if ":" in userinfo:
        method, _, password = userinfo.partition(":")
        return _unquote(method), _unquote(password)
    decoded = _unquote(userinfo)
    if ":" in decoded:  # the whole userinfo percent-encoded, separator included
        method, _, password = decoded.partition(":")
        return method, password
    account = _base64_text(decoded)
    if account is None or ":" not in account:
        raise ConfigError("ss:// URL: the part before '@' is neither method:password nor base64 of it")
    method, _, password = account.partition(":")
    return method, password


def _legacy(body: str) -> tuple[str, str, str]:
    """(method, password, host:port) from the legacy ss://BASE64(method:password@host:port)."""
    decoded = _base64_text(unquote(body))
    if decoded is None and body.endswith("/"):
        decoded = _base64_text(unquote(body[:-1]))
    account, at, hostport = (decoded or "").strip().rpartition("@")
    if not at or ":" not in account:
        raise ConfigError(
            "ss:// URL has no '@' and is not the legacy form ss://BASE64(method:password@host:port) either"
        )
    method, _, password = account.partition(":")
    return method, password, hostport


def _host_port(text: str) -> Address:
    if text.startswith("["):
        bracketed, sep, rest = text.partition("]")
        host_text = bracketed + sep
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"ss:// URL: expected [IPv6]:PORT after '@', not {text!r}")
        port_text = rest[1:]
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"ss:// URL: the port is missing after host {text!r}")
        if ":" in host_text:
            raise ConfigError(f"ss:// URL: an IPv6 host goes in brackets, as {'[' + host_text + ']:' + port_text!r}")
    if "/" in port_text:
        port_text, _, path = port_text.partition("/")
        raise ConfigError(f"ss:// URL: unexpected path {'/' + path!r} after the port")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536):
        raise ConfigError(f"ss:// URL: bad port {port_text!r}: a port is a number from 1 to 65535")
    try:
        host = check_host(_unquote(host_text, "host"))
    except ValueError as e:
        raise ConfigError(f"ss:// URL: {e}") from None
    return Address(host, int(port_text))


def _plugin(query: str) -> tuple[str | None, str | None]:
    values = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "plugin"]
    if len(values) > 1:
        raise ConfigError("ss:// URL gives the plugin parameter more than once")
    if not values or not values[0]:
        return None, None
    name, _, opts = values[0].partition(";")
    if not name:
        raise ConfigError("ss:// URL: the plugin parameter has options but no plugin name before ';'")
    return name, opts or None


def _unquote(text: str, what: str = "userinfo") -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(f"ss:// URL: the {what} is not percent-encoded UTF-8") from None


def _base64_text(text: str) -> str | None:
    """UTF-8 text from standard or URL-safe base64, padded or not; None if it is not that."""
    data = text.rstrip("=").replace("-", "+").replace("_", "/")
    if not data:
        return None
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True).decode()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
