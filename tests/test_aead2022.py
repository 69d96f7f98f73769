"""Shadowsocks 2022 (SIP022): known answers, wire layouts rebuilt from the spec, round trips at any
split, and every refusal the spec asks for."""

import base64
import os
import struct

import pytest
from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import Address, ConfigError, DecryptError, ProtocolError
from relay.address import encode_address
from relay.aead2022 import (
    CIPHERS,
    MAX_PADDING,
    MAX_PAYLOAD,
    WINDOW_SIZE,
    PacketWindow,
    ReplayError,
    SaltStore,
    XChaCha20Poly1305,
    decode_psk,
    hchacha20,
    session_subkey,
)

NOW = 1_700_000_000
BY_NAME = {c.name: c for c in CIPHERS}
AES128, AES256, CHACHA = (
    BY_NAME[n] for n in ("2022-blake3-aes-128-gcm", "2022-blake3-aes-256-gcm", "2022-blake3-chacha20-poly1305")
)
TARGET = Address("example.com", 443)
ECHO = Address("192.0.2.7", 7)


def clock(offset=0):
    return lambda: NOW + offset


class Monotonic:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def key_for(cipher):
    return bytes(range(cipher.key_size))


def feed(decoder, wire, cuts=()):
    """Feed ``wire`` to ``decoder`` cut at ``cuts``; the plaintext, then EOF."""
    points = sorted({min(c, len(wire)) for c in cuts})
    out = b"".join(decoder.decrypt(wire[a:b]) for a, b in zip([0, *points], [*points, len(wire)]))
    decoder.eof()
    return out


# -- a test-side Shadowsocks 2022 writer, from the spec text alone (blake3 + cryptography)


def spec_subkey(key, salt):
    return blake3(key + salt, derive_key_context="shadowsocks 2022 session subkey").digest(len(key))


class SpecStream:
    """salt, then chunks: AEAD(subkey, 12-byte little-endian counter, plaintext) || tag."""

    def __init__(self, cipher, key, salt):
        self.aead = cipher.aead(spec_subkey(key, salt))
        self.nonce = 0
        self.wire = bytearray(salt)

    def chunk(self, plaintext):
        self.wire += self.aead.encrypt(self.nonce.to_bytes(12, "little"), bytes(plaintext), None)
        self.nonce += 1
        return self

    def data(self, payload):
        return self.chunk(len(payload).to_bytes(2, "big")).chunk(payload)


def spec_request(cipher, key, salt, variable, *, kind=0, timestamp=NOW, length=None):
    fixed = struct.pack(">BQH", kind, timestamp, len(variable) if length is None else length)
    return SpecStream(cipher, key, salt).chunk(fixed).chunk(variable)


def variable_header(target=TARGET, padding=b"", payload=b"", padding_length=None):
    length = len(padding) if padding_length is None else padding_length
    return encode_address(target) + length.to_bytes(2, "big") + padding + payload


def spec_response(cipher, key, salt, request_salt, first, *, kind=1, timestamp=NOW):
    fixed = struct.pack(">BQ", kind, timestamp) + request_salt + len(first).to_bytes(2, "big")
    return SpecStream(cipher, key, salt).chunk(fixed).chunk(first)


def spec_client_packet(cipher, key, session_id, packet_id, body):
    separate = session_id + packet_id.to_bytes(8, "big")
    if cipher.aead is AESGCM:
        sealed = AESGCM(spec_subkey(key, session_id)).encrypt(separate[4:16], body, None)
        return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(separate) + sealed
    nonce = os.urandom(24)
    return nonce + XChaCha20Poly1305(key).encrypt(nonce, separate + body, None)


def client_body(target=ECHO, payload=b"q", *, kind=0, timestamp=NOW, padding=b"", padding_length=None):
    length = len(padding) if padding_length is None else padding_length
    return struct.pack(">BQH", kind, timestamp, length) + padding + encode_address(target) + payload


# -- known answers


def test_session_subkey_known_answer():
    # shared/vectors/shadowsocks.json "sip022_session_subkey" (from Zmax0/urban-spork AEAD2022TestCase).
    key = base64.b64decode("Lc3tTx0BY6ZJ/fCwOx3JvF0I/anhwJBO5p2+FA5Vce4=")
    salt = base64.b64decode("3oFO0VyLyGI4nFN0M9P+62vPND/L6v8IingaPJWTbJA=")
    assert session_subkey(key, salt) == base64.b64decode("EdNE+4U8dVnHT0+poAFDK2bdlwfrHT61sUNr9WYPh+E=")
    assert len(session_subkey(bytes(16), bytes(16))) == 16


