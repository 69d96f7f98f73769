"""relay: a plugin-based TCP proxy in the Shadowsocks spirit.

The public API, for plugins and embedders: the hook markers, the types hooks receive and
return, and the error tree. The plugin contract itself is relay.hookspecs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .address import Address
from .config import Config
from .endpoint import Endpoint
from .errors import ConfigError, DecryptError, ProtocolError, RelayError, Socks5Error, TargetRefused, WouldBlock
from .hookspecs import HandlerSpec, hookimpl, hookspec, nonblocking
from .server import Handshake, ParsedHandshake, Ready, RelayHandler
from .session import Session

__all__ = [
    "__version__",
    "Address",
    "Config",
    "RelayHandler",
    "Handshake",
    "ParsedHandshake",
    "Ready",
    "Endpoint",
    "HandlerSpec",
    "Session",
    "hookimpl",
    "hookspec",
    "nonblocking",
    "RelayError",
    "ConfigError",
    "TargetRefused",
    "ProtocolError",
    "Socks5Error",
    "DecryptError",
    "WouldBlock",
]
