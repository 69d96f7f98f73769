"""Shadowsocks AEAD ciphers, the 2017 edition (SIP004), sans-I/O.

Keys::

    master key = EVP_BytesToKey(MD5, password)[:key_size]
    subkey     = HKDF-SHA1(master key, salt, info=b"ss-subkey")[:key_size]
    nonce      = 12-byte little-endian counter from 0, +1 after every AEAD operation

A TCP stream, each direction, with its own random salt (salt size = key size)::

    +------+----------------------------+-----------------------------+-----
    | salt | encrypted length (2) | tag | encrypted payload (n) | tag | ...
    +------+----------------------------+-----------------------------+-----
              n big-endian, n <= 0x3FFF

The first plaintext a client sends is the target in SOCKS5 form (relay.address), then data.
UDP packets are described at AeadDatagramCodec.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from hashlib import sha1
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .address import Address, decode_address, encode_address
from .codec import DEFAULT_BUFFER_SIZE, ChunkReceiveBuffer
from .errors import DecryptError, ProtocolError

__all__ = [
    "MAX_PAYLOAD",
    "TAG_SIZE",
    "evp_bytes_to_key",
    "session_subkey",
    "Aead2017Cipher",
    "AeadStreamEncryptor",
    "AeadStreamDecryptor",
    "AeadDatagramCodec",
]

MAX_PAYLOAD = 0x3FFF
TAG_SIZE = 16
NONCE_SIZE = 12
LENGTH_SIZE = 2
_LENGTH_CHUNK = LENGTH_SIZE + TAG_SIZE
_OVERHEAD = _LENGTH_CHUNK + TAG_SIZE  # per chunk
_MAX_CHUNK = _OVERHEAD + MAX_PAYLOAD
_EMPTY = memoryview(b"")
_FIRST_ROOM = 1024  # plaintext bytes a stream's first encode finds room for without growing
_FAILED_CHUNK = "chunk failed authentication (wrong password, or not a Shadowsocks peer)"
_ZERO_NONCE = bytes(NONCE_SIZE)
# The nonce (a 12-byte little-endian counter) and a chunk's length, packed by one C call of one
# argument each. (A counter past 2**64 chunks would make pack raise: unreachable.)
_nonce = struct.Struct("<Q4x").pack
_length = struct.Struct(">H").pack

AeadFactory = Callable[[bytes], Any]  # key -> object with encrypt_into/decrypt_into (cryptography's AEAD API)


def evp_bytes_to_key(password: bytes, key_size: int) -> bytes:
    """OpenSSL's EVP_BytesToKey with MD5, one iteration, no salt: the Shadowsocks master key."""
    blocks: list[bytes] = []
    previous = b""
    while sum(map(len, blocks)) < key_size:
        previous = hashlib.md5(previous + password).digest()
        blocks.append(previous)
    return b"".join(blocks)[:key_size]


_IPAD = bytes(byte ^ 0x36 for byte in range(256))  # HMAC's pads, as bytes.translate tables
_OPAD = bytes(byte ^ 0x5C for byte in range(256))
_SHA1_BLOCK = bytes(64)
_INFO_1, _INFO_2 = b"ss-subkey\x01", b"ss-subkey\x02"


def session_subkey(key: bytes, salt: bytes) -> bytes:
    """HKDF-SHA1 (RFC 5869) of the master key, with the salt, info "ss-subkey": SIP004's subkey.

    Written out with hashlib for the lengths Shadowsocks uses (a salt of at most 64 bytes, a key
    of at most 40): it runs once per stream and once per AEAD-2017 datagram, and this is half
    again as fast as cryptography's HKDF object (tests check both agree)."""
    if len(salt) > 64 or len(key) > 40:
        return HKDF(algorithm=hashes.SHA1(), length=len(key), salt=salt, info=b"ss-subkey").derive(key)
    padded = salt + _SHA1_BLOCK[len(salt) :]
    prk = sha1(padded.translate(_OPAD) + sha1(padded.translate(_IPAD) + key).digest()).digest()
    padded = prk + _SHA1_BLOCK[20:]
    inner, outer = padded.translate(_IPAD), padded.translate(_OPAD)
    t1 = sha1(outer + sha1(inner + _INFO_1).digest()).digest()
    if len(key) <= 20:
        return t1[: len(key)]
    t2 = sha1(outer + sha1(inner + t1 + _INFO_2).digest()).digest()
    return (t1 + t2)[: len(key)]