def test_hchacha20_known_answer():
    # draft-irtf-cfrg-xchacha-03 section 2.2.1
    subkey = hchacha20(bytes(range(32)), bytes.fromhex("000000090000004a0000000031415927"))
    assert subkey.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"


XCHACHA_PLAINTEXT = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it."
XCHACHA_SEALED = bytes.fromhex(  # draft-irtf-cfrg-xchacha-03 appendix A.3.1: ciphertext || tag
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49"
)


def test_xchacha20_poly1305_known_answer():
    aead = XChaCha20Poly1305(bytes(range(0x80, 0xA0)))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    assert aead.encrypt(nonce, XCHACHA_PLAINTEXT, aad) == XCHACHA_SEALED
    assert aead.decrypt(nonce, XCHACHA_SEALED, aad) == XCHACHA_PLAINTEXT
    tampered = bytearray(XCHACHA_SEALED)
    tampered[0] ^= 1
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, bytes(tampered), aad)
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, XCHACHA_SEALED, b"")


# -- keys


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_psk_is_base64_of_exactly_the_key_size(cipher):
    key = os.urandom(cipher.key_size)
    assert cipher.key_from_password(base64.b64encode(key).decode()) == key
    assert len(cipher.key_from_password(cipher.generate_key())) == cipher.key_size
    for wrong in (cipher.key_size - 1, cipher.key_size + 1, 24):
        with pytest.raises(ConfigError) as caught:
            cipher.key_from_password(base64.b64encode(os.urandom(wrong)).decode())
        message = str(caught.value)
        assert (
            "\n" not in message
            and f"exactly {cipher.key_size} bytes" in message
            and f"decodes to {wrong} bytes" in message
        )
    for garbage in ("not base64!", "password", "", "é", "\ud800", "AAAA\nAAAA"):
        with pytest.raises(ConfigError, match=f"exactly {cipher.key_size} bytes"):
            cipher.key_from_password(garbage)


def test_psk_error_names_the_method():
    with pytest.raises(ConfigError, match="2022-blake3-aes-128-gcm needs a key of exactly 16 bytes"):
        decode_psk(base64.b64encode(bytes(32)).decode(), 16, "2022-blake3-aes-128-gcm")


# -- TCP: the wire, rebuilt from the spec


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_request_stream_is_the_spec_layout(cipher):
    key, salt = key_for(cipher), os.urandom(cipher.salt_size)
    encoder = cipher.request_encoder(key, salt=salt, clock=clock(), padding=lambda n: 0)
    wire = encoder.encrypt(encode_address(TARGET) + b"hello") + encoder.encrypt(b"world")
    expected = spec_request(cipher, key, salt, variable_header(payload=b"hello")).data(b"world").wire
    assert wire == expected

    # With a target given up front, and padding: the same layout, padding bytes zero.
    encoder = cipher.request_encoder(key, TARGET, salt=salt, clock=clock(), padding=lambda n: 7)
    assert encoder.encrypt(b"") == spec_request(cipher, key, salt, variable_header(padding=bytes(7))).wire


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_response_stream_is_the_spec_layout(cipher):
    key, salt, request_salt = key_for(cipher), os.urandom(cipher.salt_size), os.urandom(cipher.salt_size)
    encoder = cipher.response_encoder(key, request_salt, salt=salt, clock=clock())
    assert encoder.encrypt(b"") == b""  # the header waits for payload
    wire = encoder.encrypt(b"first") + encoder.encrypt(b"second")
    assert wire == spec_response(cipher, key, salt, request_salt, b"first").data(b"second").wire


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_spec_streams_decode(cipher):
    key, salt, response_salt = key_for(cipher), os.urandom(cipher.salt_size), os.urandom(cipher.salt_size)
    wire = spec_request(cipher, key, salt, variable_header(padding=b"\xaa" * 900, payload=b"hi")).data(b"there").wire
    decoder = cipher.request_decoder(key, clock=clock())
    assert feed(decoder, bytes(wire)) == b"hithere"
    assert decoder.target == TARGET and decoder.request_salt == decoder.salt == salt and decoder.timestamp == NOW

    response = spec_response(cipher, key, response_salt, salt, b"").data(b"x" * MAX_PAYLOAD).data(b"").data(b"y").wire
    decoder = cipher.response_decoder(key, salt, clock=clock())  # an empty first chunk, a full one, an empty one
    assert feed(decoder, bytes(response)) == b"x" * MAX_PAYLOAD + b"y"
    assert decoder.salt == response_salt and decoder.timestamp == NOW


