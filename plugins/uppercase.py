"""The uppercase handler: the TCP server example of Python's socketserver documentation,
streaming: every byte received comes back upper-cased, until the client closes."""

from __future__ import annotations

import socketserver

from relay import HandlerSpec, hookimpl


class UppercaseHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(64 * 1024):
            self.request.sendall(data.upper())


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("uppercase", UppercaseHandler, "send back what was received, upper-cased (ASCII)")]
