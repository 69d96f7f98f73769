"""The tunnel front-end (like ss-tunnel): every connection, and every datagram, goes to one
fixed target; answers to a datagram go back to its sender."""

from __future__ import annotations

from relay import Handshake, HandlerSpec, Ready, RelayHandler, Session, hookimpl
from relay.udp import DatagramHandler


class TunnelHandler(RelayHandler):
    @classmethod
    def handshake(cls, session: Session) -> Handshake:
        target = session.config.forward
        if target is None:
            raise ValueError("the tunnel handler needs config.forward")
        handshake = Handshake()
        handshake.ready = Ready(target)  # nothing to read: the target is the configured one
        return handshake


class TunnelDatagramHandler(DatagramHandler):
    def handle(self) -> None:
        data, sock = self.request
        client = self.client_address
        association = self.association(lambda source, payload: sock.sendto(payload, client))
        if association is not None:
            self.forward(association, self.server.config.forward, data)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("tunnel", TunnelHandler, "forward every connection (and datagram) to the --forward target", TunnelDatagramHandler)]
