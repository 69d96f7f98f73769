"""Settings of one relay, from a shadowsocks-libev JSON file and command-line flags. Pure code.

The JSON keys are shadowsocks-libev's, accepted unchanged::

    server, server_port        remote: where to listen; local: where the remote is
    local_address, local_port  local: where to listen (default 127.0.0.1:1080)
    password (or key, base64)  method (default chacha20-ietf-poly1305)
    timeout (seconds, default 300)    mode (tcp_only, tcp_and_udp, udp_only)

and relay's own: allow_private, protocol, forward (or libev's tunnel_address), handler,
connect_timeout, handshake_timeout, udp_timeout, udp_max_associations, plugins. A flag given on the command line wins over the file. Every problem
raises ConfigError with a one-line message naming the key.

A remote's replay filter (relay.replay): replay_capacity, the salts each of its two generations
holds (default 1,000,000; 2 x 4/3 x 8 = 21.3 bytes of memory per salt of capacity for TCP, as
much again for UDP when UDP is on), and replay_window, the seconds a salt is remembered at
least while fewer than replay_capacity others arrive (default 86400).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .address import Address, parse_host_port, parse_port
from .codec import Cipher
from .errors import ConfigError
from .hookspecs import HandlerSpec
from .policy import EgressPolicy
from .replay import DEFAULT_CAPACITY as DEFAULT_REPLAY_CAPACITY
from .replay import DEFAULT_WINDOW as DEFAULT_REPLAY_WINDOW
from .replay import MAX_CAPACITY as MAX_REPLAY_CAPACITY
from .ssurl import parse_ss_url

__all__ = ["Config", "Role", "build_config", "build_configs", "load_file", "DEFAULT_METHOD"]

DEFAULT_METHOD = "chacha20-ietf-poly1305"
DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_UDP_TIMEOUT = 300.0  # RFC 4787's minimum for a NAT's UDP mapping
DEFAULT_UDP_MAX_ASSOCIATIONS = 1024
DEFAULT_MAX_SESSIONS = 8192
DEFAULT_MAX_SESSIONS_PER_CLIENT = 1024
MODES = ("tcp_only", "tcp_and_udp", "udp_only")

# Role -> default listen address and default handler (the session's front-end).
Role = str
_DEFAULT_LISTEN = {"local": "127.0.0.1:1080", "remote": "0.0.0.0:8388", "serve": "127.0.0.1:9999"}
_DEFAULT_PROTOCOL = {"local": "mixed", "remote": "shadowsocks"}
_PER_LOCAL_FLAGS = ("listen", "protocol", "forward")

# Keys shadowsocks-libev knows that relay does not act on: accepted, so a libev file works as is.
_LIBEV_IGNORED = frozenset(
    "fast_open reuse_port no_delay nameserver user acl ipv6_first dscp mtu mptcp "
    "manager_address port_password local_ipv4_address local_ipv6_address use_syslog remarks "
    "verbose disable_sni".split()
)
_KNOWN = frozenset(
    "replay_capacity replay_window "
    "server server_port local_address local_port password key method timeout mode plugin "
    "plugin_opts tunnel_address allow_private protocol forward handler connect_timeout "
    "handshake_timeout plugins udp_timeout udp_max_associations workers auth locals forward_address "
    "forward_port server_url server_list server_name egress allow_open one_time_auth max_sessions "
    "max_sessions_per_client users".split()
)

# Pre-AEAD methods: recognised only to say why they are refused.
_INSECURE_METHODS = frozenset(
    "table rc4 rc4-md5 rc4-md5-6 aes-128-cfb aes-192-cfb aes-256-cfb aes-128-ctr aes-192-ctr "
    "aes-256-ctr aes-128-ofb aes-192-ofb aes-256-ofb bf-cfb camellia-128-cfb camellia-192-cfb "
    "camellia-256-cfb cast5-cfb des-cfb idea-cfb rc2-cfb seed-cfb salsa20 chacha20 chacha20-ietf "
    "none plain".split()
)


@dataclass(frozen=True, eq=False)
class Config:
    """The resolved settings of one relay: names are already looked up, keys already derived.

    Compared and hashed by identity, so a plugin can key per-relay state by the config.
    """

    role: Role
    listen: tuple[Address, ...]
    handler: HandlerSpec
    """What answers accepted connections: a local's protocol, the remote's shadowsocks, serve's handler."""
    upstream_handler: HandlerSpec | None = None
    """A remote's ``--handler``: answers tunnelled streams instead of connecting out."""
    server: Address | None = None
    forward: Address | None = None
    method: str | None = None
    cipher: Cipher | None = None
    key: Any = field(default=b"", repr=False)
    """What the cipher made of the password (``key_from_password``, or ``key_for_users``)."""
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    allow_private: bool = False
    mode: str = "tcp_only"
    udp_timeout: float = DEFAULT_UDP_TIMEOUT
    udp_max_associations: int = DEFAULT_UDP_MAX_ASSOCIATIONS
    replay_capacity: int = DEFAULT_REPLAY_CAPACITY
    """A remote's replay filter: salts per generation (two generations; see relay.replay)."""
    replay_window: float = DEFAULT_REPLAY_WINDOW
    """A remote's replay filter: seconds a salt is remembered at least, capacity allowing."""
    workers: int = 1
    """Processes sharing the listening port (SO_REUSEPORT); 1 serves in this process."""
    max_sessions: int = DEFAULT_MAX_SESSIONS
    """Concurrent TCP sessions a relay accepts; beyond it a connection is closed at once."""
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    """The same, per client IP address."""
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    """What a remote (or a direct proxy) may dial: the private-address policy and the ACL."""
    allow_open: bool = False
    auth: Mapping[str, str] = field(default_factory=dict, repr=False)
    users: Mapping[str, str] = field(default_factory=dict, repr=False)
    """A multi-user remote's users, name -> password as configured (the cipher's key_for_users
    made ``key`` of them)."""
    """Username -> password a local's clients must present (SOCKS5 RFC 1929, HTTP Basic)."""
    plugins: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    file: Mapping[str, Any] = field(default_factory=dict, repr=False)
    options: argparse.Namespace = field(default_factory=argparse.Namespace, repr=False)

    @property
    def tcp(self) -> bool:
        """Whether this relay serves streams."""
        return self.mode != "udp_only"

    @property
    def udp(self) -> bool:
        """Whether this relay serves datagrams."""
        return self.mode != "tcp_only"


