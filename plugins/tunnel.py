"""The tunnel front-end (like ss-tunnel): every connection, and every datagram, goes to one
fixed target; answers to a datagram go back to its sender."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay import Handshake, HandlerSpec, Ready, RelayHandler, Session, hookimpl
from relay.udp import DatagramHandler, RelayUDPServer


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
    @classmethod
    def receiver(cls, server: RelayUDPServer) -> Callable[[bytes, Any], None]:
        target = server.config.forward
        send_answer = server.send_answer
        find, associate, forward = server.associations.get, server.associate, server.forward

        def receive(data: bytes, client: Any) -> None:
            association = find(client)
            if association is None:
                association = associate(client, lambda source, payload: send_answer(payload, client))
                if association is None:
                    return
            forward(association, target, data)

        return receive


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("tunnel", TunnelHandler, "forward every connection (and datagram) to the --forward target", TunnelDatagramHandler)]
