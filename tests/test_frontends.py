"""The local's front-ends with real clients: curl as an HTTP proxy client (plain and https via
CONNECT to a local TLS server), the mixed port, authentication, and several front-ends from one
config."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from conftest import find_binary, http_server, relay_command, relay_pair, subprocess_env
from relay import Address
from relay.testing import free_port, make_config, process_output, recv_until_eof, running_process, socks5_connect, start_relay

BODY = b"hello from the origin\n"


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = BODY if self.path == "/" else f"path {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Connection-Seen", self.headers.get("Connection", "-"))
        self.send_header("X-Proxy-Authorization-Seen", self.headers.get("Proxy-Authorization", "-"))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def origin(tls: ssl.SSLContext | None = None) -> contextlib.AbstractContextManager[int]:
    return http_server(Origin, tls)


def curl(*args: str) -> subprocess.CompletedProcess:
    binary = find_binary("curl", "curl")
    return subprocess.run([binary, "-sS", "--max-time", "15", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def http_pair(pm):
    with relay_pair(pm, local={"protocol": "http"}) as servers:
        yield servers


def test_curl_through_the_http_proxy_keeps_the_connection_alive(http_pair):
    local, _ = http_pair
    with origin() as port:
        url = f"http://127.0.0.1:{port}/"
        result = curl("-x", f"http://{local.address}", url, f"{url}second", "-w", "|%{num_connects}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == BODY.decode() + "|1" + "path /second\n" + "|0"  # the second request reused the connection


def test_hop_by_hop_headers_are_not_forwarded(http_pair):
    local, _ = http_pair
    with origin() as port:
        result = curl("-x", f"http://{local.address}", "-H", "Connection: keep-alive, X-Private", "-H", "X-Private: secret", "-D", "-", f"http://127.0.0.1:{port}/")
    assert "x-connection-seen: -" in result.stdout.lower()
    assert "x-proxy-authorization-seen: -" in result.stdout.lower()


def test_post_body_goes_through(http_pair):
    local, _ = http_pair
    with origin() as port:
        result = curl("-x", f"http://{local.address}", "--data-binary", "x" * 100_000, f"http://127.0.0.1:{port}/echo")
    assert result.stdout == "x" * 100_000


def test_https_through_connect_to_a_local_tls_server(http_pair, tmp_path):
    trustme = pytest.importorskip("trustme")  # in the test extras: never missing in CI
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    local, _ = http_pair
    with origin(context) as port:
        result = curl("--cacert", str(ca_file), "-x", f"http://{local.address}", f"https://localhost:{port}/")
        assert result.returncode == 0, result.stderr
        assert result.stdout == BODY.decode()
        # HTTPS_PROXY, as pip and git users set it
        env = {**subprocess_env(), "HTTPS_PROXY": f"http://{local.address}"}
        binary = find_binary("curl", "curl")
        result = subprocess.run([binary, "-sS", "--cacert", str(ca_file), f"https://localhost:{port}/"], capture_output=True, text=True, env=env, timeout=30)
        assert result.stdout == BODY.decode(), result.stderr


def http_exchange(address: Address, request: bytes) -> bytes:
    with socket.create_connection(tuple(address), timeout=10) as sock:
        sock.sendall(request)
        return recv_until_eof(sock)


def test_error_answers(pm):
    with start_relay(make_config("serve", pm, handler="http", allow_private=True, timeout=5, handshake_timeout=1), pm) as proxy:
        assert http_exchange(proxy.address, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert http_exchange(proxy.address, b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        huge = b"GET http://127.0.0.1/ HTTP/1.1\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        assert http_exchange(proxy.address, huge)[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400")
        closed = free_port()
        assert http_exchange(proxy.address, f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()).startswith(b"HTTP/1.1 502 ")
        assert http_exchange(proxy.address, f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nHost: 127.0.0.1:{closed}\r\n\r\n".encode()).startswith(b"HTTP/1.1 502 ")
        with socket.create_connection(tuple(proxy.address), timeout=10) as sock:
            sock.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
            sock.settimeout(40)
            assert recv_until_eof(sock) == b""  # closed at the handshake timeout, not hanging


def test_basic_auth_and_407(pm):
    with origin() as port, relay_pair(pm, local={"protocol": "http", "auth": ["alice:secret"]}) as (local, _):
        url = f"http://127.0.0.1:{port}/"
        assert curl("-x", f"http://{local.address}", "-o", "/dev/null", "-w", "%{http_code}", url).stdout == "407"
        assert curl("-x", f"http://alice:wrong@{local.address}", "-o", "/dev/null", "-w", "%{http_code}", url).stdout == "407"
        result = curl("-x", f"http://alice:secret@{local.address}", "-D", "-", url)
        assert result.stdout.endswith(BODY.decode())
        assert "x-proxy-authorization-seen: -" in result.stdout.lower()  # credentials stop at the proxy


def test_mixed_port_speaks_socks5_and_http(pm, echo_target):
    with origin() as port, relay_pair(pm) as (local, _):
        assert local.config.handler.name == "mixed"
        assert curl("-x", f"http://{local.address}", f"http://127.0.0.1:{port}/").stdout == BODY.decode()
        assert curl("--socks5-hostname", str(local.address), f"http://localhost:{port}/").stdout == BODY.decode()
        with socks5_connect(local.address, echo_target) as sock:
            sock.sendall(b"socks")
            assert sock.recv(5) == b"socks"


def test_several_front_ends_from_one_config(tmp_path: Path, pm):
    """A mixed port, a tunnel and an HTTP port sharing one server definition, from one file."""
    with origin() as web_port, start_relay(make_config("remote", pm, password="shared", allow_private=True), pm) as remote:
        mixed, tunnel, http_port = free_port(), free_port(), free_port()
        config = {
            "server": "127.0.0.1",
            "server_port": remote.address.port,
            "password": "shared",
            "method": "chacha20-ietf-poly1305",
            "locals": [
                {"local_address": "127.0.0.1", "local_port": mixed},
                {"local_address": "127.0.0.1", "local_port": tunnel, "protocol": "tunnel", "forward_address": "127.0.0.1", "forward_port": web_port},
                {"local_address": "127.0.0.1", "local_port": http_port, "protocol": "http"},
            ],
        }
        path = tmp_path / "locals.json"
        path.write_text(json.dumps(config))
        with running_process([*relay_command(), "local", "-c", str(path)], port=http_port, env=subprocess_env()) as proc:
            url = f"http://127.0.0.1:{web_port}/"
            assert curl("--socks5-hostname", f"127.0.0.1:{mixed}", url).stdout == BODY.decode()
            assert curl("-x", f"http://127.0.0.1:{http_port}", url).stdout == BODY.decode()
            assert curl("-H", "Host: origin", f"http://127.0.0.1:{tunnel}/").stdout == BODY.decode()
            log = process_output(proc)
        assert log.count("listening on") == 3, log


def test_a_local_refuses_to_be_an_open_proxy(pm):
    """Non-loopback without auth: refused (one line) unless --allow-open, which still warns."""
    from relay import ConfigError

    with pytest.raises(ConfigError, match="--allow-open"):
        make_config("local", pm, server="127.0.0.1:1", password="p", listen="0.0.0.0:0")
    config = make_config("local", pm, server="127.0.0.1:1", password="p", listen="0.0.0.0:0", allow_open=True)
    assert any("open proxy" in warning for warning in config.warnings)
    assert not make_config("local", pm, server="127.0.0.1:1", password="p", listen="0.0.0.0:0", auth=["u:p"]).warnings
    assert not make_config("local", pm, server="127.0.0.1:1", password="p").warnings
    result = subprocess.run([*relay_command(), "local", "--listen", "0.0.0.0:0", "--server", "127.0.0.1:1", "--password", "p"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--allow-open" in result.stderr and len(result.stderr.splitlines()) == 1


def test_socks4a_and_socks4_with_curl(pm):
    with origin() as port, relay_pair(pm) as (local, _):
        assert curl("--socks4a", str(local.address), f"http://localhost:{port}/").stdout == BODY.decode()
        assert curl("--socks4", str(local.address), f"http://127.0.0.1:{port}/").stdout == BODY.decode()
        assert curl("-x", f"socks4a://{local.address}", f"http://localhost:{port}/").stdout == BODY.decode()


def test_socks4_bind_is_answered_rejected(pm):
    with relay_pair(pm) as (local, _), socket.create_connection(tuple(local.address), timeout=5) as sock:
        sock.sendall(b"\x04\x02\x00\x50\x7f\x00\x00\x01user\x00")
        answer = recv_until_eof(sock)
    assert answer == b"\x00\x5b" + bytes(6)


def test_pysocks_clients(pm, echo_target):
    socks = pytest.importorskip("socks")  # PySocks, in the test extras: never missing in CI
    with relay_pair(pm, local={"auth": ["bob:hunter2"]}) as (local, _):
        for version, kwargs in ((socks.SOCKS5, {"username": "bob", "password": "hunter2"}),):
            client = socks.socksocket()
            client.settimeout(10)
            client.set_proxy(version, local.address.host, local.address.port, rdns=True, **kwargs)
            client.connect(("localhost", echo_target.port))
            client.sendall(b"pysocks")
            assert client.recv(7) == b"pysocks"
            client.close()
        bad = socks.socksocket()
        bad.settimeout(10)
        bad.set_proxy(socks.SOCKS5, local.address.host, local.address.port, username="bob", password="nope")
        with pytest.raises(socks.ProxyError):
            bad.connect(("127.0.0.1", echo_target.port))
        bad.close()
        four = socks.socksocket()  # SOCKS4 has no password: refused when auth is required
        four.settimeout(10)
        four.set_proxy(socks.SOCKS4, local.address.host, local.address.port)
        with pytest.raises(socks.ProxyError):
            four.connect(("127.0.0.1", echo_target.port))
        four.close()
    with relay_pair(pm) as (local, _):
        four = socks.socksocket()
        four.settimeout(10)
        four.set_proxy(socks.SOCKS4, local.address.host, local.address.port, rdns=True)
        four.connect(("localhost", echo_target.port))
        four.sendall(b"4a")
        assert four.recv(2) == b"4a"
        four.close()


def test_socks5_auth_with_curl(pm):
    with origin() as port, relay_pair(pm, local={"auth": ["alice:s3cret"]}) as (local, _):
        assert curl("-x", f"socks5h://alice:s3cret@{local.address}", f"http://localhost:{port}/").stdout == BODY.decode()
        assert curl("-x", f"socks5h://alice:wrong@{local.address}", f"http://localhost:{port}/").returncode != 0
        assert curl("-x", f"socks5h://{local.address}", f"http://localhost:{port}/").returncode != 0