class Aead2017Cipher:
    """One AEAD-2017 method: a name, a key size and an AEAD class such as ``AESGCM``."""

    def __init__(self, name: str, key_size: int, aead: AeadFactory) -> None:
        self.name = name
        self.key_size = key_size
        self.salt_size = key_size
        self.aead = aead

    def __repr__(self) -> str:
        return f"Aead2017Cipher({self.name!r})"

    def key_from_password(self, password: str) -> bytes:
        return evp_bytes_to_key(password.encode("utf-8"), self.key_size)

    def encryptor(self, key: bytes, salt: bytes | None = None) -> AeadStreamEncryptor:
        return AeadStreamEncryptor(self.aead, key, salt if salt is not None else os.urandom(self.salt_size))

    def decryptor(self, key: bytes, capacity: int = DEFAULT_BUFFER_SIZE) -> AeadStreamDecryptor:
        return AeadStreamDecryptor(self.aead, key, self.salt_size, capacity)

    def datagram_codec(self, key: bytes) -> AeadDatagramCodec:
        return AeadDatagramCodec(self.aead, key, self.salt_size)


class AeadStreamEncryptor:
    """Plaintext in, salt (once) and whole chunks out."""

    def __init__(self, aead: AeadFactory, key: bytes, salt: bytes) -> None:
        self.salt = salt
        self._encrypt_into = aead(session_subkey(key, salt)).encrypt_into
        self._nonce = 0
        # The salt waits at the front of the output, with room behind it for a first message of
        # a usual size (a target header and a request): the first encode is a fast one too.
        self._head = len(salt)  # bytes in _out before the first chunk: the salt, until it is sent
        self._out = memoryview(bytearray(len(salt) + _FIRST_ROOM + _OVERHEAD))
        self._out[: len(salt)] = salt
        self._length_out = self._out[len(salt) : len(salt) + _LENGTH_CHUNK]  # the first chunk's length field

    def encode(self, data: memoryview | bytes) -> memoryview:
        size = len(data)
        head = self._head
        end = head + size + _OVERHEAD
        if 0 < size <= MAX_PAYLOAD and end <= len(self._out):
            # One chunk, the common case on an interactive stream: no loop, no slicing of _out
            # beyond the payload's place.
            out = self._out
            nonce = self._nonce
            self._nonce = nonce + 2
            encrypt_into = self._encrypt_into
            encrypt_into(_nonce(nonce), _length(size), None, self._length_out)
            encrypt_into(_nonce(nonce + 1), data, None, out[head + _LENGTH_CHUNK : end])
            if head:
                self._head = 0
                self._length_out = out[:_LENGTH_CHUNK]
            return out[:end]
        return self._encode_chunks(data)

    def _encode_chunks(self, data: memoryview | bytes) -> memoryview:
        size = len(data)
        pos = self._head
        needed = pos + size + -(-size // MAX_PAYLOAD) * _OVERHEAD
        if needed > len(self._out):
            grown = memoryview(bytearray(max(needed, 2 * len(self._out))))
            grown[:pos] = self._out[:pos]
            self._out = grown
            self._length_out = grown[:_LENGTH_CHUNK]
        elif pos:
            self._length_out = self._out[:_LENGTH_CHUNK]
        self._head = 0
        out = self._out
        data = memoryview(data)
        encrypt_into = self._encrypt_into
        nonce = self._nonce
        start = 0
        while start < size:
            n = min(size - start, MAX_PAYLOAD)
            encrypt_into(_nonce(nonce), _length(n), None, out[pos : pos + _LENGTH_CHUNK])
            pos += _LENGTH_CHUNK
            end = pos + n + TAG_SIZE
            encrypt_into(_nonce(nonce + 1), data[start : start + n], None, out[pos:end])
            pos = end
            nonce += 2
            start += n
        self._nonce = nonce
        return out[:pos]

    def encrypt(self, data: bytes) -> bytes:
        """``encode`` returning a copy that stays valid."""
        return bytes(self.encode(data))


class AeadStreamDecryptor(ChunkReceiveBuffer):
    """Ciphertext in, plaintext out; partial chunks wait in the receive buffer."""

    def __init__(self, aead: AeadFactory, key: bytes, salt_size: int, capacity: int = DEFAULT_BUFFER_SIZE) -> None:
        self._init_buffer(max(capacity, _MAX_CHUNK + salt_size))
        self.salt: bytes | None = None
        self._aead_factory = aead
        self._key = key
        self._salt_size = salt_size
        self._decrypt_into: Callable[..., int] | None = None
        self._nonce = 0
        self._length = -1  # payload length read from the last length chunk, or -1
        self._length_out = bytearray(LENGTH_SIZE)

    def recv_buffer(self) -> memoryview:
        # Bytes the chunk being read needs from ``start`` on: its payload and tag once the length
        # is known, else the salt (if still to come) and a length chunk.
        return self._offer(self._length + TAG_SIZE if self._length >= 0 else _LENGTH_CHUNK + (0 if self._decrypt_into else self._salt_size))

    def received(self, nbytes: int) -> memoryview:
        buf = self._buf
        end = self._end + nbytes  # ChunkReceiveBuffer._took, inline on this per-chunk path
        self._filled = end == len(buf)
        pos = self._start
        if self._decrypt_into is None:
            if end - pos < self._salt_size:
                self._end = end
                return _EMPTY
            self.salt = bytes(buf[pos : pos + self._salt_size])
            self._decrypt_into = self._aead_factory(session_subkey(self._key, self.salt)).decrypt_into
            pos += self._salt_size
        if end == nbytes and self._length < 0 and end - pos > _OVERHEAD:
            # Into the empty buffer, between chunks: usually exactly one whole chunk (a message
            # of an interactive stream, or the first flight after the salt), decrypted without
            # the general loop's bookkeeping.
            decrypt_into = self._decrypt_into
            nonce = self._nonce
            length_out = self._length_out
            try:
                decrypt_into(_nonce(nonce), buf[pos : pos + _LENGTH_CHUNK], None, length_out)
                length = int.from_bytes(length_out, "big")
                if length + _OVERHEAD == end - pos and length <= MAX_PAYLOAD:
                    out = self._out[:length]
                    decrypt_into(_nonce(nonce + 1), buf[pos + _LENGTH_CHUNK : end], None, out)
                    self._nonce = nonce + 2
                    return out  # _start and _end are still 0: the buffer is empty again
            except InvalidTag:
                raise DecryptError(_FAILED_CHUNK) from None
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"chunk length {length:#x} exceeds {MAX_PAYLOAD:#x}")
            return self._decrypt_chunks(pos + _LENGTH_CHUNK, end, nonce + 1, length)
        return self._decrypt_chunks(pos, end, self._nonce, self._length)

    def _decrypt_chunks(self, pos: int, end: int, nonce: int, length: int) -> memoryview:
        """Decrypt every whole chunk in ``_buf[pos:end]``, ``length`` being the payload length of a
        chunk whose length chunk was read already (else -1); keep the rest for later."""
        buf = self._buf
        decrypt_into: Callable[..., int] = self._decrypt_into  # type: ignore[assignment]  # set with the salt
        length_out = self._length_out
        out = self._out
        produced = 0
        try:
            while True:
                if length < 0:
                    if end - pos < _LENGTH_CHUNK:
                        break
                    decrypt_into(_nonce(nonce), buf[pos : pos + _LENGTH_CHUNK], None, length_out)
                    nonce += 1
                    pos += _LENGTH_CHUNK
                    length = int.from_bytes(length_out, "big")
                    if length > MAX_PAYLOAD:
                        raise ProtocolError(f"chunk length {length:#x} exceeds {MAX_PAYLOAD:#x}")
                chunk_end = pos + length + TAG_SIZE
                if chunk_end > end:
                    break
                decrypt_into(_nonce(nonce), buf[pos:chunk_end], None, out[produced : produced + length])
                nonce += 1
                produced += length
                pos = chunk_end
                length = -1
        except InvalidTag:
            raise DecryptError(_FAILED_CHUNK) from None
        self._nonce = nonce
        self._length = length
        if pos == end:
            pos = end = 0
        self._start = pos
        self._end = end
        return out[:produced]

    def eof(self) -> None:
        if self._end != self._start or self._length >= 0:
            raise ProtocolError("stream ended inside a chunk")


