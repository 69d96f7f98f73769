"""SIP008 server lists: the spec's example, one-line errors naming the server, files and HTTP."""

import http.server
import json
import logging
import time

import pytest

from relay import Address, ConfigError
from relay.sip008 import MAX_SERVER_LIST_BYTES, load_server_list, parse_server_list, pick_server
from relay.ssurl import ServerSpec
from relay.testing import free_port, serve_in_thread

# The example document of SIP008 (https://shadowsocks.org/doc/sip008.html), verbatim.
SIP008_EXAMPLE = """\
{
    "version": 1,
    "servers": [
        {
            // Server UUID to distinguish between servers when updating.
            "id": "27b8a625-4f4b-4428-9f0f-8a2317db7c79",
            "remarks": "Name of the server",
            "server": "example.com",
            "server_port": 8388,
            "password": "example",
            "method": "chacha20-ietf-poly1305",
            "plugin": "xxx",
            "plugin_opts": "xxxxx"
        },
        // Another server
        {
            "id": "7842c068-c667-41f2-8f7d-04feece3cb67",
            "remarks": "Name of the server",
            "server": "example.com",
            "server_port": 8388,
            "password": "example",
            "method": "chacha20-ietf-poly1305",
            "plugin": "xxx",
            "plugin_opts": "xxxxx"
        }
    ],
    // The above fields are mandatory.
    // Optional fields for data usage:
    "bytes_used": 274877906944,
    "bytes_remaining": 824633720832
    // You may add other custom fields in the root object.
}
"""
# Its comments explain it; they are not JSON, and SIP008 requires a standard JSON document.
SIP008_DOCUMENT = "\n".join(line for line in SIP008_EXAMPLE.splitlines() if not line.strip().startswith("//"))
FIRST_ID, SECOND_ID = "27b8a625-4f4b-4428-9f0f-8a2317db7c79", "7842c068-c667-41f2-8f7d-04feece3cb67"


def test_the_spec_example():
    servers = parse_server_list(SIP008_DOCUMENT, "example.json")
    assert servers == [
        ServerSpec(
            Address("example.com", 8388),
            "chacha20-ietf-poly1305",
            "example",
            "Name of the server",
            "xxx",
            "xxxxx",
            FIRST_ID,
        ),
        ServerSpec(
            Address("example.com", 8388),
            "chacha20-ietf-poly1305",
            "example",
            "Name of the server",
            "xxx",
            "xxxxx",
            SECOND_ID,
        ),
    ]
    assert parse_server_list(SIP008_DOCUMENT.encode(), "example.json") == servers
    assert parse_server_list(b"\xef\xbb\xbf" + SIP008_DOCUMENT.encode(), "example.json") == servers  # a BOM


def test_the_spec_example_with_its_comments_is_not_json():
    with pytest.raises(ConfigError, match=r"^server list example.json is not valid JSON: .* at line 5 column 13$"):
        parse_server_list(SIP008_EXAMPLE, "example.json")


def document(*servers, **root):
    return json.dumps({"version": 1, "servers": list(servers), **root})


def entry(**keys):
    base = {"server": "198.51.100.7", "server_port": 8388, "password": "s3cr3t-Pa55", "method": "aes-256-gcm"}
    return {key: value for key, value in {**base, **keys}.items() if value is not ...}


def test_optional_keys_may_be_absent_null_or_empty_and_unknown_keys_are_ignored():
    data = document(
        entry(),
        entry(id=None, remarks="", plugin="", plugin_opts="ignored without a plugin", custom_key=[1, 2]),
        entry(server="::1", server_port="8389"),  # libev takes the port as a string too
        entry(server="[2001:db8::1]", method=" aes-128-gcm "),
        bytes_used=1,
        bytes_remaining=2,
        provider_note={"x": 1},
    )
    first, second, third, fourth = parse_server_list(data, "list.json")
    assert first == second == ServerSpec(Address("198.51.100.7", 8388), "aes-256-gcm", "s3cr3t-Pa55")
    assert third.server == Address("::1", 8389)
    assert fourth.server == Address("2001:db8::1", 8388) and fourth.method == "aes-128-gcm"


def test_a_server_becomes_the_same_ss_url_it_would_be_given_as():
    (spec,) = parse_server_list(
        document(entry(remarks="Tokyo 1", plugin="v2ray-plugin", plugin_opts="server")), "list.json"
    )
    assert (
        spec.to_url()
        == "ss://YWVzLTI1Ni1nY206czNjcjN0LVBhNTU@198.51.100.7:8388/?plugin=v2ray-plugin%3Bserver#Tokyo%201"
    )


