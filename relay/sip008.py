"""SIP008 server lists (online configuration delivery).

SIP008 (https://shadowsocks.org/doc/sip008.html) is one JSON object::

    +-----------------+----------+----------------------------------------------------+
    | key             | type     |                                                    |
    +-----------------+----------+----------------------------------------------------+
    | version         | 1        | required                                           |
    | servers         | array    | required, each element an object:                  |
    |   id            | string   |   a UUID, stable across updates (optional here)    |
    |   remarks       | string   |   the server's name -> ServerSpec.tag (optional)   |
    |   server        | string   |   host name or IP address (required)               |
    |   server_port   | integer  |   1 to 65535 (required)                            |
    |   password      | string   |   (required)                                       |
    |   method        | string   |   (required)                                       |
    |   plugin        | string   |   SIP003 plugin; empty or absent for none          |
    |   plugin_opts   | string   |   its options                                      |
    | bytes_used, ... | any      | data usage and custom keys: ignored                |
    +-----------------+----------+----------------------------------------------------+

``parse_server_list`` and ``pick_server`` are pure. ``load_server_list`` is the one function here
that does I/O: it reads a file, or fetches an http(s):// URL with urllib. SIP008 asks for HTTPS
(certificates are verified; a plain http:// list is fetched with a warning) and suggests a secret
in the URL's path or query, so messages name a URL only by its scheme and host. Every problem
raises ConfigError with one line that never quotes a password.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .address import Address
from .config import parse_json_object
from .errors import ConfigError
from .ssurl import ServerSpec, check_host

__all__ = ["MAX_SERVER_LIST_BYTES", "load_server_list", "parse_server_list", "pick_server"]

MAX_SERVER_LIST_BYTES = 1 << 20
"""A server list larger than this (1 MiB) is refused, from a file or from the network."""

_READ_CHUNK = 64 * 1024
_USER_AGENT = "relay (SIP008 client)"

log = logging.getLogger("relay")


def parse_server_list(data: bytes | str, source: str) -> list[ServerSpec]:
    """The servers of an SIP008 document, in its order; ``source`` names it in error messages."""
    where = f"server list {source}"
    document = parse_json_object(data, where)
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version != 1:
        shown = "missing" if "version" not in document else f"{version!r}"
        raise ConfigError(f'{where}: "version" must be 1 (SIP008), not {shown}')
    servers = document.get("servers")
    if not isinstance(servers, list):
        raise ConfigError(f'{where}: "servers" must be a list of server objects')
    if not servers:
        raise ConfigError(f'{where}: "servers" is empty')
    return [_server(entry, f"{where}: servers[{index}]") for index, entry in enumerate(servers)]


def load_server_list(location: str, timeout: float = 10.0) -> list[ServerSpec]:
    """Read an SIP008 document from a file path or an http:// or https:// URL, and parse it.

    ``timeout`` bounds each network wait, and the body must have arrived ``timeout`` seconds after
    the request began. Redirects may not leave http(s), nor go from https to http. Environment
    proxy settings (``https_proxy``, ``no_proxy``...) apply, as for any urllib client.
    """
    scheme, sep, _ = location.partition("://")
    if not sep:
        return parse_server_list(_read_file(location), location)
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"cannot load a server list from {scheme}:// URLs: give an http:// or https:// URL or a file path"
        )
    shown = _shown(location)
    if "@" in location.partition("://")[2].partition("/")[0]:
        raise ConfigError(
            f"server list {shown}: user:password@ in the URL is not supported; put the secret in the path or query"
        )
    if scheme == "http":
        log.warning(
            "server list %s comes over plain HTTP: anyone on the way can read or change it (SIP008 asks for HTTPS)",
            shown,
        )
    return parse_server_list(_fetch(location, timeout, shown), shown)


def pick_server(servers: Sequence[ServerSpec], name: str | None) -> ServerSpec:
    """The server whose ``id``, else whose ``tag`` (SIP008 remarks), is ``name``; the first if no name."""
    if not servers:
        raise ConfigError("the server list has no servers")
    if name is None:
        return servers[0]
    matches = [s for s in servers if s.id == name] or [s for s in servers if s.tag == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        choices = ", ".join(_label(s) for s in matches)
        raise ConfigError(f"{len(matches)} servers are named {name!r}; choose one by id: {choices}")
    choices = ", ".join(_label(s) for s in servers)
    raise ConfigError(f"no server named {name!r} in the server list; choices: {choices}")


def _server(entry: Any, where: str) -> ServerSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a JSON object")
    remarks = _optional(entry, "remarks", where)
    if remarks:
        where = f"{where} ({remarks!r})"
    for key in ("server", "server_port", "password", "method"):
        if entry.get(key) is None:
            raise ConfigError(f'{where}: "{key}" is missing')
    host = entry["server"]
    if not isinstance(host, str):
        raise ConfigError(f'{where}: "server" must be a host name or address, not {host!r}')
    try:
        host = check_host(host.strip())
    except ValueError as e:
        raise ConfigError(f'{where}: "server": {e}') from None
    port = entry["server_port"]
    if isinstance(port, str) and port.strip().isascii() and port.strip().isdigit() and len(port.strip()) <= 5:
        port = int(port)  # shadowsocks-libev accepts the port as a string too
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f'{where}: "server_port" must be a number from 1 to 65535, not {port!r}')
    password = entry["password"]
    if not isinstance(password, str) or not password:
        raise ConfigError(f'{where}: "password" must be a non-empty string')
    method = entry["method"]
    if not isinstance(method, str) or not method.strip():
        raise ConfigError(f'{where}: "method" must be a method name, not {method!r}')
    plugin = _optional(entry, "plugin", where)
    plugin_opts = _optional(entry, "plugin_opts", where) if plugin else None
    return ServerSpec(
        server=Address(host, port),
        method=method.strip(),
        password=password,
        tag=remarks,
        plugin=plugin,
        plugin_opts=plugin_opts,
        id=_optional(entry, "id", where),
    )


def _optional(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    """A string that may be absent, null or empty (all meaning None)."""
    value = entry.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f'{where}: "{key}" must be a string, not {value!r}')
    return value


def _label(spec: ServerSpec) -> str:
    if spec.tag and spec.id:
        return f"{spec.tag!r} (id {spec.id})"
    if spec.id:
        return spec.id
    if spec.tag:
        return repr(spec.tag)
    return f"(unnamed) {spec.server}"


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SERVER_LIST_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read server list {path}: {e.strerror or e}") from None
    if len(data) > MAX_SERVER_LIST_BYTES:
        raise ConfigError(f"server list {path} is larger than {MAX_SERVER_LIST_BYTES} bytes")
    return data


def _shown(url: str) -> str:
    """A URL as messages show it: scheme and host only, since SIP008 URLs often carry a secret."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6 bracket: _fetch says what is wrong
        return url.partition("://")[0].lower() + "://..."
    hostport = parts.netloc.rpartition("@")[2]
    rest = "/..." if parts.path.strip("/") or parts.query else "/"
    return f"{parts.scheme.lower()}://{hostport}{rest}"


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and never from https down to http."""

    def __init__(self, shown: str) -> None:
        self.shown = shown

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        old, new = urlsplit(req.full_url).scheme.lower(), urlsplit(newurl).scheme.lower()
        if new not in ("http", "https") or (old == "https" and new == "http"):
            fp.close()
            raise ConfigError(f"server list {self.shown}: refused a redirect from {old}:// to {new}://")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, timeout: float, shown: str) -> bytes:
    where = f"server list {shown}"
    opener = urllib.request.build_opener(_Redirects(shown))
    deadline = time.monotonic() + timeout
    try:
        request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": _USER_AGENT})
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            if length.strip().isdigit() and int(length) > MAX_SERVER_LIST_BYTES:
                raise ConfigError(f"{where} is larger than {MAX_SERVER_LIST_BYTES} bytes ({int(length)})")
            body = bytearray()
            while chunk := response.read1(_READ_CHUNK):
                body += chunk
                if len(body) > MAX_SERVER_LIST_BYTES:
                    raise ConfigError(f"{where} is larger than {MAX_SERVER_LIST_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise ConfigError(f"{where} did not arrive within {timeout:g} s")
            return bytes(body)
    except urllib.error.HTTPError as e:
        e.close()
        raise ConfigError(f"cannot fetch {where}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ConfigError(f"cannot fetch {where}: {_reason(e.reason, timeout)}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ConfigError(f"cannot fetch {where}: {_reason(e, timeout)}") from None


def _reason(error: object, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
