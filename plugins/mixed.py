"""The mixed front-end, a local's default: SOCKS5, SOCKS4/4a and HTTP on one port, told apart by
the client's first byte (5 and 4 are the SOCKS versions; an HTTP request starts with a letter).

Each protocol's handshake is sans-I/O, so all three run in the event loop; HTTP requests other
than CONNECT go on in a thread (HttpProxyHandler.serve_requests)."""

from __future__ import annotations

from relay import Handshake, HandlerSpec, ProtocolError, Ready, RelayHandler, Session, hookimpl
from relay.server import HANDSHAKE_BUFFER

from .http import HttpHandshake, HttpProxyHandler
from .socks4 import Socks4Handler, Socks4Handshake
from .socks5 import Socks5DatagramHandler, Socks5Handler, Socks5Handshake


class MixedHandler(Socks5Handler, Socks4Handler, HttpProxyHandler):
    handle = RelayHandler.handle  # drives MixedHandshake, in the loop or (without one) in a thread

    @classmethod
    def handshake(cls, session: Session) -> MixedHandshake:
        return MixedHandshake(session)


class MixedHandshake(Handshake):
    """Reads the first bytes, then is the handshake of the protocol they start."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.buffer = memoryview(bytearray(HANDSHAKE_BUFFER))
        self.inner: Handshake | None = None

    @property  # type: ignore[override]
    def ready(self) -> Ready | None:
        return self.inner.ready if self.inner is not None else None

    @property  # type: ignore[override]
    def reply(self) -> bytes:
        return self.inner.reply if self.inner is not None else b""

    def take_reply(self) -> bytes:
        return self.inner.take_reply() if self.inner is not None else b""

    def take_ready(self) -> Ready | None:
        return self.inner.take_ready() if self.inner is not None else None

    def recv_buffer(self) -> memoryview:
        return self.inner.recv_buffer() if self.inner is not None else self.buffer

    def eof(self) -> None:
        if self.inner is not None:
            self.inner.eof()
        raise ProtocolError("closed before saying anything")

    def received(self, nbytes: int) -> None:
        if self.inner is None:
            first = self.buffer[0]
            kind = Socks5Handshake if first == 5 else Socks4Handshake if first == 4 else HttpHandshake
            self.inner = kind(self.session, self.buffer)
        self.inner.received(nbytes)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("mixed", MixedHandler, "SOCKS5, SOCKS4/4a and HTTP proxy on one port (a local's default)", Socks5DatagramHandler)]
