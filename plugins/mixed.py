"""The mixed front-end, a local's default: SOCKS5, SOCKS4/4a and HTTP on one port, told apart by
the client's first byte (5 and 4 are the SOCKS versions; an HTTP request starts with a letter)."""

from __future__ import annotations

import socket

from relay import HandlerSpec, ProtocolError, hookimpl

from .http import HttpProxyHandler
from .socks4 import Socks4Handler
from .socks5 import Socks5DatagramHandler, Socks5Handler


class MixedHandler(Socks5Handler, Socks4Handler, HttpProxyHandler):
    def handle(self) -> None:
        first = self.request.recv(1, socket.MSG_PEEK)
        if not first:
            raise ProtocolError("closed before saying anything")
        if first[0] == 5:
            Socks5Handler.handle(self)
        elif first[0] == 4:
            Socks4Handler.handle(self)
        else:
            HttpProxyHandler.handle(self)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("mixed", MixedHandler, "SOCKS5, SOCKS4/4a and HTTP proxy on one port (a local's default)", Socks5DatagramHandler)]
