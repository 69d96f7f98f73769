"""SOCKS5, the server side, sans-I/O (RFC 1928, with RFC 1929 username/password authentication).

Client greeting and the server's choice::

    +-----+----------+----------+        +-----+--------+
    | VER | NMETHODS | METHODS  |  --->  | VER | METHOD |
    |  5  |    1     | 1 to 255 |  <---  |  5  |   1    |
    +-----+----------+----------+        +-----+--------+

Username/password sub-negotiation, when the server chose method 2 (RFC 1929 section 2)::

    +-----+------+----------+------+----------+        +-----+--------+
    | VER | ULEN |  UNAME   | PLEN |  PASSWD  |  --->  | VER | STATUS |
    |  1  |  1   | 1 to 255 |  1   | 0 to 255 |  <---  |  1  |   1    |
    +-----+------+----------+------+----------+        +-----+--------+

    STATUS 0 is success; anything else is failure, after which the server closes the connection.
    RFC 1929 says PLEN is 1 to 255; an empty password (PLEN 0) is tolerated, an empty username is not.
    UNAME and PASSWD are decoded as strict UTF-8 (the RFC names no charset): bytes that are not
    UTF-8 raise ProtocolError, for the username and the password alike, so a ``Credentials`` event
    holds ordinary ``str`` values (no lone surrogates) that encode back to the client's exact bytes.

Request and reply (the address is relay.address's ATYP form)::

    +-----+-----+-------+------+----------+----------+
    | VER | CMD |  RSV  | ATYP | DST.ADDR | DST.PORT |   request
    | VER | REP |  RSV  | ATYP | BND.ADDR | BND.PORT |   reply
    +-----+-----+-------+------+----------+----------+

A UDP datagram between client and relay, after UDP ASSOCIATE::

    +-----+------+------+----------+----------+------+
    | RSV | FRAG | ATYP | DST.ADDR | DST.PORT | DATA |
    |  2  |  1   |      |          |    2     |      |
    +-----+------+------+----------+----------+------+

Use: feed bytes with ``receive_data`` (``b""`` means EOF), pull events with ``next_event``
(``NEED_DATA`` until a whole message is in), and turn answers into bytes with ``send``.
The states, in the order a handshake meets them::

    GREETING --Greeting--> CHOOSING_METHOD --MethodSelection(NO_AUTHENTICATION)--> REQUEST
    CHOOSING_METHOD --MethodSelection(USERNAME_PASSWORD)--> AUTHENTICATING --Credentials--> VERIFYING
    VERIFYING --AuthResult(True)--> REQUEST --Request--> REPLYING --Reply(SUCCEEDED)--> ESTABLISHED
    NO_ACCEPTABLE_METHODS, AuthResult(False) and a failure Reply lead to CLOSED.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .address import Address, decode_address, encode_address
from .errors import ProtocolError, Socks5Error
from .protocol import NEED_DATA, NeedData

__all__ = [
    "VERSION",
    "AUTH_VERSION",
    "Method",
    "Command",
    "ReplyCode",
    "Greeting",
    "MethodSelection",
    "Credentials",
    "AuthResult",
    "Request",
    "Reply",
    "NEED_DATA",
    "State",
    "Socks5Server",
    "Datagram",
    "parse_datagram",
    "build_datagram",
]

VERSION = 5
AUTH_VERSION = 1  # the version byte of RFC 1929's sub-negotiation, in both directions


class Method(enum.IntEnum):
    NO_AUTHENTICATION = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class ReplyCode(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


@dataclass(frozen=True)
class Greeting:
    methods: tuple[int, ...]


@dataclass(frozen=True)
class MethodSelection:
    method: Method


@dataclass(frozen=True)
class Credentials:
    """The client's RFC 1929 username and password (the password stays out of ``repr``, hence logs)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class AuthResult:
    """The server's verdict on the credentials: STATUS 0 if ``ok``, else 1 and the connection closes."""

    ok: bool


@dataclass(frozen=True)
class Request:
    command: Command
    target: Address


@dataclass(frozen=True)
class Reply:
    code: ReplyCode
    bound: Address = Address("0.0.0.0", 0)


class State(enum.Enum):
    GREETING = "client sends its greeting"
    CHOOSING_METHOD = "server sends its method selection"
    AUTHENTICATING = "client sends its username and password"
    VERIFYING = "server sends its verdict on the credentials"
    REQUEST = "client sends its request"
    REPLYING = "server sends its reply"
    ESTABLISHED = "the connection carries the client's stream"
    CLOSED = "the handshake failed; the connection must be closed"


# (state, kind of message, outcome) -> next state. Anything missing is a protocol violation.
# The client's messages have no outcome (None); the server's have the one that decides where
# the handshake goes (see _outcome): the chosen method, whether the credentials are accepted,
# whether the reply is a success.
_TRANSITIONS: dict[tuple[State, type, object], State] = {
    (State.GREETING, Greeting, None): State.CHOOSING_METHOD,
    (State.CHOOSING_METHOD, MethodSelection, Method.NO_AUTHENTICATION): State.REQUEST,
    (State.CHOOSING_METHOD, MethodSelection, Method.USERNAME_PASSWORD): State.AUTHENTICATING,
    (State.CHOOSING_METHOD, MethodSelection, Method.NO_ACCEPTABLE_METHODS): State.CLOSED,
    (State.AUTHENTICATING, Credentials, None): State.VERIFYING,
    # AUTHENTICATING too: credentials that could not be parsed may still be answered with a failure.
    (State.AUTHENTICATING, AuthResult, False): State.CLOSED,
    (State.VERIFYING, AuthResult, True): State.REQUEST,
    (State.VERIFYING, AuthResult, False): State.CLOSED,
    (State.REQUEST, Request, None): State.REPLYING,
    (State.REPLYING, Reply, True): State.ESTABLISHED,
    (State.REPLYING, Reply, False): State.CLOSED,
    # REQUEST too: a request that could not be parsed is still answered with its code.
    (State.REQUEST, Reply, True): State.ESTABLISHED,
    (State.REQUEST, Reply, False): State.CLOSED,
}


