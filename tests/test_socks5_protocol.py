"""The sans-I/O SOCKS5 server: whole input, one byte at a time, and random split points."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import Address, ProtocolError, Socks5Error
from relay.protocol import NEED_DATA
from relay.socks5 import (
    Command,
    Greeting,
    Method,
    MethodSelection,
    Reply,
    ReplyCode,
    Request,
    Socks5Server,
    State,
)

GREETING = b"\x05\x02\x00\x02"
REQUESTS = {
    b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50": Request(Command.CONNECT, Address("127.0.0.1", 80)),
    b"\x05\x01\x00\x03\x0bexample.com\x01\xbb": Request(Command.CONNECT, Address("example.com", 443)),
    b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16": Request(Command.CONNECT, Address("::1", 22)),
    b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00": Request(Command.BIND, Address("0.0.0.0", 0)),
    b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00": Request(Command.UDP_ASSOCIATE, Address("0.0.0.0", 0)),
}


def events(chunks):
    """Feed chunks; collect events, answering the greeting with no-auth."""
    server = Socks5Server()
    seen = []
    for chunk in chunks:
        server.receive_data(chunk)
        while server.state in (State.GREETING, State.REQUEST):
            event = server.next_event()
            if event is NEED_DATA:
                break
            seen.append(event)
            if isinstance(event, Greeting):
                assert server.send(MethodSelection(Method.NO_AUTHENTICATION)) == b"\x05\x00"
    return server, seen


@pytest.mark.parametrize("wire,request_", REQUESTS.items())
def test_whole_and_bytewise(wire, request_):
    data = GREETING + wire + b"early"
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        server, seen = events(chunks)
        assert seen == [Greeting((0, 2)), request_]
        assert server.state is State.REPLYING
        assert server.trailing_data == b"early"


@given(st.sampled_from(sorted(REQUESTS)), st.lists(st.integers(0, 60), max_size=6))
def test_random_split_points(wire, cuts):
    data = GREETING + wire
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)]) if a < b]  # b"" is EOF
    assert events(chunks)[1] == [Greeting((0, 2)), REQUESTS[wire]]


def test_reply_bytes_and_states():
    server, _ = events([GREETING + next(iter(REQUESTS))])
    assert server.send(Reply(ReplyCode.SUCCEEDED, Address("10.0.0.1", 4242))) == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x10\x92"
    assert server.state is State.ESTABLISHED


def test_failure_reply_closes():
    server, _ = events([GREETING + next(iter(REQUESTS))])
    assert server.send(Reply(ReplyCode.COMMAND_NOT_SUPPORTED)) == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    assert server.state is State.CLOSED


def test_no_acceptable_methods():
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x02")
    assert server.next_event() == Greeting((2,))
    assert server.send(MethodSelection(Method.NO_ACCEPTABLE_METHODS)) == b"\x05\xff"
    assert server.state is State.CLOSED


def test_unknown_command_and_address_type_carry_reply_codes():
    for wire, code in ((b"\x05\x09\x00\x01" + bytes(6), 7), (b"\x05\x01\x00\x07" + bytes(6), 8)):
        server, _ = events([GREETING])
        server.receive_data(wire)
        with pytest.raises(Socks5Error) as info:
            server.next_event()
        assert info.value.reply_code == code
        # the request could not be parsed, but it is still answered with its code
        assert server.send(Reply(ReplyCode(code)))[1] == code


def test_wrong_version_and_eof():
    server = Socks5Server()
    server.receive_data(b"\x04\x01")
    with pytest.raises(ProtocolError):
        server.next_event()
    server = Socks5Server()
    server.receive_data(b"\x05\x02\x00")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        server.next_event()


def test_out_of_order_send_is_refused():
    with pytest.raises(ProtocolError):
        Socks5Server().send(Reply(ReplyCode.SUCCEEDED))


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_random_input_raises_only_protocol_errors(first, second):
    server = Socks5Server()
    try:
        for chunk in (first, second):
            server.receive_data(chunk)
            event = server.next_event()
            if isinstance(event, Greeting):
                server.send(MethodSelection(Method.NO_AUTHENTICATION))
    except ProtocolError:
        pass
