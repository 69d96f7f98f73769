"""The sans-I/O SOCKS5 server: whole input, one byte at a time, and random split points."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import Address, ProtocolError, Socks5Error
from relay.protocol import NEED_DATA
from relay.socks5 import (
    AuthResult,
    Command,
    Credentials,
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


# RFC 1929: the client offers username/password, the server picks it, then checks the credentials.
AUTH_GREETING = b"\x05\x01\x02"
AUTH = {
    b"\x01\x05alice\x06s3cret": Credentials("alice", "s3cret"),
    b"\x01\x01u\x00": Credentials("u", ""),  # an empty password is tolerated
    b"\x01\x07j\xc3\xbcrgen\x03\xe2\x82\xac": Credentials("jürgen", "€"),
    b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255: Credentials("u" * 255, "p" * 255),
}
AUTH_REQUEST = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"


def auth_events(chunks, ok=True):
    """Feed chunks; collect events, choosing username/password and answering the credentials with ``ok``."""
    server = Socks5Server()
    seen = []
    for chunk in chunks:
        server.receive_data(chunk)
        while server.state in (State.GREETING, State.AUTHENTICATING, State.REQUEST):
            event = server.next_event()
            if event is NEED_DATA:
                break
            seen.append(event)
            if isinstance(event, Greeting):
                assert server.send(MethodSelection(Method.USERNAME_PASSWORD)) == b"\x05\x02"
                assert server.state is State.AUTHENTICATING
            elif isinstance(event, Credentials):
                assert server.state is State.VERIFYING
                assert server.send(AuthResult(ok)) == (b"\x01\x00" if ok else b"\x01\x01")
    return server, seen


def split(data, cuts):
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)]) if a < b]  # b"" is EOF


@pytest.mark.parametrize("wire,credentials", AUTH.items())
def test_auth_whole_and_bytewise(wire, credentials):
    data = AUTH_GREETING + wire + AUTH_REQUEST + b"early"
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        server, seen = auth_events(chunks)
        assert seen == [Greeting((2,)), credentials, Request(Command.CONNECT, Address("example.com", 443))]
        assert server.state is State.REPLYING
        assert server.trailing_data == b"early"


@given(st.sampled_from(sorted(AUTH)), st.lists(st.integers(0, 600), max_size=8))
def test_auth_random_split_points(wire, cuts):
    chunks = split(AUTH_GREETING + wire + AUTH_REQUEST, cuts)
    assert auth_events(chunks)[1] == [Greeting((2,)), AUTH[wire], Request(Command.CONNECT, Address("example.com", 443))]


def test_auth_every_prefix_needs_data():
    wire = next(iter(AUTH))
    for end in range(1, len(wire)):  # not 0: receive_data(b"") is EOF
        server, _ = auth_events([AUTH_GREETING])
        server.receive_data(wire[:end])
        assert server.next_event() is NEED_DATA
        assert server.state is State.AUTHENTICATING


def test_auth_failure_closes():
    server, seen = auth_events([AUTH_GREETING + next(iter(AUTH)) + AUTH_REQUEST], ok=False)
    assert seen == [Greeting((2,)), Credentials("alice", "s3cret")]  # the request is never read
    assert server.state is State.CLOSED
    with pytest.raises(ProtocolError):
        server.next_event()
    with pytest.raises(ProtocolError):
        server.send(Reply(ReplyCode.SUCCEEDED))


def test_auth_success_then_reply():
    server, _ = auth_events([AUTH_GREETING + next(iter(AUTH)) + AUTH_REQUEST])
    assert server.send(Reply(ReplyCode.SUCCEEDED)) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert server.state is State.ESTABLISHED


@pytest.mark.parametrize(
    "wire,message",
    [
        (b"\x05\x05alice\x00", "version"),  # a SOCKS5 version byte where RFC 1929's 1 belongs
        (b"\x00", "version"),
        (b"\x01\x00\x06s3cret", "empty username"),
        (b"\x01\x02\xff\xfe\x00", "username is not UTF-8"),
        (b"\x01\x01u\x02\xc3\x28", "password is not UTF-8"),
    ],
)
def test_auth_violations(wire, message):
    for chunks in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        server, _ = auth_events([AUTH_GREETING])
        with pytest.raises(ProtocolError, match=message) as info:
            for chunk in chunks:
                server.receive_data(chunk)
                assert server.next_event() is NEED_DATA
        assert "s3cret" not in str(info.value)
        # credentials that could not be parsed can still be answered with a failure, never a success
        with pytest.raises(ProtocolError):
            server.send(AuthResult(True))
        assert server.send(AuthResult(False)) == b"\x01\x01"
        assert server.state is State.CLOSED


def test_auth_eof_mid_credentials():
    server, _ = auth_events([AUTH_GREETING, b"\x01\x05ali"])
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        server.next_event()


def test_password_stays_out_of_repr():
    assert "s3cret" not in repr(Credentials("alice", "s3cret"))
    assert "alice" in repr(Credentials("alice", "s3cret"))


def test_auth_messages_are_refused_out_of_order():
    server = Socks5Server()
    with pytest.raises(ProtocolError):
        server.send(AuthResult(True))
    server, _ = events([GREETING])  # no authentication chosen: no credentials to answer
    with pytest.raises(ProtocolError):
        server.send(AuthResult(True))
    assert server.state is State.REQUEST


def test_unimplemented_method_is_refused_without_changing_state():
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x01")
    assert server.next_event() == Greeting((1,))
    with pytest.raises(ProtocolError):
        server.send(MethodSelection(Method.GSSAPI))
    assert server.state is State.CHOOSING_METHOD


def outcome(chunks):
    """The events, or the error's type and message: must not depend on where the input was split."""
    try:
        return auth_events(chunks)[1]
    except ProtocolError as e:
        return type(e), str(e)


@given(st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=6))
def test_auth_random_input_same_outcome_however_split(body, cuts):
    data = AUTH_GREETING + body
    result = outcome([data])
    assert outcome(split(data, cuts)) == result
    assert outcome([data[i : i + 1] for i in range(len(data))]) == result


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_auth_random_input_raises_only_protocol_errors(first, second):
    try:
        auth_events([AUTH_GREETING, first, second])
    except ProtocolError:
        pass