# -- TCP: round trips


def exchange(cipher, request_parts, response_parts, cuts=(), *, capacity=1):
    """Client -> server -> client through the four codecs; what each side read."""
    key = key_for(cipher)
    encoder, client_decoder = cipher.client_stream(key, clock=clock())
    request = b"".join(encoder.encrypt(p) for p in request_parts)
    server_decoder = cipher.request_decoder(key, salts=SaltStore(), clock=clock(), capacity=capacity)
    got_request = feed(server_decoder, request, cuts)
    response_encoder = cipher.response_encoder(key, server_decoder.request_salt, clock=clock())
    response = b"".join(response_encoder.encrypt(p) for p in response_parts)
    got_response = feed(client_decoder, response, cuts)
    return server_decoder.target, got_request, got_response


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_round_trip_whole_and_byte_by_byte(cipher):
    request = [encode_address(TARGET) + b"GET / HTTP/1.1\r\n", b"\r\n", b"body" * 100]
    response = [b"HTTP/1.1 200 OK\r\n", b"\r\n", b"answer" * 50]
    whole = exchange(cipher, request, response)
    assert whole == (TARGET, b"".join(request)[len(encode_address(TARGET)) :], b"".join(response))
    wire_length = 2000  # longer than either stream: a cut at every byte
    assert exchange(cipher, request, response, cuts=range(1, wire_length)) == whole


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_payloads_beyond_one_chunk(cipher):
    big = os.urandom(3 * MAX_PAYLOAD + 17)
    target, got_request, got_response = exchange(cipher, [encode_address(ECHO) + big, big], [big, big], capacity=0)
    assert target == ECHO and got_request == big + big and got_response == big + big


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_header_with_padding_only(cipher):
    key = key_for(cipher)
    encoder = cipher.request_encoder(key, clock=clock())
    first = encoder.encrypt(encode_address(TARGET))  # what the pump sends when the client says nothing
    overhead = cipher.salt_size + 11 + 16 + len(encode_address(TARGET)) + 2 + 16
    assert overhead < len(first) <= overhead + MAX_PADDING
    decoder = cipher.request_decoder(key, clock=clock())
    assert decoder.decrypt(first) == b"" and decoder.target == TARGET
    assert decoder.decrypt(encoder.encrypt(b"later")) == b"later"
    assert encoder.encrypt(b"") == b""


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(CIPHERS),
    st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
    st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=4),
    st.lists(st.integers(1, 13000), max_size=10),
)
def test_round_trip_at_random_split_points(cipher, request, response, cuts):
    request = [encode_address(ECHO) + request[0], *request[1:]]
    assert exchange(cipher, request, response, cuts) == exchange(cipher, request, response)


def test_target_address_forms():
    cipher = AES128
    for target in (Address("10.1.2.3", 1), Address("2001:db8::1", 65535), Address("a" * 255, 80)):
        assert exchange(cipher, [encode_address(target) + b"x"], [b"y"])[0] == target


def test_encoder_needs_a_whole_target_first():
    encoder = AES128.request_encoder(key_for(AES128))
    with pytest.raises(ValueError, match="whole target"):
        encoder.encode(encode_address(TARGET)[:3])
    with pytest.raises(ValueError, match="target address"):
        encoder.encode(b"\x09garbage")


# -- TCP: refusals


def request_decoder(cipher, **options):
    options.setdefault("clock", clock())
    return cipher.request_decoder(key_for(cipher), **options)


def refused(decoder, wire, error=ProtocolError, match=None):
    with pytest.raises(error, match=match):
        feed(decoder, bytes(wire))


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_request_header_type_must_be_0(cipher):
    salt = os.urandom(cipher.salt_size)
    refused(
        request_decoder(cipher),
        spec_request(cipher, key_for(cipher), salt, variable_header(payload=b"x"), kind=1).wire,
        match="type 1, expected 0",
    )


