"""The echo handler: sends back exactly what it receives, until the client closes; for
datagrams, each one straight back to its sender."""

from __future__ import annotations

import socketserver

from relay import HandlerSpec, hookimpl


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        buffer = bytearray(64 * 1024)
        view = memoryview(buffer)
        while n := self.request.recv_into(buffer):
            self.request.sendall(view[:n])


class EchoDatagramHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("echo", EchoHandler, "send back every byte received", EchoDatagramHandler)]
