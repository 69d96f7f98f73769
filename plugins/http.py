"""The HTTP proxy front-end: CONNECT tunnels (RFC 9110 section 9.3.6) and plain absolute-URI
requests (``GET http://host/path``) forwarded with keep-alive.

HTTP/1.1 framing (request and response heads, Content-Length and chunked bodies, HEAD and 1xx/
204/304 without bodies, keep-alive and pipelining) is h11's: the handler only decides where
requests go and what headers are hop-by-hop.

* CONNECT host:port: the target is opened, the client gets ``200 Connection established``, and
  the pump relays the tunnel's bytes as they are.
* ``METHOD http://host[:port]/path``: the request goes to host:port with an origin-form target,
  the hop-by-hop headers dropped (RFC 9110 section 7.6.1: Connection and the headers it names,
  Proxy-Connection, Keep-Alive, TE, Upgrade, Proxy-Authorization), and the response comes back
  the same way. The connection to a host is kept for the client's next request to that host.
* Errors: a malformed request 400, a head over the size bound 431, a target that cannot be
  reached 502, a missing or wrong Basic credential 407; every wait has the handshake or idle
  timeout, so nothing hangs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

import h11

from relay import Address, Endpoint, HandlerSpec, ParsedHandshake, ProtocolError, Ready, RelayHandler, Session, TargetRefused, hookimpl
from relay.address import parse_host_port
from relay.codec import PlainDecoder
from relay.server import answer

HEAD_LIMIT = 64 * 1024
"""Bytes a request or response head may take: the bound on the header section."""

_HOP_BY_HOP = frozenset(
    b"connection proxy-connection keep-alive te trailer upgrade proxy-authorization proxy-authenticate".split()
)
_SERVER = b"relay"


class HttpHandshake(ParsedHandshake):
    """The first request head, sans-I/O (h11), so that a CONNECT runs in relay's event loop.

    A CONNECT is ready with its target and the bytes the client sent past the head; the client
    gets ``200 Connection established`` once the upstream is connected, or an error response if
    it is refused (403) or cannot be reached (502). Any other request (an absolute http:// URI:
    bodies, keep-alive, pipelining) is ready with ``serve``: ``HttpProxyHandler.serve_requests``
    goes on in a thread from that request, with this h11 connection (and what it has buffered).
    A malformed or oversized head (400, 431) and a missing or wrong credential (407) are
    answered, and the session ends.
    """

    what = "the request head"

    def __init__(self, session: Session, buffer: memoryview | None = None) -> None:
        super().__init__(buffer)  # one read of a head: h11 gathers a longer one, up to HEAD_LIMIT
        self.users = session.config.auth
        # ParsedHandshake feeds "protocol"; "http" is what this module calls an h11 connection elsewhere
        self.http = self.protocol = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)

    def received(self, nbytes: int) -> None:
        self.feed(nbytes)
        self._next_request()  # at EOF (nbytes 0), h11 says what the client left unfinished (a 400)

    def _next_request(self) -> None:
        try:
            event = self.http.next_event()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            raise self._refuse(status, "request head too large" if status == 431 else "bad request", e) from None
        if event is h11.NEED_DATA:
            return
        if isinstance(event, h11.ConnectionClosed):
            raise ProtocolError("closed before sending a request")
        if not isinstance(event, h11.Request):
            raise ProtocolError(f"unexpected {type(event).__name__} from the client")
        refused = _refusal(self.http, event, self.users)
        if refused is not None:
            self.reply, error = refused
            raise error
        if event.method != b"CONNECT":
            http = self.http
            self.ready = Ready(None, serve=lambda handler: handler.serve_requests(http, event))
            return
        try:
            target = parse_host_port(event.target.decode("ascii"), what="CONNECT target")
        except (ValueError, UnicodeDecodeError) as e:
            raise self._refuse(400, "bad CONNECT target", ProtocolError(str(e))) from None
        early, _ = self.http.trailing_data
        self.ready = Ready(target, early=bytes(early), connected=self._established, failed=lambda error: _failure_response(self.http, target, error))

    def _established(self, upstream: Endpoint) -> bytes:
        return self.http.send(h11.Response(status_code=200, reason=b"Connection established", headers=[])) or b""

    def _refuse(self, status: int, reason: str, error: BaseException) -> BaseException:
        self.reply = _error_response(self.http, status, reason)
        return _as_relay_error(error)


class HttpProxyHandler(RelayHandler):
    handle = RelayHandler.handle  # drives HttpHandshake, in the loop or (without one) in a thread

    @classmethod
    def handshake(cls, session: Session) -> HttpHandshake:
        return HttpHandshake(session)

    def serve_requests(self, http: h11.Connection, first: h11.Request) -> None:
        """Serve the connection's requests in this thread, from ``first`` on: the head the
        handshake read with ``http`` (and checked), which goes on with what it has buffered."""
        self.http = http
        self.upstream: _Upstream | None = None
        self.request.settimeout(self.session.config.timeout)  # the handshake is over: bodies and later requests get the idle timeout
        try:
            self._serve_requests(first)
        finally:
            if self.upstream is not None:
                self.close_upstream(self.upstream.endpoint)

    def _serve_requests(self, request: h11.Request) -> None:
        while True:
            if request.method == b"CONNECT":
                self._connect(request)
                return
            if not self._forward(request):
                return
            if self.http.our_state is h11.MUST_CLOSE or self.http.their_state is h11.MUST_CLOSE:
                return
            self.http.start_next_cycle()
            try:
                event = self._client_event()
            except h11.RemoteProtocolError as e:
                self._fail(e.error_status_hint, "request head too large" if e.error_status_hint == 431 else "bad request", e)
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise ProtocolError(f"unexpected {type(event).__name__} from the client")
            refused = _refusal(self.http, event, self.session.config.auth)
            if refused is not None:
                response, self.error = refused
                answer(self.request, response)
                return
            request = event

    # -- the client side

    def _client_event(self) -> h11.Event:
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.http.receive_data(self.request.recv(HEAD_LIMIT))

    def _send(self, *events: h11.Event) -> None:
        self.request.sendall(b"".join(self.http.send(event) or b"" for event in events))

    def _fail(self, status: int, reason: str, error: BaseException) -> None:
        """A whole small error response; the connection closes after it."""
        answer(self.request, _error_response(self.http, status, reason))
        self.error = _as_relay_error(error)

    # -- CONNECT

    def _connect(self, request: h11.Request) -> None:
        try:
            target = parse_host_port(request.target.decode("ascii"), what="CONNECT target")
        except (ValueError, UnicodeDecodeError) as e:
            self._fail(400, "bad CONNECT target", ProtocolError(str(e)))
            return
        try:
            upstream = self.open_upstream(target)
        except (TargetRefused, OSError) as e:
            answer(self.request, _failure_response(self.http, target, e))
            self.error = e
            return
        self._send(h11.Response(status_code=200, reason=b"Connection established", headers=[]))
        early, _ = self.http.trailing_data
        self.relay(upstream, early=bytes(early))

    # -- absolute-URI requests

    def _forward(self, request: h11.Request) -> bool:
        """Forward one request and its response; False when the client connection must end."""
        try:
            target, path = _absolute_target(request.target)
        except ValueError as e:
            self._fail(400, str(e), ProtocolError(str(e)))
            return False
        try:
            upstream = self._upstream_for(target)
        except TargetRefused as e:
            self._fail(403, "target refused", e)
            return False
        except OSError as e:
            self._fail(502, f"cannot reach {target}", e)
            return False
        headers = _end_to_end(request.headers)
        if self.http.client_is_waiting_for_100_continue:
            # Answer "100 Continue" here, where the body is read: waiting for the target's would
            # leave the client waiting for us while we wait for its body.
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
            headers = [(name, value) for name, value in headers if name != b"expect"]
        if not any(name == b"host" for name, _ in headers):
            headers.insert(0, (b"Host", request.target.split(b"/")[2]))
        try:
            upstream.send(h11.Request(method=request.method, target=path, headers=headers))
            while not isinstance(event := self._client_event(), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    self.session.bytes_up += len(event.data)
                upstream.send(event)
            upstream.send(event)
            return self._relay_response(upstream, request.method == b"HEAD")
        except (h11.RemoteProtocolError, h11.LocalProtocolError, ProtocolError, OSError) as e:
            self.upstream = None
            self.close_upstream(upstream.endpoint)
            if self.http.our_state in (h11.SEND_RESPONSE, h11.IDLE):
                self._fail(502, f"no answer from {target}", e)
            else:
                self.error = _as_relay_error(e)
            return False

    def _relay_response(self, upstream: _Upstream, head_request: bool) -> bool:
        while True:
            event = upstream.next_event()
            if isinstance(event, h11.InformationalResponse):
                self._send(h11.InformationalResponse(status_code=event.status_code, headers=_end_to_end(event.headers), reason=event.reason))
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise ProtocolError("the target closed before answering")
            break
        assert isinstance(event, h11.Response)
        self._send(h11.Response(status_code=event.status_code, headers=_end_to_end(event.headers), reason=event.reason))
        while not isinstance(event := upstream.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.ConnectionClosed):
                break  # a body delimited by the close
            self._send(event)
        self._send(h11.EndOfMessage())
        self.session.bytes_down += upstream.received
        if not upstream.reusable():
            self.upstream = None
            self.close_upstream(upstream.endpoint)
        return True

    def _upstream_for(self, target: Address) -> _Upstream:
        if self.upstream is not None and self.upstream.target == target:
            self.upstream.http.start_next_cycle()
            return self.upstream
        if self.upstream is not None:
            self.close_upstream(self.upstream.endpoint)
            self.upstream = None
        self.upstream = _Upstream(target, self.open_upstream(target), self.session.config.timeout)
        return self.upstream


class _Upstream:
    """An HTTP client connection to one target over an Endpoint (plain, or a Shadowsocks tunnel)."""

    def __init__(self, target: Address, endpoint: Endpoint, timeout: float) -> None:
        self.target = target
        self.endpoint = endpoint
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=HEAD_LIMIT)
        self.decoder = endpoint.decoder or PlainDecoder()
        self.received = 0
        endpoint.sock.settimeout(timeout)

    def send(self, event: h11.Event) -> None:
        data = self.http.send(event) or b""
        if self.endpoint.first_flight is not None:
            data, self.endpoint.first_flight = self.endpoint.first_flight + data, None
        if data:
            encoder = self.endpoint.encoder
            self.endpoint.sock.sendall(encoder.encode(data) if encoder is not None else data)

    def next_event(self) -> h11.Event:
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.Data):
                    self.received += len(event.data)
                return event
            n = self.endpoint.sock.recv_into(self.decoder.recv_buffer())
            if not n:
                self.decoder.eof()
                self.http.receive_data(b"")  # h11's EOF
            elif plaintext := self.decoder.received(n):  # empty while a chunk is incomplete: not EOF
                self.http.receive_data(bytes(plaintext))

    def reusable(self) -> bool:
        return self.http.our_state is h11.DONE and self.http.their_state is h11.DONE


_PHRASES = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large", 502: "Bad Gateway"}
_NEEDS_CREDENTIALS = (407, "Proxy Authentication Required", "relay: proxy authentication required", [(b"Proxy-Authenticate", b'Basic realm="relay"')])


def _response(http: h11.Connection, status: int, reason: str, text: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole small response for the connection to close after; b"" if ``http`` is in no
    state to answer."""
    body = (text + "\n").encode()
    head = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", str(len(body)).encode()), (b"Connection", b"close"), *headers]
    try:
        return b"".join(http.send(event) or b"" for event in (h11.Response(status_code=status, reason=reason.encode(), headers=head), h11.Data(data=body), h11.EndOfMessage()))
    except h11.LocalProtocolError:
        return b""


