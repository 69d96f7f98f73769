"""An endpoint: one socket of a session, and how its bytes are framed."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Callable

from .address import Address
from .codec import StreamDecoder, StreamEncoder
from .config import DEFAULT_CONNECT_TIMEOUT

__all__ = ["Endpoint"]


@dataclass(eq=False)
class Endpoint:
    """A connected socket as the pump sees it.

    ``decoder`` turns what arrives on ``sock`` into plaintext and ``encoder`` frames plaintext
    before it is sent on ``sock`` (``None``: plain bytes). ``first_flight`` is plaintext that must
    go out on ``sock`` before anything else; the pump sends it together with the first data from
    the other side when that arrives promptly (a Shadowsocks client's target header).
    ``bound`` is the address the outgoing connection is bound to, when a plugin knows better
    than the socket's own (a SOCKS5 reply names it). ``on_close`` runs once after the pump
    closed ``sock``.

    ``connecting``: ``sock`` is non-blocking and its connect is still in progress (an upstream
    opened from the event loop, see ``relay_open_upstream``); the pump waits up to
    ``connect_timeout`` seconds for it to complete before moving anything, and a failed connect
    ends the session with the connect's error.
    """

    sock: socket.socket
    decoder: StreamDecoder | None = None
    encoder: StreamEncoder | None = None
    first_flight: bytes | None = None
    bound: Address | None = None
    on_close: Callable[[], None] | None = field(default=None, repr=False)
    connecting: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def close(self) -> None:
        """Close the socket and run ``on_close``, once."""
        try:
            self.sock.close()
        except OSError:
            pass
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
