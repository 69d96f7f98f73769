"""The example third-party plugin, examples/relay-rot13, used as a user would use it.

It is pip-installed into a throwaway directory (never into the test environment), and relay runs
in subprocesses with that directory on PYTHONPATH: this proves the entry point is discovered, the
plugin's CLI option is parsed, and the handler answers both on ``relay serve`` and at the far end
of a tunnel (``relay remote --handler``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import relay_command, subprocess_env

from relay import Address
from relay.testing import free_port, process_output, recv_until_eof, running_process, socks5_connect

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "relay-rot13"
STARTUP_TIMEOUT = 10.0
IO_TIMEOUT = 10.0
HOOKS = (
    "relay_register_handlers",
    "relay_add_arguments",
    "relay_configure",
    "relay_session_started",
    "relay_session_finished",
)


@pytest.fixture(scope="module")
def rot13_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example, pip-installed with --target into a temporary directory (builds a wheel)."""
    base = tmp_path_factory.mktemp("relay-rot13")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(EXAMPLE, base / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = base / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet", "--target", str(target), source],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    assert (target / "relay_rot13.py").is_file()
    return target


def env_with_path(path: Path) -> dict[str, str]:
    """The environment with ``path`` first on PYTHONPATH: importlib.metadata then finds the
    example's dist-info there, and with it the entry point."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH")) if p)
    return env


def running(args: list[str], env: dict[str, str], port: int):
    """``relay ARGS`` in a subprocess until the block ends; ready once ``port`` accepts."""
    return running_process(relay_command() + args, env=env, port=port, startup=STARTUP_TIMEOUT)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read the answer to EOF."""
    with sock:
        sock.settimeout(IO_TIMEOUT)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


def test_relay_plugins_lists_the_entry_point(rot13_path: Path) -> None:
    result = subprocess.run(
        relay_command() + ["plugins"], env=env_with_path(rot13_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    (plugin,) = [line for line in lines if line.split()[:1] == ["rot13"] and "relay_rot13" in line]
    assert "entry point (relay-rot13)" in plugin
    assert "0.1.0" in plugin
    hooks = lines[lines.index(plugin) + 1]
    for hook in HOOKS:
        assert hook in hooks
    handlers = lines[lines.index("handlers:") + 1 : lines.index("ciphers:")]
    assert any(line.split()[:1] == ["rot13"] for line in handlers)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], b"Uryyb, Jbeyq!\n"),
        (["--rot13-shift", "1"], b"Ifmmp, Xpsme!\n"),
        (["--rot13-shift", "0"], b"Hello, World!\n"),
    ],
    ids=["default", "shift-1", "shift-0"],
)
def test_serve_rot13(rot13_path: Path, options: list[str], expected: bytes) -> None:
    port = free_port()
    args = ["serve", "--handler", "rot13", "--listen", f"127.0.0.1:{port}", "-q", *options]
    with running(args, env_with_path(rot13_path), port):
        assert exchange(connect(port), b"Hello, World!\n") == expected


def test_serve_rot13_streams_every_byte(rot13_path: Path) -> None:
    """Larger than one chunk, every byte value: letters rotate, the rest passes unchanged."""
    payload = bytes(range(256)) * 1024
    port = free_port()
    args = ["serve", "--handler", "rot13", "--listen", f"127.0.0.1:{port}", "-q"]
    with running(args, env_with_path(rot13_path), port):
        answer = exchange(connect(port), payload)
    table = bytes.maketrans(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        b"NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm",
    )
    assert answer == payload.translate(table)


def test_session_hooks_log_at_debug(rot13_path: Path) -> None:
    """relay_session_started and relay_session_finished each log one line on relay.rot13 (-v)."""
    port = free_port()
    args = ["serve", "--handler", "rot13", "--listen", f"127.0.0.1:{port}", "-v"]
    with running(args, env_with_path(rot13_path), port) as proc:
        sock = connect(port)
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        assert exchange(sock, b"Hello, World!\n") == b"Uryyb, Jbeyq!\n"
        deadline = time.monotonic() + IO_TIMEOUT
        while "14 B in, 14 B out" not in process_output(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
        output = process_output(proc, limit=100_000)
    ours = [line.split("relay.rot13: ", 1)[1] for line in output.splitlines() if " relay.rot13: " in line]
    mine = [line for line in ours if f" from {client}: " in line]
    assert len(mine) == 2, ours
    assert mine[0].startswith("session ") and mine[0].endswith(": started (shift 13)")
    assert mine[1].split(": ", 1)[0] == mine[0].split(": ", 1)[0]  # the same session id and client
    assert mine[1].endswith(": 14 B in, 14 B out")


def test_bad_shift_is_refused_before_listening(rot13_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        relay_command() + ["serve", "--handler", "rot13", "--listen", f"127.0.0.1:{port}", "--rot13-shift", "26"],
        env=env_with_path(rot13_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "relay: error: --rot13-shift must be between 0 and 25, not 26" in result.stderr


def test_remote_handler_rot13_through_the_tunnel(rot13_path: Path) -> None:
    """``relay remote --handler rot13`` answers every tunnelled stream itself, whatever the target."""
    env = env_with_path(rot13_path)
    remote_port, local_port = free_port(), free_port()
    remote = ["remote", "--handler", "rot13", "--listen", f"127.0.0.1:{remote_port}", "--password", "x", "-q"]
    remote += ["--allow-private"]  # not needed (the handler answers, nothing is dialled), but the usual setup
    local = ["local", "--listen", f"127.0.0.1:{local_port}", "--server", f"127.0.0.1:{remote_port}", "--password", "x"]
    with (
        running(remote, env, remote_port),
        running(local + ["-q"], env, local_port),
    ):
        # Port 9 (discard) on loopback: nothing needs to listen there, the remote answers itself.
        sock = socks5_connect(Address("127.0.0.1", local_port), Address("127.0.0.1", 9), timeout=IO_TIMEOUT)
        assert exchange(sock, b"Hello, World!\n") == b"Uryyb, Jbeyq!\n"
        sock = socks5_connect(Address("127.0.0.1", local_port), Address("example.invalid", 443), timeout=IO_TIMEOUT)
        assert exchange(sock, b"Uryyb, Jbeyq!\n") == b"Hello, World!\n"


def test_plugin_option_alternative_without_packaging(tmp_path: Path) -> None:
    """``--plugin relay_rot13`` loads the module straight from the import path: no install, no
    entry point; the plugin is named after its module."""
    modules = tmp_path / "modules"
    modules.mkdir()
    shutil.copy(EXAMPLE / "relay_rot13.py", modules)  # a copy: no __pycache__ in the work tree
    env = env_with_path(modules)
    result = subprocess.run(
        relay_command() + ["plugins", "--plugin", "relay_rot13"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    (plugin,) = [line for line in result.stdout.splitlines() if line.split()[:1] == ["relay_rot13"]]
    assert "--plugin" in plugin
    port = free_port()
    args = ["serve", "--plugin", "relay_rot13", "--handler", "rot13", "--rot13-shift", "25"]
    args += ["--listen", f"127.0.0.1:{port}", "-q"]
    with running(args, env, port):
        assert exchange(connect(port), b"Hello, World!\n") == b"Gdkkn, Vnqkc!\n"