BAD_DOCUMENTS = [
    (b"\xff\xfe{}", "server list src is not UTF-8 text"),
    ("[]", "server list src must hold a JSON object"),
    ("[" * 100000 + "]" * 100000, "server list src is not valid JSON"),
    ('{"servers": []}', 'server list src: "version" must be 1 (SIP008), not missing'),
    ('{"version": 2, "servers": []}', '"version" must be 1 (SIP008), not 2'),
    ('{"version": "1", "servers": []}', "\"version\" must be 1 (SIP008), not '1'"),
    ('{"version": true, "servers": []}', '"version" must be 1 (SIP008), not True'),
    ('{"version": 1}', 'server list src: "servers" must be a list of server objects'),
    ('{"version": 1, "servers": {}}', '"servers" must be a list'),
    ('{"version": 1, "servers": []}', 'server list src: "servers" is empty'),
    (document(entry(), "x"), "server list src: servers[1] must be a JSON object"),
    (document(entry(), entry(server_port=...)), 'server list src: servers[1]: "server_port" is missing'),
    (document(entry(remarks="Tokyo", password=None)), "server list src: servers[0] ('Tokyo'): \"password\" is missing"),
    (document(entry(server_port=0)), '"server_port" must be a number from 1 to 65535, not 0'),
    (document(entry(server_port=65536)), '"server_port" must be a number from 1 to 65535, not 65536'),
    (document(entry(server_port="http")), "\"server_port\" must be a number from 1 to 65535, not 'http'"),
    (document(entry(server_port=True)), '"server_port" must be a number from 1 to 65535, not True'),
    (document(entry(server=["a", "b"])), "servers[0]: \"server\" must be a host name or address, not ['a', 'b']"),
    (document(entry(server="")), 'servers[0]: "server": empty host'),
    (document(entry(server="bad host")), "servers[0]: \"server\": bad host 'bad host'"),
    (document(entry(server="[::g]")), "servers[0]: \"server\": bad IPv6 address '[::g]'"),
    (document(entry(password=12345678)), 'servers[0]: "password" must be a non-empty string'),
    (document(entry(password="")), 'servers[0]: "password" must be a non-empty string'),
    (document(entry(method=7)), 'servers[0]: "method" must be a method name, not 7'),
    (document(entry(method=" ")), "servers[0]: \"method\" must be a method name, not ' '"),
    (document(entry(id=7)), 'servers[0]: "id" must be a string, not 7'),
    (document(entry(plugin=["obfs"])), "servers[0]: \"plugin\" must be a string, not ['obfs']"),
]


@pytest.mark.parametrize("data,message", BAD_DOCUMENTS)
def test_errors_name_the_source_the_server_and_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        parse_server_list(data, "src")
    text = str(info.value)
    assert message in text
    assert "\n" not in text and "s3cr3t" not in text and "12345678" not in text


SERVERS = [
    ServerSpec(Address("a.example", 1), "aes-128-gcm", "p", "Tokyo", id="id-1"),
    ServerSpec(Address("b.example", 2), "aes-128-gcm", "p", "Osaka", id="id-2"),
    ServerSpec(Address("c.example", 3), "aes-128-gcm", "p", "Osaka", id="id-3"),
    ServerSpec(Address("d.example", 4), "aes-128-gcm", "p", "id-1"),  # a name that is another server's id
    ServerSpec(Address("e.example", 5), "aes-128-gcm", "p"),
]


def test_pick_server_by_id_then_by_remarks_else_the_first():
    assert pick_server(SERVERS, None) is SERVERS[0]
    assert pick_server(SERVERS, "id-2") is SERVERS[1]
    assert pick_server(SERVERS, "Tokyo") is SERVERS[0]
    assert pick_server(SERVERS, "id-1") is SERVERS[0]  # an id wins over a remark


def test_pick_server_lists_the_choices_when_the_name_matches_none():
    with pytest.raises(ConfigError) as info:
        pick_server(SERVERS, "Paris")
    assert str(info.value) == (
        "no server named 'Paris' in the server list; choices: 'Tokyo' (id id-1), 'Osaka' (id id-2), "
        "'Osaka' (id id-3), 'id-1', (unnamed) e.example:5"
    )


def test_pick_server_refuses_a_name_two_servers_share():
    with pytest.raises(
        ConfigError, match=r"^2 servers are named 'Osaka'; choose one by id: 'Osaka' \(id id-2\), 'Osaka' \(id id-3\)$"
    ):
        pick_server(SERVERS, "Osaka")
    with pytest.raises(ConfigError, match="has no servers"):
        pick_server([], None)


def test_load_from_a_file(tmp_path):
    path = tmp_path / "servers.json"
    path.write_text(SIP008_DOCUMENT, encoding="utf-8")
    assert [s.id for s in load_server_list(str(path))] == [FIRST_ID, SECOND_ID]


def test_load_from_a_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^cannot read server list .*missing.json: No such file or directory$"):
        load_server_list(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"^cannot read server list .*: Is a directory$"):
        load_server_list(str(tmp_path))
    big = tmp_path / "big.json"
    big.write_bytes(SIP008_DOCUMENT.encode().ljust(MAX_SERVER_LIST_BYTES + 1))
    with pytest.raises(ConfigError, match=r"big.json is larger than 1048576 bytes$"):
        load_server_list(str(big))
    big.write_bytes(SIP008_DOCUMENT.encode().ljust(MAX_SERVER_LIST_BYTES))  # whitespace up to the limit is fine
    assert len(load_server_list(str(big))) == 2


