"""What every sans-I/O protocol object of relay shares (h11's conventions).

``receive_data(data)`` buffers bytes (``b""`` is EOF), ``next_event()`` returns the next whole
message or ``NEED_DATA``, and ``send(message)`` returns the bytes to write.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["NEED_DATA", "NeedData", "SansIO"]


class NeedData:
    """The type of ``NEED_DATA``: no whole message is buffered yet."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class SansIO(Protocol):
    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Any: ...
