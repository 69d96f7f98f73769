"""The NAT-style association table of a UDP relay. Pure logic, no sockets.

One entry per client address. An entry expires after ``idle_timeout`` seconds without traffic
(RFC 4787 asks NATs for at least 300 s); the table holds at most ``capacity`` entries and evicts
the least recently used one to make room. Thread-safe: the datagram thread adds and touches
entries while other threads expire or remove them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["AssociationTable", "REFRESH"]

REFRESH = 0.25  # seconds between refreshes of an entry's last use

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class AssociationTable(Generic[K, V]):
    def __init__(self, capacity: int, idle_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The entry for ``key``, marked as just used; None if there is none.

        The mark is refreshed at most every ``REFRESH`` seconds: a flow of datagrams finds its
        entry many thousand times a second, and expiry and eviction need no finer clock."""
        found = self._entries.get(key)  # one C call, atomic under the GIL: the lock is for changes
        if found is None:
            return None
        now = self._clock()
        if now - found[1] >= REFRESH:
            with self._lock:
                current = self._entries.get(key)  # replaced or removed meanwhile: keep what is there
                if current is not None:
                    self._entries[key] = (current[0], now)
                    self._entries.move_to_end(key)
        return found[0]

    def peek(self, key: K) -> V | None:
        """The entry for ``key``, without marking it used."""
        with self._lock:
            found = self._entries.get(key)
            return None if found is None else found[0]

    def touch(self, key: K) -> None:
        self.get(key)

    def add(self, key: K, value: V) -> list[tuple[K, V]]:
        """Insert (or replace) an entry; return the entries evicted to stay within capacity."""
        with self._lock:
            self._entries[key] = (value, self._clock())
            self._entries.move_to_end(key)
            evicted = []
            while len(self._entries) > self.capacity:
                old_key, (old_value, _) = self._entries.popitem(last=False)
                evicted.append((old_key, old_value))
            return evicted

    def pop(self, key: K) -> V | None:
        with self._lock:
            found = self._entries.pop(key, None)
            return None if found is None else found[0]

    def expire(self) -> list[tuple[K, V]]:
        """Remove and return the entries idle for ``idle_timeout`` seconds or more."""
        deadline = self._clock() - self.idle_timeout
        expired = []
        with self._lock:
            while self._entries:
                key, (value, used) = next(iter(self._entries.items()))
                if used > deadline:
                    break
                del self._entries[key]
                expired.append((key, value))
        return expired

    def clear(self) -> list[tuple[K, V]]:
        with self._lock:
            entries = [(key, value) for key, (value, _) in self._entries.items()]
            self._entries.clear()
            return entries
