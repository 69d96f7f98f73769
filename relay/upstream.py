"""The core's own plugin: the last word on where a session's bytes go.

Registered by the plugin manager under the name ``core``. Being ``trylast``, any plugin can
answer ``relay_open_upstream`` before it (the shadowsocks plugin does, on a local relay).
"""

from __future__ import annotations

from .address import Address
from .config import Config
from .endpoint import Endpoint
from .errors import ConfigError
from .hookspecs import hookimpl, nonblocking
from .net import connect_tcp, start_connect
from .server import RelayHandler, start_terminal_handler
from .session import Session
from .udp import DatagramUpstream, DirectDatagramUpstream, HandlerDatagramUpstream

__all__ = ["relay_configure", "relay_open_upstream", "relay_open_datagram_upstream"]


@hookimpl
def relay_configure(config: Config) -> None:
    """A remote's ``--handler`` answers tunnelled streams itself: a front-end (one that relays to
    a target of its own) cannot."""
    spec = config.upstream_handler
    if spec is not None and issubclass(spec.handler, RelayHandler):
        raise ConfigError(
            f'handler {spec.name!r} is a front-end (it relays to a target of its own); a remote\'s '
            '"handler" answers tunnelled streams itself, as echo and uppercase do'
        )


@hookimpl(trylast=True)
@nonblocking
def relay_open_upstream(session: Session, target: Address, evented: bool) -> Endpoint:
    """A remote's ``--handler`` answers the stream itself; otherwise dial the target directly,
    checking every address it resolves to against the private-address policy (from the event
    loop: an IP literal at once, a name to resolve from a thread)."""
    config = session.config
    if config.upstream_handler is not None:
        return start_terminal_handler(session, config.upstream_handler.handler)
    check = config.egress.for_target(target.host)
    if evented:
        return Endpoint(start_connect(target, check), connecting=True, connect_timeout=config.connect_timeout)
    return Endpoint(connect_tcp(target, config.connect_timeout, check))


@hookimpl(trylast=True)
def relay_open_datagram_upstream(session: Session) -> DatagramUpstream:
    """A remote's ``--handler`` answers the datagrams itself; otherwise send them directly,
    checking every target against the private-address policy."""
    config = session.config
    if config.upstream_handler is not None and config.upstream_handler.datagram_handler is not None:
        return HandlerDatagramUpstream(session, config.upstream_handler.datagram_handler)
    return DirectDatagramUpstream(config.egress)
