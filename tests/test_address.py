import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import Address, ProtocolError, Socks5Error
from relay.address import decode_address, encode_address, parse_host_port

CASES = [
    (Address("127.0.0.1", 80), bytes.fromhex("017f0000010050")),
    (Address("::1", 443), b"\x04" + bytes(15) + b"\x01\x01\xbb"),
    (Address("example.com", 8080), b"\x03\x0bexample.com\x1f\x90"),
]


@pytest.mark.parametrize("address,wire", CASES)
def test_encode_decode(address, wire):
    assert encode_address(address) == wire
    assert decode_address(wire) == (address, len(wire))
    assert decode_address(b"xx" + wire + b"tail", 2) == (address, 2 + len(wire))


@pytest.mark.parametrize("address,wire", CASES)
def test_every_prefix_needs_more_data(address, wire):
    for cut in range(len(wire)):
        assert decode_address(wire[:cut]) is None


def test_unknown_type_has_socks5_reply_code():
    with pytest.raises(Socks5Error) as info:
        decode_address(b"\x05\x00\x00")
    assert info.value.reply_code == 8


def test_empty_or_non_ascii_domain_is_refused():
    with pytest.raises(ProtocolError):
        decode_address(b"\x03\x00\x00\x50")
    with pytest.raises(ProtocolError):
        decode_address(b"\x03\x02\xff\xfe\x00\x50")


@given(st.ip_addresses(), st.integers(0, 65535))
def test_ip_round_trip(ip, port):
    address = Address(str(ip), port)
    assert decode_address(encode_address(address)) == (address, len(encode_address(address)))


@given(st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?", fullmatch=True), st.integers(0, 65535))
def test_domain_round_trip(name, port):
    address = Address(name, port)
    try:
        import ipaddress

        ipaddress.ip_address(name)
        return  # a name that is an IP literal encodes as an IP
    except ValueError:
        pass
    assert decode_address(encode_address(address))[0] == address


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data):
    try:
        decode_address(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:1080", Address("127.0.0.1", 1080)),
        ("[::1]:8388", Address("::1", 8388)),
        ("example.com:443", Address("example.com", 443)),
    ],
)
def test_parse_host_port(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "host:99999", ":80", "::1:80", "[::1]80", "host:http"])
def test_parse_host_port_rejects(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_str_brackets_ipv6():
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("a.b", 1)) == "a.b:1"
