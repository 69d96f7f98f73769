"""The per-chunk contract between the pump and whatever transforms a stream.

A session's bytes move in a loop of plain calls (see relay.pump)::

    n = sock.recv_into(decoder.recv_buffer())
    plaintext = decoder.received(n)          # may be empty: a frame is not complete yet
    peer.sendall(encoder.encode(plaintext))  # whole frames, one send

Decoders own their receive buffer so that a cipher can decrypt in place of a copy; the
memoryviews they hand out are valid until their next call. ``None`` as an encoder means
"send as is". Nothing here touches a socket.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .address import Address

__all__ = ["StreamDecoder", "StreamEncoder", "DatagramCodec", "Cipher", "PlainDecoder", "ChunkReceiveBuffer", "DEFAULT_BUFFER_SIZE", "INITIAL_BUFFER_SIZE"]

DEFAULT_BUFFER_SIZE = 256 * 1024


@runtime_checkable
class StreamDecoder(Protocol):
    def recv_buffer(self) -> memoryview:
        """Where the next ``recv_into`` should write."""

    def received(self, nbytes: int) -> memoryview:
        """Account for ``nbytes`` written to the last ``recv_buffer``; return the plaintext now ready."""

    def eof(self) -> None:
        """The peer closed; raise ``ProtocolError`` if that cut a frame in half."""


@runtime_checkable
class StreamEncoder(Protocol):
    def encode(self, data: memoryview | bytes) -> memoryview | bytes:
        """Frame ``data`` for the wire; the result is valid until the next call."""


@runtime_checkable
class DatagramCodec(Protocol):
    """Shadowsocks UDP packets: one datagram carries an address and a payload."""

    overhead: int
    """Bytes a packet adds to address + payload (salt, tag...)."""

    def encode(self, address: Address, payload: bytes | memoryview) -> bytes:
        """A client encodes the target; a server the source of the answer."""

    def decode(self, packet: bytes | memoryview) -> tuple[Address, bytes]:
        """Raise ``ProtocolError`` for anything that is not a packet under this key."""


@runtime_checkable
class Cipher(Protocol):
    """A Shadowsocks method, as a cipher plugin registers it (see relay.hookspecs)."""

    name: str
    key_size: int

    def key_from_password(self, password: str) -> Any:
        """The master key for a password (bytes for the AEAD-2017 methods; the core only hands it
        back to the cipher)."""

    def encryptor(self, key: bytes) -> StreamEncoder:
        """A fresh stream encryptor with a random salt; its first output starts with the salt."""

    def decryptor(self, key: bytes) -> StreamDecoder:
        """A fresh stream decryptor; it reads the salt first."""

    def datagram_codec(self, key: bytes) -> DatagramCodec:
        """The UDP packet codec for this key."""


INITIAL_BUFFER_SIZE = 4 * 1024


class ChunkReceiveBuffer:
    """The receive buffer of a decoder that reads whole chunks (relay.aead, relay.aead2022).

    It starts small (an idle session holds little), grows to fit the chunk being read, and
    doubles whenever a receive fills what was offered, up to ``capacity``. A partial chunk moves
    to the front when the space behind it runs short. ``_out`` (plaintext) is as large as
    ``_buf``. Subclasses call ``_offer(needed)`` from ``recv_buffer`` and ``_took(nbytes)`` first
    in ``received`` (or do what it does inline); ``decrypt`` drives them both.
    """

    def _init_buffer(self, capacity: int) -> None:
        self._capacity = capacity
        self._filled = False
        self._buf = memoryview(bytearray(INITIAL_BUFFER_SIZE))
        self._out = memoryview(bytearray(INITIAL_BUFFER_SIZE))
        self._start = 0
        self._end = 0

    def _offer(self, needed: int) -> memoryview:
        """Free space after the received bytes, room enough for ``needed`` from ``_start``."""
        buf, start, end = self._buf, self._start, self._end
        if not end and not self._filled and needed <= len(buf):
            return buf  # empty, and large enough: the case of every small exchange
        size = len(buf)
        if self._filled and size < self._capacity:
            size = min(2 * size, self._capacity)
        size = max(size, needed)
        if size > len(buf):
            grown = memoryview(bytearray(size))
            grown[: end - start] = buf[start:end]
            self._buf, self._out = grown, memoryview(bytearray(size))
            self._start, self._end = 0, end - start
        elif start and (len(buf) - start < needed or len(buf) - end < len(buf) // 4):
            buf[: end - start] = buf[start:end]  # move the partial chunk to the front
            self._start, self._end = 0, end - start
        self._filled = False
        return self._buf[self._end :]

    def _took(self, nbytes: int) -> int:
        """Record a receive of ``nbytes`` into the offered space; the new end."""
        self._filled = self._end + nbytes == len(self._buf)
        self._end += nbytes
        return self._end

    def recv_buffer(self) -> memoryview:
        raise NotImplementedError

    def received(self, nbytes: int) -> memoryview:
        raise NotImplementedError

    def decrypt(self, data: bytes) -> bytes:
        """Feed ``data`` and return every plaintext byte it completes (a copy)."""
        result = bytearray()
        view = memoryview(data)
        while view:
            buf = self.recv_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            result += self.received(n)
        return bytes(result)


class PlainDecoder:
    """The identity decoder: one buffer, handed out again and again.

    It starts small and doubles (up to ``capacity``) each time a receive fills it, so an idle or
    chatty session costs 4 KiB and a bulk transfer gets large reads.
    """

    __slots__ = ("_view", "_capacity")

    def __init__(self, capacity: int = DEFAULT_BUFFER_SIZE) -> None:
        self._capacity = capacity
        self._view = memoryview(bytearray(min(INITIAL_BUFFER_SIZE, capacity)))

    def recv_buffer(self) -> memoryview:
        return self._view

    def received(self, nbytes: int) -> memoryview:
        view = self._view
        if nbytes == len(view) and nbytes < self._capacity:
            self._view = memoryview(bytearray(min(2 * nbytes, self._capacity)))
        return view[:nbytes]

    def eof(self) -> None:
        pass
