"""Shadowsocks AEAD-2017 framing: published known-answer vectors, round trips, refusals."""

import json
import os

import pytest
from conftest import VECTORS
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import DecryptError, ProtocolError
from relay.aead import MAX_PAYLOAD, Aead2017Cipher, evp_bytes_to_key, session_subkey

VECTOR_DATA = json.loads(VECTORS.read_text(encoding="utf-8"))
KEY_SIZES = {"aes-128-gcm": 16, "aes-192-gcm": 24, "aes-256-gcm": 32, "chacha20-ietf-poly1305": 32}


def cipher_for(method):
    return Aead2017Cipher(method, KEY_SIZES[method], ChaCha20Poly1305 if "chacha" in method else AESGCM)


def chunk_sizes(cipher, key, stream):
    """Plaintext size of each chunk in a stream, found by feeding it a byte at a time."""
    decryptor = cipher.decryptor(key)
    return [len(out) for i in range(len(stream)) if (out := decryptor.decrypt(stream[i : i + 1]))]


@pytest.mark.parametrize("vector", VECTOR_DATA["aead2017_streams"], ids=lambda v: f"{v['method']}-{len(v['plaintext'])}")
def test_known_answer_streams(vector):
    cipher = cipher_for(vector["method"])
    key = cipher.key_from_password(vector["password"])
    stream = bytes.fromhex(vector["stream_hex"])
    plaintext = vector["plaintext"].encode()

    decryptor = cipher.decryptor(key)
    assert decryptor.decrypt(stream) == plaintext
    decryptor.eof()

    # Encrypting the same chunks with the vector's salt reproduces the stream byte for byte.
    encryptor = cipher.encryptor(key, salt=stream[: cipher.salt_size])
    out, pos = b"", 0
    for size in chunk_sizes(cipher, key, stream):
        out += encryptor.encrypt(plaintext[pos : pos + size])
        pos += size
    assert out == stream


def test_known_answer_refusal_of_oversized_chunk():
    vector = VECTOR_DATA["aead2017_reject"]
    cipher = cipher_for(vector["method"])
    with pytest.raises(ProtocolError, match="exceeds"):
        cipher.decryptor(cipher.key_from_password(vector["password"])).decrypt(bytes.fromhex(vector["stream_hex"]))


@pytest.mark.parametrize("case", VECTOR_DATA["evp_bytes_to_key"]["cases"], ids=lambda c: c["password"][:8])
def test_evp_bytes_to_key(case):
    key32 = bytes.fromhex(case["key32_hex"])
    for size in range(16, 33):
        assert evp_bytes_to_key(case["password"].encode(), size) == key32[:size]


def test_subkey_is_hkdf_sha1_of_key_size():
    assert len(session_subkey(bytes(16), bytes(16))) == 16
    assert session_subkey(bytes(32), bytes(32)) != session_subkey(bytes(32), b"\x01" * 32)


