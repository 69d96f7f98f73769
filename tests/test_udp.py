"""Datagrams end to end: SOCKS5 UDP ASSOCIATE, tunnel mode, handlers, the association table."""

from __future__ import annotations

import base64
import logging
import os
import socket
import struct
import sys
import threading
import time

import pytest

from conftest import relay_pair
from relay import Address, hookimpl
from relay.gso import DatagramBatch
from relay.plugin_manager import get_plugin_manager
from relay.testing import Socks5UDPClient, make_config, socks5_connect, start_relay, udp_echo_server, wait_until

UDP = {"mode": "tcp_and_udp"}


def udp_pair(pm, **kwargs):
    local = {**UDP, **kwargs.pop("local", {})}
    remote = {**UDP, **kwargs.pop("remote", {})}
    return relay_pair(pm, local=local, remote=remote, **kwargs)


@pytest.fixture
def echo_udp():
    with udp_echo_server() as address:
        yield address


def test_socks5_udp_to_ipv4_ipv6_and_names(pm, echo_udp):
    with udp_echo_server("::1") as echo6, udp_pair(pm) as (local, _):
        with Socks5UDPClient(local.address) as client:
            for target, payload in ((echo_udp, b"four"), (echo6, b"six"), (Address("localhost", echo_udp.port), b"name")):
                client.sendto(payload, target)
                answer, source = client.recvfrom()
                assert answer == payload
                # the answer's header names where it came from: the address the remote received it from
                assert source.port == target.port and source.host in ("127.0.0.1", "::1")


def build_dns_query(name: str, ident: int) -> bytes:
    question = b"".join(bytes((len(part),)) + part.encode() for part in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)


class TinyDNS(threading.Thread):
    """Answers every A query with 127.0.0.42 (enough of RFC 1035 to be a real DNS exchange)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = Address("127.0.0.1", self.sock.getsockname()[1])
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                query, client = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            ident = query[:2]
            question = query[12:]
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes((127, 0, 0, 42))
            self.sock.sendto(ident + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer, client)

    def __enter__(self):
        self.start()
        return self.address

    def __exit__(self, *exc):
        self.stopping.set()
        self.join(2)
        self.sock.close()


def test_dns_query_through_the_pair(pm):
    with TinyDNS() as dns, udp_pair(pm) as (local, _):
        with Socks5UDPClient(local.address) as client:
            client.sendto(build_dns_query("relay.example", 0x1234), dns)
            answer, _ = client.recvfrom()
    assert answer[:2] == b"\x12\x34" and answer[3] & 0x0F == 0  # our id, no error
    assert answer[-4:] == bytes((127, 0, 0, 42))


def test_tunnel_mode_udp(pm, echo_udp):
    with udp_pair(pm, local={"protocol": "tunnel", "forward": echo_udp}) as (local, _):
        port = local.udp_server.address.port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            for payload in (b"one", b"two", os.urandom(1200)):
                sock.sendto(payload, ("127.0.0.1", port))
                assert sock.recv(65535) == payload


@pytest.mark.parametrize("handler,expected", [("uppercase", b"HELLO WORLD\n"), ("echo", b"hello world\n")])
def test_serve_udp_handlers(pm, handler, expected):
    """socketserver's UDP examples: the request is the datagram and the socket."""
    with start_relay(make_config("serve", pm, handler=handler, mode="udp_only"), pm) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"hello world\n", tuple(server.address))
            assert sock.recv(1024) == expected


def test_a_datagram_front_end_written_the_socketserver_way(echo_udp):
    """A third-party front-end that only defines ``handle()`` runs as socketserver runs it, an
    instance per datagram, through the default ``DatagramHandler.receiver``; the bundled ones
    return closures instead, and both reach the same association and forward helpers."""
    from relay import HandlerSpec, RelayHandler
    from relay.udp import DatagramHandler

    seen = []

    class Bracketed(DatagramHandler):
        def handle(self):
            data, sock = self.request
            seen.append(type(self))
            client = self.client_address
            association = self.association(lambda source, payload: sock.sendto(b"[" + payload + b"]", client))
            if association is not None:
                self.forward(association, self.server.config.forward, data)

    class Plugin:
        @hookimpl
        def relay_register_handlers(self):
            return [HandlerSpec("bracketed", RelayHandler, "datagrams to --forward, answers in brackets", Bracketed)]

    pm = get_plugin_manager((Plugin(),))
    with udp_pair(pm, local={"protocol": "bracketed", "forward": str(echo_udp)}) as (local, _):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            for payload in (b"one", b"two"):
                sock.sendto(payload, tuple(local.address))
                assert sock.recv(65535) == b"[" + payload + b"]"
    assert seen == [Bracketed, Bracketed]


