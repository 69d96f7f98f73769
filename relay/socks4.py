"""SOCKS4 and SOCKS4a, the server side, sans-I/O.

Specs: "SOCKS: A protocol for TCP proxy across firewalls" (Ying-Da Lee, SOCKS 4) and
"SOCKS 4A: A Simple Extension to SOCKS 4 Protocol" (Ying-Da Lee); both at openssh.com/txt/.

Request (CD 1 is CONNECT, 2 is BIND; DSTPORT big-endian)::

    +----+----+----+----+----+----+----+----+----+....+----+
    | VN | CD | DSTPORT |      DSTIP        | USERID  |NUL |
    +----+----+----+----+----+----+----+----+----+....+----+
       1    1      2              4          0 to 255   1

SOCKS4a: when DSTIP is 0.0.0.x with x != 0 (a deliberately invalid address), the client could
not resolve the target itself and a host name follows the USERID's NUL::

    +----+----+----+----+----+----+----+----+----+....+----+----+....+----+
    | VN | CD | DSTPORT |  0 .  0 .  0 .  x | USERID  |NUL | HOSTNAME|NUL |
    +----+----+----+----+----+----+----+----+----+....+----+----+....+----+
                                                                1 to 255

Reply (VN is 0; CD 90 granted, 91 rejected or failed, 92 rejected because the server cannot
reach the client's identd, 93 rejected because identd reports another user id)::

    +----+----+----+----+----+----+----+----+
    | VN | CD | DSTPORT |      DSTIP        |
    +----+----+----+----+----+----+----+----+
       1    1      2              4

Limits this module sets (the specs set none): USERID up to 255 bytes, strict UTF-8; HOSTNAME 1 to
255 bytes of ASCII, as in SOCKS5's ATYP 3. A request beyond them, or with an unknown command,
raises ``Socks4Error`` with reply code 91, which the server may still send before closing; bytes
that are not SOCKS4 at all (VN != 4) or a connection closed mid-request raise ``ProtocolError``.
Every check runs as soon as its bytes are in, in wire order, so a userid without its NUL is
refused at byte 256 rather than buffered, and the same input raises the same error however it
was split.

BIND's second reply (sent when the peer connects to the bound port) is not modelled: BIND is
parsed so that a handler can refuse it with code 91, as relay.socks5 does with its BIND.

Use: feed bytes with ``receive_data`` (``b""`` means EOF), pull the request with ``next_event``
(``NEED_DATA`` until it is whole), and turn the answer into bytes with ``send``::

    REQUEST --Socks4Request--> REPLYING --Socks4Reply(GRANTED)--> ESTABLISHED
    REPLYING or REQUEST --Socks4Reply(any other code)--> CLOSED
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from .address import Address
from .errors import ProtocolError, Socks4Error
from .protocol import NEED_DATA, NeedData

__all__ = [
    "VERSION",
    "REPLY_VERSION",
    "MAX_USERID",
    "MAX_HOSTNAME",
    "Command",
    "ReplyCode",
    "Socks4Request",
    "Socks4Reply",
    "NEED_DATA",
    "State",
    "Socks4Server",
]

VERSION = 4
REPLY_VERSION = 0  # the VN of a reply: the specs make it 0, not 4
MAX_USERID = 255  # bytes, without the NUL
MAX_HOSTNAME = 255  # bytes, without the NUL; as long as a SOCKS5 domain name can be


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2


class ReplyCode(enum.IntEnum):
    GRANTED = 90
    REJECTED_OR_FAILED = 91
    NO_IDENTD = 92
    IDENTD_MISMATCH = 93


@dataclass(frozen=True)
class Socks4Request:
    """The client's request; ``target.host`` is a host name for SOCKS4a, an IPv4 literal otherwise."""

    command: Command
    target: Address
    userid: str


@dataclass(frozen=True)
class Socks4Reply:
    """The server's answer; ``bound`` must be IPv4 (SOCKS4 has no other address form)."""

    code: ReplyCode
    bound: Address = Address("0.0.0.0", 0)