@pytest.mark.parametrize("url", ["ftp://example.com/servers.json", "file:///etc/servers.json", "FTP://x/y"])
def test_other_schemes_are_refused(url):
    with pytest.raises(
        ConfigError,
        match=r"^cannot load a server list from (ftp|file):// URLs: give an http:// or https:// URL or a file path$",
    ):
        load_server_list(url)


def test_credentials_in_the_url_are_refused_and_not_shown():
    with pytest.raises(ConfigError) as info:
        load_server_list("https://user:hunter2@example.com/list.json")
    assert "not supported" in str(info.value) and "hunter2" not in str(info.value)


# A secret in the path, as SIP008 suggests: it must not show in messages.
TOKEN = "tok-9f2b7c"
ROUTES: dict = {}


class ListHandler(http.server.BaseHTTPRequestHandler):
    """Answers from ROUTES: path -> (status, headers, body, seconds to wait first)."""

    def do_GET(self):
        status, headers, body, delay = ROUTES.get(self.path, (404, {}, b"not found", 0))
        time.sleep(delay)
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should for an oversized body

    def log_message(self, format, *args):
        pass


@pytest.fixture
def no_proxy(monkeypatch):
    """urllib honours proxy settings from the environment: none may stand between a test and 127.0.0.1."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def web(no_proxy):
    """Base URL of a stdlib HTTP server on 127.0.0.1."""
    ROUTES.clear()
    with serve_in_thread(ListHandler) as address:
        yield f"http://{address}"
    ROUTES.clear()


JSON_TYPE = {"Content-Type": "application/json; charset=utf-8"}


def load_error(url, **kwargs):
    with pytest.raises(ConfigError) as info:
        load_server_list(url, **kwargs)
    text = str(info.value)
    assert TOKEN not in text and "\n" not in text
    return text


def test_load_from_a_url(web, caplog):
    ROUTES[f"/{TOKEN}/sip008.json"] = (200, JSON_TYPE, SIP008_DOCUMENT.encode(), 0)
    with caplog.at_level(logging.WARNING, logger="relay"):
        servers = load_server_list(f"{web}/{TOKEN}/sip008.json")
    assert [s.id for s in servers] == [FIRST_ID, SECOND_ID]
    assert f"server list {web}/... comes over plain HTTP" in caplog.text and TOKEN not in caplog.text


def test_a_redirect_within_http_is_followed(web):
    ROUTES["/old"] = (302, {"Location": f"/{TOKEN}/sip008.json"}, b"", 0)
    ROUTES[f"/{TOKEN}/sip008.json"] = (200, JSON_TYPE, SIP008_DOCUMENT.encode(), 0)
    assert len(load_server_list(f"{web}/old")) == 2


def test_a_redirect_out_of_http_is_refused(web):
    ROUTES[f"/{TOKEN}"] = (302, {"Location": "ftp://example.com/sip008.json"}, b"", 0)
    assert load_error(f"{web}/{TOKEN}") == f"server list {web}/...: refused a redirect from http:// to ftp://"


def test_http_errors_name_the_host_not_the_secret(web):
    assert load_error(f"{web}/{TOKEN}?key={TOKEN}") == f"cannot fetch server list {web}/...: HTTP 404 Not Found"
    ROUTES[f"/{TOKEN}"] = (200, JSON_TYPE, b'{"version": 1, "servers": [', 0)
    assert load_error(f"{web}/{TOKEN}").startswith(f"server list {web}/... is not valid JSON: ")


def test_oversized_bodies_are_refused(web):
    body = SIP008_DOCUMENT.encode().ljust(MAX_SERVER_LIST_BYTES + 1)
    ROUTES["/declared"] = (200, {**JSON_TYPE, "Content-Length": str(len(body))}, body, 0)
    ROUTES["/undeclared"] = (200, JSON_TYPE, body, 0)  # HTTP/1.0, no length: read until the bound
    assert load_error(f"{web}/declared") == f"server list {web}/... is larger than 1048576 bytes (1048577)"
    assert load_error(f"{web}/undeclared") == f"server list {web}/... is larger than 1048576 bytes"
    ROUTES["/at-limit"] = (200, JSON_TYPE, body[:-1], 0)
    assert len(load_server_list(f"{web}/at-limit")) == 2


def test_a_silent_server_times_out(web):
    ROUTES["/slow"] = (200, JSON_TYPE, SIP008_DOCUMENT.encode(), 1.5)
    started = time.monotonic()
    assert load_error(f"{web}/slow", timeout=0.3) == f"cannot fetch server list {web}/...: no answer within 0.3 s"
    assert time.monotonic() - started < 1.4


def test_a_closed_port_is_a_config_error(no_proxy):
    port = free_port()
    assert (
        load_error(f"http://127.0.0.1:{port}/{TOKEN}")
        == f"cannot fetch server list http://127.0.0.1:{port}/...: Connection refused"
    )
