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

__all__ = ["StreamDecoder", "StreamEncoder", "DatagramCodec", "Cipher", "PlainDecoder", "DEFAULT_BUFFER_SIZE", "INITIAL_BUFFER_SIZE"]

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
