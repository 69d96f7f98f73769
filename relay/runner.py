"""Start and stop relays: the servers of one or more configs, each serving in its own thread."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .address import Address
from .config import Config
from .errors import ConfigError
from .plugin_manager import RelayPluginManager
from .server import RelayServer
from .udp import RelayUDPServer

__all__ = ["Runner"]

log = logging.getLogger("relay")

POLL_INTERVAL = 0.2  # how quickly serve_forever notices a shutdown request


class Runner:
    """The running relays of one process. ``start(config)`` listens at once; ``stop()`` closes
    the listeners, ends every live session and waits (boundedly) for their threads."""

    def __init__(self, pm: RelayPluginManager) -> None:
        self.pm = pm
        self.servers: list[RelayServer | RelayUDPServer] = []
        self._threads: list[threading.Thread] = []

    def start(self, config: Config) -> list[RelayServer | RelayUDPServer]:
        """Listen as ``config`` says: for each address a TCP server, a UDP server on the same
        port, or both (the TCP one first)."""
        self.pm.hook.relay_configure(config=config)
        for warning in config.warnings:
            log.warning("%s", warning)
        started: list[RelayServer | RelayUDPServer] = []
        for address in config.listen:
            tcp = self._listen(RelayServer, config, address) if config.tcp else None
            if tcp is not None:
                started.append(tcp)
            if config.udp:
                # Datagrams on the same port as streams, as Shadowsocks peers expect.
                udp = self._listen(RelayUDPServer, config, tcp.address if tcp is not None else address)
                started.append(udp)
                if tcp is not None:
                    tcp.udp_server = udp
            where = started[-1].address
            kinds = " and ".join(k for k, on in (("tcp", config.tcp), ("udp", config.udp)) if on)
            log.info("%s (%s) listening on %s (%s)", config.role, config.handler.name, where, kinds)
        return started

    def _listen(self, server_class: type, config: Config, address: Address) -> Any:
        try:
            server = server_class(config, self.pm.hook, address, v6only=len(config.listen) > 1)
        except OSError as e:
            kind = "udp" if server_class is RelayUDPServer else "tcp"
            raise ConfigError(f"cannot listen on {address} ({kind}): {(e.strerror or str(e)).lower()}") from None
        thread = threading.Thread(
            target=server.serve_forever, args=(POLL_INTERVAL,), name=f"{config.role}-{server.address}", daemon=True
        )
        thread.start()
        self.servers.append(server)
        self._threads.append(thread)
        return server

    def stop(self, grace: float = 3.0) -> None:
        stoppers = [threading.Thread(target=server.shutdown) for server in self.servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self.servers:
            server.server_close()
            server.close_sessions()
        deadline = time.monotonic() + grace
        while any(server.live_sessions for server in self.servers) and time.monotonic() < deadline:
            time.sleep(0.02)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.servers.clear()
        self._threads.clear()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
