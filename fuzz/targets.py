"""Fuzz targets: one per parser of relay, each a function of one input (bytes).

A target returns normally when the parser behaved: it produced a result or raised the project's
own error (ProtocolError for wire protocols, ConfigError for URLs, server lists and config, the
documented ValueError for parse_host_port and the HTTP helpers). Anything else escapes: another
exception from the parser, or an AssertionError when a property fails (the same input split
differently gave different events, a mutated stream produced plaintext that was never sent).

fuzz/run.py imports this module inside atheris's instrumentation hook, so that relay, its
plugins and h11 are imported (and instrumented for coverage) from here.

Each target also has seeds (valid messages, from which mutation starts) and a dictionary of
tokens for libFuzzer.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay_plugins.http import HEAD_LIMIT, HttpHandshake, _check_basic
from relay_plugins.mixed import MixedHandshake
from relay_plugins.socks4 import Socks4Handshake
from relay_plugins.socks5 import Socks5Handshake
from relay_plugins.shadowsocks import CIPHERS as ALL_CIPHERS

from relay import Address, ConfigError, ProtocolError
from relay.address import decode_address, encode_address, parse_host_port
from relay.aead import MAX_PAYLOAD, NONCE_SIZE, Aead2017Cipher, session_subkey
from relay.aead2022 import MAX_PADDING, Aead2022Cipher, SaltStore
from relay.config import build_configs, load_file
from relay.plugin_manager import get_plugin_manager
from relay.sip008 import parse_server_list
from relay.socks5 import parse_datagram
from relay.ssurl import format_ss_url, parse_ss_url

# The properties themselves are the test suite's (tests/test_hostile_input.py): what a front-end
# does with what a parser hands it, and how an outcome is recorded. Here they run for minutes.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_hostile_input as properties  # noqa: E402
from test_hostile_input import (  # noqa: E402
    USERS,
    check_target,
    decrypt_in_pieces,
    front_end,
    http_handler,
    http_outcome,
    outcome,
    seal,
    socks4_request,
    socks5_handshake,
    socks5_session,
)

# run.py bounds every input itself (libFuzzer's -timeout, or its own alarm): the suite's
# per-call alarm would only replace that one's handler.
properties.time_limit = lambda seconds=None: contextlib.nullcontext()


@dataclass
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: list[bytes]
    tokens: list[bytes] = field(default_factory=list)
    max_len: int = 4096


# -- shared helpers -----------------------------------------------------------------------------



def splits_of(data: bytes, max_bytewise: int = 1024) -> list[list[bytes]]:
    """The input whole, at random split points chosen from the input itself, and byte by byte."""
    rng = random.Random(hashlib.sha1(data).digest())
    whole = [data] if data else []
    points = sorted({rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 8))}) if data else []
    cut = [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if a < b]
    ways = [whole, cut]
    if len(data) <= max_bytewise:
        ways.append([data[i : i + 1] for i in range(len(data))])
    return ways



def assert_one_line(message: str) -> None:
    """ConfigError messages are one line; the assertion names the message's fixed words only, so
    that every input hitting the same message counts as one crash."""
    if "\n" in message:
        template = re.split(r"['\"\[{(\n]", message)[0].replace(":", "").strip()[:60]
        raise AssertionError(f"multi-line ConfigError ({template})")


def same(results: list[tuple], what: str) -> None:
    for result in results[1:]:
        assert result == results[0], f"{what} depends on how the input was split: {results[0]!r} != {result!r}"


# Macros the text targets expand before parsing: short dictionary tokens that stand for inputs a
# mutator would hardly build byte by byte (libFuzzer's dictionary entries are 64 bytes at most).
MACROS = {
    b"$9$": b"9" * 5000,  # past Python's 4300-digit limit on int(str)
    b"$0$": b"1" + b"0" * 400,  # an integer past float range
    b"$[$": b"[" * 50_000,  # JSON nested past the recursion limit
    b"$u$": b"\\ud800",  # a JSON escape for a lone surrogate
}


def expand(data: bytes) -> bytes:
    if b"$" in data:
        for macro, value in MACROS.items():
            data = data.replace(macro, value)
    return data


class Reader:
    """Structured values read off the front of a fuzz input; zeros once it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, nbytes: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(nbytes)), "big")

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


