"""The uppercase handler: the TCP and UDP server examples of Python's socketserver
documentation, streaming: every byte received comes back upper-cased, until the client closes;
every datagram comes back upper-cased to its sender."""

from __future__ import annotations

import socketserver

from relay import HandlerSpec, hookimpl


class UppercaseHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(64 * 1024):
            self.request.sendall(data.upper())


class UppercaseDatagramHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data.upper(), self.client_address)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [
        HandlerSpec("uppercase", UppercaseHandler, "send back what was received, upper-cased (ASCII)", UppercaseDatagramHandler)
    ]
