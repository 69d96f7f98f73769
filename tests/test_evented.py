"""Evented sessions: front-ends with a sans-I/O handshake (tunnel, shadowsocks, socks5, socks4, http, mixed) run in the event
loop, with no thread per connection; unmarked hooks still run, in a thread; names resolve in a
thread; connects fail and time out in the loop; nothing outlives its session."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import socket
import socketserver
import threading
import time
import weakref

import pytest

from relay import Address, Endpoint, Handshake, Ready, hookimpl, nonblocking
from relay.net import connect_tcp
from relay.plugin_manager import get_plugin_manager
from relay.address import encode_address, decode_address
from relay.testing import (
    Socks5UDPClient,
    free_port,
    make_config,
    recv_exactly,
    recv_until_eof,
    serve_in_thread,
    socks5_connect,
    start_relay,
    udp_echo_server,
    wait_until,
)

from conftest import relay_pair
from test_udp import UDP
from test_resources import starved_relay

PUMP_THREAD = "relay-pump"


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and read as much back, leaving the connection open."""
    sock.sendall(data)
    return recv_exactly(sock, len(data))


@contextlib.contextmanager
def tunnel_pair(pm, target: Address, **local_flags):
    """A remote, and a tunnel local in front of it forwarding to ``target``; yields (local, remote)."""
    with relay_pair(pm, local={"protocol": "tunnel", "forward": str(target), **local_flags}) as servers:
        yield servers


def test_tunnel_and_remote_run_many_sessions_without_a_thread_each(pm, echo_target):
    with tunnel_pair(pm, echo_target) as (local, remote):
        assert local.serves_evented() and remote.serves_evented()
        with socket.create_connection(tuple(local.address), timeout=5) as sock:  # warm up: the pump exists
            assert exchange(sock, b"warm") == b"warm"
        threads = threading.active_count()
        socks = [socket.create_connection(tuple(local.address), timeout=5) for _ in range(40)]
        try:
            for n, sock in enumerate(socks):
                assert exchange(sock, b"hello %d" % n) == b"hello %d" % n
            # The echo target runs a thread per connection; the relays add none.
            assert threading.active_count() <= threads + 40 + 2
            assert local.live_sessions == 40 * 2  # each session: the client and its upstream
        finally:
            for sock in socks:
                sock.close()
        assert wait_until(lambda: local.live_sessions == 0 and remote.live_sessions == 0, timeout=10)


def test_nonblocking_hooks_run_in_the_loop_and_unmarked_ones_in_a_thread(echo_target):
    where: dict[str, str] = {}

    class Marked:
        @hookimpl
        @nonblocking
        def relay_target_chosen(self, session, target):
            where["target_chosen"] = threading.current_thread().name

    class Unmarked:
        @hookimpl
        def relay_session_started(self, session):
            where["session_started"] = threading.current_thread().name

    pm = get_plugin_manager((Marked(),))
    config = make_config("serve", pm, handler="tunnel", forward=str(echo_target), allow_private=True)
    with start_relay(config, pm) as server:
        assert server.serves_evented()
        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            assert exchange(sock, b"marked") == b"marked"
    assert where["target_chosen"] == PUMP_THREAD

    pm = get_plugin_manager((Marked(), Unmarked()))
    config = make_config("serve", pm, handler="tunnel", forward=str(echo_target), allow_private=True)
    with start_relay(config, pm) as server:
        assert not server.serves_evented()  # an unmarked relay_session_started: threads, as before
        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            assert exchange(sock, b"unmarked") == b"unmarked"
        # socketserver's shutdown_request forgets the socket its thread handed to the pump
        assert wait_until(lambda: server.live_sessions == 0 and not server._detached, timeout=5)
    assert where["session_started"] != PUMP_THREAD
    assert where["target_chosen"] != PUMP_THREAD


def test_an_unmarked_open_upstream_runs_in_a_thread(echo_target):
    seen = []

    class Redirect:
        @hookimpl(tryfirst=True)
        def relay_open_upstream(self, session, target):
            seen.append(threading.current_thread().name)
            return Endpoint(connect_tcp(echo_target, 5))  # blocking: allowed, since unmarked

    pm = get_plugin_manager((Redirect(),))
    config = make_config("serve", pm, handler="tunnel", forward="192.0.2.1:80", allow_private=True)
    with start_relay(config, pm) as server:
        assert server.serves_evented()
        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            assert exchange(sock, b"redirected") == b"redirected"
    assert seen and seen[0] != PUMP_THREAD