@pytest.mark.parametrize("skew", [-31, 31, -(10**9), 2**64 - 1 - NOW])
def test_request_timestamp_outside_the_window(skew):
    cipher = AES256
    wire = spec_request(
        cipher, key_for(cipher), os.urandom(32), variable_header(payload=b"x"), timestamp=NOW + skew
    ).wire
    refused(request_decoder(cipher), wire, match="outside the 30 s window")


@pytest.mark.parametrize("skew", [-30, 0, 30])
def test_request_timestamp_inside_the_window(skew):
    cipher = AES256
    wire = spec_request(
        cipher, key_for(cipher), os.urandom(32), variable_header(payload=b"x"), timestamp=NOW + skew
    ).wire
    assert feed(request_decoder(cipher), bytes(wire)) == b"x"


@pytest.mark.parametrize(
    "variable, match",
    [
        (b"", "ends inside the target address"),
        (encode_address(TARGET)[:-1], "ends inside the target address"),
        (encode_address(TARGET), "before its padding length"),
        (encode_address(TARGET) + b"\x00", "before its padding length"),
        (variable_header(), "neither padding nor initial payload"),
        (variable_header(padding=bytes(4), padding_length=5), "runs past its header chunk"),
        (variable_header(padding=bytes(3), padding_length=0xFFFF), "exceeds 900"),
        (variable_header(padding=bytes(901), payload=b"x"), "exceeds 900"),
        (b"\x05" + bytes(6) + b"\x00\x01\x00", "unknown address type"),
        (b"\x03\x00\x00\x50\x00\x01\x00", "empty domain name"),
    ],
)
def test_malformed_variable_headers(variable, match):
    cipher = AES128
    refused(request_decoder(cipher), spec_request(cipher, key_for(cipher), os.urandom(16), variable).wire, match=match)


def test_padding_limits_that_pass():
    cipher = AES128
    for variable, payload in ((variable_header(padding=bytes(900)), b""), (variable_header(payload=b"p"), b"p")):
        assert (
            feed(request_decoder(cipher), bytes(spec_request(cipher, key_for(cipher), os.urandom(16), variable).wire))
            == payload
        )


def test_padding_may_come_with_payload():
    # sing-box pads every request shorter than 900 bytes, payload or not.
    cipher = CHACHA
    wire = spec_request(
        cipher, key_for(cipher), os.urandom(32), variable_header(padding=os.urandom(300), payload=b"GET")
    ).wire
    assert feed(request_decoder(cipher), bytes(wire)) == b"GET"


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_response_header_checks(cipher):
    key, request_salt = key_for(cipher), os.urandom(cipher.salt_size)

    def decoder():
        return cipher.response_decoder(key, request_salt, clock=clock())

    def response(**fields):
        return bytes(
            spec_response(
                cipher, key, os.urandom(cipher.salt_size), fields.pop("echo", request_salt), b"data", **fields
            ).wire
        )

    assert feed(decoder(), response()) == b"data"
    refused(decoder(), response(kind=0), match="type 0, expected 1")
    refused(decoder(), response(timestamp=NOW - 31), match="outside the 30 s window")
    refused(decoder(), response(timestamp=NOW + 31), match="outside the 30 s window")
    other = bytearray(request_salt)
    other[-1] ^= 1
    refused(decoder(), response(echo=bytes(other)), match="another request salt")


def test_a_request_sent_back_is_not_a_response():
    cipher = AES128
    key = key_for(cipher)
    encoder = cipher.request_encoder(key, clock=clock())
    wire = encoder.encrypt(encode_address(TARGET) + b"x" * 100)
    refused(cipher.response_decoder(key, encoder.salt, clock=clock()), wire)  # type 0, or a bad length chunk
    with pytest.raises(ProtocolError):
        cipher.request_decoder(key, clock=clock()).decrypt(
            cipher.response_encoder(key, encoder.salt).encrypt(b"y" * 100)
        )


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_wrong_key_and_tampering_are_decrypt_errors(cipher):
    key = key_for(cipher)
    wire = cipher.request_encoder(key, clock=clock()).encrypt(encode_address(TARGET) + b"payload")
    stranger = cipher.request_decoder(os.urandom(cipher.key_size), clock=clock())
    refused(stranger, wire, DecryptError)
    assert stranger.salt is None and stranger.target is None  # nothing unauthenticated is exposed
    for position in (cipher.salt_size - 1, cipher.salt_size + 3, len(wire) - 1):
        tampered = bytearray(wire)
        tampered[position] ^= 0x40
        refused(request_decoder(cipher), tampered, DecryptError)


