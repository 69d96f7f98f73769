"""ss:// URLs: SIP002's examples, every accepted form, round trips, errors that keep the password out."""

import base64
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import Address, ConfigError
from relay.ssurl import ServerSpec, format_ss_url, parse_ss_url

# SIP002's own examples (https://shadowsocks.org/doc/sip002.html), with what they mean.
SIP002_EXAMPLES = [
    (
        "ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1",
        ServerSpec(Address("192.168.100.1", 8888), "aes-128-gcm", "test", "Example1"),
    ),
    (
        "ss://cmM0LW1kNTpwYXNzd2Q@192.168.100.1:8888/?plugin=obfs-local%3Bobfs%3Dhttp#Example2",
        ServerSpec(Address("192.168.100.1", 8888), "rc4-md5", "passwd", "Example2", "obfs-local", "obfs=http"),
    ),
    (
        "ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888#Example3",
        ServerSpec(
            Address("192.168.100.1", 8888),
            "2022-blake3-aes-256-gcm",
            "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI=",
            "Example3",
        ),
    ),
    (
        "ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888/?plugin=v2ray-plugin%3Bserver#Example3",
        ServerSpec(
            Address("192.168.100.1", 8888),
            "2022-blake3-aes-256-gcm",
            "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI=",
            "Example3",
            "v2ray-plugin",
            "server",
        ),
    ),
]


@pytest.mark.parametrize("url,spec", SIP002_EXAMPLES)
def test_sip002_examples_parse(url, spec):
    assert parse_ss_url(url) == spec  # == compares the password too; only repr leaves it out


@pytest.mark.parametrize("url,spec", SIP002_EXAMPLES)
def test_sip002_examples_are_what_format_writes(url, spec):
    # base64url without padding for AEAD; plain percent-encoded userinfo for 2022 methods, unasked.
    assert spec.to_url() == url


def test_sip002_example_with_unsupported_query_arguments():
    url = "ss://YmYtY2ZiOnRlc3Q@192.168.100.1:8888/?plugin=url-encoded-plugin-argument-value&unsupported-arguments=should-be-ignored#Dummy+profile+name"
    spec = parse_ss_url(url)
    assert (spec.method, spec.password, spec.server) == ("bf-cfb", "test", Address("192.168.100.1", 8888))
    assert spec.plugin == "url-encoded-plugin-argument-value" and spec.plugin_opts is None
    assert spec.tag == "Dummy+profile+name"  # the fragment is percent-decoded, not form-decoded


# A password whose standard base64 has '+' and '/', so both alphabets really differ.
METHOD, PASSWORD = "aes-256-gcm", ">>>>>? w@rd:#x"
ACCOUNT = f"{METHOD}:{PASSWORD}".encode()
STANDARD = base64.b64encode(ACCOUNT).decode()
URLSAFE = base64.urlsafe_b64encode(ACCOUNT).decode()


def test_the_password_exercises_both_alphabets_and_padding():
    assert "+" in STANDARD and "/" in STANDARD and STANDARD.endswith("=")
    assert "-" in URLSAFE and "_" in URLSAFE


def legacy(host: str, alphabet=base64.urlsafe_b64encode, pad=True) -> str:
    encoded = alphabet(ACCOUNT + b"@" + host.encode() + b":8388").decode()
    return encoded if pad else encoded.rstrip("=")


@pytest.mark.parametrize(
    "host,written", [("198.51.100.7", "198.51.100.7"), ("2001:db8::7", "[2001:db8::7]"), ("example.com", "example.com")]
)
@pytest.mark.parametrize(
    "form",
    [
        "ss://{urlsafe_nopad}@{host}:8388#Tokyo%201",
        "ss://{urlsafe}@{host}:8388#Tokyo%201",
        "ss://{urlsafe_pct}@{host}:8388#Tokyo%201",  # padding percent-encoded, as some Python tools write it
        "ss://{standard}@{host}:8388#Tokyo%201",
        "ss://{standard_nopad}@{host}:8388/#Tokyo%201",
        "ss://{plain}@{host}:8388#Tokyo%201",
        "ss://{plain_all}@{host}:8388#Tokyo%201",  # the ':' between method and password encoded too
        "ss://{legacy}#Tokyo%201",
        "ss://{legacy_nopad}#Tokyo%201",
        "ss://{legacy_standard}#Tokyo%201",
        "SS://{urlsafe_nopad}@{host}:8388/?unknown=1#Tokyo%201",
        "  ss://{urlsafe_nopad}@{host}:8388#Tokyo%201\n",
    ],
)
def test_every_accepted_form_means_the_same_server(form, host, written):
    url = form.format(
        host=written,
        urlsafe_nopad=URLSAFE.rstrip("="),
        urlsafe=URLSAFE,
        urlsafe_pct=URLSAFE.replace("=", "%3D"),
        standard=STANDARD,
        standard_nopad=STANDARD.rstrip("="),
        plain=f"{quote(METHOD, safe='')}:{quote(PASSWORD, safe='')}",
        plain_all=quote(f"{METHOD}:{PASSWORD}", safe=""),
        legacy=legacy(written),
        legacy_nopad=legacy(written, pad=False),
        legacy_standard=legacy(written, base64.b64encode),
    )
    assert parse_ss_url(url) == ServerSpec(Address(host, 8388), METHOD, PASSWORD, "Tokyo 1")


