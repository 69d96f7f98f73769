"""The SOCKS4/4a front-end: CONNECT to IPv4 addresses and (4a) host names. BIND is answered
"rejected". SOCKS4 carries no password, so a local that requires authentication refuses it."""

from __future__ import annotations

import socket

from relay import Address, HandlerSpec, ProtocolError, RelayHandler, TargetRefused, hookimpl
from relay.errors import Socks4Error
from relay.socks4 import Command, ReplyCode, Socks4Reply, Socks4Request, Socks4Server


class Socks4Handler(RelayHandler):
    def handle(self) -> None:
        conn = self.request
        protocol = Socks4Server()
        try:
            request = self.next_event(protocol)
            assert isinstance(request, Socks4Request)
            if self.session.config.auth:
                raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, "SOCKS4 cannot authenticate, and this local requires it")
            if request.command is not Command.CONNECT:
                raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, f"{request.command.name} is not supported")
            upstream = self.open_upstream(request.target)
        except (Socks4Error, TargetRefused, OSError):
            if protocol.state.name in ("REQUEST", "REPLYING"):
                try:
                    conn.sendall(protocol.send(Socks4Reply(ReplyCode.REJECTED_OR_FAILED)))
                except (OSError, ProtocolError):
                    pass
            raise
        bound = Address("0.0.0.0", 0)
        if upstream.encoder is None and upstream.sock.family == socket.AF_INET:
            host, port = upstream.sock.getsockname()[:2]
            bound = Address(host, port)
        conn.sendall(protocol.send(Socks4Reply(ReplyCode.GRANTED, bound)))
        self.relay(upstream, early=protocol.trailing_data)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("socks4", Socks4Handler, "SOCKS4 and SOCKS4a proxy, CONNECT")]