def test_truncated_streams_fail_at_eof():
    cipher = AES128
    key = key_for(cipher)
    encoder = cipher.request_encoder(key, clock=clock())
    wire = encoder.encrypt(encode_address(TARGET) + b"x") + encoder.encrypt(b"more")
    header_end = len(wire) - (2 + 16 + 4 + 16)
    for cut, where in (
        (1, "salt and fixed header"),
        (16 + 27, "variable header"),
        (header_end + 5, "length chunk"),
        (len(wire) - 1, "payload chunk"),
    ):
        decoder = request_decoder(cipher)
        decoder.decrypt(wire[:cut])
        with pytest.raises(ProtocolError, match=f"inside its {where}"):
            decoder.eof()
    request_decoder(cipher).eof()  # nothing at all: a clean close, the handler decides
    decoder = request_decoder(cipher)
    decoder.decrypt(wire[:header_end])
    decoder.eof()  # between chunks


def test_a_failed_decoder_stays_failed():
    cipher = AES128
    decoder = request_decoder(cipher)
    with pytest.raises(DecryptError):
        decoder.decrypt(os.urandom(100))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.recv_buffer()
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.received(0)


def test_replayed_salt_refused_for_60_seconds():
    cipher = AES128
    monotonic = Monotonic()
    salts = SaltStore(monotonic=monotonic)
    wire = cipher.request_encoder(key_for(cipher), clock=clock()).encrypt(encode_address(TARGET) + b"x")
    assert feed(request_decoder(cipher, salts=salts), wire) == b"x"
    monotonic.now += 59.9
    refused(request_decoder(cipher, salts=salts), wire, ReplayError, "seen in the last 60 s")
    monotonic.now += 0.2
    assert feed(request_decoder(cipher, salts=salts), wire) == b"x"  # its timestamp check would refuse it by now


def test_a_truncated_copy_does_not_block_the_real_request():
    cipher = AES128
    salts = SaltStore()
    wire = cipher.request_encoder(key_for(cipher), clock=clock()).encrypt(encode_address(TARGET) + b"x")
    request_decoder(cipher, salts=salts).decrypt(wire[: 16 + 27])  # salt and fixed header only
    assert feed(request_decoder(cipher, salts=salts), wire) == b"x"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CIPHERS), st.binary(max_size=300), st.booleans())
def test_garbage_raises_only_protocol_errors(cipher, garbage, response):
    key = key_for(cipher)
    decoder = cipher.response_decoder(key, bytes(cipher.salt_size)) if response else cipher.request_decoder(key)
    try:
        decoder.decrypt(garbage)
        decoder.eof()
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=120), st.integers(0, 2))
def test_authentic_garbage_headers_raise_only_protocol_errors(variable, kind):
    # Well-encrypted headers with arbitrary contents: the parser must refuse, never crash.
    cipher = AES128
    wire = spec_request(cipher, key_for(cipher), os.urandom(16), variable, kind=kind).wire
    try:
        feed(request_decoder(cipher), bytes(wire))
    except ProtocolError:
        pass


# -- salt store and packet window


def test_salt_store_is_exact_and_expires():
    monotonic = Monotonic()
    store = SaltStore(60, monotonic=monotonic)
    salts = [os.urandom(32) for _ in range(5000)]
    assert all(store.add_if_new(s) for s in salts)
    assert not any(store.add_if_new(s) for s in salts)
    assert all(os.urandom(32) not in store for _ in range(5000))  # no false positives
    assert len(store) == 5000
    monotonic.now += 30
    store.add_if_new(b"late")
    monotonic.now += 30  # the first 5000 are 60 s old now
    assert len(store) == 1 and b"late" in store and salts[0] not in store
    with pytest.raises(ValueError):
        SaltStore(0)


def test_packet_window():
    window = PacketWindow()
    assert [window.add(i) for i in (0, 1, 2, 2, 1, 0)] == [True, True, True, False, False, False]
    assert window.add(10) and window.add(5) and not window.add(5) and window.add(3)
    assert window.check(9) and not window.check(10)  # check changes nothing
    assert window.check(9) and window.add(9)
    assert window.add(10 + WINDOW_SIZE)
    assert not window.check(10) and not window.add(9)  # fell behind
    assert window.add(11) and not window.add(11)  # exactly WINDOW_SIZE behind: still tracked
    assert window.add(2**64 - 1) and not window.add(2**64 - 1 - WINDOW_SIZE - 1)
    assert window.add(2**64 - 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3 * 64), max_size=200), st.integers(1, 64))
