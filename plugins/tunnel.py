"""The tunnel front-end (like ss-tunnel): every connection goes to one fixed target."""

from __future__ import annotations

from relay import HandlerSpec, RelayHandler, hookimpl


class TunnelHandler(RelayHandler):
    def handle(self) -> None:
        target = self.session.config.forward
        if target is None:
            raise ValueError("the tunnel handler needs config.forward")
        self.relay(self.open_upstream(target))


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("tunnel", TunnelHandler, "forward every connection to the --forward target")]