def test_legacy_form_from_a_shell_pipeline_with_a_trailing_newline():
    # echo "$method:$password@$host:$port" | base64   (echo adds the newline)
    url = "ss://" + base64.b64encode(b"chacha20-ietf-poly1305:secret@198.51.100.7:8388\n").decode()
    assert parse_ss_url(url) == ServerSpec(Address("198.51.100.7", 8388), "chacha20-ietf-poly1305", "secret")


def test_legacy_password_may_hold_at_signs():
    url = "ss://" + base64.urlsafe_b64encode(b"aes-128-gcm:a@b@c@[::1]:443").decode()
    spec = parse_ss_url(url)
    assert spec.password == "a@b@c" and spec.server == Address("::1", 443)


def test_url_from_a_shadowsocks_libev_config():
    # The shape of Debian's /etc/shadowsocks-libev/config.json: "server" may be a list of hosts.
    libev = {
        "server": ["::1", "127.0.0.1"],
        "mode": "tcp_and_udp",
        "server_port": 8388,
        "local_port": 1080,
        "password": "bm2hLuAHoltQ",
        "timeout": 86400,
        "method": "chacha20-ietf-poly1305",
    }
    for host in libev["server"]:
        url = format_ss_url(libev["method"], libev["password"], Address(host, libev["server_port"]), "libev")
        assert url.startswith("ss://Y2hhY2hhMjAtaWV0Zi1wb2x5MTMwNTpibTJoTHVBSG9sdFE@")
        spec = parse_ss_url(url)
        assert (spec.method, spec.password, spec.server, spec.tag) == (
            libev["method"],
            libev["password"],
            Address(host, 8388),
            "libev",
        )
    assert "@[::1]:8388#" in format_ss_url(libev["method"], libev["password"], Address("::1", 8388), "libev")


def test_plugin_name_and_options_split_at_the_first_semicolon():
    url = "ss://YWVzLTEyOC1nY206dGVzdA@example.com:443/?plugin=obfs-local%3Bobfs%3Dhttp%3Bobfs-host%3Dexample.org"
    spec = parse_ss_url(url)
    assert (spec.plugin, spec.plugin_opts) == ("obfs-local", "obfs=http;obfs-host=example.org")
    assert parse_ss_url(url.replace("%3Bobfs%3Dhttp%3Bobfs-host%3Dexample.org", "")).plugin_opts is None
    assert parse_ss_url(url.split("?")[0] + "?plugin=").plugin is None


def test_tag_is_percent_decoded():
    spec = parse_ss_url("ss://YWVzLTEyOC1nY206dGVzdA@example.com:443#%E6%9D%B1%E4%BA%AC%20%231")
    assert spec.tag == "東京 #1"
    assert parse_ss_url("ss://YWVzLTEyOC1nY206dGVzdA@example.com:443#").tag is None


def test_format_plain_on_request_and_always_for_2022_methods():
    server = Address("example.com", 443)
    assert format_ss_url("aes-128-gcm", "a/b+c=", server) == "ss://YWVzLTEyOC1nY206YS9iK2M9@example.com:443"
    assert format_ss_url("aes-128-gcm", "a/b+c=", server, plain=True) == "ss://aes-128-gcm:a%2Fb%2Bc%3D@example.com:443"
    assert (
        format_ss_url("2022-blake3-aes-128-gcm", "a/b+c=", server)
        == "ss://2022-blake3-aes-128-gcm:a%2Fb%2Bc%3D@example.com:443"
    )


def test_format_plugin_and_tag():
    url = format_ss_url(
        "aes-128-gcm",
        "test",
        Address("::1", 8388),
        "my server",
        plugin="v2ray-plugin",
        plugin_opts="mode=websocket;host=a.example",
    )
    assert (
        url
        == "ss://YWVzLTEyOC1nY206dGVzdA@[::1]:8388/?plugin=v2ray-plugin%3Bmode%3Dwebsocket%3Bhost%3Da.example#my%20server"
    )
    with pytest.raises(ValueError):
        format_ss_url("aes-128-gcm", "test", Address("::1", 8388), plugin_opts="x")


