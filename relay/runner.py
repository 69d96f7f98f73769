"""Start and stop relays: the servers of one or more configs, each serving in its own thread."""

from __future__ import annotations

import logging
import threading
import time

from .config import Config
from .errors import ConfigError
from .plugin_manager import RelayPluginManager
from .server import RelayServer

__all__ = ["Runner"]

log = logging.getLogger("relay")

POLL_INTERVAL = 0.2  # how quickly serve_forever notices a shutdown request


class Runner:
    """The running relays of one process. ``start(config)`` listens at once; ``stop()`` closes
    the listeners, ends every live session and waits (boundedly) for their threads."""

    def __init__(self, pm: RelayPluginManager) -> None:
        self.pm = pm
        self.servers: list[RelayServer] = []
        self._threads: list[threading.Thread] = []

    def start(self, config: Config) -> list[RelayServer]:
        self.pm.hook.relay_configure(config=config)
        for warning in config.warnings:
            log.warning("%s", warning)
        started = []
        for address in config.listen:
            try:
                server = RelayServer(config, self.pm.hook, address)
            except OSError as e:
                raise ConfigError(f"cannot listen on {address}: {(e.strerror or str(e)).lower()}") from None
            thread = threading.Thread(
                target=server.serve_forever, args=(POLL_INTERVAL,), name=f"{config.role}-{server.address}", daemon=True
            )
            thread.start()
            self.servers.append(server)
            self._threads.append(thread)
            started.append(server)
            log.info("%s (%s) listening on %s", config.role, config.handler.name, server.address)
        return started

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