def _error_response(http: h11.Connection, status: int, reason: str) -> bytes:
    return _response(http, status, _PHRASES.get(status, reason), f"relay: {reason}")


def _failure_response(http: h11.Connection, target: Address, error: BaseException) -> bytes:
    """What a CONNECT gets when its target cannot be opened: 403 refused, else 502."""
    if isinstance(error, TargetRefused):
        return _error_response(http, 403, "target refused")
    return _error_response(http, 502, f"cannot reach {target}")


def _refusal(http: h11.Connection, request: h11.Request, users: dict[str, str]) -> tuple[bytes, BaseException] | None:
    """A request head relay will not serve, first or later on a connection: the response that
    refuses it and the session's error (431 for a head over HEAD_LIMIT, which h11 bounds only
    while it arrives; 407 without good credentials); None to go on."""
    if _head_size(request) > HEAD_LIMIT:
        return _error_response(http, 431, "request head too large"), ProtocolError(f"request head over {HEAD_LIMIT} bytes")
    if users and not _authorized(request.headers, users):
        return _response(http, *_NEEDS_CREDENTIALS), ProtocolError("proxy authentication failed")
    return None


def _authorized(headers: Iterable[tuple[bytes, bytes]], users: dict[str, str]) -> bool:
    for name, value in headers:
        if name == b"proxy-authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"basic" and _check_basic(credentials.strip(), users):
                return True
    return False