def test_a_udp_server_shut_down_before_it_serves_returns_quietly(pm, echo_udp):
    """shutdown() and server_close() may come before serve_forever's thread has started (a
    relay stopped as it starts): the loop must then return, not use the closed socket; and a
    server shut down may serve again, as socketserver's may."""
    from relay.udp import RelayUDPServer

    config = make_config("serve", pm, handler="tunnel", forward=str(echo_udp), allow_private=True, mode="udp_only")
    server = RelayUDPServer(config, pm.hook, Address("127.0.0.1", 0))
    errors = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_value)
    try:
        server.shutdown()
        thread = threading.Thread(target=server.serve_forever, args=(0.05,))
        thread.start()
        thread.join(5)
        assert not thread.is_alive() and errors == []
        thread = threading.Thread(target=server.serve_forever, args=(0.05,))
        thread.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"again", tuple(server.server_address))
            assert sock.recv(100) == b"again"
        server.shutdown()
        thread.join(5)
        assert not thread.is_alive() and errors == []
    finally:
        threading.excepthook = hook
        server.server_close()


def test_remote_handler_answers_tunnelled_datagrams(pm):
    with udp_pair(pm, remote={"handler": "uppercase"}) as (local, _):
        with Socks5UDPClient(local.address) as client:
            client.sendto(b"shout", Address("127.0.0.1", 9))
            assert client.recvfrom() == (b"SHOUT", Address("127.0.0.1", 9))


def test_answers_go_back_to_the_right_client(pm, echo_udp):
    with udp_pair(pm) as (local, remote):
        with Socks5UDPClient(local.address) as first, Socks5UDPClient(local.address) as second:
            for i in range(20):
                first.sendto(b"first %d" % i, echo_udp)
                second.sendto(b"second %d" % i, echo_udp)
                assert first.recvfrom()[0] == b"first %d" % i
                assert second.recvfrom()[0] == b"second %d" % i
            # one association (one upstream socket) per client address, on both relays
            assert local.udp_server.live_sessions == 2 and remote.udp_server.live_sessions == 2


def test_closing_the_control_connection_ends_the_association(pm, echo_udp):
    with udp_pair(pm) as (local, _):
        client = Socks5UDPClient(local.address)
        client.sendto(b"x", echo_udp)
        assert client.recvfrom()[0] == b"x"
        assert local.udp_server.live_sessions == 1
        client.control.close()
        assert wait_until(lambda: local.udp_server.live_sessions == 0)
        client.sock.sendto(b"\x00\x00\x00" + bytes((1, 127, 0, 0, 1)) + echo_udp.port.to_bytes(2, "big") + b"late", tuple(client.relay))
        assert wait_until(lambda: local.udp_server.stats["not associated"] == 1)
        client.close()


def test_other_sources_and_fragments_are_dropped_and_counted(pm, echo_udp):
    with udp_pair(pm) as (local, _):
        with Socks5UDPClient(local.address) as client:
            client.sendto(b"mine", echo_udp)
            assert client.recvfrom()[0] == b"mine"
            header = b"\x00\x00\x00" + bytes((1, 127, 0, 0, 1)) + echo_udp.port.to_bytes(2, "big")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                stranger.sendto(header + b"not mine", tuple(client.relay))
            client.sock.sendto(b"\x00\x00\x01" + header[3:] + b"fragment", tuple(client.relay))
            client.sock.sendto(b"\x01\x00\x00garbage", tuple(client.relay))
            client.sendto(b"still served", echo_udp)
            assert client.recvfrom()[0] == b"still served"
            stats = local.udp_server.stats
            assert wait_until(lambda: stats["not associated"] == 1 and stats["fragmented"] == 1 and stats["ProtocolError"] == 1), stats


def test_wrong_key_and_garbage_at_the_remote_are_dropped(pm, echo_udp):
    with udp_pair(pm, password="right") as (local, remote):
        wrong = make_config("local", pm, password="wrong", server=remote.address, **UDP)
        with start_relay(wrong, pm) as bad_local, Socks5UDPClient(bad_local.address, timeout=0.5) as client:
            client.sendto(b"wrong key", echo_udp)
            with pytest.raises(TimeoutError):
                client.recvfrom()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for junk in (b"", b"x", os.urandom(100), os.urandom(2000)):
                raw.sendto(junk, tuple(remote.address))
        assert wait_until(lambda: remote.udp_server.stats["undecryptable"] == 5), remote.udp_server.stats
        with Socks5UDPClient(local.address) as client:
            client.sendto(b"right key", echo_udp)
            assert client.recvfrom()[0] == b"right key"


