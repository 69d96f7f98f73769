"""A bounded, time-aware memory of salts, against replayed and reflected Shadowsocks flights. Pure code.

Why: AEAD-2017 (SIP004, with SIP007's per-session subkey) carries no timestamp or challenge, so a
first flight recorded on the wire authenticates again when it is sent again, and so does a
remote's own flight sent back at it (same key; the salt picks the subkey either way). A censor
that replays a flight and sees the remote connect out and answer knows what it found
(shadowsocks-org#44, #150). So the remote remembers the salt of every client flight whose first
chunk authenticated, and of every flight it sends itself, and treats a flight whose salt it
remembers as a probe. shadowsocks-libev (``ppbloom``) and shadowsocks-rust (``PingPongBloom``)
keep two generations of Bloom filters, the newer taking new salts; so does this filter, with
exact fingerprints instead of Bloom bits (cheaper per lookup in Python, and no false positives
worth the name), and with a clock.

Structure: two generations, each a fixed table of ``slots`` 64-bit words (open addressing,
linear probing; 0 marks a free slot) holding at most ``capacity`` fingerprints, so at most 3/4
full::

    fingerprint = SipHash-64(salt), Python's hash of bytes, keyed at random per process, never 0
                  (BLAKE2b-64 keyed with 16 random bytes of this filter where PYTHONHASHSEED
                  turns that randomness off, or on a build without a 64-bit SipHash)
    slots       = ceil(capacity * 4 / 3)

    salts are recorded here           consulted too, then dropped
    +------------------------+        +------------------------+
    | current: slots x 8 B   | -----> | previous: slots x 8 B  | -----> gone
    +------------------------+        +------------------------+
      rotates when it holds ``capacity`` salts, or has been current for ``window`` seconds;
      the previous generation is also dropped once it was opened ``2 * window`` seconds ago.

Guarantees, for a salt recorded at time t:

* No false negatives while remembered: it is reported as seen until at least t + ``window``,
  unless ``capacity`` more salts are recorded before then (it is then remembered for at least
  those ``capacity`` more). ``on_rotate`` reports each rotation, with how long the generation
  lasted, so a remote can say when salts are kept for less than ``window``.
* It is forgotten before t + 2 * ``window`` (sooner when ``capacity`` more salts come first).
* False positives: a salt never recorded is reported as seen only if its 64-bit fingerprint
  equals one of the at most 2 * ``capacity`` stored, probability below 2 * capacity / 2**64
  (1.1e-13 with the defaults). The key is random, so nobody can aim for that.
* Memory: exactly ``2 * slots * 8`` bytes of tables once both generations exist (the previous one
  appears at the first rotation; a rotation frees the oldest table before allocating its
  replacement, so there are never three), plus a few hundred bytes of objects: ``nbytes``.
  Defaults (1,000,000 salts per generation): 2 x 1,333,334 slots x 8 B = 21,333,344 bytes
  (20.3 MiB), for up to 2,000,000 salts.
* Thread-safe: ``add_if_new`` checks and records under one lock, so of two connections sending
  the same flight at the same moment exactly one sees "new".
* Cost: one keyed hash and a few table reads per call (about a microsecond in CPython), so it
  runs for every datagram too.
"""

from __future__ import annotations

import array
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_WINDOW", "MAX_CAPACITY", "SaltFilter", "table_slots"]

DEFAULT_CAPACITY = 1_000_000
"""Salts per generation, shadowsocks-libev's server value (a TCP session records two: the
client's and the remote's own)."""
DEFAULT_WINDOW = 24 * 3600.0
"""Seconds a salt is remembered at least (while fewer than ``capacity`` salts arrive meanwhile).
Replays have been seen from a second to a day after the flight (shadowsocks-org#150)."""
MAX_CAPACITY = 100_000_000  # 1 GiB of tables per generation: beyond that, a typo rather than a plan

_SLOT_BYTES = 8
_MASK = (1 << 64) - 1
# Python's own hash of bytes is SipHash with a key drawn at random per process, unless
# PYTHONHASHSEED fixes it: a keyed 64-bit fingerprint for a tenth of BLAKE2b's cost in CPython.
_SIPHASH = bool(sys.flags.hash_randomization) and sys.hash_info.width == 64 and sys.hash_info.algorithm.startswith("siphash")


def _siphash(salt: bytes) -> int:
    return hash(bytes(salt)) & _MASK or 1


