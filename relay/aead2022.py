"""Shadowsocks 2022 (SIP022), sans-I/O: keys, TCP streams, UDP packets, replay filters.

Spec: SIP022 "Shadowsocks 2022 Edition" (shadowsocks.org/doc/sip022.html, also
Shadowsocks-NET/shadowsocks-specs 2022-1). Checked against shadowsocks-rust (tcprelay/aead_2022.rs,
udprelay/aead_2022.rs) and sing-shadowsocks (shadowaead_2022), the peers relay interoperates with.

Keys::

    PSK            = base64 of exactly key_size random bytes (no password hashing)
    session subkey = BLAKE3 derive_key("shadowsocks 2022 session subkey", PSK || salt)[:key_size]
    nonce          = 12-byte little-endian counter from 0, +1 after every AEAD operation (TCP)

    method                           key = salt   TCP AEAD            UDP
    2022-blake3-aes-128-gcm          16           AES-128-GCM         AES block header + AES-GCM body
    2022-blake3-aes-256-gcm          32           AES-256-GCM         AES block header + AES-GCM body
    2022-blake3-chacha20-poly1305    32           ChaCha20-Poly1305   XChaCha20-Poly1305 with the PSK

TCP, each direction its own salt; every chunk is AEAD(subkey, nonce++, plaintext) || 16-byte tag::

    request   | salt | fixed header | variable header | length | payload | length | payload | ...
    response  | salt | fixed header | payload | length | payload | ...

    request fixed header (11)     | type 0 | timestamp u64be | length u16be of the variable header |
    request variable header       | ATYP address port | padding length u16be | padding | initial payload |
    response fixed header (27/43) | type 1 | timestamp u64be | request salt | length u16be of payload |
    length chunk (2)              | u16be, payload chunks carry 0..0xFFFF bytes |

    Timestamps are Unix seconds; more than 30 s from the receiver's clock is a replay. A request
    header carries padding (at most 900 bytes) or initial payload, or both; padding never runs past
    its chunk. The response echoes the request salt and the client checks it. The server remembers
    every request salt for 60 s.

UDP, each packet alone; a session id (8 random bytes per client session, another per server
session) and a packet id (u64be counter from 0) identify it::

    AES methods   | AES-ECB(PSK, session id || packet id) | AES-GCM(subkey(PSK, session id),
                  |                16 bytes                |   nonce = (session id || packet id)[4:16], body) |
    ChaCha method | nonce (24 random) | XChaCha20-Poly1305(PSK, nonce, session id || packet id || body) |

    client body | type 0 | timestamp u64be |                   padding length u16be | padding | address | payload |
    server body | type 1 | timestamp u64be | client session id | padding length u16be | padding | address | payload |

    The server routes packets by client session id; every session, both ways, keeps a sliding
    window of packet ids (PacketWindow) and updates it only once a packet has fully validated.

Several users on one port (SIP023, AES methods only): a client's key is the chain iPSK:uPSK
(PskChain), a server's its iPSK and its users' uPSKs (UserKeys). The user's PSK keys the
session both ways; the identity header names it by hash::

    psk hash      = BLAKE3(uPSK)[:16]
    TCP request   | salt | AES(BLAKE3 derive_key("shadowsocks 2022 identity subkey", iPSK || salt), psk hash) | fixed header ... |
    UDP packet    | AES(iPSK, separate header) | AES(iPSK, psk hash XOR separate header) | body |
    UDP answer    | AES(uPSK, separate header) | body |

cryptography has no XChaCha20-Poly1305: XChaCha20Poly1305 below builds it from HChaCha20 (one
ChaCha20 block, less the initial state) and ChaCha20Poly1305, per draft-irtf-cfrg-xchacha-03.

Everything here is pure: ``clock`` (Unix time, for timestamps) and ``monotonic`` (for expiry) can
be injected. Malformed input raises ``ProtocolError``; failed authentication ``DecryptError``;
a remembered salt or packet id ``ReplayError`` (a ProtocolError too).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import itertools
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .address import Address, decode_address, encode_address
from .codec import DEFAULT_BUFFER_SIZE, ChunkReceiveBuffer
from .errors import ConfigError, DecryptError, ProtocolError

__all__ = [
    "CIPHERS",
    "MAX_PADDING",
    "MAX_PAYLOAD",
    "SALT_TTL",
    "TIMESTAMP_WINDOW",
    "WINDOW_SIZE",
    "Aead2022Cipher",
    "HeaderType",
    "PacketWindow",
    "PskChain",
    "ReplayError",
    "RequestDecoder",
    "RequestEncoder",
    "ResponseDecoder",
    "ResponseEncoder",
    "SaltStore",
    "UdpClient",
    "UdpServer",
    "UdpServerSession",
    "UserKeys",
    "XChaCha20Poly1305",
    "decode_psk",
    "generate_psk",
    "hchacha20",
    "psk_hash",
    "session_subkey",
]

SUBKEY_CONTEXT = "shadowsocks 2022 session subkey"
IDENTITY_CONTEXT = "shadowsocks 2022 identity subkey"  # SIP023
TAG_SIZE = 16
NONCE_SIZE = 12
MAX_PAYLOAD = 0xFFFF
MAX_PADDING = 900
TIMESTAMP_WINDOW = 30
"""Seconds a timestamp may differ from the receiver's clock, either way."""
SALT_TTL = 60.0
"""Seconds a server remembers a request salt (twice the timestamp window)."""
WINDOW_SIZE = 8128
"""Packet ids more than this many behind the newest are refused: (128 - 1) * 64, the window of
wireguard-go's replay filter, which shadowsocks-rust and sing-box both use."""
SESSION_TIMEOUT = 300.0
MIN_SESSION_TIMEOUT = 60.0  # SIP022 3.2.4: a relay session is remembered for at least 60 s

_FIXED_REQUEST = 1 + 8 + 2
_LENGTH_CHUNK = 2 + TAG_SIZE
_CHUNK_OVERHEAD = _LENGTH_CHUNK + TAG_SIZE
_EMPTY = memoryview(b"")
_SESSION_ID_SIZE = 8
_SEPARATE_HEADER = 16
_IDENTITY_SIZE = 16  # SIP023: one AES block per identity header
_XNONCE_SIZE = 24
_UDP_CLIENT_HEADER = 1 + 8 + 2
_UDP_SERVER_HEADER = 1 + 8 + 8 + 2


class HeaderType(enum.IntEnum):
    """The type byte: who sent a stream or a packet."""

    CLIENT = 0  # a request stream, a client-to-server packet
    SERVER = 1  # a response stream, a server-to-client packet


class ReplayError(ProtocolError):
    """A salt or packet id seen before (or too old for the packet window): a replay, or a copy."""


AeadFactory = Callable[[bytes], Any]  # key -> AESGCM/ChaCha20Poly1305-like (encrypt_into, decrypt_into...)
Clock = Callable[[], float]


# -- keys


def session_subkey(key: bytes, salt: bytes) -> bytes:
    """BLAKE3 derive_key("shadowsocks 2022 session subkey", key || salt), key_size bytes."""
    return blake3(key + salt, derive_key_context=SUBKEY_CONTEXT).digest(len(key))


