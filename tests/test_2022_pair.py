"""The 2022 edition (SIP022) end to end between relay's own local and remote, TCP and UDP."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from conftest import relay_pair
from relay.aead2022 import CIPHERS, generate_psk
from relay.testing import Socks5UDPClient, make_config, socks5_connect, start_relay, udp_echo_server, wait_until
from test_pair import exchange

METHODS_2022 = [(cipher.name, cipher.key_size) for cipher in CIPHERS]
UDP = {"mode": "tcp_and_udp"}


@pytest.mark.parametrize("method,size", METHODS_2022, ids=[m for m, _ in METHODS_2022])
def test_tcp_and_udp_round_trips(pm, echo_target, method, size):
    key = generate_psk(size)
    payload = os.urandom(3 << 20)
    with udp_echo_server() as echo_udp, relay_pair(pm, method=method, password=key, local=UDP, remote=UDP) as (local, remote):
        with socks5_connect(local.address, echo_target) as sock:
            assert hashlib.sha256(exchange(sock, payload)).digest() == hashlib.sha256(payload).digest()
        with Socks5UDPClient(local.address) as client:
            for datagram in (b"x", os.urandom(1400), os.urandom(8000)):
                client.sendto(datagram, echo_udp)
                assert client.recvfrom() == (datagram, echo_udp)
        assert not local.udp_server.stats and not remote.udp_server.stats, (local.udp_server.stats, remote.udp_server.stats)


def test_wrong_key_gets_nothing(pm, echo_target):
    method, size = METHODS_2022[0]
    with start_relay(make_config("remote", pm, method=method, password=generate_psk(size), allow_private=True, handshake_timeout=1), pm) as remote:
        with start_relay(make_config("local", pm, method=method, password=generate_psk(size), server=remote.address), pm) as local:
            with socks5_connect(local.address, echo_target) as sock:
                assert exchange(sock, b"wrong key") == b""


def test_a_replayed_2022_flight_is_refused(pm, echo_target):
    """The remote's 60-second salt store: the same request flight twice reaches the target once."""
    method, size = METHODS_2022[1]
    key = generate_psk(size)
    cipher = {c.name: c for c in CIPHERS}[method]
    from relay.address import encode_address

    encoder, _ = cipher.client_stream(cipher.key_from_password(key))
    flight = bytes(encoder.encode(encode_address(echo_target) + b"once"))
    with start_relay(make_config("remote", pm, method=method, password=key, allow_private=True, handshake_timeout=1), pm) as remote:
        answers = []
        for _ in range(2):
            with socket.create_connection(tuple(remote.address), timeout=5) as sock:
                sock.sendall(flight)
                sock.settimeout(3)
                try:
                    answers.append(sock.recv(4096))
                except (TimeoutError, ConnectionResetError):
                    answers.append(b"")
        assert answers[0] and answers[1] == b""
        assert wait_until(lambda: remote.data.get("shadowsocks.replays") == 1)