class State(enum.Enum):
    REQUEST = "client sends its request"
    REPLYING = "server sends its reply"
    ESTABLISHED = "the connection carries the client's stream"
    CLOSED = "the request failed; the connection must be closed"


# (state, kind of message, outcome) -> next state. Anything missing is a protocol violation.
# The client's request has no outcome (None); a reply's outcome is whether it grants the request.
_TRANSITIONS: dict[tuple[State, type, object], State] = {
    (State.REQUEST, Socks4Request, None): State.REPLYING,
    (State.REPLYING, Socks4Reply, True): State.ESTABLISHED,
    (State.REPLYING, Socks4Reply, False): State.CLOSED,
    # REQUEST too: a request that raised Socks4Error is still answered, with a failure code.
    (State.REQUEST, Socks4Reply, False): State.CLOSED,
}


class Socks4Server:
    """One SOCKS4 or SOCKS4a connection as seen by the server."""

    def __init__(self) -> None:
        self.state = State.REQUEST
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

    def next_event(self) -> Socks4Request | NeedData:
        if self.state is not State.REQUEST:
            raise ProtocolError(f"no event expected while {self.state.value}")
        event, used = _parse_request(self._buffer)
        if event is NEED_DATA:
            if self._eof:
                raise ProtocolError(f"connection closed while {self.state.value}")
            return NEED_DATA
        del self._buffer[:used]
        self.state = _TRANSITIONS[(self.state, Socks4Request, None)]
        return event

    def send(self, message: Socks4Reply) -> bytes:
        outcome = message.code == ReplyCode.GRANTED if isinstance(message, Socks4Reply) else None
        next_state = _TRANSITIONS.get((self.state, type(message), outcome))
        if next_state is None:
            raise ProtocolError(f"cannot send {message!r} while {self.state.value}")
        try:
            packed = ipaddress.IPv4Address(message.bound.host).packed
        except ValueError:
            raise ProtocolError(f"a SOCKS4 reply carries an IPv4 address, not {message.bound.host!r}") from None
        self.state = next_state
        return bytes((REPLY_VERSION, message.code)) + message.bound.port.to_bytes(2, "big") + packed


def _parse_request(buffer: bytearray) -> tuple[Socks4Request | NeedData, int]:
    if not buffer:
        return NEED_DATA, 0
    if buffer[0] != VERSION:
        raise ProtocolError(f"not SOCKS4: version byte {buffer[0]:#04x}")
    if len(buffer) < 2:
        return NEED_DATA, 0
    try:
        command = Command(buffer[1])
    except ValueError:
        raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, f"unknown command {buffer[1]:#04x}") from None
    if len(buffer) < 8:
        return NEED_DATA, 0
    port = int.from_bytes(buffer[2:4], "big")
    found = _nul_terminated(buffer, 8, MAX_USERID, "user id")
    if found is None:
        return NEED_DATA, 0
    raw_userid, end = found
    try:
        userid = raw_userid.decode("utf-8")
    except UnicodeDecodeError:
        raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, "user id is not UTF-8") from None
    if buffer[4] == buffer[5] == buffer[6] == 0 and buffer[7] != 0:  # SOCKS4a: a host name follows
        found = _nul_terminated(buffer, end, MAX_HOSTNAME, "host name")
        if found is None:
            return NEED_DATA, 0
        raw_host, end = found
        if not raw_host:
            raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, "empty host name")
        try:
            host = raw_host.decode("ascii")
        except UnicodeDecodeError:
            raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, "host name is not ASCII") from None
    else:
        host = "%d.%d.%d.%d" % (buffer[4], buffer[5], buffer[6], buffer[7])
    return Socks4Request(command, Address(host, port), userid), end


def _nul_terminated(buffer: bytearray, start: int, limit: int, what: str) -> tuple[bytearray, int] | None:
    """The field at ``buffer[start:]`` up to its NUL, and the offset past the NUL; None if not whole."""
    nul = buffer.find(0, start, start + limit + 1)
    if nul >= 0:
        return buffer[start:nul], nul + 1
    if len(buffer) - start > limit:
        raise Socks4Error(ReplyCode.REJECTED_OR_FAILED, f"{what} longer than {limit} bytes")
    return None
