"""Wire compatibility with shadowsocks-libev, the reference implementation.

Each AEAD method, each way round, with the real peer as a subprocess:

* relay local (SOCKS5)  -> ss-server    -> echo target   (relay as the Shadowsocks client)
* ss-local (SOCKS5)     -> relay remote -> echo target   (relay as the Shadowsocks server)
* ss-tunnel             -> relay remote -> echo target   (libev's tunnel client)

The bulk tests carry 32 MiB of random bytes up and back down through one connection: far more
than one AEAD chunk (0x3FFF bytes) or one socket buffer, so chunking, nonce counting and flow
control all get exercised, not only the handshake. A missing peer binary fails with the command
that installs it; it is never skipped.

shadowsocks-libev does not relay a half-close (see ``echo_round_trip``), so the client here reads
the whole echo back before it shuts its write half; half-close is not part of what these tests
can prove against libev.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import METHODS, find_binary

from relay import Address
from relay.plugin_manager import RelayPluginManager
from relay.testing import free_port, make_config, process_output, running_process, socks5_connect, start_relay

pytestmark = pytest.mark.interop

PASSWORD = "interop password"
BULK_SIZE = 32 * 1024 * 1024
SEND_CHUNK = 1024 * 1024
SOCKET_TIMEOUT = 30.0  # one recv or send that waits this long fails the test
TRANSFER_DEADLINE = 60.0  # the whole transfer, both directions
STARTUP_TIMEOUT = 5.0  # for a libev process to accept on its port


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