def test_password_is_not_in_the_repr():
    spec = parse_ss_url("ss://YWVzLTEyOC1nY206dGVzdA@example.com:443")
    assert "test" not in repr(spec) and "YWVz" not in repr(spec)


SECRET = "s3cr3t-Pa55"


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


GOOD = b64(f"aes-256-gcm:{SECRET}")

MALFORMED = [
    (f"http://{GOOD}@example.com:8388", "must start with ss://"),
    (f"aes-256-gcm:{SECRET}@example.com:8388", "must start with ss://"),
    ("ss://example.com:8388", "no method and password"),
    (f"ss://aes-256-gcm:{SECRET}#x@example.com:8388", "no method and password"),  # '#' not percent-encoded
    (f"ss://{GOOD}@example.com", "port is missing"),
    (f"ss://{GOOD}@example.com:0", "bad port '0'"),
    (f"ss://{GOOD}@example.com:65536", "bad port '65536'"),
    (f"ss://{GOOD}@example.com:http", "bad port 'http'"),
    (f"ss://{GOOD}@example.com:", "bad port ''"),
    (f"ss://{GOOD}@example.com:8388/path", "unexpected path '/path'"),
    (f"ss://{GOOD}@2001:db8::1:8388", "IPv6 host goes in brackets"),
    (f"ss://{GOOD}@[2001:db8::g]:8388", "bad IPv6 address"),
    (f"ss://{GOOD}@[::1]8388", "expected [IPv6]:PORT"),
    (f"ss://{GOOD}@[::1:8388", "expected [IPv6]:PORT"),
    (f"ss://{GOOD}@:8388", "empty host"),
    (f"ss://{GOOD}@exa mple.com:8388", "bad host 'exa mple.com'"),
    (f"ss://{GOOD}@300.1.2.3:8388", "bad IPv4 address '300.1.2.3'"),
    (f"ss://{b64(SECRET)}@example.com:8388", "neither method:password nor base64"),
    (f"ss://{SECRET}!@example.com:8388", "neither method:password nor base64"),
    (
        f"ss://{base64.urlsafe_b64encode(b'aes-256-gcm:' + SECRET.encode() + bytes([255])).decode()}@example.com:8388",
        "neither",
    ),
    (f"ss://:{SECRET}@example.com:8388", "empty method"),
    ("ss://aes-256-gcm:@example.com:8388", "empty password"),
    (f"ss://aes-256-gcm:{SECRET}%FF@example.com:8388", "not percent-encoded UTF-8"),
    (f"ss://{GOOD}@example.com:8388/?plugin=%3Bopts", "no plugin name"),
    (f"ss://{GOOD}@example.com:8388/?plugin=a&plugin=b", "more than once"),
    ("ss://", "not the legacy form"),
    (f"ss://{b64('aes-256-gcm:' + SECRET)}", "not the legacy form"),  # legacy without @host:port
    (f"ss://{b64('aes-256-gcm:' + SECRET + '@example.com')}", "port is missing"),
    (f"ss://{b64(SECRET + '@example.com:8388')}", "not the legacy form"),
]


@pytest.mark.parametrize("url,message", MALFORMED)
def test_malformed_url_says_what_is_wrong_without_the_password(url, message):
    with pytest.raises(ConfigError) as info:
        parse_ss_url(url)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    for secret in (SECRET, quote(SECRET), GOOD, b64(SECRET), "Pa55"):
        assert secret not in text


printable = st.characters(blacklist_categories=("Cs", "Cc"))
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(
        r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}", fullmatch=True
    ).filter(lambda h: not all(label.isdigit() for label in h.split("."))),
)


@settings(max_examples=300)
@given(
    method=st.text(printable, min_size=1).filter(lambda m: ":" not in m),
    password=st.text(printable, min_size=1),
    host=hosts,
    port=st.integers(1, 65535),
    tag=st.none() | st.text(printable, min_size=1),
    plugin=st.none() | st.text(printable, min_size=1).filter(lambda p: ";" not in p),
    plugin_opts=st.none() | st.text(printable, min_size=1),
    plain=st.booleans(),
)
def test_round_trip(method, password, host, port, tag, plugin, plugin_opts, plain):
    plugin_opts = plugin_opts if plugin else None
    spec = ServerSpec(Address(host, port), method, password, tag, plugin, plugin_opts)
    url = spec.to_url(plain=plain)
    assert parse_ss_url(url) == spec
    assert url.isascii() and " " not in url


@given(st.text(max_size=200))
def test_any_text_is_a_server_or_a_config_error(text):
    for url in (text, "ss://" + text):
        try:
            spec = parse_ss_url(url)
        except ConfigError as e:
            assert "\n" not in str(e)
        else:
            assert spec.method and spec.password and 0 < spec.server.port < 65536
