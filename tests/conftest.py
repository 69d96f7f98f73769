"""Shared fixtures: plugin manager, target servers on loopback, relay pairs started in-process."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socketserver
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import Address
from relay.plugin_manager import RelayPluginManager, get_plugin_manager
from relay.server import RelayServer
from relay.testing import make_config, serve_in_thread, start_relay

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "shadowsocks.json"  # a copy of shared/vectors: CI has only the repo
METHODS = ("aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305")


@contextlib.contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """An HTTP(S) origin on loopback for the life of the block; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def body_handler(body: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    """A quiet HTTP handler that answers every GET with ``body``."""

    class Body(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Body


class EchoHandler(socketserver.BaseRequestHandler):
    """A target that echoes until EOF, then half-closes back (stdlib only: not relay's echo)."""

    def handle(self) -> None:
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


class ReplyAfterEofHandler(socketserver.BaseRequestHandler):
    """A target that reads to EOF first, then answers with the length it read: proves half-close."""

    def handle(self) -> None:
        total = 0
        while data := self.request.recv(1 << 16):
            total += len(data)
        self.request.sendall(b"got %d" % total)


@pytest.fixture(scope="session")
def pm() -> RelayPluginManager:
    return get_plugin_manager()


@pytest.fixture
def echo_target() -> Iterator[Address]:
    with serve_in_thread(EchoHandler) as address:
        yield address


@pytest.fixture
def echo_target6() -> Iterator[Address]:
    with serve_in_thread(EchoHandler, host="::1") as address:
        yield address


@pytest.fixture
def eof_target() -> Iterator[Address]:
    with serve_in_thread(ReplyAfterEofHandler) as address:
        yield address


@contextlib.contextmanager
def relay_pair(
    pm: RelayPluginManager, method: str = "chacha20-ietf-poly1305", password: str = "test password", local: dict | None = None, remote: dict | None = None
) -> Iterator[tuple[RelayServer, RelayServer]]:
    """A remote (allowing loopback targets) and a local in front of it; yields (local, remote)."""
    remote_flags = {"method": method, "password": password, "allow_private": True, **(remote or {})}
    with start_relay(make_config("remote", pm, **remote_flags), pm) as remote_server:
        local_flags = {"method": method, "password": password, "server": remote_server.address, **(local or {})}
        with start_relay(make_config("local", pm, **local_flags), pm) as local_server:
            yield local_server, remote_server


@pytest.fixture
def pair(pm: RelayPluginManager) -> Iterator[tuple[RelayServer, RelayServer]]:
    with relay_pair(pm) as servers:
        yield servers


def find_binary(name: str, package: str) -> str:
    """A peer binary the suite needs: fail (never skip) with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `apt-get install {package}` (.ci/run does)", pytrace=False)
    return path


def relay_command() -> list[str]:
    """How to run the CLI in a subprocess: the interpreter running the tests, ``-m relay``."""
    return [sys.executable, "-m", "relay"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
