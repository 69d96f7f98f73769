"""Config: shadowsocks-libev JSON keys accepted as they are, flags over the file, one-line errors."""

import json

import pytest

from relay import Address, ConfigError
from relay.config import load_file
from relay.testing import make_config


def test_libev_local_config_unchanged(pm):
    libev = {
        "server": "198.51.100.7",
        "server_port": 8388,
        "local_address": "127.0.0.1",
        "local_port": 1080,
        "password": "barfoo!",
        "method": "aes-256-gcm",
        "timeout": 60,
        "mode": "tcp_only",
        "fast_open": False,
        "nameserver": "1.1.1.1",
    }
    config = make_config("local", pm, file=libev, listen=None)
    assert config.listen == (Address("127.0.0.1", 1080),)
    assert config.server == Address("198.51.100.7", 8388)
    assert config.method == "aes-256-gcm" and config.timeout == 60
    assert config.key == config.cipher.key_from_password("barfoo!")
    assert config.handler.name == "mixed"  # SOCKS5, SOCKS4/4a and HTTP on one port
    assert config.warnings == ()


def test_libev_server_config_listens_on_server_keys(pm):
    config = make_config("remote", pm, file={"server": ["::1", "127.0.0.1"], "server_port": "8389", "password": "x"}, listen=None)
    assert config.listen == (Address("::1", 8389), Address("127.0.0.1", 8389))
    assert config.handler.name == "shadowsocks" and config.upstream_handler is None


def test_flags_override_file(pm):
    config = make_config("remote", pm, file={"server": "0.0.0.0", "server_port": 8388, "password": "a", "method": "aes-128-gcm"}, listen="127.0.0.1:9", password="b", method="aes-256-gcm")
    assert config.listen == (Address("127.0.0.1", 9),)
    assert config.password == "b" and config.method == "aes-256-gcm"


def test_defaults(pm):
    local = make_config("local", pm, listen=None, server="127.0.0.1:8388", password="p")
    assert local.listen == (Address("127.0.0.1", 1080),)
    assert local.method == "chacha20-ietf-poly1305" and local.timeout == 300 and not local.allow_private
    assert make_config("serve", pm, listen=None).listen == (Address("127.0.0.1", 9999),)


def test_numeric_password_is_its_digits_as_in_libev(pm):
    assert make_config("remote", pm, file={"password": 12345678}).key == make_config("remote", pm, password="12345678").key


def test_base64_key_instead_of_password(pm):
    config = make_config("remote", pm, key="AAECAwQFBgcICQoLDA0ODw==", method="aes-128-gcm")
    assert config.key == bytes(range(16))


def test_tunnel_and_handler(pm):
    config = make_config("local", pm, server="h:1", password="p", protocol="tunnel", forward="[::1]:53")
    assert config.handler.name == "tunnel" and config.forward == Address("::1", 53)
    assert make_config("local", pm, file={"tunnel_address": "1.2.3.4:5"}, server="h:1", password="p", protocol="tunnel").forward == Address("1.2.3.4", 5)
    assert make_config("remote", pm, password="p", handler="echo").upstream_handler.name == "echo"
    assert make_config("serve", pm, handler="uppercase").handler.name == "uppercase"


@pytest.mark.parametrize(
    "role,flags,file,message",
    [
        ("remote", {"method": "rot-1"}, {"password": "p"}, "unknown method 'rot-1'"),
        ("remote", {"method": "rc4-md5", "password": "p"}, {}, "insecure"),
        ("remote", {}, {}, "password is required"),
        ("local", {"password": "p"}, {}, "needs its remote"),
        ("local", {"password": "p", "server": "nohostport"}, {}, "bad server"),
        ("remote", {"password": "p", "listen": "1.2.3.4:70000"}, {}, "0 to 65535"),
        ("remote", {"password": "p", "listen": None}, {"server": "0.0.0.0", "server_port": "http"}, "server_port"),
        ("remote", {"password": "p"}, {"timeout": "soon"}, '"timeout"'),
        ("remote", {"password": "p"}, {"timeout": -1}, "positive"),
        ("remote", {"password": "p"}, {"mode": "both"}, '"mode"'),
        ("remote", {"password": "p"}, {"allow_private": "yes"}, "allow_private"),
        ("remote", {"key": "AAEC", "method": "aes-128-gcm"}, {}, "16 bytes"),
        ("remote", {"password": "p", "handler": "nope"}, {}, "unknown handler 'nope'"),
        ("local", {"password": "p", "server": "h:1", "protocol": "tunnel"}, {}, "--forward"),
        ("local", {"password": "p", "server": "h:1"}, {"plugin": "obfs-local"}, "SIP003"),
        ("remote", {"password": "p"}, {"udp_max_associations": 0}, "udp_max_associations"),
        ("remote", {"password": "p"}, {"plugins": 5}, '"plugins"'),
        ("remote", {"password": "p"}, {"one_time_auth": True}, "OTA"),
        ("remote", {"password": "p"}, {"auth": True}, "OTA"),
        ("remote", {"password": "p"}, {"egress": {"deny": "10.0.0.0/8"}}, '"egress"'),
        ("remote", {"password": "p"}, {"handler": ["echo"]}, '"handler"'),
        ("remote", {"password": "p"}, {"udp_timeout": "never"}, "udp_timeout"),
    ],
)
def test_errors_name_the_problem(pm, role, flags, file, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        make_config(role, pm, file=file, **flags)
    assert "\n" not in str(info.value)


def test_a_remote_handler_must_answer_by_itself(pm):
    """A front-end (socks5, tunnel...) relays to a target of its own: refused as a remote's
    --handler when the relay starts (the core plugin's relay_configure), in one line."""
    pm.hook.relay_configure(config=make_config("remote", pm, password="p", handler="echo"))
    with pytest.raises(ConfigError, match="handler 'socks5' is a front-end") as info:
        pm.hook.relay_configure(config=make_config("remote", pm, password="p", handler="socks5"))
    assert "\n" not in str(info.value)


def test_unknown_key_is_a_warning(pm):
    config = make_config("remote", pm, file={"password": "p", "passwrod": "typo"})
    assert any("passwrod" in w for w in config.warnings)


def test_udp_settings(pm):
    config = make_config("remote", pm, file={"password": "p", "mode": "tcp_and_udp", "udp_timeout": 60, "udp_max_associations": 10})
    assert config.tcp and config.udp and config.udp_timeout == 60 and config.udp_max_associations == 10
    only = make_config("local", pm, server="h:1", password="p", mode="udp_only")
    assert only.udp and not only.tcp and only.udp_timeout == 300 and only.udp_max_associations == 1024
    assert not make_config("remote", pm, password="p").udp


def test_load_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"server": "x",\n "password": }')
    with pytest.raises(ConfigError, match="not valid JSON.*line 2"):
        load_file(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(str(tmp_path / "missing.json"))
    listy = tmp_path / "list.json"
    listy.write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="object"):
        load_file(str(listy))