def load_file(path: str) -> dict[str, Any]:
    """Read a JSON config file; ConfigError with the path and the line on any problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    return parse_json_object(data, f"config file {path}")


def parse_json_object(data: bytes | str, where: str) -> dict[str, Any]:
    """A JSON object from UTF-8 text (a BOM allowed); ConfigError, naming ``where`` and the line,
    for anything else."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError(f"{where} is not UTF-8 text") from None
    try:
        document = json.loads(data.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ConfigError(f"{where} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer longer than Python converts
        raise ConfigError(f"{where} is not usable JSON: {e}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{where} must hold a JSON object")
    return document


def build_configs(
    role: Role,
    file: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    ciphers: Mapping[str, Cipher],
    handlers: Mapping[str, HandlerSpec],
    options: argparse.Namespace | None = None,
) -> list[Config]:
    """The relays a command starts: one, or for a local whose file has ``"locals"`` (as
    shadowsocks-rust's config has), one per entry. An entry's keys (local_address, local_port,
    protocol, forward, mode, auth...) win over the file's top level, which they share: server,
    method, password and the rest; flags win over both, except the per-front-end ones."""
    file = dict(file or {})
    entries = file.pop("locals", None)
    if role != "local" or entries is None:
        return [build_config(role, file, flags, ciphers=ciphers, handlers=handlers, options=options)]
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError('"locals" must be a non-empty list of objects, one per front-end')
    clashing = [f"--{name}" for name in _PER_LOCAL_FLAGS if (flags or {}).get(name) is not None]
    if clashing:
        raise ConfigError(f'{", ".join(clashing)} cannot apply to a config with "locals": set them in each entry')
    shared = {key: value for key, value in file.items() if key not in ("local_address", "local_port")}
    configs = []
    for index, entry in enumerate(entries):
        try:
            configs.append(build_config(role, {**shared, **entry}, flags, ciphers=ciphers, handlers=handlers, options=options))
        except ConfigError as e:
            raise ConfigError(f'"locals"[{index}]: {e}') from None
    return configs


def build_config(
    role: Role,
    file: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    ciphers: Mapping[str, Cipher],
    handlers: Mapping[str, HandlerSpec],
    options: argparse.Namespace | None = None,
) -> Config:
    """Merge ``flags`` (values that are not None win) over ``file`` and check the result.

    ``flags`` keys: listen, server, method, password, key, timeout, connect_timeout, mode,
    protocol, forward, handler, allow_private, plugins. ``ciphers`` and ``handlers`` are what the
    plugins registered.
    """
    file = dict(file or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != []}
    warnings = _check_keys(file)
    if role == "local":
        file = _with_server_url(file, flags)

    def pick(key: str, default: Any = None) -> Any:
        return flags.get(key, file.get(key, default))

    listen = _listen(role, file, flags)
    server = None
    if role == "local":
        server = _server(file, flags)

    handler_name = pick("protocol") if role == "local" else None
    handler_name = handler_name or _DEFAULT_PROTOCOL.get(role)
    upstream_name = pick("handler")
    if role == "serve":
        handler_name, upstream_name = upstream_name or "echo", None
    handler = _handler(handlers, handler_name, "protocol" if role == "local" else "handler")
    upstream_handler = _handler(handlers, upstream_name, "handler") if upstream_name else None

    forward = pick("forward") or file.get("tunnel_address")
    if forward is not None:
        forward = _address(forward, "forward")
    elif "forward_address" in file:  # shadowsocks-rust's spelling
        forward = Address(str(file["forward_address"]), _port(file.get("forward_port"), "forward_port"))
    if handler.name == "tunnel" and forward is None:
        raise ConfigError('tunnel protocol needs a target: give --forward HOST:PORT or "forward" in the config file')

    method = cipher = None
    key = b""
    password = None
    users = _users(file.get("users"))
    if role in ("local", "remote"):
        method = str(pick("method", DEFAULT_METHOD)).lower()
        cipher = _cipher(ciphers, method)
        password = pick("password")
        key_text = pick("key")
        if key_text and users:
            raise ConfigError('"users": give the identity key as "password", not "key"')
        if key_text:
            key = _base64_key(key_text, cipher)
        elif password or password == 0:
            if isinstance(password, (int, float)) and not isinstance(password, bool):
                password = str(password)  # shadowsocks-libev takes a JSON number as its digits
            if not isinstance(password, str):
                raise ConfigError('"password" must be a string')
            _utf8(password, '"password"')
            if users:
                key = _key_for_users(cipher, password, users, role)
            else:
                key = cipher.key_from_password(password)
        else:
            raise ConfigError('a password is required: give --password or "password" in the config file')

    plugin_opt = file.get("plugin")
    if plugin_opt:
        raise ConfigError(f'"plugin": SIP003 plugins ({plugin_opt!r}) are not supported by relay')

    mode = pick("mode", "tcp_only")
    if mode not in MODES:
        raise ConfigError(f'"mode" must be one of {", ".join(MODES)}, not {mode!r}')
    if mode != "tcp_only":
        for spec, option in ((handler, "protocol" if role == "local" else "handler"), (upstream_handler, "handler")):
            if spec is not None and spec.datagram_handler is None:
                raise ConfigError(f"{option} {spec.name!r} does not handle datagrams, but mode is {mode}")

    plugins = pick("plugins", ())
    if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError('"plugins" must be a list of module names')

    if pick("one_time_auth") or pick("auth") is True:
        raise ConfigError("one-time auth (OTA) is insecure and was dropped from Shadowsocks: relay refuses it; use an AEAD method without it")
    auth = _auth(pick("auth", {}))
    allow_open = _bool(pick("allow_open", False), "allow_open")
    if role == "local" and not auth:
        for address in listen:
            if _is_loopback(address.host):
                continue
            if not allow_open:
                raise ConfigError(
                    f"refusing to listen on {address} without authentication: anyone who reaches it could use it as an "
                    'open proxy; set "auth" (--auth USER:PASSWORD), or pass --allow-open'
                )
            warnings.append(f"listening on {address} without authentication: an open proxy (--allow-open)")
    allow_private = _bool(pick("allow_private", False), "allow_private")
    egress = EgressPolicy.from_config(allow_private, pick("egress"))
    workers = _count(pick("workers", 1), "workers")
    if workers > 1 and any(address.port == 0 for address in listen):
        raise ConfigError('"workers" needs a fixed port to share: give --listen HOST:PORT with a port other than 0')

    return Config(
        role=role,
        listen=listen,
        handler=handler,
        upstream_handler=upstream_handler,
        server=server,
        forward=forward,
        method=method,
        cipher=cipher,
        key=key,
        password=password,
        timeout=_seconds(pick("timeout", DEFAULT_TIMEOUT), "timeout"),
        connect_timeout=_seconds(pick("connect_timeout", DEFAULT_CONNECT_TIMEOUT), "connect_timeout"),
        handshake_timeout=_seconds(pick("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT), "handshake_timeout"),
        allow_private=allow_private,
        egress=egress,
        allow_open=allow_open,
        mode=mode,
        udp_timeout=_seconds(pick("udp_timeout", DEFAULT_UDP_TIMEOUT), "udp_timeout"),
        udp_max_associations=_count(pick("udp_max_associations", DEFAULT_UDP_MAX_ASSOCIATIONS), "udp_max_associations"),
        replay_capacity=_replay_capacity(pick("replay_capacity", DEFAULT_REPLAY_CAPACITY)),
        replay_window=_seconds(pick("replay_window", DEFAULT_REPLAY_WINDOW), "replay_window"),
        workers=workers,
        auth=auth,
        users=users,
        max_sessions=_count(pick("max_sessions", DEFAULT_MAX_SESSIONS), "max_sessions"),
        max_sessions_per_client=_count(pick("max_sessions_per_client", DEFAULT_MAX_SESSIONS_PER_CLIENT), "max_sessions_per_client"),
        plugins=tuple(plugins),
        warnings=tuple(warnings),
        file=file,
        options=options or argparse.Namespace(),
    )


def _with_server_url(file: dict[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """A local's server given as an ss:// URL (--server-url, "server_url"; a SIP008 list's pick
    arrives here as one too): its host, port, method and password stand in for the file's keys,
    and flags still win over them."""
    url = flags.get("server_url", file.get("server_url"))
    if url is None:
        return file
    if not isinstance(url, str):
        raise ConfigError('"server_url" must be an ss:// URL string')
    spec = parse_ss_url(url)
    if spec.plugin:
        raise ConfigError(f"the server's URL asks for the SIP003 plugin {spec.plugin!r}, which relay does not support")
    if "server" in flags:
        raise ConfigError("give the server either as --server or as an ss:// URL, not both")
    return {**file, "server": spec.server.host, "server_port": spec.server.port, "method": spec.method, "password": spec.password}


def _check_keys(file: Mapping[str, Any]) -> list[str]:
    return [f"config key {key!r} is unknown and ignored" for key in file if key not in _KNOWN | _LIBEV_IGNORED]


def _listen(role: Role, file: Mapping[str, Any], flags: Mapping[str, Any]) -> tuple[Address, ...]:
    if "listen" in flags:
        return (_address(flags["listen"], "listen"),)
    if role == "local" and ("local_address" in file or "local_port" in file):
        host = file.get("local_address", "127.0.0.1")
        port = _port(file.get("local_port", 1080), "local_port")
        return tuple(Address(h, port) for h in _hosts(host, "local_address"))
    if role == "remote" and ("server" in file or "server_port" in file):
        port = _port(file.get("server_port", 8388), "server_port")
        return tuple(Address(h, port) for h in _hosts(file.get("server", "0.0.0.0"), "server"))
    return (_address(_DEFAULT_LISTEN[role], "listen"),)


def _server(file: Mapping[str, Any], flags: Mapping[str, Any]) -> Address:
    if "server" in flags:
        return _address(flags["server"], "server")
    if "server" not in file:
        raise ConfigError('a local needs its remote: give --server HOST:PORT or "server" and "server_port" in the config file')
    hosts = _hosts(file["server"], "server")
    if "server_port" not in file:
        raise ConfigError('"server_port" is missing from the config file')
    return Address(hosts[0], _port(file["server_port"], "server_port"))


def _hosts(value: Any, key: str) -> list[str]:
    hosts = [value] if isinstance(value, str) else value
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f'"{key}" must be a host name or address (or a list of them), not {value!r}')
    return hosts


def _address(value: Any, key: str) -> Address:
    if not isinstance(value, str):
        raise ConfigError(f'"{key}" must be a "HOST:PORT" string, not {value!r}')
    try:
        return parse_host_port(value, what=key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _port(value: Any, key: str) -> int:
    try:
        return parse_port(value, what=key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _seconds(value: Any, key: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f'"{key}" must be a number of seconds, not {value!r}') from None
    if isinstance(value, bool) or not 0 < seconds < 10**7:
        raise ConfigError(f'"{key}" must be a positive number of seconds, not {value!r}')
    return seconds


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _users(value: Any) -> dict[str, str]:
    """A multi-user remote's users: ``[{"name": ..., "password": ...}, ...]`` as sing-box and
    shadowsocks-rust write them, or ``{"name": "password"}``."""
    if value is None:
        return {}
    shape = '"users" must be a list of {"name": ..., "password": ...}'
    if isinstance(value, dict):
        value = [{"name": name, "password": password} for name, password in value.items()]
    if not isinstance(value, list):
        raise ConfigError(shape)
    users: dict[str, str] = {}
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("password"), str):
            raise ConfigError(shape)
        name = entry["name"]
        _utf8(name, '"users" name')
        if not name or name in users:
            raise ConfigError(f'"users": every user needs a name of their own ({name!r})')
        users[name] = entry["password"]
    return users


def _key_for_users(cipher: Cipher, password: str, users: dict[str, str], role: str) -> Any:
    """A cipher plugin that serves several users on one port says so with ``key_for_users``."""
    if role != "remote":
        raise ConfigError('"users" is a remote\'s setting; a local names its user by its password (for Shadowsocks 2022: IDENTITY_KEY:USER_KEY)')
    make = getattr(cipher, "key_for_users", None)
    if make is None:
        raise ConfigError(f'"users": method {cipher.name} serves one key; several users on one port need a method that has them, such as 2022-blake3-aes-256-gcm')
    return make(password, users)


def _auth(value: Any) -> dict[str, str]:
    """``{"user": "password"}`` from the file, or ``["user:password", ...]`` from ``--auth``."""
    if isinstance(value, (list, tuple)):
        pairs = [str(item).partition(":") for item in value]
        if any(not sep or not user for user, sep, _ in pairs):
            raise ConfigError('"auth" entries must be USER:PASSWORD')
        value = {user: password for user, _, password in pairs}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
        raise ConfigError('"auth" must map user names to passwords, like {"alice": "secret"}')
    for user, password in value.items():
        _utf8(user, '"auth" user name')
        _utf8(password, '"auth" password')
    return dict(value)


def _utf8(text: str, what: str) -> None:
    """Text that cannot be UTF-8 encoded (a lone surrogate from a JSON \\ud800) is refused here,
    not later at every login or key derivation."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} is not valid Unicode text") from None


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'"{key}" must be a whole number of at least 1, not {value!r}')
    return value


def _replay_capacity(value: Any) -> int:
    capacity = _count(value, "replay_capacity")
    if capacity > MAX_REPLAY_CAPACITY:
        raise ConfigError(f'"replay_capacity" must be at most {MAX_REPLAY_CAPACITY} salts (21.3 bytes of memory each), not {value!r}')
    return capacity


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f'"{key}" must be true or false, not {value!r}')
    return value


def _cipher(ciphers: Mapping[str, Cipher], method: str) -> Cipher:
    if method in ciphers:
        return ciphers[method]
    if method in _INSECURE_METHODS:
        raise ConfigError(f"method {method!r} is a stream cipher without authentication: insecure and refused; use an AEAD method such as {DEFAULT_METHOD}")
    known = ", ".join(sorted(ciphers)) or "none: is the shadowsocks plugin installed?"
    raise ConfigError(f"unknown method {method!r} (known: {known})")


def _base64_key(text: Any, cipher: Cipher) -> bytes:
    try:
        key = base64.b64decode(str(text), altchars=b"-_" if ("-" in str(text) or "_" in str(text)) else None, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError('"key" must be base64') from None
    if len(key) != cipher.key_size:
        raise ConfigError(f'"key" must be {cipher.key_size} bytes for {cipher.name}, got {len(key)}')
    return key


def _handler(handlers: Mapping[str, HandlerSpec], name: Any, key: str) -> HandlerSpec:
    if not isinstance(name, str):
        raise ConfigError(f'"{key}" must be a handler name, not {name!r}')
    if name in handlers:
        return handlers[name]
    known = ", ".join(sorted(handlers)) or "none"
    raise ConfigError(f"unknown {key} {name!r} (known: {known})")
