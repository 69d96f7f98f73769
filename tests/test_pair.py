"""A local and a remote relay on loopback, end to end, with real sockets and threads."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time

import pytest
from conftest import METHODS, relay_pair
from relay_plugins.shadowsocks import CIPHERS

from relay import Address, Socks5Error
from relay.address import encode_address
from relay.testing import make_config, recv_exactly, recv_until_eof, socks5_connect, start_relay, wait_until


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send everything (from a thread, so both directions flow), half-close, read to EOF."""
    sock.settimeout(30)
    writer = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    writer.start()
    try:
        return recv_until_eof(sock, limit=len(payload) + 1024)
    finally:
        writer.join(30)


@pytest.mark.parametrize("method", METHODS)
def test_socks5_connect_ipv4_each_method(pm, echo_target, method):
    payload = os.urandom(4 << 20)
    with relay_pair(pm, method=method) as (local, _):
        with socks5_connect(local.address, echo_target) as sock:
            assert hashlib.sha256(exchange(sock, payload)).digest() == hashlib.sha256(payload).digest()


def test_socks5_connect_ipv6_and_domain(pm, pair, echo_target, echo_target6):
    local, _ = pair
    with socks5_connect(local.address, echo_target6) as sock:
        assert exchange(sock, b"over IPv6") == b"over IPv6"
    with socks5_connect(local.address, Address("localhost", echo_target.port)) as sock:
        assert exchange(sock, b"by name") == b"by name"


def test_local_listens_on_ipv6(pm, echo_target):
    with relay_pair(pm, local={"listen": "[::1]:0"}) as (local, _):
        assert local.address.host == "::1"
        with socks5_connect(local.address, echo_target) as sock:
            assert exchange(sock, b"v6 client") == b"v6 client"


def test_half_close_through_the_whole_chain(pm, pair, eof_target):
    local, _ = pair
    with socks5_connect(local.address, eof_target) as sock:
        sock.sendall(b"x" * 100_000)
        sock.shutdown(socket.SHUT_WR)  # the target answers only after it sees EOF
        sock.settimeout(10)
        assert recv_until_eof(sock) == b"got 100000"


def test_tunnel_mode(pm, echo_target):
    with relay_pair(pm, local={"protocol": "tunnel", "forward": echo_target}) as (local, _):
        with socket.create_connection(tuple(local.address), timeout=10) as sock:
            assert exchange(sock, b"through the tunnel") == b"through the tunnel"


def test_server_speaks_first(pm, echo_target):
    """The target header goes out on its own when the client says nothing at first."""
    import socketserver

    from relay.testing import serve_in_thread

    class Banner(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"220 hello\r\n")
            self.request.recv(100)

    with serve_in_thread(Banner) as target, relay_pair(pm) as (local, _):
        with socks5_connect(local.address, target) as sock:
            sock.settimeout(5)
            assert recv_exactly(sock, 11) == b"220 hello\r\n"


def socks5_raw(proxy: Address, greeting: bytes, request: bytes | None) -> bytes:
    with socket.create_connection(tuple(proxy), timeout=5) as sock:
        sock.sendall(greeting)
        answer = recv_exactly(sock, 2)
        if request is not None:
            sock.sendall(request)
            answer += recv_until_eof(sock)
        return answer


def test_socks5_reply_codes(pair):
    local, _ = pair
    # no acceptable method
    assert socks5_raw(local.address, b"\x05\x01\x02", None) == b"\x05\xff"
    # BIND and UDP ASSOCIATE are answered "command not supported"
    for command in (2, 3):
        answer = socks5_raw(local.address, b"\x05\x01\x00", bytes((5, command, 0, 1, 127, 0, 0, 1, 0, 80)))
        assert answer[2:4] == b"\x05\x07"
    # unknown address type
    assert socks5_raw(local.address, b"\x05\x01\x00", b"\x05\x01\x00\x09" + bytes(6))[2:4] == b"\x05\x08"


