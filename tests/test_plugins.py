"""The plugin contract: hooks fire once per session, a plugin can add handlers and ciphers,
and a plugin that fails ends only its own session."""

from __future__ import annotations

import logging
import os
import socketserver
import threading
from types import SimpleNamespace

import pytest
from conftest import relay_pair
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from test_pair import exchange

from relay import Address, ConfigError, HandlerSpec, TargetRefused, hookimpl
from relay.aead import Aead2017Cipher
from relay.plugin_manager import get_plugin_manager
from relay.testing import make_config, recv_until_eof, socks5_connect, start_relay, wait_until


class Recorder:
    """A plugin object recording every session hook call."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def _record(self, *item):
        with self.lock:
            self.calls.append(item)

    @hookimpl
    def relay_session_started(self, session):
        self._record("started", session.role, session.id)

    @hookimpl
    def relay_target_chosen(self, session, target):
        self._record("target", session.role, session.id, target)

    @hookimpl
    def relay_session_finished(self, session, error):
        self._record("finished", session.role, session.id, session.bytes_up, session.bytes_down, error)


def test_session_hooks_fire_once_per_session_on_both_relays(echo_target):
    recorder = Recorder()
    pm = get_plugin_manager((recorder,))
    with relay_pair(pm) as (local, remote):
        with socks5_connect(local.address, echo_target) as sock:
            assert exchange(sock, b"12345") == b"12345"
        assert wait_until(lambda: sum(c[0] == "finished" for c in recorder.calls) == 2)
    for role in ("local", "remote"):
        calls = [c for c in recorder.calls if c[1] == role]
        assert [c[0] for c in calls] == ["started", "target", "finished"]
        assert calls[1][3] == echo_target
        assert calls[2][3:] == (5, 5, None)


def test_target_veto_is_answered_not_allowed(echo_target):
    class Veto:
        @hookimpl
        def relay_target_chosen(self, session, target):
            if target.port == echo_target.port:
                raise TargetRefused("port vetoed by a plugin")

    pm = get_plugin_manager((Veto(),))
    with start_relay(make_config("serve", pm, handler="socks5", allow_private=True), pm) as proxy:
        with pytest.raises(Exception) as info:
            socks5_connect(proxy.address, echo_target)
        assert getattr(info.value, "reply_code", None) == 2


def test_failing_plugin_ends_only_its_session(echo_target, caplog):
    class Flaky:
        def __init__(self):
            self.count = 0

        @hookimpl
        def relay_session_started(self, session):
            self.count += 1
            if self.count == 1:
                raise RuntimeError("plugin bug")

    caplog.set_level(logging.INFO, logger="relay")
    pm = get_plugin_manager((Flaky(),))
    with start_relay(make_config("serve", pm, handler="echo"), pm) as server:
        import socket

        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            assert recv_until_eof(sock) == b""  # the first session is ended
        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            assert exchange(sock, b"second") == b"second"
    def errors():
        return [r for r in caplog.records if "plugin bug" in r.getMessage() or (r.exc_info and "plugin bug" in str(r.exc_info[1]))]

    assert wait_until(lambda: errors())  # logged by the session's thread, after the client saw EOF
    assert len(errors()) == 1 and errors()[0].exc_info is not None  # the traceback, logged once


def test_a_plugin_adds_a_cipher_without_touching_the_core(echo_target):
    class Aes192:
        @hookimpl
        def relay_register_ciphers(self):
            return [Aead2017Cipher("aes-192-gcm", 24, AESGCM)]

    pm = get_plugin_manager((Aes192(),))
    assert "aes-192-gcm" in pm.ciphers()
    with relay_pair(pm, method="aes-192-gcm") as (local, _):
        with socks5_connect(local.address, echo_target) as sock:
            payload = os.urandom(100_000)
            assert exchange(sock, payload) == payload


def test_a_plugin_adds_a_handler_usable_by_serve_and_remote():
    class Reverse(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.rstrip(b"\n")[::-1] + b"\n")

    plugin = SimpleNamespace(relay_register_handlers=hookimpl(lambda: [HandlerSpec("reverse", Reverse, "reverse each line")]))
    pm = get_plugin_manager((plugin,))
    with start_relay(make_config("serve", pm, handler="reverse"), pm) as server:
        import socket

        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            assert exchange(sock, b"abc\nxyz\n") == b"cba\nzyx\n"
    with relay_pair(pm, remote={"handler": "reverse"}) as (local, _):
        with socks5_connect(local.address, Address("127.0.0.1", 9)) as sock:
            assert exchange(sock, b"tunnel\n") == b"lennut\n"


def test_open_upstream_can_be_taken_over_by_a_plugin(echo_target):
    """firstresult: a plugin answering relay_open_upstream first decides where bytes go."""
    from relay.net import connect_tcp

    seen = []

    class Redirect:
        @hookimpl(tryfirst=True)
        def relay_open_upstream(self, session, target):
            if session.role != "serve":
                return None
            seen.append(target)
            from relay import Endpoint

            return Endpoint(connect_tcp(echo_target, 5))

    pm = get_plugin_manager((Redirect(),))
    with start_relay(make_config("serve", pm, handler="socks5"), pm) as proxy:
        with socks5_connect(proxy.address, Address("192.0.2.1", 80)) as sock:  # never dialled
            assert exchange(sock, b"redirected") == b"redirected"
    assert seen == [Address("192.0.2.1", 80)]


def test_duplicate_handler_names_are_a_config_error():
    class Dup:
        @hookimpl
        def relay_register_handlers(self):
            return [HandlerSpec("echo", socketserver.BaseRequestHandler)]

    with pytest.raises(ConfigError, match="echo"):
        get_plugin_manager((Dup(),)).handlers()


def test_configure_hook_can_refuse_a_config():
    class Strict:
        @hookimpl
        def relay_configure(self, config):
            if config.role == "serve":
                raise ConfigError("serve is not allowed here")

    pm = get_plugin_manager((Strict(),))
    with pytest.raises(ConfigError, match="not allowed"):
        with start_relay(make_config("serve", pm), pm):
            pass


def test_terminal_handler_sessions_report_their_bytes():
    """A handler on `relay serve` moves bytes itself; the core still reports them."""
    import socket

    recorder = Recorder()
    pm = get_plugin_manager((recorder,))
    with start_relay(make_config("serve", pm, handler="echo"), pm) as server:
        with socket.create_connection(tuple(server.address), timeout=5) as sock:
            assert exchange(sock, b"x" * 1000) == b"x" * 1000
        assert wait_until(lambda: any(c[0] == "finished" for c in recorder.calls))
    (finished,) = [c for c in recorder.calls if c[0] == "finished"]
    assert finished[3:] == (1000, 1000, None)


@pytest.mark.parametrize("wrapped", [False, True], ids=["direct", "with a wrapper"])
def test_relay_open_upstream_is_called_in_pluggys_order(wrapped):
    """The server calls relay_open_upstream's implementations itself (SessionHooks), in the order
    and with the first-result rule pluggy's own call has; with a wrapper registered, through
    pluggy. Each implementation passes (None) or answers; tryfirst, trylast and registration
    order decide who is asked first."""
    from relay.server import SessionHooks

    calls: list[str] = []

    def plugin(name: str, answer: object, **marks: bool) -> object:
        def relay_open_upstream(session, target):  # declares only what it uses
            calls.append(name)
            return answer if target == "ask " + name else None

        return SimpleNamespace(relay_open_upstream=hookimpl(**marks)(relay_open_upstream))

    plugins = [
        plugin("first", "F", tryfirst=True),
        plugin("early", "E"),
        plugin("late", "L"),
        plugin("last", "Z", trylast=True),
    ]
    if wrapped:

        class Wrapper:
            @hookimpl(wrapper=True)
            def relay_open_upstream(self, session, target, evented):
                calls.append("wrapper")
                return (yield)

        plugins.append(Wrapper())
    pm = get_plugin_manager(tuple(plugins), entry_points=False)
    pm.unregister(name="core")  # it would connect; these answer by name
    direct = SessionHooks(pm.hook).open_upstream
    for asked in ("first", "early", "late", "last", "nobody"):
        calls.clear()
        got = direct("session", "ask " + asked, True)
        by_direct = list(calls)
        calls.clear()
        assert got == pm.hook.relay_open_upstream(session="session", target="ask " + asked, evented=True)
        assert by_direct == calls, asked
        assert calls[: 2 if wrapped else 1] == (["wrapper", "first"] if wrapped else ["first"])