def test_a_target_name_is_resolved_in_a_thread(pm, echo_target):
    """The core's evented open raises WouldBlock for a name; the session goes on from a thread."""
    with tunnel_pair(pm, Address("localhost", echo_target.port)) as (local, remote):
        assert remote.serves_evented()
        with socket.create_connection(tuple(local.address), timeout=5) as sock:
            assert exchange(sock, b"by name") == b"by name"


def test_a_refused_connect_ends_the_session(pm, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    closed = Address("127.0.0.1", free_port())
    config = make_config("serve", pm, handler="tunnel", forward=str(closed), allow_private=True)
    with start_relay(config, pm) as server:
        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            sock.sendall(b"anyone?")
            assert recv_until_eof(sock) == b""
        assert wait_until(lambda: server.live_sessions == 0, timeout=5)
    assert "refused" in caplog.text.lower()


def test_a_connect_that_hangs_times_out(pm, caplog):
    """A listener whose accept queue is full drops SYNs: the connect hangs until connect_timeout."""
    caplog.set_level(logging.INFO, logger="relay")
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = []
        try:
            for _ in range(4):  # more than the queue holds
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(full.getsockname())
                fillers.append(filler)
            time.sleep(0.2)
            target = Address("127.0.0.1", full.getsockname()[1])
            config = make_config("serve", pm, handler="tunnel", forward=str(target), allow_private=True, connect_timeout=0.5)
            with start_relay(config, pm) as server:
                with socket.create_connection(tuple(server.address), timeout=5) as sock:
                    started = time.monotonic()
                    assert recv_until_eof(sock) == b""
                    took = time.monotonic() - started
                assert wait_until(lambda: server.live_sessions == 0, timeout=5)
        finally:
            for filler in fillers:
                filler.close()
    assert 0.3 < took < 4.0, took
    assert "timed out" in caplog.text


def test_a_connect_that_completes_later_is_relayed_once_it_does(pm):
    """Loopback connects complete within connect() and the pump relays at once; this one does
    not: the target's accept queue is full, so its SYN is dropped and sent again about a second
    later, after the queue was drained. The SOCKS5 replies, then the data, come once it connects."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    target = Address("127.0.0.1", listener.getsockname()[1])
    fillers = []
    for _ in range(2):  # listen(0) queues one: with two, the queue is full
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(tuple(target))
        fillers.append(filler)
    time.sleep(0.2)
    try:
        with start_relay(make_config("serve", pm, handler="socks5", allow_private=True), pm) as proxy:
            with socket.create_connection(tuple(proxy.address), timeout=10) as sock:
                sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + encode_address(target) + b"early")
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(1)  # no reply while the connect is pending, not even the method selection
                listener.settimeout(5)
                queued = [listener.accept()[0] for _ in range(2)]  # the fillers: make room
                upstream = listener.accept()[0]  # the relay's connect, retried
                sock.settimeout(10)
                assert recv_exactly(sock, 2) == b"\x05\x00"  # held for a client that pipelined its request
                assert socks5_reply(sock)[0] == 0
                assert recv_exactly(upstream, 5) == b"early"
                upstream.sendall(b"answer")
                assert recv_exactly(sock, 6) == b"answer"
                for conn in (*queued, upstream):
                    conn.close()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_ended_sessions_are_not_kept_alive(echo_target):
    """Handshake deadlines and connect timers are cancelled with their session: nothing the loop
    holds keeps a finished session (and its buffers) alive until the timer would have been due;
    nor does the server keep a finished session's client socket (socketserver's shutdown_request,
    which forgets a socket handed to the pump, never runs for an evented session)."""
    sessions: list[weakref.ref] = []

    class Recorder:
        @hookimpl
        @nonblocking
        def relay_session_started(self, session):
            sessions.append(weakref.ref(session))

    pm = get_plugin_manager((Recorder(),))
    with relay_pair(pm, local={"protocol": "tunnel", "forward": str(echo_target)}) as (local, remote):
        for n in range(30):
            with socket.create_connection(tuple(local.address), timeout=5) as sock:
                assert exchange(sock, b"%d" % n) == b"%d" % n
        assert wait_until(lambda: local.live_sessions == 0 and remote.live_sessions == 0, timeout=10)
        assert len(sessions) == 60  # 30 on each relay
        assert wait_until(lambda: gc.collect() is not None and all(ref() is None for ref in sessions), timeout=5), [
            ref() for ref in sessions if ref() is not None
        ]
        gc.collect()
        closed = [o for o in gc.get_objects() if isinstance(o, socket.socket) and o.fileno() == -1]
        assert len(closed) < 10, f"{len(closed)} closed sockets still referenced after 60 sessions"


@pytest.mark.parametrize("protocol", ["tunnel", "mixed"])
def test_ended_sessions_leave_no_garbage_cycles(echo_target, protocol):
    """A finished session is freed by reference counting alone: its buffers, codecs and sockets
    do not wait for (and keep busy) the cyclic garbage collector."""
    with relay_pair(get_plugin_manager(), local={"protocol": protocol, "forward": str(echo_target)}) as (local, remote):

        def session(data: bytes) -> None:
            with socket.create_connection(tuple(local.address), timeout=5) as sock:
                if protocol != "tunnel":  # SOCKS5: a Ready whose callbacks are the handshake's methods
                    sock.sendall(b"\x05\x01\x00\x05\x01\x00" + encode_address(echo_target))
                    assert recv_exactly(sock, 2 + 10)[:4] == b"\x05\x00\x05\x00"
                assert exchange(sock, data) == data

        session(b"warm")  # warm-up: caches, the pump
        assert wait_until(lambda: local.live_sessions == 0 and remote.live_sessions == 0, timeout=10)
        gc.collect()
        gc.disable()
        try:
            for n in range(20):
                session(b"%d" % n)
            assert wait_until(lambda: local.live_sessions == 0 and remote.live_sessions == 0, timeout=10)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            cyclic = [o for o in gc.garbage if type(o).__module__.startswith(("relay", "plugins")) or isinstance(o, socket.socket)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not cyclic, sorted({type(o).__qualname__ for o in cyclic})


def test_take_ready_lets_go_and_tolerates_a_computed_ready():
    inner = Handshake()
    inner.ready = ready = Ready(Address("127.0.0.1", 1))
    assert inner.take_ready() is ready and inner.ready is None  # the handshake no longer holds it

    class Wrapper(Handshake):  # a third-party wrapper that computes ready and does not override take_ready
        @property  # type: ignore[override]
        def ready(self):
            return ready

    assert Wrapper().take_ready() is ready


def test_the_event_loop_backs_off_when_out_of_descriptors(tmp_path):
    """An evented remote with 40 descriptors: accept must wait, not spin, and recover."""
    port = free_port()
    config = tmp_path / "remote.json"
    settings = {"server": "127.0.0.1", "server_port": port, "method": "aes-256-gcm", "password": "test password"}
    config.write_text(json.dumps({**settings, "handshake_timeout": 1}))
    # Held connections send nothing: each waits for a first flight until its 1 s deadline, so
    # the remote stays full for the CPU window (and the probe that found it listening is gone).
    with starved_relay(["remote", "-c", str(config), "-q"], port, settle=1.5, window=0.6):
        time.sleep(1.0)
        # Served again: a connection that sends garbage is drained, then closed at its deadline.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"not a shadowsocks flight" * 4)
            started = time.monotonic()
            assert recv_until_eof(sock) == b""
            assert 0.3 < time.monotonic() - started < 3


class BannerHandler(socketserver.BaseRequestHandler):
    """A target that speaks first (as SMTP and SSH servers do), then echoes."""

    def handle(self) -> None:
        self.request.sendall(b"220 hello\r\n")
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


def test_a_target_that_speaks_first_is_reached_without_client_data(pm):
    """The local sends the target header alone once FIRST_FLIGHT_WAIT passes without client data."""
    with serve_in_thread(BannerHandler) as banner:
        with tunnel_pair(pm, banner) as (local, _):
            with socket.create_connection(tuple(local.address), timeout=5) as sock:
                assert recv_exactly(sock, 11) == b"220 hello\r\n"
                assert exchange(sock, b"EHLO") == b"EHLO"
        with relay_pair(pm) as (local, _):  # socks5: the threaded front-end, the same pump
            with socks5_connect(local.address, banner) as sock:
                assert recv_exactly(sock, 11) == b"220 hello\r\n"
                assert exchange(sock, b"EHLO") == b"EHLO"


def socks5_reply(sock: socket.socket) -> tuple[int, Address]:
    """Read a SOCKS5 reply: its code and bound address."""
    head = recv_exactly(sock, 4)
    size = {1: 4, 4: 16}.get(head[3])
    tail = recv_exactly(sock, (size if size is not None else recv_exactly(sock, 1)[0]) + 2)
    decoded = decode_address(head[3:] + tail)
    assert decoded is not None
    return head[1], decoded[0]


def test_socks5_runs_in_the_loop_and_replies_once_connected(pm, echo_target):
    """A direct SOCKS5 proxy: greeting, request and data in one flight; the reply names the
    address the proxy connected from, the data arrives after it."""
    with start_relay(make_config("serve", pm, handler="socks5", allow_private=True), pm) as proxy:
        assert proxy.serves_evented()
        with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
            sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + encode_address(echo_target) + b"early")
            assert recv_exactly(sock, 2) == b"\x05\x00"
            code, bound = socks5_reply(sock)
            assert code == 0 and bound.host == "127.0.0.1" and bound.port != 0
            assert recv_exactly(sock, 5) == b"early"
            assert exchange(sock, b"later") == b"later"


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (Address("127.0.0.1", 1), 5),  # refused: the evented connect fails in the pump
        (Address("192.0.2.1", 80), 2),  # a private-address policy refusal: not allowed by ruleset
        (Address("localhost", 1), 5),  # a name: resolved and refused in a thread
    ],
)
def test_socks5_failure_replies(pm, target, code):
    with start_relay(make_config("serve", pm, handler="socks5", allow_private=target.host != "192.0.2.1"), pm) as proxy:
        with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
            sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + encode_address(target))
            assert recv_exactly(sock, 2) == b"\x05\x00"
            assert socks5_reply(sock)[0] == code
            assert recv_until_eof(sock) == b""
        assert wait_until(lambda: proxy.live_sessions == 0, timeout=5)


def test_socks5_authentication_in_the_loop(pm, echo_target):
    config = make_config("serve", pm, handler="socks5", allow_private=True, file={"auth": {"alice": "secret"}})
    with start_relay(config, pm) as proxy:
        assert proxy.serves_evented()
        for password, verdict in ((b"secret", b"\x01\x00"), (b"wrong", b"\x01\x01")):
            with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
                sock.sendall(b"\x05\x01\x02")
                assert recv_exactly(sock, 2) == b"\x05\x02"
                sock.sendall(b"\x01\x05alice" + bytes((len(password),)) + password)
                assert recv_exactly(sock, 2) == verdict
                if verdict == b"\x01\x00":
                    sock.sendall(b"\x05\x01\x00" + encode_address(echo_target))
                    assert socks5_reply(sock)[0] == 0
                    assert exchange(sock, b"authenticated") == b"authenticated"
                else:
                    assert recv_until_eof(sock) == b""


def test_socks5_udp_associate_from_the_loop(pm):
    """UDP ASSOCIATE leaves the loop: the control connection is held in a thread."""
    with udp_echo_server() as echo, relay_pair(pm, local={"protocol": "socks5", **UDP}, remote=UDP) as (local, _):
        assert local.serves_evented()
        with Socks5UDPClient(local.address) as client:
            client.sendto(b"datagram", echo)
            assert client.recvfrom()[0] == b"datagram"
        assert wait_until(lambda: local.udp_server.live_sessions == 0, timeout=5)


def read_head(sock: socket.socket) -> bytes:
    head = b""
    for _ in range(4096):
        if head.endswith(b"\r\n\r\n"):
            break
        head += recv_exactly(sock, 1)
    return head


def where_targets_are_chosen() -> tuple[dict, list[str]]:
    """A plugin that notes the thread each target is chosen in (the loop's, or a pool thread)."""
    seen: list[str] = []

    class Note:
        @hookimpl
        @nonblocking
        def relay_target_chosen(self, session, target):
            seen.append(threading.current_thread().name)

    return get_plugin_manager((Note(),)), seen


def test_http_connect_runs_in_the_loop_and_answers_once_connected(echo_target):
    """An HTTP proxy's CONNECT is a handshake like SOCKS5's: the head and early data in one
    flight, "200 Connection established" once the upstream is connected, then the data; a plain
    http:// request still works, served in a thread."""
    pm, seen = where_targets_are_chosen()
    with start_relay(make_config("serve", pm, handler="http", allow_private=True), pm) as proxy:
        assert proxy.serves_evented()
        with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
            sock.sendall(f"CONNECT {echo_target} HTTP/1.1\r\nHost: {echo_target}\r\n\r\nearly".encode())
            assert read_head(sock) == b"HTTP/1.1 200 Connection established\r\n\r\n"
            assert recv_exactly(sock, 5) == b"early"
            assert exchange(sock, b"later") == b"later"
        assert seen == [PUMP_THREAD]
        closed = free_port()
        for target, status in ((f"127.0.0.1:{closed}", b"502"), ("localhost:" + str(closed), b"502"), ("[::1", b"400")):
            with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
                sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert recv_until_eof(sock).startswith(b"HTTP/1.1 " + status), target
        assert wait_until(lambda: proxy.live_sessions == 0, timeout=5)
    with start_relay(make_config("serve", pm, handler="http", allow_private=False), pm) as proxy:
        with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
            sock.sendall(f"CONNECT {echo_target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert recv_until_eof(sock).startswith(b"HTTP/1.1 403 ")


def test_a_plain_http_request_that_fails_in_its_thread_ends_with_that_error():
    """A plain http:// request goes on in a thread (Ready.serve); the 502 it answers is the
    session's error, as for a session run in a thread from the start: logged, and given to
    relay_session_finished."""
    finished: list = []

    class Watch:
        @hookimpl
        def relay_session_finished(self, session, error):
            finished.append(error)

    pm = get_plugin_manager((Watch(),))
    closed = free_port()
    with start_relay(make_config("serve", pm, handler="http", allow_private=True), pm) as proxy:
        assert proxy.serves_evented()
        with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
            sock.sendall(f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert recv_until_eof(sock).startswith(b"HTTP/1.1 502 ")
        assert wait_until(lambda: len(finished) == 1, timeout=5)
    assert isinstance(finished[0], OSError), finished


def test_socks4_runs_in_the_loop_and_is_granted_once_connected(echo_target):
    pm, seen = where_targets_are_chosen()
    with start_relay(make_config("serve", pm, handler="socks4", allow_private=True), pm) as proxy:
        assert proxy.serves_evented()
        with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
            sock.sendall(b"\x04\x01" + echo_target.port.to_bytes(2, "big") + socket.inet_aton(echo_target.host) + b"me\x00early")
            reply = recv_exactly(sock, 8)
            assert reply[:2] == b"\x00\x5a" and reply[2:4] != b"\x00\x00"  # granted, from the port it connected from
            assert recv_exactly(sock, 5) == b"early"
            assert exchange(sock, b"later") == b"later"
        assert seen == [PUMP_THREAD]
        closed = free_port()
        for request in (
            b"\x04\x01" + closed.to_bytes(2, "big") + socket.inet_aton("127.0.0.1") + b"\x00",  # refused
            b"\x04\x02" + closed.to_bytes(2, "big") + socket.inet_aton("127.0.0.1") + b"\x00",  # BIND
        ):
            with socket.create_connection(tuple(proxy.address), timeout=5) as sock:
                sock.sendall(request)
                assert recv_until_eof(sock) == b"\x00\x5b" + bytes(6)
        assert wait_until(lambda: proxy.live_sessions == 0, timeout=5)


def through_mixed(local: Address, target: Address) -> None:
    """One session each way the mixed port takes: SOCKS5, SOCKS4 and an HTTP CONNECT."""
    with socks5_connect(local, target) as sock:
        assert exchange(sock, b"five") == b"five"
    with socket.create_connection(tuple(local), timeout=5) as sock:
        sock.sendall(b"\x04\x01" + target.port.to_bytes(2, "big") + socket.inet_aton(target.host) + b"me\x00")
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5a"
        assert exchange(sock, b"four") == b"four"
    with socket.create_connection(tuple(local), timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        assert exchange(sock, b"http") == b"http"


@pytest.mark.parametrize("evented", [True, False], ids=["in the loop", "in threads"])
def test_the_mixed_port_in_the_loop_and_in_threads(echo_target, evented):
    """The local's default: SOCKS5, SOCKS4 and HTTP CONNECT handshakes run in the loop. With an
    unmarked session hook, everything runs in threads."""

    class Unmarked:
        @hookimpl
        def relay_session_started(self, session):
            pass

    pm = get_plugin_manager(() if evented else (Unmarked(),))
    with relay_pair(pm) as (local, _):
        assert local.config.handler.name == "mixed"
        assert local.serves_evented() is evented
        through_mixed(local.address, echo_target)
        assert wait_until(lambda: local.live_sessions == 0, timeout=5)