def test_packet_window_matches_a_set(ids, size):
    window, seen, newest = PacketWindow(size), set(), -1
    for packet_id in ids:
        expected = packet_id not in seen and packet_id >= newest - size
        assert window.check(packet_id) == expected
        assert window.add(packet_id) == expected
        if expected:
            seen.add(packet_id)
            newest = max(newest, packet_id)


# -- UDP


def udp_pair(cipher, **server_options):
    key = key_for(cipher)
    monotonic = Monotonic()
    server_options.setdefault("monotonic", monotonic)
    server = cipher.datagram_server(key, clock=clock(), **server_options)
    client = cipher.datagram_client(key, clock=clock(), monotonic=monotonic)
    return client, server, monotonic


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_udp_round_trip(cipher):
    client, server, _ = udp_pair(cipher)
    for i, target in enumerate((ECHO, Address("dns.example", 53), Address("2001:db8::53", 53))):
        packet = client.encode(target, b"query %d" % i)
        session, got_target, payload = server.decode(packet, ("198.51.100.1", 4000))
        assert (got_target, payload) == (target, b"query %d" % i)
        assert session.client_session_id == client.session_id != session.server_session_id
        assert session.client_address == ("198.51.100.1", 4000)
        assert client.decode(session.encode(target, b"answer %d" % i)) == (target, b"answer %d" % i)
    assert len(server) == 1 and server.get(client.session_id) is session
    assert len(client.encode(ECHO, b"")) == client.overhead + len(encode_address(ECHO))


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_udp_client_packets_are_the_spec_layout(cipher):
    key, session_id = key_for(cipher), os.urandom(8)
    client = cipher.datagram_client(key, session_id=session_id, clock=clock(), padding=lambda target, n: 0)
    packet = client.encode(ECHO, b"payload")
    body = client_body(ECHO, b"payload")
    if cipher.aead is AESGCM:
        assert packet == spec_client_packet(cipher, key, session_id, 0, body)
    else:
        assert XChaCha20Poly1305(key).decrypt(packet[:24], packet[24:], None) == session_id + bytes(8) + body
    # and the server reads what the spec says a client sends
    spec_packet = spec_client_packet(cipher, key, session_id, 5, client_body(ECHO, b"x", padding=os.urandom(40)))
    _, target, payload = cipher.datagram_server(key, clock=clock()).decode(spec_packet)
    assert (target, payload) == (ECHO, b"x")


def test_udp_server_packets_are_the_spec_layout():
    cipher = AES256
    client, server, _ = udp_pair(cipher)
    session, _, _ = server.decode(client.encode(ECHO, b"q"))
    packet = session.encode(ECHO, b"answer")
    key = key_for(cipher)
    separate = Cipher(algorithms.AES(key), modes.ECB()).decryptor().update(packet[:16])
    assert separate == session.server_session_id + bytes(8)
    body = AESGCM(spec_subkey(key, separate[:8])).decrypt(separate[4:16], packet[16:], None)
    assert body == struct.pack(">BQ", 1, NOW) + client.session_id + b"\0\0" + encode_address(ECHO) + b"answer"


def test_udp_dns_queries_are_padded():
    client, server, _ = udp_pair(AES128)
    lengths = {len(client.encode(Address("9.9.9.9", 53), b"q" * 40)) for _ in range(20)}
    assert len(lengths) > 1 and min(lengths) > client.overhead + 7 + 40
    assert server.decode(client.encode(Address("9.9.9.9", 53), b"q" * 40))[2] == b"q" * 40


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_udp_replays_refused(cipher):
    client, server, _ = udp_pair(cipher)
    packets = [client.encode(ECHO, b"%d" % i) for i in range(5)]
    for i in (0, 2, 1, 4, 3):  # reordering is fine
        assert server.decode(packets[i])[2] == b"%d" % i
    for packet in packets:
        with pytest.raises(ReplayError):
            server.decode(packet)
    session = server.get(client.session_id)
    answers = [session.encode(ECHO, b"a%d" % i) for i in range(2)]
    assert client.decode(answers[1])[1] == b"a1" and client.decode(answers[0])[1] == b"a0"
    with pytest.raises(ReplayError):
        client.decode(answers[1])


