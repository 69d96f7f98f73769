"""Bounded resources: handshake deadlines, session caps, and an accept loop that backs off when
the process runs out of descriptors instead of spinning."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import relay_command, relay_pair, subprocess_env
from relay.testing import free_port, make_config, recv_until_eof, socks5_connect, start_relay, wait_until
from relay.threads import shared_pool
from test_pair import exchange


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("first_bytes", [b"", b"\x05", b"\x05\x01", b"\x04\x01", b"GET http://x/ HTTP/1.1\r\n"])
def test_a_trickling_client_is_cut_at_the_handshake_deadline(pm, first_bytes):
    """One deadline from accept for the whole handshake, whatever the front-end: sending a byte
    now and then does not extend it."""
    with relay_pair(pm, local={"handshake_timeout": 1.0}) as (local, _):
        with socket.create_connection(tuple(local.address), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(first_bytes)
            closed = None
            for _ in range(40):  # a byte every 0.1 s would keep a per-recv timeout alive forever
                time.sleep(0.1)
                try:
                    sock.sendall(b"\x00" if first_bytes[:1] in (b"\x05", b"\x04") else b"X")
                except OSError:
                    break
                try:
                    if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                        break
                except BlockingIOError:
                    continue
                except OSError:
                    break
            closed = time.monotonic() - started
    assert closed < 2.5, f"still open after {closed:.1f} s"


def test_slow_handshakes_do_not_starve_a_normal_client(pm, echo_target):
    pool = shared_pool()
    pool.idle_timeout, saved = 1.0, pool.idle_timeout  # let idle threads go quickly for the baseline check
    try:
        with relay_pair(pm, local={"handshake_timeout": 20}) as (local, _):
            with socks5_connect(local.address, echo_target) as sock:
                assert exchange(sock, b"warm") == b"warm"
            assert wait_until(lambda: threading.active_count() <= 12, timeout=10)
            threads, fds = threading.active_count(), open_fds()
            slow = []
            try:
                for _ in range(200):
                    sock = socket.create_connection(tuple(local.address), timeout=5)
                    sock.sendall(b"\x05")  # a greeting that never finishes
                    slow.append(sock)
                started = time.monotonic()
                with socks5_connect(local.address, echo_target) as sock:
                    assert exchange(sock, b"normal") == b"normal"
                assert time.monotonic() - started < 1.0
            finally:
                for sock in slow:
                    sock.close()
            assert wait_until(lambda: local.live_sessions == 0, timeout=10)
            assert wait_until(lambda: threading.active_count() <= threads + 2, timeout=10), threading.active_count()
            assert wait_until(lambda: open_fds() <= fds + 4, timeout=10), (open_fds(), fds)
    finally:
        pool.idle_timeout = saved


def test_session_caps_refuse_beyond_them(pm, echo_target, caplog):
    with start_relay(make_config("serve", pm, handler="echo", max_sessions_per_client=3), pm) as server:
        held = [socket.create_connection(tuple(server.address), timeout=5) for _ in range(3)]
        try:
            for sock in held:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
            with socket.create_connection(tuple(server.address), timeout=5) as extra:
                assert recv_until_eof(extra) == b""  # closed at once
            assert server.stats["refused"] == 1
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: server.live_sessions == 0)
        with socket.create_connection(tuple(server.address), timeout=5) as sock:  # the count went back down
            assert exchange(sock, b"again") == b"again"
    with start_relay(make_config("serve", pm, handler="echo", max_sessions=2), pm) as server:
        held = [socket.create_connection(tuple(server.address), timeout=5) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
            with socket.create_connection(tuple(server.address), timeout=5) as extra:
                assert recv_until_eof(extra) == b""
        finally:
            for sock in held:
                sock.close()
    assert "max_sessions" in caplog.text


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def starved_relay(args: list[str], port: int, *, settle: float = 0.0, window: float = 2.0) -> Iterator[None]:
    """Run ``relay ARGS`` (listening on ``port``) with 40 descriptors, hold more connections
    than it can take, and check that accepting backs off instead of spinning (CPU over
    ``window`` seconds); the block runs once they are closed again, to check recovery."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    proc = subprocess.Popen(
        [*relay_command(), *args], preexec_fn=limit, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    held = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(settle)
        for _ in range(60):  # more than the relay can hold
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.3)
        before = cpu_seconds(proc.pid)
        time.sleep(window)
        busy = (cpu_seconds(proc.pid) - before) / window
        assert busy < 0.3, f"the accept loop spins: {busy:.0%} CPU"
        for sock in held:
            sock.close()
        held.clear()
        time.sleep(0.5)
        yield
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        proc.wait(10)
        stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert "backing off" in stderr, stderr  # the limit was really hit
    assert "Traceback" not in stderr, stderr


def test_accept_backs_off_when_out_of_descriptors():
    """With 40 descriptors the server runs out; it must wait, not spin, and recover afterwards."""
    port = free_port()
    with starved_relay(["serve", "--handler", "echo", "--listen", f"127.0.0.1:{port}", "-q"], port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(b"recovered")
            assert sock.recv(100) == b"recovered"