def decode_psk(text: str, key_size: int, method: str = "this method") -> bytes:
    """The PSK a 2022 ``password`` holds; ConfigError (one line, naming the size) if it is not
    base64 of exactly ``key_size`` bytes."""
    hint = f"{method} needs a key of exactly {key_size} bytes in base64 (`openssl rand -base64 {key_size}` makes one)"
    try:
        key = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ConfigError(f"password: {hint}; this one is not base64") from None
    if len(key) != key_size:
        raise ConfigError(f"password: {hint}; this one decodes to {len(key)} bytes")
    return key


class PskChain(tuple):
    """A client's key for a multi-user server (SIP023): ``iPSK, ..., uPSK``, parsed from the
    password ``iPSK:...:uPSK``. Each identity PSK makes one identity header; the last, the
    user's own PSK, keys the session both ways."""

    @property
    def user_psk(self) -> bytes:
        return self[-1]


class UserKeys:
    """A multi-user server's key (SIP023): its identity PSK and its users' PSKs, which clients
    name in the identity header by the first 16 bytes of their BLAKE3 hash."""

    def __init__(self, identity_psk: bytes, users: dict[str, bytes]) -> None:
        self.identity_psk = identity_psk
        self.by_hash: dict[bytes, tuple[str, bytes]] = {}
        for name, psk in users.items():
            digest = psk_hash(psk)
            if digest in self.by_hash:
                raise ConfigError(f"users {self.by_hash[digest][0]!r} and {name!r} have the same key: each user needs a key of their own")
            self.by_hash[digest] = (name, psk)

    def __repr__(self) -> str:
        return f"UserKeys({len(self.by_hash)} users)"

    def user(self, digest: bytes) -> tuple[str, bytes]:
        """The (name, PSK) whose hash is ``digest``; ProtocolError for nobody's."""
        found = self.by_hash.get(bytes(digest))
        if found is None:
            raise ProtocolError("identity header names no user of this server (wrong identity PSK, or an unknown user)")
        return found


def psk_hash(psk: bytes) -> bytes:
    """What an identity header carries for a PSK (SIP023): BLAKE3 hash, first 16 bytes."""
    return blake3(psk).digest()[:_IDENTITY_SIZE]


def _identity_subkey(psk: bytes, salt: bytes) -> bytes:
    return blake3(psk + salt, derive_key_context=IDENTITY_CONTEXT).digest(len(psk))


def _aes_block(key: bytes, block: bytes, *, decrypt: bool = False) -> bytes:
    ecb = Cipher(algorithms.AES(key), modes.ECB())
    context = ecb.decryptor() if decrypt else ecb.encryptor()
    return context.update(block) + context.finalize()


def stream_identity_headers(chain: PskChain, salt: bytes) -> bytes:
    """The identity headers of a request stream, one per identity PSK (SIP023): AES with the
    identity subkey of (PSK, salt) over the next PSK's hash."""
    return b"".join(_aes_block(_identity_subkey(psk, salt), psk_hash(after)) for psk, after in zip(chain, chain[1:]))


def generate_psk(key_size: int) -> str:
    """A fresh random PSK in base64, as ``relay genkey`` prints it."""
    return base64.b64encode(os.urandom(key_size)).decode("ascii")


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(NONCE_SIZE, "little")


def _check_timestamp(timestamp: int, now: float, what: str) -> None:
    skew = timestamp - int(now)
    if abs(skew) > TIMESTAMP_WINDOW:
        raise ProtocolError(
            f"{what} timestamp is {skew:+d} s from this clock, outside the {TIMESTAMP_WINDOW} s window "
            "(a replay, or a clock that is off)"
        )


def _check_type(found: int, expected: HeaderType, what: str) -> None:
    if found != expected:
        raise ProtocolError(f"{what} header type {found}, expected {int(expected)}")