def test_udp_packet_ids_behind_the_window_refused():
    cipher = AES128
    key = key_for(cipher)
    server = cipher.datagram_server(key, clock=clock())
    session_id = os.urandom(8)
    body = client_body()
    server.decode(spec_client_packet(cipher, key, session_id, WINDOW_SIZE + 100, body))
    with pytest.raises(ReplayError):
        server.decode(spec_client_packet(cipher, key, session_id, 99, body))
    server.decode(spec_client_packet(cipher, key, session_id, 100, body))


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_udp_window_updated_only_by_valid_packets(cipher):
    key = key_for(cipher)
    server = cipher.datagram_server(key, clock=clock())
    session_id = os.urandom(8)
    good = spec_client_packet(cipher, key, session_id, 0, client_body())
    server.decode(spec_client_packet(cipher, key, session_id, 1, client_body()))  # the session exists
    tampered = bytearray(good)
    tampered[-1] ^= 1
    with pytest.raises(DecryptError):
        server.decode(bytes(tampered))
    with pytest.raises(ProtocolError, match="outside the 30 s window"):
        server.decode(spec_client_packet(cipher, key, session_id, 0, client_body(timestamp=NOW - 60)))
    with pytest.raises(ProtocolError, match="type 1"):
        server.decode(spec_client_packet(cipher, key, session_id, 0, client_body(kind=1)))
    assert server.decode(good)[2] == b"q"  # packet id 0 was never recorded


def test_udp_failed_first_packet_opens_no_session():
    cipher = AES128
    key = key_for(cipher)
    server = cipher.datagram_server(key, clock=clock())
    with pytest.raises(ProtocolError):
        server.decode(spec_client_packet(cipher, key, os.urandom(8), 0, client_body(timestamp=NOW + 31)))
    assert len(server) == 0


@pytest.mark.parametrize(
    "body, match",
    [
        (client_body(kind=1), "type 1, expected 0"),
        (client_body(timestamp=NOW + 31), "outside the 30 s window"),
        (client_body(timestamp=NOW - 31), "outside the 30 s window"),
        (client_body(padding=bytes(3), padding_length=500), "runs past the packet"),
        (struct.pack(">BQH", 0, NOW, 0) + encode_address(ECHO)[:-1], "too short for its address"),
        (struct.pack(">BQ", 0, NOW), "too short"),  # refused before decryption
        (struct.pack(">BQH", 0, NOW, 0) + b"\x07" + bytes(6), "unknown address type"),
    ],
)
@pytest.mark.parametrize("cipher", [AES128, CHACHA], ids=lambda c: c.name)
def test_udp_malformed_client_packets(cipher, body, match):
    key = key_for(cipher)
    with pytest.raises(ProtocolError, match=match):
        cipher.datagram_server(key, clock=clock()).decode(spec_client_packet(cipher, key, os.urandom(8), 0, body))


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_udp_short_garbage_and_wrong_key(cipher):
    client, server, _ = udp_pair(cipher)
    for size in (0, 1, 15, 16, 42):
        with pytest.raises(ProtocolError):
            server.decode(os.urandom(size))
        with pytest.raises(ProtocolError):
            client.decode(os.urandom(size))
    stranger = cipher.datagram_client(os.urandom(cipher.key_size), clock=clock())
    with pytest.raises(DecryptError):
        server.decode(stranger.encode(ECHO, b"x"))
    assert len(server) == 0


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_udp_reflected_packets_refused(cipher):
    client, server, _ = udp_pair(cipher)
    packet = client.encode(ECHO, b"q")
    session, _, _ = server.decode(packet)
    with pytest.raises(ProtocolError, match="type 0, expected 1"):
        client.decode(client.encode(ECHO, b"q"))
    with pytest.raises(ProtocolError, match="type 1, expected 0"):
        server.decode(session.encode(ECHO, b"a"))


def test_udp_server_packet_for_another_client_refused():
    client, server, monotonic = udp_pair(AES128)
    other = AES128.datagram_client(key_for(AES128), clock=clock(), monotonic=monotonic)
    session, _, _ = server.decode(other.encode(ECHO, b"q"))
    with pytest.raises(ProtocolError, match="another client session"):
        client.decode(session.encode(ECHO, b"a"))