# -- SOCKS5 (RFC 1928, RFC 1929) and its UDP header ------------------------------------------------



def fuzz_socks5(data: bytes) -> None:
    auth, body = bool(data[:1] and data[0] & 1), data[1:]
    same([outcome(lambda c=chunks: socks5_handshake(c, auth), ProtocolError) for chunks in splits_of(body)], "SOCKS5 handshake")
    front_ends_alike(body, auth)


def front_ends_alike(body: bytes, auth: bool) -> None:
    """The front-end handshakes the event loop runs (the protocol's own, and the mixed port's),
    driven as the loop drives them: only ProtocolError escapes, and the outcome and every reply
    byte are the same however the input is split. h11 words one error differently depending
    on the split, so an HTTP error's text is left out of the comparison."""
    session = socks5_session(auth)
    first = body[:1]
    own = {b"\x05": Socks5Handshake, b"\x04": Socks4Handshake}.get(first, HttpHandshake)
    worded = first in (b"\x04", b"\x05")
    for make in (lambda: own(session), lambda: MixedHandshake(session)):
        results = []
        for chunks in splits_of(body):
            kind, detail, replies = front_end(make(), chunks)
            results.append((kind, detail if worded or kind != "error" else None, replies))
        same(results, f"{own.__name__} front-end")


def fuzz_socks5_udp(data: bytes) -> None:
    result = outcome(lambda: parse_datagram(data), ProtocolError)
    same([result, outcome(lambda: parse_datagram(memoryview(data)), ProtocolError)], "parse_datagram")
    if result[0] == "ok":
        check_target(result[1].address)


SOCKS5_REQUESTS = [
    b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
    b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16",
    b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
]
SOCKS5_SEEDS = [b"\x00\x05\x01\x00" + r + b"early" for r in SOCKS5_REQUESTS] + [
    b"\x01\x05\x02\x00\x02" + c + r for c in (b"\x01\x05alice\x06s3cret", b"\x01\x01u\x00", b"\x01\x02\xc3\xbc\x00") for r in SOCKS5_REQUESTS
]
SOCKS5_UDP_SEEDS = [b"\x00\x00\x00" + encode_address(a) + b"payload" for a in (Address("1.2.3.4", 53), Address("::1", 53), Address("example.com", 443))]


# -- SOCKS4 / SOCKS4a ------------------------------------------------------------------------------



def fuzz_socks4(data: bytes) -> None:
    same([outcome(lambda c=chunks: socks4_request(c), ProtocolError) for chunks in splits_of(data)], "SOCKS4 request")
    front_ends_alike(data, auth=False)
    front_ends_alike(data, auth=True)


SOCKS4_SEEDS = [
    b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00",
    b"\x04\x01\x01\xbb\x5d\xb8\xd8\x22\x00early",
    b"\x04\x01\x01\xbb\x00\x00\x00\x01bob\x00example.com\x00",
    b"\x04\x02\x10\x92\x0a\x00\x00\x02carol\x00",
]


# -- addresses -------------------------------------------------------------------------------------


def fuzz_address(data: bytes) -> None:
    reader = Reader(data)
    selector = reader.byte()
    body = reader.rest()
    if selector & 0x80:  # parse_host_port on text, lone surrogates included
        text = expand(body).decode("utf-8", "surrogateescape")
        for default_host in (None, "0.0.0.0"):
            result = outcome(lambda d=default_host: parse_host_port(text, default_host=d), ValueError)
            if result[0] == "ok":
                address = result[1]
                assert address.host and 0 <= address.port <= 65535
                assert parse_host_port(str(address)) == address, (text, address)
        return
    offset = selector & 3
    whole = outcome(lambda: decode_address(body, offset), ProtocolError)
    same([whole, outcome(lambda: decode_address(memoryview(body), offset), ProtocolError)], "decode_address")
    ends = range(len(body)) if len(body) <= 300 else random.Random(body).sample(range(len(body)), 50)
    for end in ends:
        prefix = outcome(lambda e=end: decode_address(body[:e], offset), ProtocolError)
        assert prefix in (("ok", None), whole), f"prefix of {end} bytes: {prefix!r}, whole: {whole!r}"
    if whole[0] == "ok" and whole[1] is not None:
        check_target(whole[1][0])


