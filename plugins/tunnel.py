"""The tunnel front-end (like ss-tunnel): every connection, and every datagram, goes to one
fixed target; answers to a datagram go back to its sender."""

from __future__ import annotations

from relay import HandlerSpec, RelayHandler, hookimpl
from relay.udp import DatagramHandler


class TunnelHandler(RelayHandler):
    def handle(self) -> None:
        target = self.session.config.forward
        if target is None:
            raise ValueError("the tunnel handler needs config.forward")
        self.relay(self.open_upstream(target))


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