class AeadDatagramCodec:
    """AEAD-2017 UDP: every packet stands alone, with its own salt and nonce zero::

        +------+------------------------------------------------+
        | salt | AEAD(subkey, nonce 0, address + payload) + tag |
        +------+------------------------------------------------+

    The same codec serves both ways: a client encodes its target, a server the source of an answer.
    """

    def __init__(self, aead: AeadFactory, key: bytes, salt_size: int) -> None:
        self._aead = aead
        self._key = key
        self._salt_size = salt_size
        self.overhead = salt_size + TAG_SIZE

    def encode(self, address: Address, payload: bytes | memoryview) -> bytes:
        salt = os.urandom(self._salt_size)
        sealed = self._aead(session_subkey(self._key, salt)).encrypt(_ZERO_NONCE, encode_address(address) + bytes(payload), None)
        return salt + sealed

    def decode(self, packet: bytes | memoryview) -> tuple[Address, bytes]:
        """The address and payload of one packet; ProtocolError (DecryptError) if it is not one."""
        if len(packet) < self._salt_size + TAG_SIZE + 1:
            raise ProtocolError(f"datagram of {len(packet)} bytes is too short")
        view = memoryview(packet)
        salt = bytes(view[: self._salt_size])
        try:
            plaintext = self._aead(session_subkey(self._key, salt)).decrypt(_ZERO_NONCE, view[self._salt_size :], None)
        except InvalidTag:
            raise DecryptError("datagram failed authentication (wrong password, or not a Shadowsocks peer)") from None
        decoded = decode_address(plaintext)
        if decoded is None:
            raise ProtocolError("datagram too short for its address")
        address, end = decoded
        return address, plaintext[end:]
