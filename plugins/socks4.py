"""The SOCKS4/4a front-end: CONNECT to IPv4 addresses and (4a) host names. BIND is answered
"rejected". SOCKS4 carries no password, so a local that requires authentication refuses it."""

from __future__ import annotations

import socket

from relay import Address, Endpoint, HandlerSpec, ParsedHandshake, Ready, RelayHandler, Session, hookimpl
from relay.errors import Socks4Error
from relay.socks4 import NEED_DATA, Command, ReplyCode, Socks4Reply, Socks4Server, State


class Socks4Handler(RelayHandler):
    handle = RelayHandler.handle  # drives Socks4Handshake, in the loop or (without one) in a thread

    @classmethod
    def handshake(cls, session: Session) -> Socks4Handshake:
        return Socks4Handshake(session)


class Socks4Handshake(ParsedHandshake):
    """The request, sans-I/O; ready with its target once it is whole. The client is granted
    once the upstream is connected (with the address it connected from, for a direct IPv4
    connection), else rejected; a request refused outright (BIND, a bad field, authentication
    required) is rejected at once."""

    what = "the SOCKS4 request"

    def __init__(self, session: Session, buffer: memoryview | None = None) -> None:
        super().__init__(buffer)
        self.auth_required = bool(session.config.auth)
        self.protocol = Socks4Server()

    def received(self, nbytes: int) -> None:
        self.feed(nbytes)
        protocol = self.protocol
        try:
            request = protocol.next_event()
            if request is NEED_DATA:
                return
            if self.auth_required:
                raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, "SOCKS4 cannot authenticate, and this local requires it")
            if request.command is not Command.CONNECT:
                raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, f"{request.command.name} is not supported")
        except Socks4Error as e:
            self.reply = self._rejected(e)
            raise
        self.ready = Ready(request.target, early=protocol.trailing_data, connected=self._granted, failed=self._rejected)

    def _granted(self, upstream: Endpoint) -> bytes:
        bound = Address("0.0.0.0", 0)
        if upstream.encoder is None and upstream.sock.family == socket.AF_INET:
            host, port = upstream.sock.getsockname()[:2]
            bound = Address(host, port)
        return self.protocol.send(Socks4Reply(ReplyCode.GRANTED, bound))

    def _rejected(self, error: BaseException) -> bytes:
        if self.protocol.state not in (State.REQUEST, State.REPLYING):
            return b""
        return self.protocol.send(Socks4Reply(ReplyCode.REJECTED_OR_FAILED))


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("socks4", Socks4Handler, "SOCKS4 and SOCKS4a proxy, CONNECT")]