def test_socks5_failure_replies_from_a_direct_proxy(pm, echo_target):
    """`relay serve --handler socks5` dials itself, so it can say why a target failed."""
    with start_relay(make_config("serve", pm, handler="socks5"), pm) as proxy:
        with pytest.raises(Socks5Error) as info:
            socks5_connect(proxy.address, echo_target)
        assert info.value.reply_code == 2  # loopback: not allowed by the policy
    with start_relay(make_config("serve", pm, handler="socks5", allow_private=True), pm) as proxy:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed_port = unused.getsockname()[1]
        with pytest.raises(Socks5Error) as info:
            socks5_connect(proxy.address, Address("127.0.0.1", closed_port))
        assert info.value.reply_code == 5  # connection refused
        with pytest.raises(Socks5Error) as info:
            socks5_connect(proxy.address, Address("no-such-host.invalid", 80))
        assert info.value.reply_code == 4  # host unreachable
        with socks5_connect(proxy.address, echo_target) as sock:
            assert exchange(sock, b"direct") == b"direct"


def test_remote_refuses_private_targets_by_default(pm, echo_target, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    with relay_pair(pm, remote={"allow_private": False}) as (local, _):
        for target in (echo_target, Address("localhost", echo_target.port)):
            with socks5_connect(local.address, target) as sock:
                assert exchange(sock, b"secret") == b""  # the remote never connects
    assert wait_until(lambda: caplog.text.count("is forbidden") >= 2)
    assert "loopback address" in caplog.text and "--allow-private" in caplog.text


def test_remote_handler_answers_tunnelled_streams(pm):
    with relay_pair(pm, remote={"handler": "uppercase"}) as (local, _):
        with socks5_connect(local.address, Address("127.0.0.1", 9)) as sock:
            assert exchange(sock, b"hello world\n") == b"HELLO WORLD\n"
    with relay_pair(pm, remote={"handler": "echo"}) as (local, _):
        payload = os.urandom(1 << 20)
        with socks5_connect(local.address, Address("example.invalid", 9)) as sock:
            assert exchange(sock, payload) == payload


@pytest.mark.parametrize("handler,expected", [("uppercase", b"HELLO WORLD\n"), ("echo", b"hello world\n")])
def test_serve_classic_handlers(pm, handler, expected):
    with start_relay(make_config("serve", pm, handler=handler), pm) as server:
        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            sock.sendall(b"hello world\n")
            assert sock.recv(1024) == expected  # the socketserver documentation's client


def test_idle_timeout_closes_both_sides(pm, echo_target):
    with relay_pair(pm, local={"timeout": 0.5}, remote={"timeout": 0.5}) as (local, remote):
        with socks5_connect(local.address, echo_target) as sock:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            sock.settimeout(5)
            started = time.monotonic()
            assert sock.recv(10) == b""  # closed by the relay, not by us
            assert 0.4 < time.monotonic() - started < 3
        assert wait_until(lambda: local.live_sessions == 0 and remote.live_sessions == 0)


def test_active_download_is_not_idle(pm):
    """The idle timeout counts both directions: a long download with a silent client survives."""
    import socketserver

    from relay.testing import serve_in_thread

    class Trickle(socketserver.BaseRequestHandler):
        def handle(self):
            for _ in range(8):
                self.request.sendall(b"tick")
                time.sleep(0.2)

    with serve_in_thread(Trickle) as target, relay_pair(pm, local={"timeout": 0.5}, remote={"timeout": 0.5}) as (local, _):
        with socks5_connect(local.address, target) as sock:
            sock.settimeout(5)
            assert recv_until_eof(sock) == b"tick" * 8


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sequential_connections_leak_no_threads_or_fds(pm, pair, echo_target):
    local, remote = pair
    for _ in range(50):  # warm up: thread-local caches, logging handlers
        with socks5_connect(local.address, echo_target) as sock:
            exchange(sock, b"warm")
    assert wait_until(lambda: local.live_sessions == 0 and remote.live_sessions == 0)
    threads, fds = threading.active_count(), open_fds()
    started = time.monotonic()
    for i in range(2000):
        with socks5_connect(local.address, echo_target) as sock:
            assert exchange(sock, b"%d" % i) == b"%d" % i
        assert time.monotonic() - started < 120
    assert wait_until(lambda: local.live_sessions == 0 and remote.live_sessions == 0)
    assert wait_until(lambda: threading.active_count() <= threads + 2)
    assert wait_until(lambda: open_fds() <= fds + 4), f"fds grew from {fds} to {open_fds()}"


def test_wrong_password_garbage_and_truncation_end_one_session_only(pm, echo_target, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    with relay_pair(pm, password="right", remote={"handshake_timeout": 2}) as (local, remote):
        # a local with the wrong password
        with start_relay(make_config("local", pm, password="wrong", server=remote.address), pm) as wrong:
            with socks5_connect(wrong.address, echo_target) as sock:
                sock.sendall(b"hello")
                time.sleep(0.3)
        # garbage, and a truncated first chunk, straight at the remote
        for junk in (os.urandom(300), b"", os.urandom(32 + 10)):
            with socket.create_connection(tuple(remote.address), timeout=5) as raw:
                raw.sendall(junk)
                raw.shutdown(socket.SHUT_WR)
                assert recv_until_eof(raw) == b""  # nothing ever comes back
        # the server still serves the right password
        with socks5_connect(local.address, echo_target) as sock:
            assert exchange(sock, b"still here") == b"still here"
    assert wait_until(lambda: "failed authentication" in caplog.text and "closed before sending a target" in caplog.text)
    for record in caplog.records:
        if "refused" in record.getMessage():
            assert "\n" not in record.getMessage() and record.exc_info is None


@pytest.mark.parametrize("cut", [None, 1, 4, "header"], ids=["one chunk", "1 byte", "4 bytes", "header alone"])
def test_a_remote_reads_the_target_header_however_the_client_chunks_it(pm, echo_target, cut):
    """The target header whole in the first chunk with data (what relay's local sends), alone
    (ss-local), or split across chunks: the same session."""
    cipher = next(c for c in CIPHERS if c.name == "aes-256-gcm")
    header = encode_address(echo_target)
    flight = header + b"ping"
    cut = len(header) if cut == "header" else cut
    with start_relay(make_config("remote", pm, method=cipher.name, password="pw", allow_private=True), pm) as remote:
        encryptor = cipher.encryptor(cipher.key_from_password("pw"))
        chunks = [flight] if cut is None else [flight[:cut], flight[cut:]]
        with socket.create_connection(tuple(remote.address), timeout=5) as raw:
            raw.sendall(b"".join(encryptor.encrypt(chunk) for chunk in chunks))
            decryptor = cipher.decryptor(cipher.key_from_password("pw"))
            answer = b""
            for _ in range(20):
                answer += decryptor.decrypt(raw.recv(4096))
                if len(answer) >= 4:
                    break
            assert answer == b"ping"


def test_probe_close_time_does_not_depend_on_bytes_sent(pm):
    """Whatever a prober sends, slowly, the remote closes at the same deadline from accept."""
    with start_relay(make_config("remote", pm, password="p", handshake_timeout=1.0), pm) as remote:
        for count in (10, 60):  # before, and after, authentication could fail
            with socket.create_connection(tuple(remote.address), timeout=5) as sock:
                started = time.monotonic()
                closed = []

                def wait_for_close():
                    try:
                        sock.recv(10)
                    except OSError:
                        pass
                    closed.append(time.monotonic() - started)

                reader = threading.Thread(target=wait_for_close)
                reader.start()
                for _ in range(count):
                    if closed:
                        break
                    try:
                        sock.sendall(b"\x01")
                    except OSError:
                        break
                    time.sleep(0.03)
                reader.join(5)
            assert closed and 0.9 < closed[0] < 1.5, (count, closed)


def test_failed_reply_leaves_no_upstream_open(echo_target):
    """A client that resets while its target is being dialled: the SOCKS5 reply fails, and the
    upstream that was opened for it must be closed then, not whenever the garbage collector runs."""
    import gc
    import struct

    from relay import hookimpl
    from relay.address import encode_address
    from relay.net import connect_tcp
    from relay.plugin_manager import get_plugin_manager

    opened = []

    class SlowDial:
        @hookimpl(tryfirst=True)
        def relay_open_upstream(self, session, target):
            from relay import Endpoint

            sock = connect_tcp(target, 5)
            opened.append(sock)
            time.sleep(0.2)  # the client's reset arrives meanwhile
            return Endpoint(sock)

    pm = get_plugin_manager((SlowDial(),))
    gc.disable()  # a leak through a traceback cycle would otherwise be hidden by a collection
    try:
        with start_relay(make_config("serve", pm, handler="socks5", allow_private=True, timeout=30), pm) as proxy:
            for _ in range(5):
                sock = socket.create_connection(tuple(proxy.address), timeout=5)
                sock.sendall(b"\x05\x01\x00")
                assert recv_exactly(sock, 2) == b"\x05\x00"
                sock.sendall(b"\x05\x01\x00" + encode_address(echo_target))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            assert wait_until(lambda: len(opened) == 5 and all(s.fileno() == -1 for s in opened), timeout=4), [
                s.fileno() for s in opened
            ]
    finally:
        gc.enable()


def test_ipv6_listener_can_be_ipv6_only(pm):
    from relay.server import RelayServer

    config = make_config("serve", pm)
    server = RelayServer(config, pm.hook, Address("::1", 0), v6only=True)
    try:
        assert server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        server.server_close()


def test_many_concurrent_sessions_through_one_pump(pm, pair, echo_target):
    """The pump moves every session of the process: 40 at once, each larger than a socket
    buffer both ways, all intact."""
    local, _ = pair
    payloads = [os.urandom(300_000 + i) for i in range(40)]
    results = [None] * len(payloads)

    def run(i):
        with socks5_connect(local.address, echo_target) as sock:
            results[i] = hashlib.sha256(exchange(sock, payloads[i])).digest()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [hashlib.sha256(p).digest() for p in payloads]


def test_a_slow_reader_holds_back_the_sender(pm, pair):
    """Backpressure: when the client stops reading, the pump stops reading from the target
    instead of buffering; the target's sends block, and nothing is lost when reading resumes."""
    import socketserver

    from relay.testing import serve_in_thread

    sent = []

    class Firehose(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(10)
            chunk = b"z" * 65536
            try:
                for _ in range(400):  # 25 MiB, far more than the socket buffers on the way
                    self.request.sendall(chunk)
                    sent.append(len(chunk))
            except OSError:
                pass

    local, _ = pair
    with serve_in_thread(Firehose) as target:
        with socks5_connect(local.address, target) as sock:
            time.sleep(1.0)  # read nothing for a while
            stalled = sum(sent)
            assert stalled < 20 * 1024 * 1024, "the pump buffered instead of holding back"
            sock.settimeout(10)
            assert len(recv_until_eof(sock)) == 400 * 65536


def test_egress_acl_at_the_remote(pm, echo_target):
    """The ACL opens loopback for this test (allow 127.0.0.0/8) and closes a name (deny localhost)."""
    remote = {"allow_private": False, "egress": {"allow": ["127.0.0.0/8"], "deny": ["localhost"]}}
    with relay_pair(pm, remote=remote) as (local, _):
        with socks5_connect(local.address, echo_target) as sock:
            assert exchange(sock, b"allowed by the ACL") == b"allowed by the ACL"
        with socks5_connect(local.address, Address("localhost", echo_target.port)) as sock:
            assert exchange(sock, b"denied") == b""