@given(key=st.binary(min_size=1, max_size=48), salt=st.binary(max_size=80))
def test_subkey_agrees_with_cryptographys_hkdf(key, salt):
    """session_subkey is HKDF written out with hashlib; cryptography's HKDF is the reference."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    expected = HKDF(algorithm=hashes.SHA1(), length=len(key), salt=salt or None, info=b"ss-subkey").derive(key)
    assert session_subkey(key, salt) == expected


@pytest.mark.parametrize("method", ["aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305"])
def test_large_round_trip_splits_into_max_chunks(method):
    cipher = cipher_for(method)
    key = os.urandom(cipher.key_size)
    data = os.urandom(3 * MAX_PAYLOAD + 5)
    wire = cipher.encryptor(key).encrypt(data)
    assert len(wire) == cipher.salt_size + len(data) + 4 * (2 + 16 + 16)
    assert chunk_sizes(cipher, key, wire) == [MAX_PAYLOAD] * 3 + [5]


def reference_stream(aead, key, salt, messages):
    """SIP004 written out plainly: every message in chunks of at most MAX_PAYLOAD, each a sealed
    length and a sealed payload, the nonce counting up from zero."""
    sealer, nonce, out = aead(session_subkey(key, salt)), 0, [salt]
    for message in messages:
        for start in range(0, len(message), MAX_PAYLOAD):
            chunk = message[start : start + MAX_PAYLOAD]
            out.append(sealer.encrypt(nonce.to_bytes(12, "little"), len(chunk).to_bytes(2, "big"), None))
            out.append(sealer.encrypt((nonce + 1).to_bytes(12, "little"), chunk, None))
            nonce += 2
    return b"".join(out)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 64, 1500, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD]), min_size=1, max_size=8))
def test_encoding_message_by_message_is_sip004(sizes):
    # One chunk and many, a growing output buffer, empty messages: every path of encode()
    # writes the same bytes as the spec, and each result is valid until the next call only.
    cipher = cipher_for("aes-256-gcm")
    key, salt = bytes(range(32)), bytes(range(100, 132))
    messages = [os.urandom(size) for size in sizes]
    encryptor = cipher.encryptor(key, salt=salt)
    wire = b"".join(bytes(encryptor.encode(memoryview(m))) for m in messages)
    assert wire == reference_stream(AESGCM, key, salt, messages)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=40000), min_size=1, max_size=4), st.lists(st.integers(1, 70000), max_size=8))
def test_round_trip_at_random_split_points(messages, cuts):
    cipher = cipher_for("aes-128-gcm")
    key = bytes(range(16))
    encryptor = cipher.encryptor(key)
    wire = b"".join(encryptor.encrypt(m) for m in messages)
    points = sorted({min(c, len(wire)) for c in cuts})
    decryptor = cipher.decryptor(key, capacity=1)  # smallest buffer: exercises compaction
    out = b"".join(decryptor.decrypt(wire[a:b]) for a, b in zip([0] + points, points + [len(wire)]))
    assert out == b"".join(messages)
    decryptor.eof()


def sealed_chunk(aead, key, salt, nonce, length, payload):
    sealer = aead(session_subkey(key, salt))
    return sealer.encrypt(nonce.to_bytes(12, "little"), length.to_bytes(2, "big"), None) + sealer.encrypt((nonce + 1).to_bytes(12, "little"), payload, None)


def test_chunk_by_chunk_decoding_refuses_what_the_general_path_refuses():
    # A receive of exactly one chunk into the empty buffer takes a shorter path than the
    # general loop: it must authenticate, and bound the length, the same way.
    cipher = cipher_for("aes-256-gcm")
    key, salt = bytes(range(32)), bytes(range(100, 132))
    messages = [b"a" * 64, b"b" * 1500, b"c"]
    wire = reference_stream(AESGCM, key, salt, messages)
    decryptor = cipher.decryptor(key)
    pos = cipher.salt_size
    assert decryptor.decrypt(wire[:pos]) == b""
    for message in messages:  # one receive per chunk, as a ping-pong reads them
        size = 2 + 16 + len(message) + 16
        assert decryptor.decrypt(wire[pos : pos + size]) == message
        pos += size

    tampered = bytearray(sealed_chunk(AESGCM, key, salt, 2 * len(messages), 3, b"xyz"))
    tampered[-1] ^= 1
    with pytest.raises(DecryptError):
        decryptor.decrypt(bytes(tampered))

    oversized = cipher.decryptor(key)
    oversized.decrypt(salt + sealed_chunk(AESGCM, key, salt, 0, 1, b"x"))
    with pytest.raises(ProtocolError, match="exceeds"):
        oversized.decrypt(sealed_chunk(AESGCM, key, salt, 2, MAX_PAYLOAD + 1, bytes(MAX_PAYLOAD + 1)))


def test_wrong_key_and_tampering_raise_decrypt_error():
    cipher = cipher_for("chacha20-ietf-poly1305")
    wire = cipher.encryptor(bytes(32)).encrypt(b"hello")
    with pytest.raises(DecryptError):
        cipher.decryptor(b"\x01" * 32).decrypt(wire)
    tampered = bytearray(wire)
    tampered[-1] ^= 1
    with pytest.raises(DecryptError):
        cipher.decryptor(bytes(32)).decrypt(bytes(tampered))


def test_truncated_stream_is_an_error_at_eof():
    cipher = cipher_for("aes-256-gcm")
    wire = cipher.encryptor(bytes(32)).encrypt(b"hello")
    decryptor = cipher.decryptor(bytes(32))
    assert decryptor.decrypt(wire[:-1]) == b""
    with pytest.raises(ProtocolError, match="inside a chunk"):
        decryptor.eof()


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_garbage_raises_only_protocol_errors(garbage):
    decryptor = cipher_for("aes-128-gcm").decryptor(bytes(16))
    try:
        decryptor.decrypt(garbage)
        decryptor.eof()
    except ProtocolError:
        pass
