"""Where a local finds its server: an ss:// URL (SIP002), a SIP008 server list (file or URL),
and `relay url` printing the URL of a remote, checked against shadowsocks-libev."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

from conftest import body_handler, find_binary, http_server, relay_command, subprocess_env
from relay import Address
from relay.testing import free_port, make_config, recv_exactly, running_process, socks5_connect, start_relay
from test_pair import exchange


def run_relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*relay_command(), *args], capture_output=True, text=True, timeout=30, env=subprocess_env())


def test_url_of_a_libev_config_drives_a_local_to_ss_server(tmp_path: Path, echo_target):
    """`relay url` on a shadowsocks-libev config gives the URL; `relay local --server-url` uses it
    to reach the real ss-server started from the same file."""
    ss_server = find_binary("ss-server", "shadowsocks-libev")
    port = free_port()
    config = {"server": "127.0.0.1", "server_port": port, "password": "from libev", "method": "aes-256-gcm", "timeout": 60}
    path = tmp_path / "libev.json"
    path.write_text(json.dumps(config))
    result = run_relay("url", "-c", str(path), "--no-qr", "--tag", "libev box")
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith("ss://") and url.endswith(f"@127.0.0.1:{port}#libev%20box")
    local_port = free_port()
    with running_process([ss_server, "-c", str(path)], port=port):
        with running_process([*relay_command(), "local", "--server-url", url, "--listen", f"127.0.0.1:{local_port}", "-q"], port=local_port, env=subprocess_env()):
            with socks5_connect(Address("127.0.0.1", local_port), echo_target) as sock:
                sock.sendall(b"through libev by URL")  # no half-close: libev drops what is in flight on EOF
                assert recv_exactly(sock, 20) == b"through libev by URL"


def test_relay_url_prints_a_qr_code_and_needs_a_dialable_host(tmp_path: Path):
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"server": "0.0.0.0", "server_port": 8388, "password": "pw", "method": "chacha20-ietf-poly1305"}))
    refused = run_relay("url", "-c", str(path))
    assert refused.returncode == 2 and "--host" in refused.stderr
    result = run_relay("url", "-c", str(path), "--host", "203.0.113.7")
    assert result.returncode == 0
    first, *qr = result.stdout.splitlines()
    assert first == "ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTpwdw@203.0.113.7:8388"
    assert len(qr) > 10 and "█" in qr[5]


def test_server_url_in_config_and_its_errors(pm):
    config = make_config("local", pm, server_url="ss://YWVzLTEyOC1nY206c2VjcmV0@127.0.0.1:9000#x")
    assert config.server == Address("127.0.0.1", 9000) and config.method == "aes-128-gcm" and config.password == "secret"
    # a flag still wins over the URL
    assert make_config("local", pm, server_url="ss://YWVzLTEyOC1nY206c2VjcmV0@127.0.0.1:9000", method="aes-256-gcm").method == "aes-256-gcm"
    result = run_relay("local", "--server-url", "ss://YWVzLTEyOC1nY206c2VjcmV0@127.0.0.1:9000/?plugin=obfs-local%3Bobfs%3Dhttp")
    assert result.returncode == 2 and "SIP003" in result.stderr
    result = run_relay("local", "--server-url", "ss://not-a-url")
    assert result.returncode == 2 and "Traceback" not in result.stderr


@contextlib.contextmanager
def served_file(body: bytes) -> Iterator[str]:
    with http_server(body_handler(body)) as port:
        yield f"http://127.0.0.1:{port}/servers.json"


def test_sip008_server_list_from_a_file_and_a_url(tmp_path: Path, pm, echo_target):
    with start_relay(make_config("remote", pm, password="listed", method="aes-128-gcm", allow_private=True), pm) as remote:
        document = {
            "version": 1,
            "servers": [
                {"id": "27b8a625-4f4b-4428-9f0f-8a2317db7c79", "remarks": "decoy", "server": "127.0.0.1", "server_port": free_port(), "password": "x", "method": "aes-128-gcm"},
                {"id": "7842c068-c667-41f2-8f7d-04feece3cb67", "remarks": "the real one", "server": "127.0.0.1", "server_port": remote.address.port, "password": "listed", "method": "aes-128-gcm"},
            ],
        }
        path = tmp_path / "servers.json"
        path.write_text(json.dumps(document))
        body = json.dumps(document).encode()
        with served_file(body) as url:
            for source in (str(path), url):
                local_port = free_port()
                args = ["local", "--server-list", source, "--server-name", "the real one", "--listen", f"127.0.0.1:{local_port}", "-q"]
                with running_process([*relay_command(), *args], port=local_port, env=subprocess_env()):
                    with socks5_connect(Address("127.0.0.1", local_port), echo_target) as sock:
                        assert exchange(sock, b"listed") == b"listed"
        result = run_relay("local", "--server-list", str(path), "--server-name", "nobody")
        assert result.returncode == 2 and "the real one" in result.stderr