ADDRESS_SEEDS = [bytes([0]) + encode_address(a) for a in (Address("127.0.0.1", 80), Address("::1", 443), Address("example.com", 8080))] + [
    b"\x80127.0.0.1:1080",
    b"\x80[::1]:8388",
    b"\x80example.com:443",
    b"\x808080",
]


# -- HTTP: h11 as the front-end drives it, and relay's own parsing of a request -----------------------


def head_refusals_alike(result: tuple) -> tuple:
    """For input past HEAD_LIMIT: a head that is over the bound and also wrong (malformed, or
    asking for what is not supported) may be refused for either, depending on where the reads
    end: 431 if the bound is met first, else 400 or 501. Any refusal is right."""
    if result[0] == "error":
        return ("error", "refused")
    if isinstance(result[0], bytes) and re.match(rb"HTTP/1\.1 (4|5)\d\d ", result[0]):
        return (b"refused", *result[1:])
    return result


def fuzz_http(data: bytes) -> None:
    eof = bool(data[:1] and data[0] & 1)
    body = expand(data[1:])
    ways = splits_of(body, max_bytewise=2048)
    alike = head_refusals_alike if len(body) > HEAD_LIMIT else (lambda result: result)
    same([alike(http_outcome(chunks, eof)) for chunks in ways], "h11 events")
    auth = bool(data[:1] and data[0] & 2)
    same([alike(http_handler(chunks, auth)) for chunks in ways], "HTTP front-end answer")
    if len(body) <= HEAD_LIMIT:
        front_ends_alike(body, auth)
    for credentials in (body[:64], body[-64:]):  # and the Basic check on raw bytes
        assert isinstance(_check_basic(credentials, USERS), bool)


HTTP_SEEDS = [flags + seed for flags in (b"\x00", b"\x02") for seed in properties.HTTP_SEEDS]
HTTP_TOKENS = [b"HTTP/1.1", b"HTTP/1.0", b"CONNECT", b"GET", b"http://", b"\r\n", b"\r\n\r\n", b"Host: ", b"Content-Length: ", b"Transfer-Encoding: chunked", b"Connection: ", b"close", b"keep-alive", b"Proxy-Authorization: Basic ", b"YWxpY2U6czNjcmV0", b"Expect: 100-continue", b"[::1]", b":65535", b":0"]


# -- Shadowsocks AEAD: TCP stream and UDP packets --------------------------------------------------

# The AEAD-2017 methods (SIP004): relay.aead's framing. (The SIP022 ones in the same list have
# framing of their own, relay.aead2022: the 2022_stream and 2022_udp targets below.)
CIPHERS = [cipher for cipher in ALL_CIPHERS if isinstance(cipher, Aead2017Cipher)]
KEYS = {cipher.name: bytes(range(1, cipher.key_size + 1)) for cipher in CIPHERS}



def build_stream(cipher, reader: Reader, salt: bytes) -> tuple[bytes, bytes]:
    """A stream described by the input: chunk sizes, and lengths that may lie. (wire, plaintext)"""
    chunks: list[tuple[int, bytes | None]] = []
    sent = bytearray()
    for index in range(reader.byte() % 4 + 1):
        kind = reader.byte()
        size = (0, 1, MAX_PAYLOAD - 1, MAX_PAYLOAD, reader.int(2) % (MAX_PAYLOAD + 1))[kind % 5] if kind & 0x80 else reader.byte()
        payload = bytes([index + 1]) * size
        lie = reader.byte()
        if lie < 0xF0:
            chunks.append((size, payload))
            sent += payload
        elif lie < 0xF8:  # authentic length, maybe another size than the payload's
            length = reader.int(2)
            chunks.append((length, payload))
            if length == size:  # no lie after all
                sent += payload
            else:
                break  # nothing after a lying chunk can authenticate, nor count as sent
        else:  # authentic length chunk alone
            chunks.append((reader.int(2), None))
            break
    return seal(cipher, KEYS[cipher.name], salt, chunks), bytes(sent)


