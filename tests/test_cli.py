"""The command line, run as a user runs it: subprocesses, real ports, signals."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import body_handler, find_binary, http_server, relay_command, subprocess_env

from relay import Address
from relay.testing import free_port, process_output, recv_until_eof, running_process, socks5_connect


def run(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*relay_command(), *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env(), **kwargs)


def relay_process(*args: str, port: int, stdout: int | None = None):
    return running_process([*relay_command(), *args], port=port, env=subprocess_env(), stdout=stdout)


def web_server() -> contextlib.AbstractContextManager[int]:
    return http_server(body_handler(b"hello from the web server\n"))


def test_help_and_version():
    result = run("--help")
    assert result.returncode == 0
    for command in ("local", "remote", "serve", "demo", "plugins"):
        assert command in result.stdout
    for command in ("local", "remote", "serve", "demo"):
        result = run(command, "--help")
        assert result.returncode == 0 and "--listen" in result.stdout and "--plugin" in result.stdout
    assert re.match(r"relay \d+\.\d+", run("--version").stdout)


@pytest.mark.parametrize(
    "args,message",
    [
        (["remote", "--password", "p", "--method", "nope"], "unknown method 'nope'"),
        (["remote", "--method", "rc4-md5", "--password", "p"], "insecure"),
        (["remote", "--listen", "127.0.0.1:0"], "password is required"),
        (["local", "--password", "p", "--server", "127.0.0.1"], "bad server"),
        (["remote", "--password", "p", "--listen", "127.0.0.1:99999"], "0 to 65535"),
        (["remote", "--password", "p", "-c", "/nonexistent/config.json"], "cannot read config file"),
        (["serve", "--handler", "nope"], "unknown handler 'nope'"),
        (["serve", "--plugin", "no_such_module_anywhere"], "cannot import plugin module"),
        (["serve", "--handler", "shadowsocks"], "relay remote"),
        (["remote", "--password", "p", "--handler", "tunnel"], "handler 'tunnel' is a front-end"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_port_in_use_is_a_user_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run("serve", "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_libev_config_files_unchanged_with_flag_overrides(tmp_path: Path):
    remote_port, local_port = free_port(), free_port()
    common = {"password": "from the file", "method": "aes-256-gcm", "timeout": 60, "mode": "tcp_only", "fast_open": False}
    server_json = tmp_path / "server.json"
    server_json.write_text(json.dumps({"server": "127.0.0.1", "server_port": remote_port, **common}))
    local_json = tmp_path / "local.json"
    local_json.write_text(json.dumps({"server": "127.0.0.1", "server_port": remote_port, "local_address": "127.0.0.1", "local_port": 1, **common}))
    with web_server() as web_port:
        with relay_process("remote", "-c", str(server_json), "--allow-private", port=remote_port):
            # --listen overrides local_port from the file
            with relay_process("local", "-c", str(local_json), "--listen", f"127.0.0.1:{local_port}", port=local_port):
                with socks5_connect(Address("127.0.0.1", local_port), Address("127.0.0.1", web_port)) as sock:
                    sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    sock.settimeout(10)
                    assert recv_until_eof(sock).endswith(b"hello from the web server\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_with_live_sessions_and_exit_0(signum):
    port = free_port()
    with relay_process("serve", "--handler", "echo", "--listen", f"127.0.0.1:{port}", port=port) as proc:
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            for client in clients:
                client.sendall(b"x")
                assert client.recv(1) == b"x"
            started = time.monotonic()
            proc.send_signal(signum)
            assert proc.wait(5) == 0
            assert time.monotonic() - started < 4
            for client in clients:
                assert client.recv(10) == b""  # sessions were closed
        finally:
            for client in clients:
                client.close()
        assert "Traceback" not in process_output(proc)


def test_python_dash_m_serves_uppercase():
    port = free_port()
    with relay_process("serve", "--handler", "uppercase", "--listen", f"127.0.0.1:{port}", port=port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"hello world\n")
            assert sock.recv(1024) == b"HELLO WORLD\n"


def test_demo_prints_what_to_run_and_curl_gets_through():
    curl = find_binary("curl", "curl")
    port = free_port()
    with web_server() as web_port, relay_process("demo", "--listen", f"127.0.0.1:{port}", port=port, stdout=subprocess.PIPE) as proc:
        lines = [proc.stdout.readline() for _ in range(4)]
        text = "".join(lines)
        assert f"127.0.0.1:{port}" in text
        assert re.search(r"ss://[A-Za-z0-9_-]+@127\.0\.0\.1:\d+#relay-demo", text)
        assert f"curl --socks5-hostname 127.0.0.1:{port} http://127.0.0.1:8000/" in text
        result = subprocess.run(
            [curl, "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{port}", f"http://127.0.0.1:{web_port}/"],
            capture_output=True, text=True, timeout=20,
        )
        assert result.stdout == "hello from the web server\n", result.stderr
        result = subprocess.run(
            [curl, "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{web_port}/"],
            capture_output=True, text=True, timeout=20,
        )
        assert result.stdout == "hello from the web server\n", result.stderr


def test_plugins_lists_sources_and_hooks(tmp_path: Path):
    (tmp_path / "my_relay_plugin.py").write_text(
        "import relay\n\n@relay.hookimpl\ndef relay_session_started(session):\n    pass\n"
    )
    env = subprocess_env()
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run([*relay_command(), "plugins", "--plugin", "my_relay_plugin"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("shadowsocks", "socks5", "tunnel", "echo", "uppercase"):
        assert re.search(rf"^  {name}\s+bundled\s", out, re.M), out
    assert re.search(r"^  core\s+core\s", out, re.M)
    assert re.search(r"^  my_relay_plugin\s+--plugin\s", out, re.M)
    assert "relay_session_started" in out and "relay_register_ciphers" in out
    assert "aes-128-gcm, aes-256-gcm, chacha20-ietf-poly1305" in out


def test_misspelled_hook_fails_loudly(tmp_path: Path):
    (tmp_path / "typo_plugin.py").write_text("import relay\n\n@relay.hookimpl\ndef relay_sesion_started(session):\n    pass\n")
    env = subprocess_env()
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run([*relay_command(), "plugins", "--plugin", "typo_plugin"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2
    assert "relay_sesion_started" in result.stderr and "Traceback" not in result.stderr


def test_workers_share_the_port_and_stop_together():
    port = free_port()
    with relay_process("serve", "--handler", "uppercase", "--workers", "2", "--listen", f"127.0.0.1:{port}", "-v", port=port) as proc:
        children = set(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        assert len(children) == 2
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"spread\n")
                assert sock.recv(100) == b"SPREAD\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        for child in children:
            assert not Path(f"/proc/{child}").exists()
        output = process_output(proc, limit=100_000)
    assert "started 2 workers" in output and "Traceback" not in output


def test_workers_need_a_fixed_port():
    result = run("serve", "--workers", "2", "--listen", "127.0.0.1:0")
    assert result.returncode == 2 and "fixed port" in result.stderr


def test_check_reports_every_problem_one_line_each(tmp_path: Path):
    config = {
        "server": "1.2.3.4", "server_port": 8388, "password": "x", "method": "aes-256-gcm",
        "locals": [
            {"local_address": "127.0.0.1", "local_port": 1080},
            {"local_address": "127.0.0.1", "local_port": 1080, "protocol": "http"},
            {"local_address": "0.0.0.0", "local_port": 1081},
            {"local_address": "127.0.0.1", "local_port": 1082, "protocol": "tunnel"},
        ],
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    result = run("check", "-c", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("relay: error: ") for line in lines)
    assert any("open proxy" in line for line in lines) and any("forward" in line for line in lines) and any("both listen on 127.0.0.1:1080" in line for line in lines)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"server": "0.0.0.0", "server_port": 8388, "password": "x", "method": "rc4-md5"}))
    result = run("check", "-c", str(good))
    assert result.returncode == 2 and "insecure" in result.stderr
    good.write_text(json.dumps({"server": "0.0.0.0", "server_port": 8388, "password": "x", "method": "aes-128-gcm", "mode": "tcp_and_udp"}))
    result = run("check", "-c", str(good))
    assert result.returncode == 0 and result.stdout.startswith("ok: remote (shadowsocks, aes-128-gcm, tcp_and_udp)")
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"server": "127.0.0.1", "server_port": 1080, "local_port": 1080, "password": "x"}))
    result = run("check", "-c", str(loop))
    assert result.returncode == 2 and "itself" in result.stderr


def test_genkey_and_2022_key_errors():
    import base64

    for method, size in (("2022-blake3-aes-128-gcm", 16), ("2022-blake3-aes-256-gcm", 32), ("2022-blake3-chacha20-poly1305", 32)):
        result = run("genkey", "-m", method)
        assert result.returncode == 0 and len(base64.b64decode(result.stdout.strip())) == size
    result = run("remote", "--method", "2022-blake3-aes-128-gcm", "--password", base64.b64encode(bytes(32)).decode())
    assert result.returncode == 2 and "16 bytes" in result.stderr and len(result.stderr.splitlines()) == 1
    result = run("url", "--method", "2022-blake3-aes-128-gcm", "--password", base64.b64encode(bytes(16)).decode(), "--host", "198.51.100.1", "--no-qr")
    assert result.stdout.strip() == "ss://2022-blake3-aes-128-gcm:AAAAAAAAAAAAAAAAAAAAAA%3D%3D@198.51.100.1:8388"
