"""SOCKS5, the server side, sans-I/O (RFC 1928; RFC 1929 is the front-ends issue's).

Client greeting and the server's choice::

    +-----+----------+----------+        +-----+--------+
    | VER | NMETHODS | METHODS  |  --->  | VER | METHOD |
    |  5  |    1     | 1 to 255 |  <---  |  5  |   1    |
    +-----+----------+----------+        +-----+--------+

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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .address import Address, decode_address, encode_address
from .errors import ProtocolError, Socks5Error
from .protocol import NEED_DATA, NeedData

__all__ = [
    "VERSION",
    "Method",
    "Command",
    "ReplyCode",
    "Greeting",
    "MethodSelection",
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
    REQUEST = "client sends its request"
    REPLYING = "server sends its reply"
    ESTABLISHED = "the connection carries the client's stream"
    CLOSED = "the handshake failed; the connection must be closed"


# (state, kind of message) -> next state. Anything missing is a protocol violation.
_TRANSITIONS: dict[tuple[State, type], State] = {
    (State.GREETING, Greeting): State.CHOOSING_METHOD,
    (State.REQUEST, Request): State.REPLYING,
}


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

    def next_event(self) -> Greeting | Request | NeedData:
        if self.state is State.GREETING:
            event, used = _parse_greeting(self._buffer)
        elif self.state is State.REQUEST:
            event, used = _parse_request(self._buffer)
        else:
            raise ProtocolError(f"no event expected while {self.state.value}")
        if event is NEED_DATA:
            if self._eof:
                raise ProtocolError(f"connection closed while {self.state.value}")
            return NEED_DATA
        del self._buffer[:used]
        self.state = _TRANSITIONS[(self.state, type(event))]
        return event

    def send(self, message: MethodSelection | Reply) -> bytes:
        if isinstance(message, MethodSelection) and self.state is State.CHOOSING_METHOD:
            if message.method == Method.NO_ACCEPTABLE_METHODS:
                self.state = State.CLOSED
            elif message.method == Method.NO_AUTHENTICATION:
                self.state = State.REQUEST
            else:
                raise ProtocolError(f"method {message.method!r} is not implemented")
            return bytes((VERSION, message.method))
        if isinstance(message, Reply) and self.state in (State.REPLYING, State.REQUEST):
            # REQUEST too: a request that could not be parsed is still answered with its code.
            self.state = State.ESTABLISHED if message.code == ReplyCode.SUCCEEDED else State.CLOSED
            return bytes((VERSION, message.code, 0)) + encode_address(message.bound)
        raise ProtocolError(f"cannot send {type(message).__name__} while {self.state.value}")


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