def mutate(data: bytes, reader: Reader, other: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(reader.byte() % 5):
        op, pos = reader.byte() % 6, reader.int(2)
        if op == 0 and out:
            out[pos % len(out)] ^= 1 << (reader.byte() % 8)
        elif op == 1:
            del out[pos % (len(out) + 1) :]
        elif op == 2:
            out[pos % (len(out) + 1) : pos % (len(out) + 1)] = reader.take(reader.byte() % 20)
        elif op == 3:
            del out[pos % (len(out) + 1) : pos % (len(out) + 1) + reader.byte()]
        elif op == 4:  # splice: our head, the other stream's tail
            out[pos % (len(out) + 1) :] = other[reader.int(2) % (len(other) + 1) :]
        elif op == 5 and out:  # duplicate a slice
            start = pos % len(out)
            out[start:start] = out[start : start + reader.int(2) % 200]
    return bytes(out)


def fuzz_aead_stream(data: bytes) -> None:
    reader = Reader(data)
    cipher = CIPHERS[reader.byte() % len(CIPHERS)]
    mode = reader.byte()
    sent: dict[bytes, bytes] = {}
    if mode & 1:  # raw bytes as ciphertext
        wire = reader.rest()
    else:  # valid streams from two senders, then mutated
        salt_a = reader.take(cipher.salt_size).ljust(cipher.salt_size, b"a")
        salt_b = bytes(b ^ 0xFF for b in salt_a)
        wire_a, sent[salt_a] = build_stream(cipher, reader, salt_a)
        wire_b, sent[salt_b] = build_stream(cipher, reader, salt_b)
        wire = mutate(wire_a, reader, wire_b)
    genuine = sent.get(wire[: cipher.salt_size], b"")
    results = [decrypt_in_pieces(cipher, KEYS[cipher.name], pieces, capacity) for pieces, capacity in zip(splits_of(wire, max_bytewise=1024), (1 << 18, 1, 1 << 18))]
    whole_text, whole_end = results[0]
    for text, end in results:
        assert genuine.startswith(text), "plaintext that was never sent came out"
        assert end == whole_end, f"ending depends on the split: {whole_end!r} != {end!r}"
        assert text == whole_text if end[0] == "ok" else text.startswith(whole_text)


def aead_stream_seeds() -> list[bytes]:
    seeds = []
    for index in range(len(CIPHERS)):
        seeds.append(bytes([index, 0]) + b"s" * 32 + b"\x02\x05\xf0\x85\x03\xe0\x00\x01\x07\x00")
        seeds.append(bytes([index, 0]) + b"t" * 32 + b"\x01\x83\x00\xf9\x40\x00\x00\x02\x10\x00\x00\x00")
        seeds.append(bytes([index, 1]) + bytes(range(80)))
    return seeds


def fuzz_aead_udp(data: bytes) -> None:
    reader = Reader(data)
    cipher = CIPHERS[reader.byte() % len(CIPHERS)]
    key = KEYS[cipher.name]
    codec = cipher.datagram_codec(key)
    mode = reader.byte() % 3
    if mode == 0:
        packet = reader.rest()
    else:
        salt = reader.take(cipher.salt_size).ljust(cipher.salt_size, b"s")
        plaintext = reader.rest()
        packet = salt + cipher.aead(session_subkey(key, salt)).encrypt(bytes(NONCE_SIZE), plaintext, None)
        if mode == 2 and packet:  # then flip one bit chosen by the input
            position = int.from_bytes(hashlib.sha1(data).digest()[:4], "big") % (len(packet) * 8)
            flipped = bytearray(packet)
            flipped[position // 8] ^= 1 << (position % 8)
            packet = bytes(flipped)
    result = outcome(lambda: codec.decode(packet), ProtocolError)
    same([result, outcome(lambda: codec.decode(memoryview(packet)), ProtocolError)], "datagram decode")
    if result[0] == "ok":
        address, payload = result[1]
        check_target(address)
        assert codec.decode(codec.encode(address, payload)) == (address, payload)


AEAD_UDP_SEEDS = [bytes([i, m]) + b"s" * 32 + encode_address(a) + b"payload" for i in range(len(CIPHERS)) for m in (1, 2) for a in (Address("1.2.3.4", 53), Address("example.com", 443))]


# -- Shadowsocks 2022 (SIP022, and SIP023's identity headers): TCP stream and UDP packets ----------

CIPHERS_2022 = [cipher for cipher in ALL_CIPHERS if isinstance(cipher, Aead2022Cipher)]
NOW = 1_700_000_000.0  # one clock for senders and receivers: timestamps are checked, not the wall clock
PSKS = {size: [base64.b64encode(bytes([n]) * size).decode() for n in (1, 2, 3)] for size in (16, 32)}


def keys_2022(cipher: Aead2022Cipher, multi_user: bool) -> tuple:
    """(client key, server key): one PSK, or (AES methods) identity PSK 1 with users 2 and 3."""
    identity, alice, bob = PSKS[cipher.key_size]
    if multi_user and cipher.udp_block_header:
        return cipher.key_from_password(f"{identity}:{bob}"), cipher.key_for_users(identity, {"alice": alice, "bob": bob})
    return cipher.key_from_password(identity), cipher.key_from_password(identity)


def decode_request_in_pieces(cipher: Aead2022Cipher, server_key, pieces: list[bytes]) -> tuple[bytes, object, tuple]:
    decoder = cipher.request_decoder(server_key, salts=SaltStore(monotonic=lambda: NOW), clock=lambda: NOW)
    plaintext = bytearray()

    def run() -> None:
        for piece in pieces:
            plaintext.extend(decoder.decrypt(piece))
        decoder.eof()

    ending = outcome(run, ProtocolError)
    return bytes(plaintext), decoder.target, ending


def fuzz_2022_stream(data: bytes) -> None:
    """A request stream at the server: raw bytes, or an authentic one (target, padding or not,
    initial payload, more chunks) from one or two senders, mutated."""
    reader = Reader(data)
    cipher = CIPHERS_2022[reader.byte() % len(CIPHERS_2022)]
    mode = reader.byte()
    client_key, server_key = keys_2022(cipher, bool(mode & 2))
    sent: dict[bytes, tuple[Address, bytes]] = {}
    if mode & 1:
        wire = reader.rest()
    else:
        flights = []
        for _ in range(2):
            target = (Address("127.0.0.1", 80), Address("example.com", 443), Address("::1", 0))[reader.byte() % 3]
            pad = reader.byte() % 3
            encoder = cipher.request_encoder(client_key, target, clock=lambda: NOW, padding=lambda n, pad=pad: (0, 1, MAX_PADDING)[pad] if n or pad else 1)
            chunks = [reader.take(reader.int(2) % 300) for _ in range(reader.byte() % 3 + 1)]
            flights.append(b"".join(bytes(encoder.encode(chunk)) for chunk in chunks))
            sent[encoder.salt] = (target, b"".join(chunks))
        wire = mutate(flights[0], reader, flights[1])
    genuine_target, genuine = sent.get(wire[: cipher.salt_size], (None, b""))
    results = [decode_request_in_pieces(cipher, server_key, pieces) for pieces in splits_of(wire, max_bytewise=1024)]
    whole_text, whole_target, whole_end = results[0]
    for text, target, end in results:
        assert genuine.startswith(text), "plaintext that was never sent came out"
        assert target is None or target == genuine_target, f"a target never sent came out: {target}"
        assert end == whole_end, f"ending depends on the split: {whole_end!r} != {end!r}"
        assert (text, target) == (whole_text, whole_target) if end[0] == "ok" else text.startswith(whole_text)
    response = cipher.response_decoder(client_key, bytes(cipher.salt_size), clock=lambda: NOW)
    outcome(lambda: response.decrypt(wire), ProtocolError)  # the same bytes as a response: refused, nothing else


def fuzz_2022_udp(data: bytes) -> None:
    """Packets at the server (raw, or authentic client packets with one bit flipped or cut short)
    and at the client (the same for server packets)."""
    reader = Reader(data)
    cipher = CIPHERS_2022[reader.byte() % len(CIPHERS_2022)]
    mode = reader.byte()
    client_key, server_key = keys_2022(cipher, bool(mode & 4))
    server = cipher.datagram_server(server_key, clock=lambda: NOW, monotonic=lambda: NOW)
    client = cipher.datagram_client(client_key, clock=lambda: NOW, monotonic=lambda: NOW, padding=lambda a, n: 0)
    target = Address("127.0.0.1", 53)
    first = client.encode(target, b"hello")
    session, _, _ = server.decode(first, ("127.0.0.1", 1))
    answer = session.encode(target, b"world")
    assert client.decode(answer) == (target, b"world")
    payload = reader.take(reader.byte())
    raw = reader.rest() if mode & 3 == 0 else b""
    kind = mode & 3 if raw or mode & 3 else 3  # 3: authentic
    for decode, packet in ((server.decode, client.encode(target, payload)), (client.decode, session.encode(target, payload))):
        if kind == 0:
            packet = raw
        elif kind == 1:
            position = int.from_bytes(hashlib.sha1(data).digest()[:4], "big") % (len(packet) * 8)
            flipped = bytearray(packet)
            flipped[position // 8] ^= 1 << (position % 8)
            packet = bytes(flipped)
        elif kind == 2:
            packet = packet[: int.from_bytes(hashlib.sha1(data).digest()[:4], "big") % len(packet)]
        result = outcome(lambda decode=decode, packet=packet: decode(packet), ProtocolError)
        if result[0] == "ok":
            decoded = result[1][1:] if decode == server.decode else result[1]
            assert kind == 3 and tuple(decoded) == (target, payload), f"a mangled packet decoded: {decoded!r}"
        elif kind == 3:
            raise AssertionError(f"an authentic packet was refused: {result!r}")


STREAM_2022_SEEDS = [bytes([c, m]) + bytes(40) for c in range(3) for m in (0, 1, 2)]
UDP_2022_SEEDS = [bytes([c, m]) + b"\x05hello" for c in range(3) for m in range(8)]


# -- ss:// URLs, SIP008, config ----------------------------------------------------------------------

SECRET = "Pa55-w0rd-NOT-IN-MESSAGES"


def fuzz_ssurl(data: bytes) -> None:
    text = expand(data).decode("utf-8", "surrogateescape")
    for url in (text, "ss://" + text):
        result = outcome(lambda u=url: parse_ss_url(u), ConfigError)
        if result[0] == "ok":
            spec = result[1]
            assert spec.method and spec.password and 0 < spec.server.port < 65536
        else:
            assert_one_line(result[2])
            authority = url.partition("#")[0]  # after '#' is the tag, where an '@' means nothing
            if SECRET in authority and url.count(SECRET) == 1 and authority.index(SECRET) < authority.rfind("@"):
                assert SECRET not in result[2], "the password is in the message"


SSURL_SEEDS = [
    s.encode()
    for s in (
        format_ss_url("aes-128-gcm", SECRET, Address("192.168.100.1", 8888), "tag"),
        format_ss_url("chacha20-ietf-poly1305", SECRET, Address("::1", 8388), plugin="obfs-local", plugin_opts="obfs=http", plain=True),
        format_ss_url("2022-blake3-aes-256-gcm", SECRET, Address("example.com", 443)),
        "ss://" + base64.b64encode(f"aes-256-gcm:{SECRET}@example.com:8388".encode()).decode() + "#legacy",
        "ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888/?plugin=obfs-local%3Bobfs%3Dhttp#Example2",
    )
]
SSURL_TOKENS = [b"ss://", b"@", b"%3D", b"%40", b"?plugin=", b"#", b"[::1]", b":65535", b"/?", b";", b"=="]


def fuzz_sip008(data: bytes) -> None:
    data = expand(data)
    for document in (data, data.decode("utf-8", "surrogateescape")):
        result = outcome(lambda d=document: parse_server_list(d, "fuzz.json"), ConfigError)
        if result[0] == "ok":
            for spec in result[1]:
                assert spec.method and spec.password and 0 < spec.server.port < 65536
        else:
            assert_one_line(result[2])


SERVER = {"id": "27b8a625", "remarks": "one", "server": "example.com", "server_port": 8388, "password": SECRET, "method": "aes-128-gcm", "plugin": "", "plugin_opts": ""}
SIP008_SEEDS = [
    json.dumps({"version": 1, "servers": [SERVER]}).encode(),
    json.dumps({"version": 1, "servers": [SERVER, {**SERVER, "server": "::1", "server_port": "8389", "plugin": "obfs-local"}], "bytes_used": 274877906944}, indent=1).encode(),
]
JSON_TOKENS = [b'"version"', b'"servers"', b'"server"', b'"server_port"', b'"password"', b'"method"', b'"plugin"', b'"remarks"', b'"id"', b"null", b"true", b"1e999", b"-0", b'"\\ud800"', b"[", b"{", b'"":']

_PM = get_plugin_manager()
_CIPHERS, _HANDLERS = _PM.ciphers(), _PM.handlers()
_CONFIG_FILE = os.path.join(tempfile.gettempdir(), f"relay-fuzz-config-{os.getpid()}.json")


def fuzz_config(data: bytes) -> None:
    """load_file on the bytes as a config file, then build_configs for a local, a remote or serve."""
    role = ("local", "remote", "serve")[data[0] % 3] if data else "local"
    with open(_CONFIG_FILE, "wb") as f:
        f.write(expand(data[1:]))
    result = outcome(lambda: load_file(_CONFIG_FILE), ConfigError)
    if result[0] != "ok":
        assert_one_line(result[2])
        return
    result = outcome(lambda: build_configs(role, result[1], ciphers=_CIPHERS, handlers=_HANDLERS), ConfigError)
    if result[0] == "error":
        assert_one_line(result[2])


CONFIG_SEEDS = [
    bytes([role]) + json.dumps(file).encode()
    for role, file in (
        (0, {"server": "198.51.100.7", "server_port": 8388, "local_address": "127.0.0.1", "local_port": 1080, "password": "barfoo!", "method": "aes-256-gcm", "timeout": 60, "mode": "tcp_and_udp"}),
        (0, {"server_url": "ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888", "protocol": "socks5", "auth": {"alice": "pw"}}),
        (1, {"server": ["::1", "127.0.0.1"], "server_port": "8389", "key": "AAECAwQFBgcICQoLDA0ODw==", "method": "aes-128-gcm", "handler": "echo", "workers": 2}),
        (0, {"password": "p", "protocol": "tunnel", "forward": "1.2.3.4:53", "server": "h", "server_port": 1, "locals": [{"local_port": 1081}, {"local_port": 1082, "protocol": "http"}]}),
        (2, {"handler": "uppercase", "timeout": 1.5, "mode": "tcp_and_udp", "plugins": []}),
    )
]
CONFIG_TOKENS = [f'"{key}"'.encode() for key in ("server", "server_port", "local_address", "local_port", "password", "key", "method", "timeout", "mode", "protocol", "forward", "handler", "auth", "locals", "workers", "server_url", "udp_timeout", "udp_max_associations", "allow_private", "plugins", "tunnel_address", "forward_address", "forward_port", "handshake_timeout", "connect_timeout")] + [b'"tcp_and_udp"', b'"udp_only"', b'"aes-128-gcm"', b'"rc4-md5"', b'"tunnel"', b'"http"', b"1e400", b'"\\udfff"']


TARGETS = {
    t.name: t
    for t in (
        Target("socks5", fuzz_socks5, SOCKS5_SEEDS, [b"\x05", b"\x01\x05alice", b"\x03\x0bexample.com"]),
        Target("socks5_udp", fuzz_socks5_udp, SOCKS5_UDP_SEEDS, [b"\x00\x00\x00", b"\x03\xff"]),
        Target("socks4", fuzz_socks4, SOCKS4_SEEDS, [b"\x04\x01", b"\x00\x00\x00\x01", b"\x00"], max_len=1024),
        Target("address", fuzz_address, ADDRESS_SEEDS, [b"[::1]", b":65535", b"\x03\xff", b"\x04", *MACROS], max_len=600),
        Target("http", fuzz_http, HTTP_SEEDS, [*HTTP_TOKENS, *MACROS], max_len=8192),
        Target("aead_stream", fuzz_aead_stream, aead_stream_seeds(), [], max_len=2048),
        Target("aead_udp", fuzz_aead_udp, AEAD_UDP_SEEDS, [b"\x01\x7f\x00\x00\x01", b"\x03\x0bexample.com", b"\x04"], max_len=2048),
        Target("2022_stream", fuzz_2022_stream, STREAM_2022_SEEDS, [], max_len=2048),
        Target("2022_udp", fuzz_2022_udp, UDP_2022_SEEDS, [], max_len=1024),
        Target("ssurl", fuzz_ssurl, SSURL_SEEDS, [*SSURL_TOKENS, *MACROS], max_len=1024),
        Target("sip008", fuzz_sip008, SIP008_SEEDS, [*JSON_TOKENS, *MACROS]),
        Target("config", fuzz_config, CONFIG_SEEDS, [*CONFIG_TOKENS, *MACROS]),
    )
}