def table_slots(capacity: int) -> int:
    """The slots of one generation's table: room for ``capacity`` fingerprints at 3/4 load."""
    return -(-capacity * 4 // 3)


class _Generation:
    __slots__ = ("count", "opened", "table")

    def __init__(self, slots: int, opened: float) -> None:
        self.table = array.array("Q", [0]) * slots
        self.count = 0
        self.opened = opened


class SaltFilter:
    """Remembers salts for a while, within a fixed memory bound (see the module docstring).

    Methods for the caller:
        add_if_new(salt)   record ``salt`` and return True, or False if it was seen (atomic)
        add(salt)          record ``salt`` (the remote's own salts)
        salt in filter     whether ``salt`` is remembered (records nothing)
        len(filter)        how many salts are remembered now

    ``clock`` (monotonic seconds) can be injected for tests. ``on_rotate(lifetime, full)`` is
    called, with the filter's lock held, whenever the current generation retires: ``full`` if it
    reached ``capacity`` (possibly sooner than ``window``), else because of its age.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        window: float = DEFAULT_WINDOW,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_rotate: Callable[[float, bool], None] | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be a whole number from 1 to {MAX_CAPACITY}, not {capacity!r}")
        if not window > 0:
            raise ValueError(f"window must be a positive number of seconds, not {window!r}")
        self.capacity = capacity
        self.window = float(window)
        self.slots = table_slots(capacity)
        self._clock = clock
        self._on_rotate = on_rotate
        self._key = os.urandom(16)
        self._fingerprint: Callable[[bytes], int] = _siphash if _SIPHASH else self._keyed_blake2b
        self._lock = threading.Lock()
        self._current = _Generation(self.slots, clock())
        self._previous: _Generation | None = None
        self._schedule_expiry()
        self.rotations = 0

    def __repr__(self) -> str:
        return f"SaltFilter(capacity={self.capacity}, window={self.window:g}, nbytes={self.nbytes})"

    @property
    def nbytes(self) -> int:
        """The memory bound: bytes of both generations' tables."""
        return 2 * self.slots * _SLOT_BYTES

    @property
    def allocated(self) -> int:
        """Bytes of tables allocated now (one generation until the first rotation)."""
        with self._lock:
            return self.slots * _SLOT_BYTES * (1 if self._previous is None else 2)

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return self._current.count + (self._previous.count if self._previous is not None else 0)

    def __contains__(self, salt: bytes) -> bool:
        fingerprint = self._fingerprint(salt)
        with self._lock:
            self._expire(self._clock())
            return self._find(self._current, fingerprint) < 0 or (
                self._previous is not None and self._find(self._previous, fingerprint) < 0
            )

    def add_if_new(self, salt: bytes) -> bool:
        """Record ``salt`` and return True; or return False, recording nothing, if it is remembered."""
        fingerprint = self._fingerprint(salt)
        with self._lock:
            now = self._clock()
            self._expire(now)
            if self._previous is not None and self._find(self._previous, fingerprint) < 0:
                return False
            return self._insert(fingerprint, now)

    def add(self, salt: bytes) -> None:
        """Record ``salt``, remembered or not."""
        fingerprint = self._fingerprint(salt)
        with self._lock:
            now = self._clock()
            self._expire(now)
            self._insert(fingerprint, now)

    # -- internals (with the lock held, except the fingerprint)

    def _keyed_blake2b(self, salt: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(salt, digest_size=8, key=self._key).digest(), "little") or 1

    def _find(self, generation: _Generation, fingerprint: int) -> int:
        """-1 if ``fingerprint`` is in the table, else the free slot where it would go."""
        table, slots = generation.table, self.slots
        index = fingerprint % slots
        while True:
            value = table[index]
            if value == fingerprint:
                return -1
            if not value:
                return index
            index += 1
            if index == slots:
                index = 0

    def _insert(self, fingerprint: int, now: float) -> bool:
        """Put ``fingerprint`` in the current generation; False if it was there already."""
        current = self._current
        index = fingerprint % self.slots
        value = current.table[index]
        if value:  # else its own slot is free, the common case (twice per stream): no probing
            if value == fingerprint:
                return False
            index = self._find(current, fingerprint)
            if index < 0:
                return False
        if self._current.count >= self.capacity:
            self._rotate(now, full=True)
            index = self._find(self._current, fingerprint)
        self._current.table[index] = fingerprint
        self._current.count += 1
        return True

    def _expire(self, now: float) -> None:
        if now < self._expiry:
            return  # nothing is due (the common case, once per salt)
        if now - self._current.opened >= self.window:
            if self._current.count:
                self._rotate(now, full=False)
            else:
                self._current.opened = now  # nothing to keep: no need for a second table yet
        if self._previous is not None and now - self._previous.opened >= 2 * self.window:
            self._previous = None
        self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        """When ``_expire`` has something to do next."""
        expiry = self._current.opened + self.window
        if self._previous is not None:
            expiry = min(expiry, self._previous.opened + 2 * self.window)
        self._expiry = expiry

    def _rotate(self, now: float, full: bool) -> None:
        retired = self._current
        self._previous = None  # free the oldest table before allocating: never three generations
        self._previous = retired
        self._current = _Generation(self.slots, now)
        self._schedule_expiry()
        self.rotations += 1
        if self._on_rotate is not None:
            self._on_rotate(now - retired.opened, full)
