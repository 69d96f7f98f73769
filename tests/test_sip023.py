"""Several users on one port (SIP023 identity headers, the 2022 AES methods): the codecs, the
config, and relay's own local and remote end to end. Interop with sing-box is in
test_interop_singbox.py."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from blake3 import blake3
from conftest import relay_command, subprocess_env
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay import Address, ConfigError
from relay.errors import DecryptError, ProtocolError
from relay.aead2022 import CIPHERS, PskChain, UserKeys, psk_hash, stream_identity_headers
from relay.address import encode_address
from relay.testing import Socks5UDPClient, make_config, socks5_connect, start_relay, udp_echo_server
from test_pair import exchange

AES = [cipher for cipher in CIPHERS if "-aes-" in cipher.name]
CHACHA = next(cipher for cipher in CIPHERS if "chacha" in cipher.name)
TARGET = Address("127.0.0.1", 80)


def key(cipher, fill: int | None = None) -> str:
    raw = bytes([fill]) * cipher.key_size if fill is not None else os.urandom(cipher.key_size)
    return base64.b64encode(raw).decode()


@pytest.fixture(params=AES, ids=lambda cipher: cipher.name)
def cipher(request):
    return request.param


def test_identity_header_known_answer():
    """The wire form pinned: AES-128 over BLAKE3(uPSK)[:16], keyed by BLAKE3 derive_key("shadowsocks
    2022 identity subkey", iPSK || salt). (SIP023 publishes no vectors; the sing-box interop tests
    are the independent check, this keeps the bytes from drifting.)"""
    ipsk, upsk, salt = bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))
    assert psk_hash(upsk) == blake3(upsk).digest()[:16]
    subkey = blake3(ipsk + salt, derive_key_context="shadowsocks 2022 identity subkey").digest(16)
    encryptor = Cipher(algorithms.AES(subkey), modes.ECB()).encryptor()
    expected = encryptor.update(blake3(upsk).digest()[:16])
    assert stream_identity_headers(PskChain([ipsk, upsk]), salt) == expected
    assert expected.hex() == "cfe4b97eb5c29f5dda417a22031c9f08"


def test_tcp_streams_name_their_user(cipher):
    identity, alice, bob = key(cipher), key(cipher), key(cipher)
    server_key = cipher.key_for_users(identity, {"alice": alice, "bob": bob})
    for name, user_key in (("alice", alice), ("bob", bob)):
        encoder, decoder = cipher.client_stream(cipher.key_from_password(f"{identity}:{user_key}"))
        flight = encoder.encrypt(encode_address(TARGET) + b"hello")
        assert flight[cipher.salt_size : cipher.salt_size + 16] == stream_identity_headers(cipher.key_from_password(f"{identity}:{user_key}"), encoder.salt)
        request = cipher.request_decoder(server_key)
        assert request.decrypt(flight) == b"hello"
        assert (request.user, request.target, request.session_key) == (name, TARGET, base64.b64decode(user_key))
        answer = cipher.response_encoder(request.session_key, request.request_salt).encrypt(b"world")
        assert decoder.decrypt(answer) == b"world"
        # answered under the identity key instead, the client refuses it
        wrong = cipher.response_encoder(base64.b64decode(identity), request.request_salt).encrypt(b"world")
        with pytest.raises(DecryptError):
            cipher.client_stream(cipher.key_from_password(f"{identity}:{user_key}"))[1].decrypt(wrong)


@pytest.mark.parametrize("client", ["stranger", "wrong identity", "no identity header"])
def test_tcp_unknown_user_is_a_protocol_error(cipher, client):
    identity = key(cipher)
    server_key = cipher.key_for_users(identity, {"alice": key(cipher)})
    password = {"stranger": f"{identity}:{key(cipher)}", "wrong identity": f"{key(cipher)}:{key(cipher)}", "no identity header": key(cipher)}[client]
    encoder, _ = cipher.client_stream(cipher.key_from_password(password))
    with pytest.raises(ProtocolError):
        cipher.request_decoder(server_key).decrypt(encoder.encrypt(encode_address(TARGET) + b"hello"))


def test_udp_sessions_keyed_by_their_user(cipher):
    identity, alice, bob = key(cipher), key(cipher), key(cipher)
    server = cipher.datagram_server(cipher.key_for_users(identity, {"alice": alice, "bob": bob}))
    for name, user_key in (("alice", alice), ("bob", bob)):
        client = cipher.datagram_client(cipher.key_from_password(f"{identity}:{user_key}"))
        packet = client.encode(TARGET, b"query")
        assert len(packet) == client.overhead + len(encode_address(TARGET)) + len(b"query")
        session, target, payload = server.decode(packet, ("127.0.0.1", 9))
        assert (session.user, target, payload) == (name, TARGET, b"query")
        assert client.decode(session.encode(TARGET, b"answer")) == (TARGET, b"answer")
        assert server.decode(client.encode(TARGET, b"again"))[2] == b"again"  # the known session
    assert len(server) == 2
    stranger = cipher.datagram_client(cipher.key_from_password(f"{identity}:{key(cipher)}"))
    with pytest.raises(ProtocolError):
        server.decode(stranger.encode(TARGET, b"query"))


def test_udp_identity_header_differs_per_packet(cipher):
    """The user's hash is XORed with the separate header before encryption: no constant 16 bytes
    for an observer to follow a user by."""
    client = cipher.datagram_client(cipher.key_from_password(f"{key(cipher)}:{key(cipher)}"))
    headers = {client.encode(TARGET, b"x")[16:32] for _ in range(8)}
    assert len(headers) == 8


def test_keys_from_config(cipher):
    identity, alice = key(cipher, 1), key(cipher, 2)
    remote = make_config("remote", None, {"users": [{"name": "alice", "password": alice}]}, method=cipher.name, password=identity)
    assert isinstance(remote.key, UserKeys) and remote.key.identity_psk == bytes([1]) * cipher.key_size
    same = make_config("remote", None, {"users": {"alice": alice}}, method=cipher.name, password=identity)
    assert same.key.by_hash == remote.key.by_hash
    local = make_config("local", None, method=cipher.name, password=f"{identity}:{alice}", server="127.0.0.1:8388")
    assert local.key == PskChain([bytes([1]) * cipher.key_size, bytes([2]) * cipher.key_size])


@pytest.mark.parametrize(
    "role,method,password,users,message",
    [
        ("remote", "chacha", "K", {"alice": "K"}, "has no multi-user identity headers"),
        ("local", "chacha", "K:K", None, "has no multi-user identity headers"),
        ("remote", "aes-256-gcm", "x", {"alice": "x"}, "serves one key"),
        ("remote", "aes", "K:K", {"alice": "K"}, "one identity key"),
        ("remote", "aes", "K", {"alice": "short"}, "user 'alice'"),
        ("remote", "aes", "K", {"alice": "K", "bob": "K"}, "the same key"),
        ("remote", "aes", "K", [{"name": "alice"}], '"users" must be a list'),
        ("local", "aes", "K", {"alice": "K"}, "remote's setting"),
    ],
)
def test_config_errors_are_one_line(role, method, password, users, message):
    cipher = AES[0] if method == "aes" else CHACHA
    name = cipher.name if method in ("aes", "chacha") else method
    k = key(cipher, 3)
    users = {u: (k if p == "K" else p) for u, p in users.items()} if isinstance(users, dict) else users
    flags = {"method": name, "password": password.replace("K", k)}
    if role == "local":
        flags["server"] = "127.0.0.1:8388"
    with pytest.raises(ConfigError, match=message) as raised:
        make_config(role, None, {"users": users} if users is not None else None, **flags)
    assert "\n" not in str(raised.value) and k not in str(raised.value)


def test_a_remote_refuses_a_chain_as_its_password(tmp_path: Path):
    cipher = AES[0]
    path = tmp_path / "remote.json"
    path.write_text(json.dumps({"server": "127.0.0.1", "server_port": 8388, "method": cipher.name, "password": f"{key(cipher)}:{key(cipher)}"}))
    done = subprocess.run([*relay_command(), "check", "-c", str(path), "--role", "remote"], capture_output=True, text=True, timeout=30, env=subprocess_env(), check=False)
    assert done.returncode == 2 and '"users"' in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_users_through_relay_pair(pm, echo_target):
    """One remote, two users and a stranger, each with relay's own local: TCP and UDP for the
    users, nothing for the stranger."""
    cipher = AES[-1]
    identity = key(cipher)
    users = {"alice": key(cipher), "bob": key(cipher)}
    udp = {"mode": "tcp_and_udp"}
    remote_config = make_config("remote", pm, {"users": users}, method=cipher.name, password=identity, allow_private=True, handshake_timeout=1, **udp)
    with udp_echo_server() as echo_udp, start_relay(remote_config, pm) as remote:
        for user_key in users.values():
            with start_relay(make_config("local", pm, method=cipher.name, password=f"{identity}:{user_key}", server=remote.address, **udp), pm) as local:
                with socks5_connect(local.address, echo_target) as sock:
                    payload = os.urandom(1 << 20)
                    assert exchange(sock, payload) == payload
                with Socks5UDPClient(local.address) as client:
                    client.sendto(b"datagram", echo_udp)
                    assert client.recvfrom() == (b"datagram", echo_udp)
        assert not remote.udp_server.stats, remote.udp_server.stats
        with start_relay(make_config("local", pm, method=cipher.name, password=f"{identity}:{key(cipher)}", server=remote.address), pm) as stranger:
            with socks5_connect(stranger.address, echo_target) as sock:
                assert exchange(sock, b"stranger") == b""


def test_udp_every_packet_names_its_sessions_user(cipher):
    """As sing-box: a packet of a known session whose identity header names someone else (or
    nobody) is refused, though its body would authenticate."""
    identity, alice, bob = key(cipher), key(cipher), key(cipher)
    server = cipher.datagram_server(cipher.key_for_users(identity, {"alice": alice, "bob": bob}))
    client = cipher.datagram_client(cipher.key_from_password(f"{identity}:{alice}"))
    server.decode(client.encode(TARGET, b"first"))
    packet = bytearray(client.encode(TARGET, b"second"))
    packet[20] ^= 1
    with pytest.raises(ProtocolError, match="identity header"):
        server.decode(bytes(packet))


def test_relay_url_prints_each_users_url_and_it_works(pm, echo_target, tmp_path: Path):
    """``relay url`` of a multi-user remote prints one URL per user (tag: the user's name), with
    both keys; a local configured by one of them gets through the remote."""
    cipher = AES[0]
    identity, users = key(cipher), {"alice": key(cipher), "bob": key(cipher)}
    remote_file = {"server": "127.0.0.1", "server_port": 8388, "method": cipher.name, "password": identity, "users": [{"name": n, "password": k} for n, k in users.items()]}
    path = tmp_path / "remote.json"
    path.write_text(json.dumps(remote_file))
    command = [*relay_command(), "url", "-c", str(path), "--no-qr"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, env=subprocess_env(), check=False)
    assert done.returncode == 0, done.stderr
    urls = done.stdout.split()
    assert [url.rpartition("#")[2] for url in urls] == ["alice", "bob"]
    bob = subprocess.run([*command, "--user", "bob"], capture_output=True, text=True, timeout=30, env=subprocess_env(), check=False)
    assert bob.stdout.split() == urls[1:]
    nobody = subprocess.run([*command, "--user", "carol"], capture_output=True, text=True, timeout=30, env=subprocess_env(), check=False)
    assert nobody.returncode == 2 and "no such user" in nobody.stderr
    remote_config = make_config("remote", pm, {"users": users}, method=cipher.name, password=identity, allow_private=True)
    with start_relay(remote_config, pm) as remote:
        url = urls[1].replace("127.0.0.1:8388", str(remote.address))
        with start_relay(make_config("local", pm, server_url=url), pm) as local:
            assert local.config.key == PskChain([base64.b64decode(identity), base64.b64decode(users["bob"])])
            with socks5_connect(local.address, echo_target) as sock:
                assert exchange(sock, b"bob via url") == b"bob via url"


def test_users_need_the_identity_key_as_password():
    cipher = AES[0]
    with pytest.raises(ConfigError, match='not "key"'):
        make_config("remote", None, {"users": {"alice": key(cipher)}}, method=cipher.name, key=key(cipher))
