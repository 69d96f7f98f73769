"""The session: what hooks and handlers know about one accepted connection. Pure data."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from .address import Address
from .config import Config

__all__ = ["Session"]

_ids = itertools.count(1)


@dataclass(eq=False)
class Session:
    """One TCP connection from accept to close.

    ``data`` is free for plugins to keep per-session state in (key it by plugin name).
    """

    config: Config
    client: Address
    server: Any = field(default=None, repr=False)
    """The socketserver server that accepted the session."""
    id: int = field(default_factory=lambda: next(_ids))
    target: Address | None = None
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    """Payload bytes from the client towards the target."""
    bytes_down: int = 0
    """Payload bytes from the target back to the client."""
    data: dict[str, Any] = field(default_factory=dict)
    client_address: Any = field(default=None, repr=False)
    """The peer address as the socket gave it (socketserver's ``client_address``)."""

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

    def __str__(self) -> str:
        where = f" -> {self.target}" if self.target else ""
        return f"session {self.id} {self.client}{where}"
