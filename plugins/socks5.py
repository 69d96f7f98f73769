"""The SOCKS5 front-end (RFC 1928): CONNECT to IPv4, IPv6 and domain-name targets."""

from __future__ import annotations

import errno
import socket

from relay import HandlerSpec, RelayHandler, Socks5Error, TargetRefused, hookimpl
from relay.socks5 import Command, Greeting, Method, MethodSelection, Reply, ReplyCode, Request, Socks5Server


class Socks5Handler(RelayHandler):
    def handle(self) -> None:
        conn = self.request
        protocol = Socks5Server()
        greeting = self.next_event(protocol)
        assert isinstance(greeting, Greeting)
        if Method.NO_AUTHENTICATION not in greeting.methods:
            conn.sendall(protocol.send(MethodSelection(Method.NO_ACCEPTABLE_METHODS)))
            raise Socks5Error(ReplyCode.GENERAL_FAILURE, "client offers no method we accept (no authentication)")
        conn.sendall(protocol.send(MethodSelection(Method.NO_AUTHENTICATION)))
        try:
            request = self.next_event(protocol)
            assert isinstance(request, Request)
            if request.command is not Command.CONNECT:
                raise Socks5Error(ReplyCode.COMMAND_NOT_SUPPORTED, f"{request.command.name} is not supported")
            upstream = self.open_upstream(request.target)
        except (Socks5Error, TargetRefused, OSError) as e:
            code = reply_code_for(e)
            try:
                conn.sendall(protocol.send(Reply(code)))
            except OSError:
                pass  # the client is gone already
            raise
        bound = upstream.bound or Reply.bound
        conn.sendall(protocol.send(Reply(ReplyCode.SUCCEEDED, bound)))
        self.relay(upstream, early=protocol.trailing_data)


def reply_code_for(error: BaseException) -> ReplyCode:
    """The reply a client gets when its target could not be reached because of ``error``."""
    if isinstance(error, Socks5Error):
        return ReplyCode(error.reply_code)
    if isinstance(error, TargetRefused):
        return ReplyCode.CONNECTION_NOT_ALLOWED
    if isinstance(error, ConnectionRefusedError):
        return ReplyCode.CONNECTION_REFUSED
    if isinstance(error, (socket.gaierror, TimeoutError)):
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(error, OSError) and error.errno == errno.ENETUNREACH:
        return ReplyCode.NETWORK_UNREACHABLE
    if isinstance(error, OSError) and error.errno == errno.EHOSTUNREACH:
        return ReplyCode.HOST_UNREACHABLE
    return ReplyCode.GENERAL_FAILURE


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("socks5", Socks5Handler, "SOCKS5 proxy (RFC 1928), CONNECT")]