def test_remote_refuses_private_targets_for_datagrams(pm, echo_udp, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    with udp_pair(pm, remote={"allow_private": False}) as (local, remote):
        with Socks5UDPClient(local.address, timeout=0.5) as client:
            client.sendto(b"secret", echo_udp)
            client.sendto(b"secret", Address("localhost", echo_udp.port))
            with pytest.raises(TimeoutError):
                client.recvfrom()
    assert remote.udp_server.stats["forbidden"] == 2
    assert wait_until(lambda: "loopback address" in caplog.text)


def test_largest_datagram_and_the_documented_limit(pm, echo_udp, caplog):
    """IPv4 carries at most 65,507 bytes of UDP payload; the tunnel adds salt, address and tag,
    so through a chacha20 pair the largest payload to an IPv4 target is 65,507 - 32 - 7 - 16."""
    limit = 65507 - 32 - 7 - 16
    caplog.set_level(logging.INFO, logger="relay")
    with udp_pair(pm) as (local, _):
        with Socks5UDPClient(local.address, timeout=2) as client:
            payload = os.urandom(limit)
            client.sendto(payload, echo_udp)
            assert client.recvfrom()[0] == payload
            client.sendto(os.urandom(limit + 1), echo_udp)
            assert wait_until(lambda: local.udp_server.stats["too large"] == 1)
    assert wait_until(lambda: "too large" in caplog.text)


def test_associations_expire_and_are_bounded(pm, echo_udp, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    finished = []

    class Recorder:
        @hookimpl
        def relay_session_finished(self, session, error):
            if session.server is not None and hasattr(session.server, "associations"):
                finished.append((session.role, type(error).__name__ if error else None))

    pm = get_plugin_manager((Recorder(),))
    with udp_pair(pm, local={"protocol": "tunnel", "forward": echo_udp}, remote={"udp_timeout": 1, "udp_max_associations": 2}) as (local, remote):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for sock in socks:
                sock.settimeout(5)
                sock.sendto(b"hi", tuple(local.udp_server.address))
                assert sock.recv(100) == b"hi"
            assert remote.udp_server.live_sessions == 2  # the least recently used was evicted
            assert remote.udp_server.stats["evicted"] == 1
            assert wait_until(lambda: "evicted" in caplog.text)
            assert wait_until(lambda: remote.udp_server.live_sessions == 0, timeout=5)  # idle for udp_timeout
            assert ("remote", "TimeoutError") in finished
        finally:
            for sock in socks:
                sock.close()


def test_ten_thousand_datagrams_arrive_in_order(pm, echo_udp):
    """Loss bound: at most 2 of 10,000 with at most 32 datagrams in flight on loopback (none is
    expected: the socket buffers hold far more than 32 datagrams)."""
    total, window = 10_000, 32
    with udp_pair(pm) as (local, _):
        with Socks5UDPClient(local.address, timeout=1) as client:
            sent = received = 0
            last = -1
            deadline = time.monotonic() + 120
            while received < total and time.monotonic() < deadline:
                while sent < total and sent - received < window:
                    client.sendto(struct.pack("!I", sent) + bytes(100), echo_udp)
                    sent += 1
                try:
                    payload, _ = client.recvfrom()
                except TimeoutError:
                    if sent == total:
                        break
                    received = sent  # count the window as lost and carry on
                    continue
                seq = struct.unpack("!I", payload[:4])[0]
                assert seq > last, "out of order"
                last = seq
                received += 1
            lost = total - received
    assert lost <= 2, f"{lost} of {total} lost"


def test_udp_association_with_a_stream_relay_still_working(pm, echo_udp, echo_target):
    """UDP and TCP share the port, and a pair relaying both keeps streams working."""
    with udp_pair(pm) as (local, _):
        assert local.udp_server.address.port == local.address.port
        with socks5_connect(local.address, echo_target) as sock:
            sock.sendall(b"tcp")
            assert sock.recv(3) == b"tcp"
        with Socks5UDPClient(local.address) as client:
            client.sendto(b"udp", echo_udp)
            assert client.recvfrom()[0] == b"udp"


def test_udp_associate_without_udp_is_not_supported(pm, pair):
    local, _ = pair
    from relay import Socks5Error

    with pytest.raises(Socks5Error) as info:
        Socks5UDPClient(local.address)
    assert info.value.reply_code == 7


def test_a_burst_larger_than_a_batch_arrives_whole(pm, echo_udp):
    """A burst queued faster than the server takes it: none may be lost between two reads."""
    burst = 300
    with udp_pair(pm, local={"protocol": "tunnel", "forward": echo_udp}) as (local, _):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(2)
            for i in range(burst):
                sock.sendto(struct.pack("!I", i), tuple(local.udp_server.address))
            got = set()
            try:
                while len(got) < burst:
                    got.add(struct.unpack("!I", sock.recv(100))[0])
            except TimeoutError:
                pass
    assert len(got) == burst, f"{burst - len(got)} of {burst} lost"


def test_association_table_refreshes_use_at_a_coarse_grain():
    """A hit refreshes an entry's last use at most every REFRESH seconds; expiry and LRU eviction
    follow those marks."""
    from relay.associations import REFRESH, AssociationTable

    now = [100.0]
    table = AssociationTable(2, idle_timeout=10, clock=lambda: now[0])
    table.add("a", 1)
    table.add("b", 2)
    now[0] += REFRESH / 2
    assert table.get("a") == 1  # too soon to refresh: "a" is still the least recently used
    assert table.add("c", 3) == [("a", 1)]
    now[0] += REFRESH
    assert table.get("b") == 2  # refreshed now: "c" is the oldest
    assert table.add("d", 4) == [("c", 3)]
    added_d = now[0]
    now[0] += REFRESH
    assert table.get("b") == 2  # refreshed: last used REFRESH after "d" was added
    now[0] = added_d + 10
    assert [key for key, _ in table.expire()] == ["d"]
    assert table.get("b") == 2 and table.get("missing") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDP GSO and GRO are Linux's")
@pytest.mark.parametrize("method", ["aes-256-gcm", "2022-blake3-aes-128-gcm"])
def test_a_burst_crosses_the_tunnel_in_few_system_calls_and_arrives_datagram_by_datagram(pm, echo_udp, method):
    """A client sending with GSO hands the local its burst in one piece (GRO); the local relays
    every datagram in it and sends them on to the remote as one run; the echo sees, and answers,
    each datagram on its own, and the answers come back in order."""
    password = "test password" if method == "aes-256-gcm" else base64.b64encode(os.urandom(16)).decode()
    packets = [struct.pack("!I", i) + os.urandom(996) for i in range(40)] + [b"tail"]
    with udp_pair(pm, method=method, password=password, local={"protocol": "tunnel", "forward": echo_udp}) as (local, remote):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(5)
            sock.connect(tuple(local.udp_server.address))
            batch = DatagramBatch(sock)
            batch.on_queued = lambda batch: True  # flushed by hand
            for packet in packets:
                batch.add(packet)
            batch.flush()
            assert batch.calls == 1
            assert [sock.recv(2000) for _ in packets] == packets
            upstream = local.udp_server.associations.peek(sock.getsockname()).upstream
    assert wait_until(lambda: upstream.batch.sent == len(packets))  # counted just after the send
    assert upstream.batch.calls < len(packets) / 4
    assert not local.udp_server.stats and not remote.udp_server.stats


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDP GSO and GRO are Linux's")
def test_a_burst_of_answers_crosses_back_in_few_system_calls(pm):
    """A target that answers a burst with a burst (as a QUIC server sending with GSO does): the
    remote reads it whole, sends the encrypted answers to the local as runs, the local reads
    those whole and hands the client its answers in a few calls too, each datagram in order."""
    count = 40
    answers = [struct.pack("!I", i) + os.urandom(1100) for i in range(count)] + [b"last"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        target.settimeout(5)

        def answer_in_one_go():
            asked = []
            for _ in range(count):
                try:
                    asked.append(target.recvfrom(2000))
                except TimeoutError:
                    return
            batch = DatagramBatch(target)
            batch.on_queued = lambda batch: True  # flushed by hand
            for packet in answers:
                batch.add(packet, asked[0][1])
            batch.flush()

        server = threading.Thread(target=answer_in_one_go, daemon=True)
        server.start()
        forward = Address("127.0.0.1", target.getsockname()[1])
        with udp_pair(pm, local={"protocol": "tunnel", "forward": forward}) as (local, remote):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.settimeout(5)
                sock.connect(tuple(local.udp_server.address))
                for i in range(count):
                    sock.send(struct.pack("!I", i))
                assert [sock.recv(2000) for _ in answers] == answers
            server.join(5)
            for relay in (remote, local):
                replies = relay.udp_server.answer_batch
                # The counts move just after the send that delivered them, on the reader thread.
                # A round's first answer goes at once, outside the batch, unless it came in a
                # burst read whole, as these do.
                assert wait_until(lambda: replies.sent >= len(answers) - 1), (relay.udp_server.config.role, replies.sent)
                assert replies.calls <= 3, (relay.udp_server.config.role, replies.calls)
                assert not relay.udp_server.stats