# -- XChaCha20-Poly1305 from cryptography's ChaCha20 and ChaCha20Poly1305

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha-03 section 2.2).

    One ChaCha20 block is the 20 rounds of the state plus the initial state. cryptography's
    16-byte ChaCha20 nonce is state words 12-15 (counter and nonce), so the block for
    ``nonce16`` less the initial words 0-3 and 12-15 leaves HChaCha20's output.
    """
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    words = struct.unpack("<16I", block)
    initial = _SIGMA + struct.unpack("<4I", nonce16)
    return struct.pack(
        "<8I", *((words[i] - initial[j]) & 0xFFFFFFFF for j, i in enumerate((0, 1, 2, 3, 12, 13, 14, 15)))
    )


class XChaCha20Poly1305:
    """AEAD_XChaCha20_Poly1305 (draft-irtf-cfrg-xchacha-03): 24-byte nonces, 16-byte tags.

    ``encrypt``/``decrypt`` as cryptography's AEAD classes (``InvalidTag`` on failure).
    """

    NONCE_SIZE = _XNONCE_SIZE

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("XChaCha20-Poly1305 takes a 32-byte key")
        self._key = key

    def _inner(self, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
        if len(nonce) != _XNONCE_SIZE:
            raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
        return ChaCha20Poly1305(hchacha20(self._key, bytes(nonce[:16]))), b"\0\0\0\0" + bytes(nonce[16:])

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        aead, inner_nonce = self._inner(nonce)
        return aead.encrypt(inner_nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        aead, inner_nonce = self._inner(nonce)
        return aead.decrypt(inner_nonce, data, associated_data)


# -- replay filters


class SaltStore:
    """Every salt added, remembered for ``ttl`` seconds: an exact set with expiry, no false positives.

    Methods for the caller:
        add_if_new(salt)   record ``salt`` and return True, or return False if it is remembered
        salt in store      whether ``salt`` is remembered (records nothing)
        len(store)         how many salts are remembered now

    Structure: one OrderedDict salt -> expiry, in insertion order, which is expiry order (one
    ``ttl`` for all, a monotonic clock); each call first drops the expired entries from the front.

    Memory is bounded by time, not by a count: it holds the salts of the last ``ttl`` seconds,
    ``R * ttl`` of them at R new salts a second, about ``ENTRY_BYTES`` (200) bytes each for 32-byte
    salts (the salt object, its float and the ordered-dict links). At 1,000 new sessions a second
    that is 60,000 salts, 12 MB; at 100 a second, 1.2 MB. Only salts of requests whose header
    authenticated are added, so nobody without the key can grow it. Thread-safe.
    """

    ENTRY_BYTES = 200

    def __init__(self, ttl: float = SALT_TTL, *, monotonic: Clock = time.monotonic) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.ttl = float(ttl)
        self._clock = monotonic
        self._salts: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SaltStore(ttl={self.ttl:g}, salts={len(self._salts)})"

    def _expire(self, now: float) -> None:
        salts = self._salts
        while salts:
            _, expiry = next(iter(salts.items()))
            if expiry > now:
                return
            salts.popitem(last=False)

    def add_if_new(self, salt: bytes) -> bool:
        salt = bytes(salt)
        with self._lock:
            now = self._clock()
            self._expire(now)
            if salt in self._salts:
                return False
            self._salts[salt] = now + self.ttl
            return True

    def __contains__(self, salt: bytes) -> bool:
        salt = bytes(salt)
        with self._lock:
            self._expire(self._clock())
            return salt in self._salts

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._salts)


class PacketWindow:
    """A sliding-window filter of packet ids (RFC 6479; WireGuard's anti-replay window).

    Accepts each id once, and ids up to ``size`` behind the newest accepted (reordering); refuses
    repeats and older ids. Memory: one ``size``-bit integer (1 KiB by default). Not thread-safe: one session's
    packets are validated one at a time.

        window.check(packet_id)   would it be accepted? (changes nothing: call before decrypting)
        window.add(packet_id)     accept and record it; False if it is a repeat or too old
    """

    __slots__ = ("_bits", "_last", "_mask", "size")

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        if size < 1:
            raise ValueError("a packet window holds at least one id")
        self.size = size
        self._last = -1  # the newest id accepted
        self._bits = 0  # bit i: id (last - i) seen
        self._mask = (1 << (size + 1)) - 1

    def check(self, packet_id: int) -> bool:
        if packet_id > self._last:
            return True
        offset = self._last - packet_id
        return offset <= self.size and not (self._bits >> offset) & 1

    def add(self, packet_id: int) -> bool:
        if packet_id > self._last:
            shift = packet_id - self._last
            self._bits = 1 if shift > self.size else ((self._bits << shift) | 1) & self._mask
            self._last = packet_id
            return True
        offset = self._last - packet_id
        if offset > self.size or (self._bits >> offset) & 1:
            return False
        self._bits |= 1 << offset
        return True


# -- TCP: encoders


def default_padding(initial_payload: int) -> int:
    """Padding for a request header: 1..900 random bytes when there is no initial payload (as
    shadowsocks-rust), none otherwise."""
    return 1 + secrets.randbelow(MAX_PADDING) if initial_payload == 0 else 0


class _Sealer:
    """AEAD chunks with a nonce counter, written into one reusable output buffer."""

    __slots__ = ("_encrypt_into", "_nonce", "_out")

    def __init__(self, aead: AeadFactory, subkey: bytes) -> None:
        self._encrypt_into = aead(subkey).encrypt_into
        self._nonce = 0
        self._out = memoryview(bytearray(0))

    def buffer(self, size: int) -> memoryview:
        if size > len(self._out):
            self._out = memoryview(bytearray(max(size, 2 * len(self._out))))
        return self._out

    def seal(self, out: memoryview, pos: int, plaintext: bytes | memoryview) -> int:
        end = pos + len(plaintext) + TAG_SIZE
        self._encrypt_into(_nonce(self._nonce), plaintext, None, out[pos:end])
        self._nonce += 1
        return end

    def seal_chunks(self, out: memoryview, pos: int, data: memoryview, start: int = 0) -> int:
        size = len(data)
        while start < size:
            n = min(size - start, MAX_PAYLOAD)
            pos = self.seal(out, pos, n.to_bytes(2, "big"))
            pos = self.seal(out, pos, data[start : start + n])
            start += n
        return pos


def _chunks_size(size: int) -> int:
    return size + -(-size // MAX_PAYLOAD) * _CHUNK_OVERHEAD


class RequestEncoder:
    """The client's request stream: plaintext in, whole frames out (a StreamEncoder).

    The first ``encode`` returns, for one write: salt, fixed header, variable header (target,
    padding, as much initial payload as fits in 0xFFFF bytes) and chunks for the rest. Later
    calls return length and payload chunks; ``encode(b"")`` then returns nothing.

    Without ``target``, the first call's data must start with the whole target in SOCKS5 form
    (encode_address), as relay's Endpoint.first_flight sends it, and the rest is initial payload;
    with ``target``, all of it is initial payload. A first call with no initial payload sends the
    header with padding (a client-silent protocol, or the pump's first-flight deadline).

    Attributes: ``salt`` (the request salt, which the ResponseDecoder needs), ``header_sent``.
    The result of ``encode`` is valid until the next call.
    """

    def __init__(
        self,
        aead: AeadFactory,
        key: bytes,
        salt: bytes,
        target: Address | None = None,
        *,
        clock: Clock = time.time,
        padding: Callable[[int], int] = default_padding,
        identity: bytes = b"",
    ) -> None:
        self.salt = salt
        self.header_sent = False
        self._identity = identity  # SIP023 identity headers, sent between the salt and the fixed header
        self._sealer = _Sealer(aead, session_subkey(key, salt))
        self._address = encode_address(target) if target is not None else None
        self._clock = clock
        self._padding = padding

    def encode(self, data: memoryview | bytes) -> memoryview:
        data = memoryview(data)
        if self.header_sent:
            if not data:
                return _EMPTY
            out = self._sealer.buffer(_chunks_size(len(data)))
            return out[: self._sealer.seal_chunks(out, 0, data)]
        return self._first(data)

    def _first(self, data: memoryview) -> memoryview:
        address = self._address
        if address is None:
            try:
                parsed = decode_address(data)
            except ProtocolError as e:
                raise ValueError(f"the first request data must start with a target address: {e}") from None
            if parsed is None:
                raise ValueError("the first request data must start with a whole target address")
            address = bytes(data[: parsed[1]])
            data = data[parsed[1] :]
        pad = self._padding(len(data))
        if not 0 <= pad <= MAX_PADDING or (pad == 0 and not data):
            raise ValueError(f"padding of {pad} bytes: must be 0..{MAX_PADDING}, and not 0 without initial payload")
        in_header = min(len(data), MAX_PAYLOAD - len(address) - 2 - pad)
        variable_size = len(address) + 2 + pad + in_header
        head = self.salt + self._identity
        sealer = self._sealer
        out = sealer.buffer(
            len(head) + _FIXED_REQUEST + TAG_SIZE + variable_size + TAG_SIZE + _chunks_size(len(data) - in_header)
        )
        out[: len(head)] = head
        fixed = struct.pack(">BQH", HeaderType.CLIENT, int(self._clock()), variable_size)
        pos = sealer.seal(out, len(head), fixed)
        variable = bytearray(variable_size)  # padding bytes stay zero: they are encrypted
        variable[: len(address)] = address
        variable[len(address) : len(address) + 2] = pad.to_bytes(2, "big")
        variable[variable_size - in_header :] = data[:in_header]
        pos = sealer.seal(out, pos, variable)
        pos = sealer.seal_chunks(out, pos, data, in_header)
        self.header_sent = True
        return out[:pos]

    def encrypt(self, data: bytes) -> bytes:
        """``encode`` returning a copy that stays valid."""
        return bytes(self.encode(data))


class ResponseEncoder:
    """The server's response stream (a StreamEncoder): salt, fixed header echoing
    ``request_salt``, then chunks. The header leaves with the first non-empty data (SIP022: it
    always travels with payload); until then ``encode(b"")`` returns nothing.

    Attributes: ``salt`` (this stream's own), ``request_salt``, ``header_sent``.
    """

    def __init__(
        self, aead: AeadFactory, key: bytes, salt: bytes, request_salt: bytes, *, clock: Clock = time.time
    ) -> None:
        if len(request_salt) != len(salt):
            raise ValueError(f"a request salt of {len(request_salt)} bytes, expected {len(salt)}")
        self.salt = salt
        self.request_salt = bytes(request_salt)
        self.header_sent = False
        self._sealer = _Sealer(aead, session_subkey(key, salt))
        self._clock = clock

    def encode(self, data: memoryview | bytes) -> memoryview:
        data = memoryview(data)
        if not data:
            return _EMPTY
        sealer = self._sealer
        if self.header_sent:
            out = sealer.buffer(_chunks_size(len(data)))
            return out[: sealer.seal_chunks(out, 0, data)]
        salt = self.salt
        first = min(len(data), MAX_PAYLOAD)
        out = sealer.buffer(
            len(salt) + 1 + 8 + len(salt) + 2 + TAG_SIZE + first + TAG_SIZE + _chunks_size(len(data) - first)
        )
        out[: len(salt)] = salt
        fixed = struct.pack(">BQ", HeaderType.SERVER, int(self._clock())) + self.request_salt + first.to_bytes(2, "big")
        pos = sealer.seal(out, len(salt), fixed)
        pos = sealer.seal(out, pos, data[:first])
        pos = sealer.seal_chunks(out, pos, data, first)
        self.header_sent = True
        return out[:pos]

    def encrypt(self, data: bytes) -> bytes:
        return bytes(self.encode(data))


# -- TCP: decoders


class _State(enum.Enum):
    HEADER = "salt and fixed header"
    VARIABLE = "variable header"
    LENGTH = "length chunk"
    PAYLOAD = "payload chunk"
    FAILED = "failed"


class _ChunkDecoder(ChunkReceiveBuffer):
    """A StreamDecoder that owns its receive buffer and reads fixed-size steps (``_need`` bytes
    for the current ``_state``); subclasses say what each step is."""

    _what = "stream"

    def __init__(
        self, aead: AeadFactory, key: bytes, salt_size: int, header_size: int, capacity: int, clock: Clock
    ) -> None:
        self._init_buffer(max(capacity, MAX_PAYLOAD + TAG_SIZE + salt_size + header_size))
        self._aead_factory = aead
        self._key = key
        self._salt_size = salt_size
        self._clock = clock
        self._open: Callable[..., int] | None = None  # decrypt_into of the session AEAD
        self._nonce = 0
        self._state = _State.HEADER
        self._need = salt_size + header_size
        self.salt: bytes | None = None
        """This stream's salt, once its fixed header authenticated."""
        self.session_key: bytes | None = None
        """The PSK this stream is keyed with, once its fixed header authenticated."""

    def recv_buffer(self) -> memoryview:
        if self._state is _State.FAILED:
            raise ProtocolError(f"{self._what} already failed")
        return self._offer(self._need)

    def received(self, nbytes: int) -> memoryview:
        if self._state is _State.FAILED:
            raise ProtocolError(f"{self._what} already failed")
        end = self._took(nbytes)
        pos = self._start
        buf, out = self._buf, self._out
        produced = 0
        try:
            while end - pos >= self._need:
                need = self._need
                produced = self._step(buf[pos : pos + need], out, produced)
                pos += need
        except InvalidTag:
            self._state = _State.FAILED
            raise DecryptError(
                f"{self._what} chunk failed authentication (wrong key, or not a Shadowsocks 2022 peer)"
            ) from None
        except ProtocolError:
            self._state = _State.FAILED
            raise
        if pos == end:
            pos = end = self._end = 0
        self._start = pos
        return out[:produced]

    def eof(self) -> None:
        state = self._state
        if state is _State.FAILED:
            return
        if self._end != self._start or state not in (_State.HEADER, _State.LENGTH):
            raise ProtocolError(f"{self._what} ended inside its {state.value}")

    # -- steps

    def _step(self, chunk: memoryview, out: memoryview, produced: int) -> int:
        state = self._state
        if state is _State.PAYLOAD:
            return self._payload_step(chunk, out, produced)
        if state is _State.LENGTH:
            self._length_step(chunk)
            return produced
        return self._header_step(chunk, out, produced)

    def _header_step(self, chunk: memoryview, out: memoryview, produced: int) -> int:
        """A step of the headers (state HEADER, or a subclass's own), which sets the next."""
        raise NotImplementedError

    def _open_session(self, chunk: memoryview, fixed: bytearray) -> None:
        """The first step: the salt gives the session AEAD, which opens the fixed header."""
        salt = bytes(chunk[: self._salt_size])
        key, rest = self._session_key(salt, chunk[self._salt_size :])
        self._open = self._aead_factory(session_subkey(key, salt)).decrypt_into
        self._decrypt(rest, fixed)
        self.session_key = key
        self.salt = salt

    def _session_key(self, salt: bytes, rest: memoryview) -> tuple[bytes, memoryview]:
        """The PSK of this stream, and what follows the salt less any identity headers."""
        return self._key, rest

    def _decrypt(self, chunk: memoryview, into: memoryview | bytearray) -> None:
        self._open(_nonce(self._nonce), chunk, None, into)  # type: ignore[misc]
        self._nonce += 1

    def _length_step(self, chunk: memoryview) -> None:
        length = bytearray(2)
        self._decrypt(chunk, length)
        self._state, self._need = _State.PAYLOAD, int.from_bytes(length, "big") + TAG_SIZE

    def _payload_step(self, chunk: memoryview, out: memoryview, produced: int) -> int:
        end = produced + len(chunk) - TAG_SIZE
        self._decrypt(chunk, out[produced:end])
        self._state, self._need = _State.LENGTH, _LENGTH_CHUNK
        return end


class RequestDecoder(_ChunkDecoder):
    """The server's side of a request stream (a StreamDecoder): validates the headers, then
    returns the initial payload and the data that follows. Never returns the target bytes.

    Checks, each a ProtocolError (DecryptError if a chunk does not authenticate): header type 0;
    timestamp within 30 s; a whole address, a padding length and the padding inside the variable
    header chunk; padding at most 900 bytes; padding or initial payload present; with ``salts``,
    a salt not seen in the last 60 s (ReplayError; recorded once the whole header validated).

    With ``users`` (SIP023), an identity header follows the salt: it names the user whose PSK
    keys the stream; nobody's is a ProtocolError, like any other failed header.

    Attributes, set as the header is read:
        salt / request_salt   the request salt, once the fixed header authenticated
        session_key           the PSK of the stream (a user's, with ``users``): the response's too
        user                  the user's name (with ``users``; else None)
        timestamp             the client's Unix time from the fixed header
        target                the Address, once the whole header validated (None until then)
    """

    _what = "request"

    def __init__(
        self,
        aead: AeadFactory,
        key: bytes,
        salt_size: int,
        *,
        users: UserKeys | None = None,
        salts: SaltStore | None = None,
        capacity: int = DEFAULT_BUFFER_SIZE,
        clock: Clock = time.time,
    ) -> None:
        identity = _IDENTITY_SIZE if users is not None else 0
        super().__init__(aead, key, salt_size, identity + _FIXED_REQUEST + TAG_SIZE, capacity, clock)
        self._users = users
        self._salts = salts
        self.user: str | None = None
        self.timestamp: int | None = None
        self.target: Address | None = None

    def _session_key(self, salt: bytes, rest: memoryview) -> tuple[bytes, memoryview]:
        users = self._users
        if users is None:
            return self._key, rest
        digest = _aes_block(_identity_subkey(users.identity_psk, salt), bytes(rest[:_IDENTITY_SIZE]), decrypt=True)
        self.user, key = users.user(digest)
        return key, rest[_IDENTITY_SIZE:]

    @property
    def request_salt(self) -> bytes | None:
        return self.salt

    def _header_step(self, chunk: memoryview, out: memoryview, produced: int) -> int:
        if self._state is _State.HEADER:
            fixed = bytearray(_FIXED_REQUEST)
            self._open_session(chunk, fixed)
            kind, timestamp, length = struct.unpack(">BQH", fixed)
            _check_type(kind, HeaderType.CLIENT, "request")
            _check_timestamp(timestamp, self._clock(), "request")
            self.timestamp = timestamp
            self._state, self._need = _State.VARIABLE, length + TAG_SIZE
        else:  # VARIABLE
            header = bytearray(len(chunk) - TAG_SIZE)
            self._decrypt(chunk, header)
            target, initial = _parse_variable_header(header)
            if self._salts is not None and not self._salts.add_if_new(self.salt):  # type: ignore[arg-type]
                raise ReplayError("request salt seen in the last 60 s (a replayed or copied request)")
            self.target = target
            out[produced : produced + len(initial)] = initial
            produced += len(initial)
            self._state, self._need = _State.LENGTH, _LENGTH_CHUNK
        return produced


def _parse_variable_header(header: bytearray) -> tuple[Address, memoryview]:
    parsed = decode_address(header)
    if parsed is None:
        raise ProtocolError(f"request header of {len(header)} bytes ends inside the target address")
    target, pos = parsed
    if len(header) - pos < 2:
        raise ProtocolError("request header ends before its padding length")
    padding = int.from_bytes(header[pos : pos + 2], "big")
    pos += 2
    if padding > MAX_PADDING:
        raise ProtocolError(f"request padding of {padding} bytes exceeds {MAX_PADDING}")
    if padding > len(header) - pos:
        raise ProtocolError(f"request padding of {padding} bytes runs past its header chunk ({len(header) - pos} left)")
    pos += padding
    if padding == 0 and pos == len(header):
        raise ProtocolError("request header has neither padding nor initial payload")
    return target, memoryview(header)[pos:]


class ResponseDecoder(_ChunkDecoder):
    """The client's side of a response stream (a StreamDecoder): checks the fixed header (type 1,
    timestamp within 30 s, the echoed ``request_salt``), then returns the payload.

    Attributes: ``request_salt`` (what the header must echo), ``salt`` (the response's own, once
    its header authenticated), ``timestamp``.
    """

    _what = "response"

    def __init__(
        self,
        aead: AeadFactory,
        key: bytes,
        salt_size: int,
        request_salt: bytes,
        *,
        capacity: int = DEFAULT_BUFFER_SIZE,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(aead, key, salt_size, 1 + 8 + salt_size + 2 + TAG_SIZE, capacity, clock)
        if len(request_salt) != salt_size:
            raise ValueError(f"a request salt of {len(request_salt)} bytes, expected {salt_size}")
        self.request_salt = bytes(request_salt)
        self.timestamp: int | None = None

    def _header_step(self, chunk: memoryview, out: memoryview, produced: int) -> int:
        size = self._salt_size
        fixed = bytearray(1 + 8 + size + 2)
        self._open_session(chunk, fixed)
        kind, timestamp = struct.unpack_from(">BQ", fixed)
        _check_type(kind, HeaderType.SERVER, "response")
        _check_timestamp(timestamp, self._clock(), "response")
        if not hmac.compare_digest(bytes(fixed[9 : 9 + size]), self.request_salt):
            raise ProtocolError("response header echoes another request salt (not the answer to this request)")
        self.timestamp = timestamp
        self._state, self._need = _State.PAYLOAD, int.from_bytes(fixed[9 + size :], "big") + TAG_SIZE
        return produced


# -- UDP


def default_datagram_padding(target: Address, payload: int) -> int:
    """Padding for a client packet: DNS queries (port 53) shorter than 900 bytes get 1..(900 -
    length) random bytes, as sing-box pads them; nothing else is padded."""
    if target.port == 53 and payload < MAX_PADDING:
        return 1 + secrets.randbelow(MAX_PADDING - payload)
    return 0


class _PacketCrypto:
    """What seals and opens packets under one PSK: the AES block cipher for separate headers and
    AES-GCM session AEADs (AES methods), or XChaCha20-Poly1305 with the PSK (ChaCha)."""

    def __init__(self, cipher: Aead2022Cipher, key: bytes) -> None:
        self.key = key
        self.block = cipher.udp_block_header
        if self.block:
            ecb = Cipher(algorithms.AES(key), modes.ECB())
            self._ecb_encrypt = ecb.encryptor()
            self._ecb_decrypt = ecb.decryptor()
            self._encrypt_lock = threading.Lock()
            self._decrypt_lock = threading.Lock()
            self.prefix = _SEPARATE_HEADER
        else:
            self.xchacha = XChaCha20Poly1305(key)
            self.prefix = _XNONCE_SIZE + _SEPARATE_HEADER
        self.aead_factory = cipher.aead

    def session_aead(self, session_id: bytes) -> Any:
        """The body AEAD of a session (AES methods; None for ChaCha, which uses the PSK)."""
        return self.aead_factory(session_subkey(self.key, session_id)) if self.block else None

    def seal(self, session_aead: Any, separate: bytes, body: bytes) -> bytes:
        if self.block:
            sealed = session_aead.encrypt(separate[4:16], body, None)
            return self.seal_block(separate) + sealed
        nonce = os.urandom(_XNONCE_SIZE)
        return nonce + self.xchacha.encrypt(nonce, separate + body, None)

    def open_header(self, packet: bytes | memoryview, offset: int = 0) -> bytes:
        """AES methods: the separate header, decrypted (session id || packet id); or, at
        ``offset``, any other block under this PSK (a SIP023 identity header)."""
        with self._decrypt_lock:
            return self._ecb_decrypt.update(bytes(packet[offset : offset + _SEPARATE_HEADER]))

    def seal_block(self, block: bytes) -> bytes:
        """AES methods: one block under this PSK (a separate or identity header)."""
        with self._encrypt_lock:
            return self._ecb_encrypt.update(block)

    def open_body(
        self, session_aead: Any, separate: bytes, packet: bytes | memoryview, offset: int = _SEPARATE_HEADER
    ) -> bytes:
        try:
            return session_aead.decrypt(separate[4:16], bytes(packet[offset:]), None)
        except InvalidTag:
            raise DecryptError("datagram failed authentication (wrong key, or not a Shadowsocks 2022 peer)") from None

    def open_whole(self, packet: bytes | memoryview) -> tuple[bytes, bytes]:
        """ChaCha: (separate header, body) of a packet."""
        try:
            plaintext = self.xchacha.decrypt(bytes(packet[:_XNONCE_SIZE]), bytes(packet[_XNONCE_SIZE:]), None)
        except InvalidTag:
            raise DecryptError("datagram failed authentication (wrong key, or not a Shadowsocks 2022 peer)") from None
        return plaintext[:_SEPARATE_HEADER], plaintext[_SEPARATE_HEADER:]


def _body(
    kind: HeaderType, timestamp: int, client_session_id: bytes, pad: int, target: Address, payload: bytes | memoryview
) -> bytes:
    """A packet body; ``client_session_id`` is b"" in client packets."""
    return b"".join(
        (
            struct.pack(">BQ", kind, timestamp),
            client_session_id,
            pad.to_bytes(2, "big"),
            bytes(pad),
            encode_address(target),
            bytes(payload),
        )
    )


def _parse_body(
    body: bytes, expected: HeaderType, now: float, client_session_id: bytes | None
) -> tuple[Address, bytes]:
    """Check a packet body's header; return its address and payload. ``client_session_id``: what
    a server packet must name (None for client packets, which have no such field)."""
    fixed = _UDP_SERVER_HEADER if client_session_id is not None else _UDP_CLIENT_HEADER
    if len(body) < fixed:
        raise ProtocolError(f"datagram body of {len(body)} bytes is too short for its header")
    kind, timestamp = struct.unpack_from(">BQ", body)
    what = "client packet" if expected is HeaderType.CLIENT else "server packet"
    _check_type(kind, expected, what)
    _check_timestamp(timestamp, now, what)
    pos = 9
    if client_session_id is not None:
        if not hmac.compare_digest(body[9:17], client_session_id):
            raise ProtocolError("server packet names another client session")
        pos = 17
    padding = int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    if padding > len(body) - pos:
        raise ProtocolError(f"datagram padding of {padding} bytes runs past the packet ({len(body) - pos} left)")
    parsed = decode_address(body, pos + padding)
    if parsed is None:
        raise ProtocolError("datagram too short for its address")
    address, end = parsed
    return address, body[end:]


def _random_session_id(avoid: bytes | None = None) -> bytes:
    while True:
        session_id = os.urandom(_SESSION_ID_SIZE)
        if session_id != avoid:
            return session_id


class _ServerSessionState:
    """A client's view of one server session: its window, AEAD and when it last spoke."""

    __slots__ = ("aead", "last_seen", "window")

    def __init__(self, aead: Any, window_size: int) -> None:
        self.aead = aead
        self.window = PacketWindow(window_size)
        self.last_seen = 0.0


class UdpClient:
    """One client UDP session (a DatagramCodec): the local keeps one per association.

        encode(target, payload) -> packet   a client packet; packet ids count up from 0
        decode(packet) -> (source, payload)  a server packet, checked: authentication, type 1,
                                            timestamp, this client session id, packet id window

    Server sessions: a server restart starts a new server session. As SIP022 allows, this keeps
    the current and one previous server session, and refuses a third while the previous one has
    spoken in the last 60 s (ProtocolError), as sing-box does.

    With a PskChain (SIP023, AES methods), packets carry an identity header per identity PSK
    after the separate header, which the first PSK encrypts; the user's PSK keys the bodies both
    ways and the server's separate headers.

    Attributes: ``session_id`` (8 bytes), ``overhead`` (bytes added to address + payload, padding
    aside).
    """

    def __init__(
        self,
        cipher: Aead2022Cipher,
        key: bytes | PskChain,
        *,
        session_id: bytes | None = None,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        padding: Callable[[Address, int], int] = default_datagram_padding,
        window_size: int = WINDOW_SIZE,
    ) -> None:
        self._identities: list[tuple[_PacketCrypto, int]] = []
        if isinstance(key, PskChain):
            if not cipher.udp_block_header:
                raise ValueError(f"{cipher.name} has no identity headers (SIP023 is for the AES methods)")
            self._identities = [(_PacketCrypto(cipher, psk), int.from_bytes(psk_hash(after), "big")) for psk, after in zip(key, key[1:])]
            key = key.user_psk
        self._crypto = _PacketCrypto(cipher, key)
        self.session_id = session_id if session_id is not None else _random_session_id()
        self.overhead = self._crypto.prefix + _IDENTITY_SIZE * len(self._identities) + _UDP_CLIENT_HEADER + TAG_SIZE
        self._aead = self._crypto.session_aead(self.session_id)
        self._packet_ids = itertools.count()
        self._clock = clock
        self._monotonic = monotonic
        self._padding = padding
        self._window_size = window_size
        self._current: tuple[bytes, _ServerSessionState] | None = None
        self._previous: tuple[bytes, _ServerSessionState] | None = None

    def encode(self, address: Address, payload: bytes | memoryview) -> bytes:
        separate = self.session_id + next(self._packet_ids).to_bytes(8, "big")
        pad = self._padding(address, len(payload))
        body = _body(HeaderType.CLIENT, int(self._clock()), b"", pad, address, payload)
        if self._identities:
            return self._seal_with_identities(separate, body)
        return self._crypto.seal(self._aead, separate, body)

    def _seal_with_identities(self, separate: bytes, body: bytes) -> bytes:
        """SIP023: the first PSK encrypts the separate header; each identity PSK encrypts the
        next PSK's hash XOR the separate header (so that it differs in every packet)."""
        mask = int.from_bytes(separate, "big")
        identities = self._identities
        parts = [identities[0][0].seal_block(separate)]
        parts += [crypto.seal_block((digest ^ mask).to_bytes(_IDENTITY_SIZE, "big")) for crypto, digest in identities]
        parts.append(self._aead.encrypt(separate[4:16], body, None))
        return b"".join(parts)

    def _known(self, server_session_id: bytes) -> _ServerSessionState | None:
        for entry in (self._current, self._previous):
            if entry is not None and entry[0] == server_session_id:
                return entry[1]
        return None

    def decode(self, packet: bytes | memoryview) -> tuple[Address, bytes]:
        crypto = self._crypto
        if len(packet) < crypto.prefix + _UDP_SERVER_HEADER + TAG_SIZE:
            raise ProtocolError(f"datagram of {len(packet)} bytes is too short")
        if crypto.block:
            separate = crypto.open_header(packet)
            state = self._known(separate[:8])
            if state is not None and not state.window.check(int.from_bytes(separate[8:], "big")):
                raise ReplayError("server packet id seen before, or behind the window")
            aead = state.aead if state is not None else crypto.session_aead(separate[:8])
            body = crypto.open_body(aead, separate, packet)
        else:
            separate, body = crypto.open_whole(packet)
            state = self._known(separate[:8])
            aead = None
        address, payload = _parse_body(body, HeaderType.SERVER, self._clock(), self.session_id)
        packet_id = int.from_bytes(separate[8:], "big")
        now = self._monotonic()
        if state is None:
            state = self._new_server_session(separate[:8], aead, now)
        if not state.window.add(packet_id):
            raise ReplayError("server packet id seen before, or behind the window")
        state.last_seen = now
        return address, payload

    def _new_server_session(self, server_session_id: bytes, aead: Any, now: float) -> _ServerSessionState:
        if self._previous is not None and now - self._previous[1].last_seen < MIN_SESSION_TIMEOUT:
            raise ProtocolError("a third server session while the previous one spoke in the last 60 s")
        state = _ServerSessionState(aead, self._window_size)
        self._previous, self._current = self._current, (server_session_id, state)
        return state


class UdpServerSession:
    """One client session on the server, found by its client session id.

    Methods for the caller:
        encode(source, payload) -> packet   an answer to this client (server packet ids from 0)

    Attributes: ``client_session_id``, ``server_session_id`` (random, never the client's),
    ``client_address`` (where the last valid packet came from: send answers there),
    ``last_seen`` (monotonic time of that packet), ``window`` (the client packet ids seen),
    ``user`` (SIP023: the user's name, whose PSK keys the session both ways; else None).
    """

    def __init__(
        self,
        server: UdpServer,
        client_session_id: bytes,
        client_aead: Any,
        window_size: int,
        crypto: _PacketCrypto | None = None,
        user: str | None = None,
    ) -> None:
        crypto = crypto if crypto is not None else server._crypto
        self._crypto = crypto
        self.user = user
        self._clock = server._clock
        self.client_session_id = client_session_id
        self.server_session_id = _random_session_id(avoid=client_session_id)
        self.client_address: Any = None
        self.last_seen = 0.0
        self.window = PacketWindow(window_size)
        self._client_aead = client_aead
        self._aead = crypto.session_aead(self.server_session_id)
        self._packet_ids = itertools.count()

    def __repr__(self) -> str:
        return f"UdpServerSession(client={self.client_session_id.hex()}, server={self.server_session_id.hex()})"

    def encode(self, source: Address, payload: bytes | memoryview) -> bytes:
        separate = self.server_session_id + next(self._packet_ids).to_bytes(8, "big")
        body = _body(HeaderType.SERVER, int(self._clock()), self.client_session_id, 0, source, payload)
        return self._crypto.seal(self._aead, separate, body)


class UdpServer:
    """A server's UDP packets under one PSK, routed by client session id.

    Methods for the caller:
        decode(packet, client_address) -> (session, target, payload)
            check a client packet (authentication, type 0, timestamp, address, and the session's
            packet-id window, updated only once all of that passed), open a session for a new
            client session id, and record ``client_address`` as where to answer
        session.encode(source, payload) -> packet   an answer, to send to session.client_address
        get(client_session_id), remove(client_session_id), len(server)
        expire() -> [session, ...]   drop the sessions idle for ``session_timeout``; return them
                                     and those dropped to make room since the last call (close
                                     what the handler holds for them)

    Sessions are remembered for ``session_timeout`` seconds of silence (at least 60: a forgotten
    session's packets, being older than 60 s, fail the 30 s timestamp check). At most
    ``max_sessions``: a new session replaces the least recently used one if that one is silent
    for 60 s, else it is refused (ProtocolError) so that no live session is forgotten.
    Thread-safe: packets are decoded one at a time under a lock; ``encode`` may run anywhere.

    With UserKeys (SIP023): the identity PSK opens separate and identity headers; the identity
    header names the user whose PSK keys the session (its bodies, and its answers' headers).
    """

    def __init__(
        self,
        cipher: Aead2022Cipher,
        key: bytes | UserKeys,
        *,
        session_timeout: float = SESSION_TIMEOUT,
        max_sessions: int = 65536,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        window_size: int = WINDOW_SIZE,
    ) -> None:
        if session_timeout < MIN_SESSION_TIMEOUT:
            raise ValueError(f"session_timeout must be at least {MIN_SESSION_TIMEOUT:g} s (SIP022 3.2.4)")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._users: dict[bytes, tuple[str, _PacketCrypto]] | None = None
        self._identity = 0
        if isinstance(key, UserKeys):
            if not cipher.udp_block_header:
                raise ValueError(f"{cipher.name} has no identity headers (SIP023 is for the AES methods)")
            self._users = {digest: (name, _PacketCrypto(cipher, psk)) for digest, (name, psk) in key.by_hash.items()}
            self._identity = _IDENTITY_SIZE
            key = key.identity_psk
        self._crypto = _PacketCrypto(cipher, key)
        self.overhead = self._crypto.prefix + _UDP_SERVER_HEADER + TAG_SIZE
        self.session_timeout = session_timeout
        self.max_sessions = max_sessions
        self._clock = clock
        self._monotonic = monotonic
        self._window_size = window_size
        self._sessions: OrderedDict[bytes, UdpServerSession] = OrderedDict()  # least recently used first
        self._evicted: list[UdpServerSession] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, client_session_id: bytes) -> UdpServerSession | None:
        return self._sessions.get(client_session_id)

    def remove(self, client_session_id: bytes) -> UdpServerSession | None:
        with self._lock:
            return self._sessions.pop(client_session_id, None)

    def expire(self) -> list[UdpServerSession]:
        deadline = self._monotonic() - self.session_timeout
        with self._lock:
            expired, self._evicted = self._evicted, []
            sessions = self._sessions
            while sessions:
                session = next(iter(sessions.values()))
                if session.last_seen > deadline:
                    break
                sessions.popitem(last=False)
                expired.append(session)
        return expired

    def decode(self, packet: bytes | memoryview, client_address: Any = None) -> tuple[UdpServerSession, Address, bytes]:
        crypto = self._crypto
        identity = self._identity
        if len(packet) < crypto.prefix + identity + _UDP_CLIENT_HEADER + TAG_SIZE:
            raise ProtocolError(f"datagram of {len(packet)} bytes is too short")
        with self._lock:
            user = user_crypto = None
            if crypto.block:
                separate = crypto.open_header(packet)
                session = self._sessions.get(separate[:8])
                if identity:  # every packet names its user, as sing-box checks too
                    user, user_crypto = self._user(packet, separate)
                if session is not None:
                    if not session.window.check(int.from_bytes(separate[8:], "big")):
                        raise ReplayError("client packet id seen before, or behind the window")
                    if session.user != user:
                        raise ProtocolError("identity header names another user than its session's")
                    aead = session._client_aead
                elif identity:
                    aead = user_crypto.session_aead(separate[:8])  # type: ignore[union-attr]
                else:
                    aead = crypto.session_aead(separate[:8])
                body = crypto.open_body(aead, separate, packet, _SEPARATE_HEADER + identity)
            else:
                separate, body = crypto.open_whole(packet)
                session = self._sessions.get(separate[:8])
                aead = None
            target, payload = _parse_body(body, HeaderType.CLIENT, self._clock(), None)
            now = self._monotonic()
            if session is None:
                session = self._open(separate[:8], aead, now, user_crypto, user)
            if not session.window.add(int.from_bytes(separate[8:], "big")):
                raise ReplayError("client packet id seen before, or behind the window")
            session.client_address = client_address
            session.last_seen = now
            self._sessions.move_to_end(session.client_session_id)
            return session, target, payload

    def _user(self, packet: bytes | memoryview, separate: bytes) -> tuple[str, _PacketCrypto]:
        """SIP023: the user the identity header names (the identity PSK decrypts it to the
        user's PSK hash XOR the separate header)."""
        assert self._users is not None
        masked = int.from_bytes(self._crypto.open_header(packet, _SEPARATE_HEADER), "big")
        digest = (masked ^ int.from_bytes(separate, "big")).to_bytes(_IDENTITY_SIZE, "big")
        found = self._users.get(digest)
        if found is None:
            raise ProtocolError("identity header names no user of this server (wrong identity PSK, or an unknown user)")
        return found

    def _open(
        self, client_session_id: bytes, aead: Any, now: float, crypto: _PacketCrypto | None = None, user: str | None = None
    ) -> UdpServerSession:
        sessions = self._sessions
        if len(sessions) >= self.max_sessions:
            oldest = next(iter(sessions.values()))
            if now - oldest.last_seen < MIN_SESSION_TIMEOUT:
                raise ProtocolError(f"{len(sessions)} UDP sessions, all active in the last 60 s: no room for another")
            self._evicted.append(sessions.popitem(last=False)[1])
        session = UdpServerSession(self, client_session_id, aead, self._window_size, crypto, user)
        sessions[client_session_id] = session
        return session


# -- the methods


class Aead2022Cipher:
    """One SIP022 method: a name, a key size (= salt size) and the TCP AEAD class.

    UDP uses an AES separate header and AES-GCM bodies when the AEAD is AESGCM, else
    XChaCha20-Poly1305 with the PSK (2022-blake3-chacha20-poly1305).

    Multi-user (SIP023, AES methods): a client's password ``iPSK:uPSK`` gives a PskChain, a
    server's ``key_for_users(iPSK, users)`` a UserKeys; the factories below take either.

    Factories (``key`` is the PSK, from ``key_from_password``):
        request_encoder(key, target=None)        client: what it sends
        response_decoder(key, request_salt)      client: what it reads (needs the encoder's salt)
        client_stream(key, target=None)          client: both, linked
        request_decoder(key, salts=None)         server: what it reads (target, salt once parsed)
        response_encoder(key, request_salt)      server: what it sends (needs the decoder's salt)
        datagram_client(key)                     a client UDP session (UdpClient), one per association
        datagram_server(key)                     the server's UDP sessions (UdpServer)
    """

    edition = 2022

    def __init__(self, name: str, key_size: int, aead: AeadFactory) -> None:
        self.name = name
        self.key_size = key_size
        self.salt_size = key_size
        self.aead = aead
        self.udp_block_header = aead is AESGCM

    def __repr__(self) -> str:
        return f"Aead2022Cipher({self.name!r})"

    def key_from_password(self, password: str) -> bytes | PskChain:
        """The PSK of a base64 ``password``; ConfigError naming the size if it is not one. A
        client's ``iPSK:uPSK`` (SIP023) gives the PskChain for a multi-user server."""
        if ":" not in password:
            return decode_psk(password, self.key_size, self.name)
        if not self.udp_block_header:
            raise ConfigError(f"password: {self.name} has no multi-user identity headers (SIP023 is for the 2022 AES methods): give one key")
        return PskChain(decode_psk(part, self.key_size, self.name) for part in password.split(":"))

    def key_for_users(self, password: str, users: dict[str, str]) -> UserKeys:
        """A multi-user server's key (SIP023): ``password`` is its identity PSK, ``users`` maps
        names to their own PSKs. ConfigError for a method without identity headers or a bad key."""
        if not self.udp_block_header:
            raise ConfigError(f'"users": {self.name} has no multi-user identity headers (SIP023 is for the 2022 AES methods)')
        if ":" in password:
            raise ConfigError('password: a multi-user server\'s password is its one identity key; the users\' keys go in "users"')
        keys = {}
        for name, psk in users.items():
            if ":" in psk:
                raise ConfigError(f'"users": user {name!r} has more than one key: give one')
            keys[name] = decode_psk(psk, self.key_size, f"user {name!r}: {self.name}")
        return UserKeys(decode_psk(password, self.key_size, self.name), keys)

    def client_password(self, password: str, user_password: str) -> str:
        """What a user of a multi-user server (``key_for_users(password, ...)``) gives as its
        password: both keys, ``IDENTITY:USER``."""
        return f"{password}:{user_password}"

    def generate_key(self) -> str:
        return generate_psk(self.key_size)

    def request_encoder(
        self,
        key: bytes | PskChain,
        target: Address | None = None,
        *,
        salt: bytes | None = None,
        clock: Clock = time.time,
        padding: Callable[[int], int] = default_padding,
    ) -> RequestEncoder:
        salt = salt if salt is not None else os.urandom(self.salt_size)
        identity = b""
        if isinstance(key, PskChain):
            identity, key = stream_identity_headers(key, salt), key.user_psk
        return RequestEncoder(self.aead, key, salt, target, clock=clock, padding=padding, identity=identity)

    def response_decoder(
        self,
        key: bytes | PskChain,
        request_salt: bytes,
        *,
        capacity: int = DEFAULT_BUFFER_SIZE,
        clock: Clock = time.time,
    ) -> ResponseDecoder:
        if isinstance(key, PskChain):
            key = key.user_psk  # the server answers with the user's key
        return ResponseDecoder(self.aead, key, self.salt_size, request_salt, capacity=capacity, clock=clock)

    def client_stream(
        self, key: bytes | PskChain, target: Address | None = None, *, clock: Clock = time.time
    ) -> tuple[RequestEncoder, ResponseDecoder]:
        encoder = self.request_encoder(key, target, clock=clock)
        return encoder, self.response_decoder(key, encoder.salt, clock=clock)

    def request_decoder(
        self,
        key: bytes | UserKeys,
        *,
        salts: SaltStore | None = None,
        capacity: int = DEFAULT_BUFFER_SIZE,
        clock: Clock = time.time,
    ) -> RequestDecoder:
        """The answer's key is the decoder's ``session_key`` (a user's, with UserKeys)."""
        users = None
        if isinstance(key, UserKeys):
            users, key = key, key.identity_psk
        elif isinstance(key, PskChain):
            raise ValueError("a server's key is one PSK, or UserKeys for several users")
        return RequestDecoder(self.aead, key, self.salt_size, users=users, salts=salts, capacity=capacity, clock=clock)

    def response_encoder(
        self, key: bytes, request_salt: bytes, *, salt: bytes | None = None, clock: Clock = time.time
    ) -> ResponseEncoder:
        return ResponseEncoder(
            self.aead, key, salt if salt is not None else os.urandom(self.salt_size), request_salt, clock=clock
        )

    def datagram_client(self, key: bytes | PskChain, **options: Any) -> UdpClient:
        """A new client UDP session: one per association, never shared (it carries the
        session id, the packet counter and the server sessions' windows)."""
        return UdpClient(self, key, **options)

    def datagram_server(self, key: bytes | UserKeys, **options: Any) -> UdpServer:
        return UdpServer(self, key, **options)


CIPHERS = [
    Aead2022Cipher("2022-blake3-aes-128-gcm", 16, AESGCM),
    Aead2022Cipher("2022-blake3-aes-256-gcm", 32, AESGCM),
    Aead2022Cipher("2022-blake3-chacha20-poly1305", 32, ChaCha20Poly1305),
]