def _absolute_target(target: bytes) -> tuple[Address, bytes]:
    try:
        url = urlsplit(target.decode("ascii"))
    except UnicodeDecodeError:
        raise ValueError("request target is not ASCII") from None
    if url.scheme != "http" or not url.hostname:
        raise ValueError("a proxy request needs an absolute http:// URI (use CONNECT for https)")
    try:
        port = url.port or 80
    except ValueError:
        raise ValueError("bad port in the request URI") from None
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    return Address(url.hostname, port), path.encode("ascii")


def _end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers without the hop-by-hop ones, including those the Connection header names."""
    headers = list(headers)
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    return [(name, value) for name, value in headers if name not in _HOP_BY_HOP and name not in named]


def _head_size(request: h11.Request) -> int:
    """The bytes of a request head as sent (give or take optional whitespace)."""
    line = len(request.method) + len(request.target) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


def _as_relay_error(error: BaseException) -> BaseException:
    """h11's errors are protocol errors: one log line, no traceback."""
    if isinstance(error, h11.ProtocolError):
        return ProtocolError(str(error))
    return error


def _check_basic(credentials: bytes, users: dict[str, str]) -> bool:
    try:
        user, _, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = users.get(user)
    return expected is not None and hmac.compare_digest(expected.encode(), password.encode())


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("http", HttpProxyHandler, "HTTP proxy: CONNECT, and http:// requests with keep-alive")]