def test_udp_client_timestamp_checked():
    cipher = CHACHA
    key = key_for(cipher)
    client = cipher.datagram_client(key, clock=clock())
    skewed_server = cipher.datagram_server(key, clock=clock(40))
    with pytest.raises(ProtocolError, match="outside the 30 s window"):
        skewed_server.decode(client.encode(ECHO, b"q"))
    server = cipher.datagram_server(key, clock=clock(-40))
    session, _, _ = server.decode(cipher.datagram_client(key, clock=clock(-40)).encode(ECHO, b"q"))
    session.client_session_id = client.session_id  # an answer addressed to ``client``, 40 s old
    with pytest.raises(ProtocolError, match="outside the 30 s window"):
        client.decode(session.encode(ECHO, b"a"))


def test_udp_sessions_routed_by_id_and_roaming():
    client_a, server, monotonic = udp_pair(AES128)
    client_b = AES128.datagram_client(key_for(AES128), clock=clock(), monotonic=monotonic)
    session_a, _, _ = server.decode(client_a.encode(ECHO, b"a"), ("198.51.100.1", 1))
    session_b, _, _ = server.decode(client_b.encode(ECHO, b"b"), ("198.51.100.1", 1))  # same address, other session
    assert session_a is not session_b and len(server) == 2
    again, _, _ = server.decode(client_a.encode(ECHO, b"a2"), ("203.0.113.9", 2))  # the client moved
    assert again is session_a and session_a.client_address == ("203.0.113.9", 2)
    assert server.remove(client_b.session_id) is session_b and len(server) == 1


def test_udp_session_expiry_and_limits():
    with pytest.raises(ValueError, match="at least 60"):
        AES128.datagram_server(key_for(AES128), session_timeout=59)
    client, server, monotonic = udp_pair(AES128, session_timeout=60, max_sessions=2)
    clients = [client] + [AES128.datagram_client(key_for(AES128), clock=clock(), monotonic=monotonic) for _ in range(2)]
    server.decode(clients[0].encode(ECHO, b"0"))
    monotonic.now += 30
    server.decode(clients[1].encode(ECHO, b"1"))
    with pytest.raises(ProtocolError, match="no room"):  # both spoke within 60 s: none is forgotten
        server.decode(clients[2].encode(ECHO, b"2"))
    monotonic.now += 30
    server.decode(clients[2].encode(ECHO, b"2"))  # client 0 has been silent 60 s: it gives way
    assert server.get(clients[0].session_id) is None and len(server) == 2
    assert [s.client_session_id for s in server.expire()] == [clients[0].session_id]  # reported once
    monotonic.now += 45
    assert [s.client_session_id for s in server.expire()] == [clients[1].session_id]
    monotonic.now += 15
    assert [s.client_session_id for s in server.expire()] == [clients[2].session_id]


def test_udp_client_follows_a_restarted_server():
    client, server, monotonic = udp_pair(CHACHA)
    first, _, _ = server.decode(client.encode(ECHO, b"q"))
    assert client.decode(first.encode(ECHO, b"1"))[1] == b"1"
    restarted = CHACHA.datagram_server(key_for(CHACHA), clock=clock(), monotonic=monotonic)
    second, _, _ = restarted.decode(client.encode(ECHO, b"q"))
    assert client.decode(second.encode(ECHO, b"2"))[1] == b"2"
    assert client.decode(first.encode(ECHO, b"late"))[1] == b"late"  # the old session still counts
    third, _, _ = CHACHA.datagram_server(key_for(CHACHA), clock=clock(), monotonic=monotonic).decode(
        client.encode(ECHO, b"q")
    )
    with pytest.raises(ProtocolError, match="third server session"):
        client.decode(third.encode(ECHO, b"3"))
    monotonic.now += 60
    assert client.decode(third.encode(ECHO, b"3"))[1] == b"3"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CIPHERS), st.binary(max_size=200))
def test_udp_garbage_raises_only_protocol_errors(cipher, garbage):
    client, server, _ = udp_pair(cipher)
    for decode in (server.decode, client.decode):
        try:
            decode(garbage)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_udp_authentic_garbage_bodies_raise_only_protocol_errors(body):
    key = key_for(AES128)
    try:
        AES128.datagram_server(key, clock=clock()).decode(spec_client_packet(AES128, key, os.urandom(8), 0, body))
    except ProtocolError:
        pass


def test_module_is_pure():
    # As tests/test_layers.py checks the other pure modules (the list there is not this file's to edit).
    from test_layers import test_pure_modules_import_no_io

    test_pure_modules_import_no_io("aead2022")
