"""The sans-I/O SOCKS4/4a server: whole input, one byte at a time, and random split points."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import Address, ProtocolError
from relay.errors import Socks4Error
from relay.protocol import NEED_DATA
from relay.socks4 import (
    MAX_HOSTNAME,
    MAX_USERID,
    Command,
    ReplyCode,
    Socks4Reply,
    Socks4Request,
    Socks4Server,
    State,
)

REQUESTS = {
    # SOCKS4: CONNECT 127.0.0.1:80 as "alice"
    b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00": Socks4Request(Command.CONNECT, Address("127.0.0.1", 80), "alice"),
    # an empty user id, as many clients send
    b"\x04\x01\x01\xbb\x5d\xb8\xd8\x22\x00": Socks4Request(Command.CONNECT, Address("93.184.216.34", 443), ""),
    # SOCKS4a: DSTIP 0.0.0.1, the host name after the user id
    b"\x04\x01\x01\xbb\x00\x00\x00\x01bob\x00example.com\x00": Socks4Request(
        Command.CONNECT, Address("example.com", 443), "bob"
    ),
    b"\x04\x01\x00\x16\x00\x00\x00\xff\x00localhost\x00": Socks4Request(Command.CONNECT, Address("localhost", 22), ""),
    # BIND is parsed, with its command: refusing it is the handler's choice
    b"\x04\x02\x10\x92\x0a\x00\x00\x02carol\x00": Socks4Request(Command.BIND, Address("10.0.0.2", 4242), "carol"),
    # 0.0.0.0 is not SOCKS4a (x must not be 0): no host name follows
    b"\x04\x01\x00\x50\x00\x00\x00\x00\x00": Socks4Request(Command.CONNECT, Address("0.0.0.0", 80), ""),
    # a UTF-8 user id, and both fields at their longest
    b"\x04\x01\x00\x50\x7f\x00\x00\x01j\xc3\xbcrgen\x00": Socks4Request(
        Command.CONNECT, Address("127.0.0.1", 80), "jürgen"
    ),
    b"\x04\x01\x00\x50\x00\x00\x00\x07" + b"u" * MAX_USERID + b"\x00" + b"h" * MAX_HOSTNAME + b"\x00": Socks4Request(
        Command.CONNECT, Address("h" * MAX_HOSTNAME, 80), "u" * MAX_USERID
    ),
}


def events(chunks):
    """Feed chunks; collect events until the request is in."""
    server = Socks4Server()
    seen = []
    for chunk in chunks:
        server.receive_data(chunk)
        if server.state is State.REQUEST:
            event = server.next_event()
            if event is not NEED_DATA:
                seen.append(event)
    return server, seen


def split(data, cuts):
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)]) if a < b]  # b"" is EOF


@pytest.mark.parametrize("wire,request_", REQUESTS.items())
def test_whole_and_bytewise(wire, request_):
    data = wire + b"early"
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        server, seen = events(chunks)
        assert seen == [request_]
        assert server.state is State.REPLYING
        assert server.trailing_data == b"early"
        assert server.trailing_data == b""


@given(st.sampled_from(sorted(REQUESTS)), st.lists(st.integers(0, 600), max_size=8))
def test_random_split_points(wire, cuts):
    assert events(split(wire, cuts))[1] == [REQUESTS[wire]]


@pytest.mark.parametrize("wire", sorted(REQUESTS))
def test_every_prefix_needs_data(wire):
    for end in range(1, len(wire)):  # not 0: receive_data(b"") is EOF
        server = Socks4Server()
        server.receive_data(wire[:end])
        assert server.next_event() is NEED_DATA
        assert server.state is State.REQUEST
    server = Socks4Server()
    assert server.next_event() is NEED_DATA


@pytest.mark.parametrize(
    "code,bound,wire",
    [
        (ReplyCode.GRANTED, Address("10.0.0.1", 4242), b"\x00\x5a\x10\x92\x0a\x00\x00\x01"),
        (ReplyCode.GRANTED, Address("0.0.0.0", 0), b"\x00\x5a\x00\x00\x00\x00\x00\x00"),
    ],
)
def test_granted_reply_bytes_and_state(code, bound, wire):
    server, _ = events([next(iter(REQUESTS))])
    assert server.send(Socks4Reply(code, bound)) == wire
    assert server.state is State.ESTABLISHED
    with pytest.raises(ProtocolError):
        server.next_event()


@pytest.mark.parametrize("code", [ReplyCode.REJECTED_OR_FAILED, ReplyCode.NO_IDENTD, ReplyCode.IDENTD_MISMATCH])
def test_failure_replies_close(code):
    server, _ = events([next(iter(REQUESTS))])
    assert server.send(Socks4Reply(code)) == bytes((0, code)) + bytes(6)
    assert server.state is State.CLOSED
    assert Socks4Reply(code).bound == Address("0.0.0.0", 0)


def test_reply_codes_are_the_specs():
    assert [int(code) for code in ReplyCode] == [90, 91, 92, 93]
    assert [int(command) for command in Command] == [1, 2]


def test_reply_needs_an_ipv4_bound_and_leaves_the_state_alone():
    server, _ = events([next(iter(REQUESTS))])
    for bound in (Address("::1", 80), Address("example.com", 80)):
        with pytest.raises(ProtocolError, match="IPv4"):
            server.send(Socks4Reply(ReplyCode.GRANTED, bound))
        assert server.state is State.REPLYING


def test_out_of_order_sends_are_refused():
    server = Socks4Server()
    with pytest.raises(ProtocolError):  # nothing asked yet, so nothing to grant
        server.send(Socks4Reply(ReplyCode.GRANTED))
    server, _ = events([next(iter(REQUESTS))])
    server.send(Socks4Reply(ReplyCode.GRANTED))
    with pytest.raises(ProtocolError):  # one reply per request
        server.send(Socks4Reply(ReplyCode.GRANTED))


REFUSED = {
    "unknown command": b"\x04\x03\x00\x50\x7f\x00\x00\x01\x00",
    "user id longer than 255": b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * (MAX_USERID + 1) + b"\x00",
    "host name longer than 255": b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * (MAX_HOSTNAME + 1) + b"\x00",
    "empty host name": b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00",
    "user id is not UTF-8": b"\x04\x01\x00\x50\x7f\x00\x00\x01\xff\xfe\x00",
    "host name is not ASCII": b"\x04\x01\x00\x50\x00\x00\x00\x01\x00h\xc3\xa9\x00",
}


@pytest.mark.parametrize("message", sorted(REFUSED))
def test_refused_requests_carry_code_91_and_can_be_answered(message):
    wire = REFUSED[message]
    for chunks in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        with pytest.raises(Socks4Error, match=message) as info:
            events(chunks)
        assert info.value.reply_code == ReplyCode.REJECTED_OR_FAILED
        assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("message", sorted(REFUSED))
def test_a_refused_request_is_answered_with_a_failure_only(message):
    server = Socks4Server()
    server.receive_data(REFUSED[message])
    with pytest.raises(Socks4Error):
        server.next_event()
    with pytest.raises(ProtocolError):
        server.send(Socks4Reply(ReplyCode.GRANTED))
    assert server.send(Socks4Reply(ReplyCode.REJECTED_OR_FAILED)) == b"\x00\x5b" + bytes(6)
    assert server.state is State.CLOSED


def test_oversized_fields_are_refused_without_waiting_for_their_nul():
    # a client that never sends the NUL cannot make the server buffer more than the limit
    server = Socks4Server()
    server.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * MAX_USERID)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"u")
    with pytest.raises(Socks4Error, match="user id"):
        server.next_event()
    server = Socks4Server()
    server.receive_data(b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * MAX_HOSTNAME)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"h")
    with pytest.raises(Socks4Error, match="host name"):
        server.next_event()


def test_wrong_version_is_a_plain_protocol_error():
    for wire in (b"\x05", b"\x05\x01\x00", b"\x00\x5a" + bytes(6)):
        server = Socks4Server()
        server.receive_data(wire)
        with pytest.raises(ProtocolError, match="not SOCKS4") as info:
            server.next_event()
        assert not isinstance(info.value, Socks4Error)  # not SOCKS4: nothing to answer


def test_eof_mid_request():
    for wire in (b"\x04\x01\x00\x50", b"\x04\x01\x00\x50\x7f\x00\x00\x01ali", b"\x04\x01\x00\x50\x00\x00\x00\x01\x00ex"):
        server = Socks4Server()
        server.receive_data(wire)
        assert server.next_event() is NEED_DATA
        server.receive_data(b"")
        with pytest.raises(ProtocolError, match="closed"):
            server.next_event()


def outcome(chunks):
    """The events, or the error's type and message: must not depend on where the input was split."""
    try:
        return events(chunks)[1]
    except ProtocolError as e:
        return type(e), str(e)


@given(st.binary(max_size=40), st.lists(st.integers(0, 60), max_size=6))
def test_random_input_same_outcome_however_split(body, cuts):
    data = b"\x04" + body
    result = outcome([data])
    assert outcome(split(data, cuts)) == result
    assert outcome([data[i : i + 1] for i in range(len(data))]) == result


@given(st.binary(max_size=600), st.binary(max_size=600))
def test_random_input_raises_only_protocol_errors(first, second):
    for prefix in (b"", b"\x04\x01", b"\x04\x01\x00\x50\x00\x00\x00\x01"):
        try:
            events([prefix + first, second])
        except ProtocolError:
            pass
