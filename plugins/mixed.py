"""The mixed front-end, a local's default: SOCKS5, SOCKS4/4a and HTTP on one port, told apart by
the client's first byte (5 and 4 are the SOCKS versions; an HTTP request starts with a letter).

SOCKS5 runs in the event loop (its handshake is sans-I/O); SOCKS4 and HTTP continue in a thread,
their handlers reading first what the loop had read already."""

from __future__ import annotations

from typing import Any

from relay import Handshake, HandlerSpec, ProtocolError, Ready, RelayHandler, Session, hookimpl

from .http import HttpProxyHandler
from .socks4 import Socks4Handler
from .socks5 import _HANDSHAKE_BUFFER, Socks5DatagramHandler, Socks5Handler, Socks5Handshake


class MixedHandler(Socks5Handler, Socks4Handler, HttpProxyHandler):
    handle = RelayHandler.handle  # drives MixedHandshake, in the loop or (without one) in a thread

    @classmethod
    def handshake(cls, session: Session) -> MixedHandshake:
        return MixedHandshake(session)


class MixedHandshake(Handshake):
    """Reads the first bytes, then is a Socks5Handshake, or hands SOCKS4 and HTTP to a thread."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.buffer = memoryview(bytearray(_HANDSHAKE_BUFFER))
        self.socks5: Socks5Handshake | None = None
        self._ready: Ready | None = None

    @property  # type: ignore[override]
    def ready(self) -> Ready | None:
        return self.socks5.ready if self.socks5 is not None else self._ready

    @property  # type: ignore[override]
    def reply(self) -> bytes:
        return self.socks5.reply if self.socks5 is not None else b""

    def take_reply(self) -> bytes:
        return self.socks5.take_reply() if self.socks5 is not None else b""

    def recv_buffer(self) -> memoryview:
        return self.socks5.recv_buffer() if self.socks5 is not None else self.buffer

    def eof(self) -> None:
        if self.socks5 is not None:
            self.socks5.eof()
        raise ProtocolError("closed before saying anything")

    def received(self, nbytes: int) -> None:
        if self.socks5 is not None:
            self.socks5.received(nbytes)
            return
        if self.buffer[0] == 5:
            self.socks5 = Socks5Handshake(self.session, self.buffer)
            self.socks5.received(nbytes)
            return
        handler = Socks4Handler.handle if self.buffer[0] == 4 else HttpProxyHandler.handle
        self._ready = Ready(None, serve=lambda relay_handler: _serve(handler, relay_handler, bytes(self.buffer[:nbytes])))


def _serve(handle: Any, handler: MixedHandler, read: bytes) -> None:
    handler.pushback = read
    handle(handler)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("mixed", MixedHandler, "SOCKS5, SOCKS4/4a and HTTP proxy on one port (a local's default)", Socks5DatagramHandler)]
