"""Wire compatibility with shadowsocks-libev, the reference implementation.

Each AEAD method, each way round, with the real peer as a subprocess:

* relay local (SOCKS5)  -> ss-server    -> echo target   (relay as the Shadowsocks client)
* ss-local (SOCKS5)     -> relay remote -> echo target   (relay as the Shadowsocks server)
* ss-tunnel             -> relay remote -> echo target   (libev's tunnel client)

and the same for datagrams (libev's ``-u``: TCP and UDP), against a UDP echo target:

* relay local (SOCKS5 UDP ASSOCIATE) -> ss-server -u -> UDP echo
* ss-tunnel -u                       -> relay remote -> UDP echo
* ss-local -u (SOCKS5 UDP ASSOCIATE) -> relay remote -> UDP echo

The bulk tests carry 32 MiB of random bytes up and back down through one connection: far more
than one AEAD chunk (0x3FFF bytes) or one socket buffer, so chunking, nonce counting and flow
control all get exercised, not only the handshake. A missing peer binary fails with the command
that installs it; it is never skipped.

The datagram tests run libev with ``--mtu 9000``: by default libev reads each datagram into a
2,794-byte buffer and drops larger ones (see LIBEV_UDP), so without it the ~8,000-byte datagram
could not pass libev whatever relay does.

shadowsocks-libev does not relay a half-close (see ``echo_round_trip``), so the client here reads
the whole echo back before it shuts its write half; half-close is not part of what these tests
can prove against libev.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import METHODS, find_binary

from relay import Address
from relay.gso import DatagramBatch
from relay.plugin_manager import RelayPluginManager
from relay.server import RelayServer
from relay.testing import (
    Socks5UDPClient,
    free_port,
    make_config,
    process_output,
    running_process,
    socks5_connect,
    start_relay,
    udp_echo_server,
    wait_until,
)

pytestmark = pytest.mark.interop

PASSWORD = "interop password"
BULK_SIZE = 32 * 1024 * 1024
SEND_CHUNK = 1024 * 1024
SOCKET_TIMEOUT = 30.0  # one recv or send that waits this long fails the test
TRANSFER_DEADLINE = 60.0  # the whole transfer, both directions
STARTUP_TIMEOUT = 5.0  # for a libev process to accept on its port
UDP_TIMEOUT = 5.0  # one datagram's answer that takes longer is lost (generous: CI machines stall)
UDP_ATTEMPTS = 5  # tries of the first datagram, while libev may still be binding its UDP socket
# libev receives datagrams into a buffer of 2 * (MTU - 95) bytes, 2,794 by default (udprelay.c:
# DEFAULT_PACKET_SIZE 1397, buf_size = 2 * packet_size), and a larger one is silently truncated,
# then fails authentication and is dropped. An MTU of 9000 (jumbo frames) lets 8,000 bytes through.
LIBEV_UDP = ["-u", "--mtu", "9000"]


# --- subprocess helpers -----------------------------------------------------------------------


@contextlib.contextmanager
def libev(binary: str, *args: str, port: int) -> Iterator[subprocess.Popen]:
    """Run a shadowsocks-libev binary until the block ends; it must be listening on ``port`` first."""
    with running_process([binary, *args], port=port, startup=STARTUP_TIMEOUT) as proc:
        yield proc
        if proc.poll() is not None:
            pytest.fail(f"{binary} died during the test (exit {proc.returncode}):\n{process_output(proc)}")


def libev_args(server_port: int, method: str, local_port: int | None = None) -> list[str]:
    args = ["-s", "127.0.0.1", "-p", str(server_port), "-k", PASSWORD, "-m", method]
    if local_port is not None:
        args += ["-b", "127.0.0.1", "-l", str(local_port)]
    return args


# --- the transfer -----------------------------------------------------------------------------


def echo_round_trip(sock: socket.socket, payload: bytes) -> tuple[str, str, int]:
    """Send ``payload`` from a writer thread while this thread reads the echo back; then
    half-close and expect a clean EOF with nothing after the echo.

    Returns (sha256 sent, sha256 received, bytes received). Both directions run at once, as they
    must: the echo target sends back while we are still sending.

    The write half is shut only once every byte is back: shadowsocks-libev does not relay a
    half-close. On EOF from either side it closes both of its connections at once (server.c,
    ``remote_recv_cb``/``server_recv_cb``: ``r == 0`` -> ``close_and_free_remote`` +
    ``close_and_free_server``; ss-local and ss-tunnel behave the same), dropping whatever is
    still in flight. Shutting the write half right after the last send loses the tail of the
    echo (or all of a small one) with libev on either end, whatever relay does.
    """
    sock.settimeout(SOCKET_TIMEOUT)
    writer_error: list[BaseException] = []

    def write() -> None:
        try:
            view = memoryview(payload)
            for start in range(0, len(view), SEND_CHUNK):
                sock.sendall(view[start : start + SEND_CHUNK])
        except BaseException as e:  # noqa: BLE001 - reported by the reader
            writer_error.append(e)

    writer = threading.Thread(target=write, name="interop-writer", daemon=True)
    received = hashlib.sha256()
    count = 0
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    deadline = time.monotonic() + TRANSFER_DEADLINE
    writer.start()
    try:
        # Each pass reads at least one byte or ends, so len(payload) passes always suffice.
        for _ in range(len(payload)):
            if count == len(payload):
                break
            n = sock.recv_into(view[: min(len(buffer), len(payload) - count)])
            if not n:
                break  # early EOF: reported below with the count
            received.update(view[:n])
            count += n
            if time.monotonic() > deadline:
                pytest.fail(f"transfer not done after {TRANSFER_DEADLINE} s ({count} of {len(payload)} bytes back)")
    finally:
        writer.join(SOCKET_TIMEOUT)
    assert not writer.is_alive(), "the writer thread is stuck"
    assert not writer_error, f"sending failed: {writer_error[0]!r}"
    if count == len(payload):
        sock.shutdown(socket.SHUT_WR)
        try:
            extra = sock.recv(4096)
        except ConnectionResetError:
            extra = b""  # libev may close with unread data: a reset is an end too
        assert extra == b"", f"{len(extra)} bytes more than were sent came back"
    return hashlib.sha256(payload).hexdigest(), received.hexdigest(), count


def assert_echoed(sock: socket.socket, payload: bytes) -> None:
    sent, back, count = echo_round_trip(sock, payload)
    assert count == len(payload), f"{count} of {len(payload)} bytes came back"
    assert back == sent, "the bytes that came back differ from those sent"


def udp_round_trips(
    send: Callable[[bytes], None],
    receive: Callable[[], tuple[bytes, Address | None]],
    method: str,
    source: Address | None,
) -> None:
    """Send datagrams one at a time (small, ~1400 and ~8000 bytes among them) and expect each one
    back unchanged; with ``source``, the answer's SOCKS5 header must name it (the echo server).

    The first datagram is a probe, sent up to UDP_ATTEMPTS times: libev's main() calls listen()
    on its TCP socket (what ``running_process`` waits for) before init_udprelay() binds the UDP
    one (tunnel.c, local.c, server.c), and a datagram sent in between is gone. A late copy of the
    probe coming back afterwards is skipped. Every other datagram must come back at the first
    try: on loopback, with one datagram in flight, nothing is lost.
    """
    probe = udp_probe(send, receive, method)
    payloads = [b"hello over udp, " + method.encode(), b"x", os.urandom(1400), os.urandom(8000), os.urandom(512)]
    for payload in payloads:
        send(payload)
        for _ in range(UDP_ATTEMPTS):  # skip late copies of the probe, at most one per try
            try:
                data, came_from = receive()
            except TimeoutError:
                pytest.fail(f"the {len(payload)}-byte datagram got no answer within {UDP_TIMEOUT} s")
            if data != probe:
                break
        else:
            pytest.fail("only copies of the probe came back")
        assert len(data) == len(payload), f"sent {len(payload)} bytes, {len(data)} came back"
        assert data == payload, f"the {len(payload)}-byte datagram came back changed"
        if source is not None:
            assert came_from == source, f"the answer's SOCKS5 header names {came_from}, not the echo server {source}"


def udp_probe(send: Callable[[bytes], None], receive: Callable[[], tuple[bytes, Address | None]], method: str) -> bytes:
    """Send a probe until it comes back (libev may still be binding its UDP socket, see
    udp_round_trips); return it, since late copies of it may still come."""
    probe = b"probe " + method.encode()
    for _ in range(UDP_ATTEMPTS):
        send(probe)
        try:
            answer = receive()
        except TimeoutError:
            continue
        assert answer[0] == probe, f"the probe came back as {len(answer[0])} other bytes"
        return probe
    pytest.fail(f"no answer to the first datagram after {UDP_ATTEMPTS} tries of {UDP_TIMEOUT} s each")


BURST = [struct.pack("!I", i) + os.urandom(1196) for i in range(48)] + [b"the short last one"]


def udp_burst(sock: socket.socket, method: str) -> None:
    """On a socket connected to a tunnel's port: after a probe, send BURST in one GSO system call
    where the kernel can (so that the tunnel's server reads it in one piece), and expect every
    datagram of it back."""
    udp_probe(sock.send, lambda: (sock.recv(65535), None), method)
    batch = DatagramBatch(sock)
    batch.on_queued = lambda batch: True  # flushed by hand
    for packet in BURST:
        batch.add(packet)
    batch.flush()
    back = []
    for _ in range(len(BURST) + UDP_ATTEMPTS):  # late copies of the probe are skipped
        try:
            data = sock.recv(65535)
        except TimeoutError:
            break
        if not data.startswith(b"probe "):
            back.append(data)
        if len(back) == len(BURST):
            break
    assert len(back) == len(BURST), f"{len(BURST) - len(back)} of {len(BURST)} datagrams of the burst did not come back"
    assert back == BURST, "datagrams of the burst came back changed or out of order"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(BULK_SIZE)


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def relay_remote(pm: RelayPluginManager, method: str) -> Iterator[Address]:
    """relay's remote, in-process, allowed to reach the loopback echo target."""
    config = make_config("remote", pm, method=method, password=PASSWORD, allow_private=True)
    with start_relay(config, pm) as server:
        yield server.address


@pytest.fixture
def echo_udp() -> Iterator[Address]:
    with udp_echo_server() as address:
        yield address


@pytest.fixture
def relay_remote_udp(pm: RelayPluginManager, method: str) -> Iterator[RelayServer]:
    """relay's remote relaying TCP and UDP on one port, allowed to reach the loopback echo."""
    config = make_config("remote", pm, method=method, password=PASSWORD, allow_private=True, mode="tcp_and_udp")
    with start_relay(config, pm) as server:
        yield server


# --- the tests --------------------------------------------------------------------------------


def test_relay_local_to_ss_server(pm: RelayPluginManager, method: str, payload: bytes, echo_target: Address) -> None:
    """relay as the client: its SOCKS5 local speaks to libev's server."""
    ss_server = find_binary("ss-server", "shadowsocks-libev")
    port = free_port()
    with libev(ss_server, *libev_args(port, method), port=port):
        config = make_config("local", pm, method=method, password=PASSWORD, server=f"127.0.0.1:{port}")
        with start_relay(config, pm) as local:
            with socks5_connect(local.address, echo_target, timeout=SOCKET_TIMEOUT) as sock:
                assert_echoed(sock, payload)


def test_ss_local_to_relay_remote(method: str, payload: bytes, relay_remote: Address, echo_target: Address) -> None:
    """relay as the server: libev's SOCKS5 local speaks to relay's remote."""
    ss_local = find_binary("ss-local", "shadowsocks-libev")
    socks_port = free_port()
    with libev(ss_local, *libev_args(relay_remote.port, method, socks_port), port=socks_port):
        with socks5_connect(Address("127.0.0.1", socks_port), echo_target, timeout=SOCKET_TIMEOUT) as sock:
            assert_echoed(sock, payload)


def test_ss_tunnel_to_relay_remote(method: str, relay_remote: Address, echo_target: Address) -> None:
    """libev's tunnel client: the target travels in the first flight with no SOCKS5 in front."""
    ss_tunnel = find_binary("ss-tunnel", "shadowsocks-libev")
    tunnel_port = free_port()
    args = [*libev_args(relay_remote.port, method, tunnel_port), "-L", str(echo_target)]
    with libev(ss_tunnel, *args, port=tunnel_port):
        small = b"hello through ss-tunnel, " + method.encode() + b"\n" + os.urandom(3000)
        with socket.create_connection(("127.0.0.1", tunnel_port), timeout=SOCKET_TIMEOUT) as sock:
            assert_echoed(sock, small)


def test_wrong_password_is_refused(pm: RelayPluginManager, method: str, echo_target: Address) -> None:
    """The two sides really authenticate each other: a different password gets nothing through."""
    ss_server = find_binary("ss-server", "shadowsocks-libev")
    port = free_port()
    with libev(ss_server, *libev_args(port, method), port=port):
        config = make_config("local", pm, method=method, password="not " + PASSWORD, server=f"127.0.0.1:{port}")
        with start_relay(config, pm) as local:
            with socks5_connect(local.address, echo_target, timeout=SOCKET_TIMEOUT) as sock:
                sock.settimeout(SOCKET_TIMEOUT)
                sock.sendall(b"must not arrive")
                sock.shutdown(socket.SHUT_WR)
                try:
                    answer = sock.recv(4096)
                except ConnectionResetError:
                    answer = b""
                assert answer == b""


# --- datagrams --------------------------------------------------------------------------------


def test_udp_relay_local_to_ss_server(pm: RelayPluginManager, method: str, echo_udp: Address) -> None:
    """relay as the client: UDP ASSOCIATE on relay's local, libev's server relays the datagrams.

    ss-server runs with ``--mtu 9000``: with libev's default buffer (2,794 bytes) the ~8,000-byte
    datagram would be truncated and dropped by ss-server, whatever relay sends (see LIBEV_UDP).
    """
    ss_server = find_binary("ss-server", "shadowsocks-libev")
    port = free_port()
    with libev(ss_server, *libev_args(port, method), *LIBEV_UDP, port=port):
        config = make_config(
            "local", pm, method=method, password=PASSWORD, server=f"127.0.0.1:{port}", mode="tcp_and_udp"
        )
        with start_relay(config, pm) as local, Socks5UDPClient(local.address, timeout=UDP_TIMEOUT) as client:
            udp_round_trips(lambda payload: client.sendto(payload, echo_udp), client.recvfrom, method, source=echo_udp)
            assert local.udp_server is not None
            assert not local.udp_server.stats, f"relay's local dropped datagrams: {dict(local.udp_server.stats)}"


def test_udp_ss_tunnel_to_relay_remote(method: str, relay_remote_udp: RelayServer, echo_udp: Address) -> None:
    """libev's tunnel client: every datagram to its port goes to the -L target through relay's remote.

    ss-tunnel runs with ``--mtu 9000`` so that it accepts the ~8,000-byte datagram (see LIBEV_UDP).
    """
    ss_tunnel = find_binary("ss-tunnel", "shadowsocks-libev")
    tunnel_port = free_port()
    args = [*libev_args(relay_remote_udp.address.port, method, tunnel_port), "-L", str(echo_udp), *LIBEV_UDP]
    with libev(ss_tunnel, *args, port=tunnel_port), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(UDP_TIMEOUT)
        sock.connect(("127.0.0.1", tunnel_port))  # answers from anywhere else are not ss-tunnel's

        def receive() -> tuple[bytes, None]:
            return sock.recv(65535), None  # ss-tunnel strips the address: there is no header to check

        udp_round_trips(sock.send, receive, method, source=None)
    assert relay_remote_udp.udp_server is not None
    assert not relay_remote_udp.udp_server.stats, (
        f"relay's remote dropped datagrams: {dict(relay_remote_udp.udp_server.stats)}"
    )


def test_udp_ss_local_to_relay_remote(method: str, relay_remote_udp: RelayServer, echo_udp: Address) -> None:
    """libev's SOCKS5 local: UDP ASSOCIATE on ss-local, relay's remote relays the datagrams, and
    the source address relay's remote encrypts into each answer reaches the client's header.

    ss-local runs with ``--mtu 9000`` so that it accepts the ~8,000-byte datagram (see LIBEV_UDP).
    """
    ss_local = find_binary("ss-local", "shadowsocks-libev")
    socks_port = free_port()
    args = libev_args(relay_remote_udp.address.port, method, socks_port)
    with (
        libev(ss_local, *args, *LIBEV_UDP, port=socks_port),
        Socks5UDPClient(Address("127.0.0.1", socks_port), timeout=UDP_TIMEOUT) as client,
    ):
        udp_round_trips(lambda payload: client.sendto(payload, echo_udp), client.recvfrom, method, source=echo_udp)
    assert relay_remote_udp.udp_server is not None
    assert not relay_remote_udp.udp_server.stats, (
        f"relay's remote dropped datagrams: {dict(relay_remote_udp.udp_server.stats)}"
    )


def test_udp_burst_relay_local_to_ss_server(pm: RelayPluginManager, method: str, echo_udp: Address) -> None:
    """relay's local sends a client's burst on to ss-server in a few GSO system calls; the kernel
    cuts them into the datagrams ss-server reads one by one, and every one comes back."""
    ss_server = find_binary("ss-server", "shadowsocks-libev")
    port = free_port()
    with libev(ss_server, *libev_args(port, method), "-u", port=port):
        config = make_config(
            "local", pm, method=method, password=PASSWORD, server=f"127.0.0.1:{port}", mode="udp_only",
            protocol="tunnel", forward=str(echo_udp),
        )
        with start_relay(config, pm) as local, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(UDP_TIMEOUT)
            sock.connect(tuple(local.address))
            udp_burst(sock, method)
            upstream = local.associations.peek(sock.getsockname()).upstream
            assert not local.stats, f"relay's local dropped datagrams: {dict(local.stats)}"
    if sys.platform.startswith("linux"):
        assert wait_until(lambda: upstream.batch.sent >= len(BURST))  # counted just after the send
        assert upstream.batch.calls < upstream.batch.sent / 4, "the burst went to ss-server one datagram per call"


def test_udp_burst_ss_tunnel_to_relay_remote(method: str, relay_remote_udp: RelayServer, echo_udp: Address) -> None:
    """ss-tunnel's burst of datagrams (one system call each) through relay's remote, which holds
    those that queue up behind one another and sends them on in batches: every one comes back,
    in order."""
    ss_tunnel = find_binary("ss-tunnel", "shadowsocks-libev")
    tunnel_port = free_port()
    args = [*libev_args(relay_remote_udp.address.port, method, tunnel_port), "-L", str(echo_udp), "-u"]
    with libev(ss_tunnel, *args, port=tunnel_port), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(UDP_TIMEOUT)
        sock.connect(("127.0.0.1", tunnel_port))
        udp_burst(sock, method)
    assert relay_remote_udp.udp_server is not None
    assert not relay_remote_udp.udp_server.stats, (
        f"relay's remote dropped datagrams: {dict(relay_remote_udp.udp_server.stats)}"
    )