def _outcome(message: object) -> object:
    if isinstance(message, MethodSelection):
        return message.method
    if isinstance(message, AuthResult):
        return bool(message.ok)
    if isinstance(message, Reply):
        return message.code == ReplyCode.SUCCEEDED
    return None


class Socks5Server:
    """One SOCKS5 connection as seen by the server."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self._buffer = bytearray()
        self._eof = False

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request (taken once the handshake is over)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        self._buffer += data

    def next_event(self) -> Greeting | Credentials | Request | NeedData:
        parse = _PARSERS.get(self.state)
        if parse is None:
            raise ProtocolError(f"no event expected while {self.state.value}")
        event, used = parse(self._buffer)
        if event is NEED_DATA:
            if self._eof:
                raise ProtocolError(f"connection closed while {self.state.value}")
            return NEED_DATA
        del self._buffer[:used]
        self.state = _TRANSITIONS[(self.state, type(event), None)]
        return event

    def send(self, message: MethodSelection | AuthResult | Reply) -> bytes:
        next_state = _TRANSITIONS.get((self.state, type(message), _outcome(message)))
        if next_state is None:
            raise ProtocolError(f"cannot send {message!r} while {self.state.value}")
        if isinstance(message, MethodSelection):
            data = bytes((VERSION, message.method))
        elif isinstance(message, AuthResult):
            data = bytes((AUTH_VERSION, 0x00 if message.ok else 0x01))
        else:
            data = bytes((VERSION, message.code, 0)) + encode_address(message.bound)
        self.state = next_state
        return data


def _check_version(buffer: bytearray) -> None:
    if buffer[0] != VERSION:
        raise ProtocolError(f"not SOCKS5: version byte {buffer[0]:#04x}")


def _parse_greeting(buffer: bytearray) -> tuple[Greeting | NeedData, int]:
    if len(buffer) < 2:
        if buffer:
            _check_version(buffer)
        return NEED_DATA, 0
    _check_version(buffer)
    end = 2 + buffer[1]
    if len(buffer) < end:
        return NEED_DATA, 0
    return Greeting(tuple(buffer[2:end])), end


def _parse_credentials(buffer: bytearray) -> tuple[Credentials | NeedData, int]:
    # Checked in wire order, each as soon as its bytes are in: the same input raises the same
    # error however it was split.
    if not buffer:
        return NEED_DATA, 0
    if buffer[0] != AUTH_VERSION:
        raise ProtocolError(f"not RFC 1929 username/password: version byte {buffer[0]:#04x}")
    if len(buffer) < 2:
        return NEED_DATA, 0
    if buffer[1] == 0:
        raise ProtocolError("empty username (RFC 1929 requires 1 to 255 bytes)")
    plen_at = 2 + buffer[1]
    if len(buffer) < plen_at:
        return NEED_DATA, 0
    username = _utf8(buffer[2:plen_at], "username")
    if len(buffer) < plen_at + 1:
        return NEED_DATA, 0
    end = plen_at + 1 + buffer[plen_at]
    if len(buffer) < end:
        return NEED_DATA, 0
    return Credentials(username, _utf8(buffer[plen_at + 1 : end], "password")), end


def _utf8(data: bytearray, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None  # never echo the bytes: it may be a secret


def _parse_request(buffer: bytearray) -> tuple[Request | NeedData, int]:
    if len(buffer) < 4:
        if buffer:
            _check_version(buffer)
        return NEED_DATA, 0
    _check_version(buffer)
    try:
        command = Command(buffer[1])
    except ValueError:
        raise Socks5Error(ReplyCode.COMMAND_NOT_SUPPORTED, f"unknown command {buffer[1]:#04x}") from None
    decoded = decode_address(buffer, 3)
    if decoded is None:
        return NEED_DATA, 0
    target, end = decoded
    return Request(command, target), end


_PARSERS: dict[State, Callable[[bytearray], tuple[object, int]]] = {
    State.GREETING: _parse_greeting,
    State.AUTHENTICATING: _parse_credentials,
    State.REQUEST: _parse_request,
}


@dataclass(frozen=True)
class Datagram:
    fragment: int
    address: Address
    payload: bytes


def parse_datagram(data: bytes | memoryview) -> Datagram:
    """A client's UDP datagram; ProtocolError if the header is not whole."""
    if len(data) < 4 or data[0] or data[1]:
        raise ProtocolError("not a SOCKS5 UDP datagram (reserved bytes are not zero)")
    decoded = decode_address(data, 3)
    if decoded is None:
        raise ProtocolError("SOCKS5 UDP datagram too short for its address")
    address, end = decoded
    return Datagram(data[2], address, bytes(data[end:]))


def build_datagram(address: Address, payload: bytes | memoryview) -> bytes:
    """A datagram for the client: the answer, and the address it came from."""
    return b"\x00\x00\x00" + encode_address(address) + bytes(payload)
