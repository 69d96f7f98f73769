"""The SOCKS5 front-end (RFC 1928): CONNECT to IPv4, IPv6 and domain-name targets, and UDP
ASSOCIATE when the local relays UDP (``--udp``).

The handshake is sans-I/O (Socks5Handshake): relay's event loop runs it, and replies once the
upstream is connected or has failed.

A UDP association lives as long as its TCP control connection: datagrams are accepted only from
the client that asked for it (its IP, and the port it named or, if it named none, the port of its
first datagram), and closing the control connection ends the association.
"""

from __future__ import annotations

import errno
import hmac
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay import Address, Endpoint, HandlerSpec, ParsedHandshake, ProtocolError, Ready, RelayHandler, Session, Socks5Error, TargetRefused, hookimpl
from relay.socks5 import (
    AuthResult,
    Command,
    Credentials,
    Greeting,
    Method,
    MethodSelection,
    Reply,
    ReplyCode,
    Request,
    Socks5Server,
    State,
    NEED_DATA,
    build_datagram,
    parse_datagram,
)
from relay.server import send_quietly
from relay.udp import DatagramHandler, RelayUDPServer


class Socks5Handler(RelayHandler):
    """SOCKS5's handshake is sans-I/O (Socks5Handshake), so the event loop runs it; the UDP
    ASSOCIATE command then holds its control connection in a thread (``_associate``)."""

    @classmethod
    def handshake(cls, session: Session) -> Socks5Handshake:
        return Socks5Handshake(session)

    def _associate(self, protocol: Socks5Server, request: Request) -> None:
        udp: RelayUDPServer | None = self.server.udp_server
        if udp is None:
            raise Socks5Error(ReplyCode.COMMAND_NOT_SUPPORTED, "UDP ASSOCIATE needs a local started with --udp")
        conn = self.request
        permits = permits_of(udp)
        permit = permits.grant(_plain_ip(self.client_address[0]), request.target.port or None)
        try:
            bound = Address(conn.getsockname()[0], udp.address.port)
            conn.sendall(protocol.send(Reply(ReplyCode.SUCCEEDED, bound)))
            self._hold(udp, permit)
        finally:
            permits.revoke(permit)
            if permit.address is not None:
                udp.close_association(permit.address)

    def _hold(self, udp: RelayUDPServer, permit: Permit) -> None:
        """Wait for the control connection to close; give up when it and the association have
        both been idle for the UDP timeout."""
        conn = self.request
        conn.settimeout(udp.config.udp_timeout)
        moved = -1
        while True:
            try:
                if not conn.recv(4096):
                    return
            except TimeoutError:
                association = udp.associations.peek(permit.address) if permit.address is not None else None
                now = association.session.bytes_up + association.session.bytes_down if association else 0
                if now == moved:
                    return
                moved = now


class Socks5Handshake(ParsedHandshake):
    """Greeting, method selection, RFC 1929 credentials, request; replies go in ``reply``.

    CONNECT is ready with the target and replies once the upstream is connected (naming the
    bound address) or failed (a reply code for the error). A client that sent its request with
    its greeting (pipelined) has not read the method selection yet: that waits, and leaves with
    the reply to the request, one send and one packet instead of two. UDP ASSOCIATE is ready
    with ``serve``: the handler's ``_associate`` holds the control connection in a thread.
    """

    what = "the SOCKS5 handshake"

    def __init__(self, session: Session, buffer: memoryview | None = None) -> None:
        super().__init__(buffer)
        self.users = session.config.auth
        self.protocol = Socks5Server()
        self._held = b""  # replies a pipelining client gets with the reply to its CONNECT

    def received(self, nbytes: int) -> None:
        self.feed(nbytes)
        protocol = self.protocol
        try:
            while self.ready is None and (event := protocol.next_event()) is not NEED_DATA:
                if isinstance(event, Greeting):
                    self._choose_method(event)
                elif isinstance(event, Credentials):
                    self._authenticate(event)
                else:
                    self._request(event)
        except ProtocolError as e:
            if protocol.state is State.AUTHENTICATING:
                self.reply += protocol.send(AuthResult(False))  # RFC 1929: unreadable credentials fail too
            elif isinstance(e, Socks5Error):
                self.reply += self._failed(e)
            raise

    def _choose_method(self, greeting: Greeting) -> None:
        method = Method.USERNAME_PASSWORD if self.users else Method.NO_AUTHENTICATION
        if method not in greeting.methods:
            self.reply += self.protocol.send(MethodSelection(Method.NO_ACCEPTABLE_METHODS))
            raise Socks5Error(ReplyCode.GENERAL_FAILURE, f"client does not offer {method.name.lower().replace('_', ' ')}")
        self.reply += self.protocol.send(MethodSelection(method))

    def _authenticate(self, credentials: Credentials) -> None:
        """RFC 1929: a wrong user or password is answered with failure, then the connection closes."""
        expected = self.users.get(credentials.username)
        ok = expected is not None and hmac.compare_digest(expected.encode(), credentials.password.encode())
        self.reply += self.protocol.send(AuthResult(ok))
        if not ok:
            raise ProtocolError("SOCKS5 authentication failed")

    def _request(self, request: Request) -> None:
        if request.command is Command.UDP_ASSOCIATE:
            self.ready = Ready(None, serve=lambda handler: self._associate(handler, request))
            return
        if request.command is not Command.CONNECT:
            raise Socks5Error(ReplyCode.COMMAND_NOT_SUPPORTED, f"{request.command.name} is not supported")
        self._held, self.reply = self.reply, b""
        self.ready = Ready(
            request.target, early=self.protocol.trailing_data, connected=self._succeeded, failed=self._failed
        )

    def _associate(self, handler: Socks5Handler, request: Request) -> None:
        """In a thread: hold the association while the control connection lives."""
        try:
            handler._associate(self.protocol, request)
        except (Socks5Error, OSError) as e:
            send_quietly(handler.request, self._failed(e))
            raise

    def _succeeded(self, upstream: Endpoint) -> bytes:
        if upstream.bound is not None:
            bound = upstream.bound
        elif upstream.encoder is None:  # a direct connection: its own address is the answer
            host, port = upstream.sock.getsockname()[:2]
            bound = Address(str(host), int(port))
        else:
            bound = Reply.bound  # through a tunnel the outgoing address is the remote's to know
        return self._after_held(Reply(ReplyCode.SUCCEEDED, bound))

    def _failed(self, error: BaseException) -> bytes:
        if self.protocol.state.name not in ("REQUEST", "REPLYING"):
            return b""  # not at the request yet: a SOCKS5 reply would be out of turn
        return self._after_held(Reply(reply_code_for(error)))

    def _after_held(self, reply: Reply) -> bytes:
        """``reply`` as bytes, after the replies held for a pipelining client (once)."""
        held, self._held = self._held, b""
        return held + self.protocol.send(reply)


@dataclass(eq=False)
class Permit:
    ip: str
    port: int | None
    address: Any = None  # the client's UDP address, once its first datagram arrived


class Permits:
    """The clients that asked for UDP ASSOCIATE on a control connection still open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_ip: dict[str, list[Permit]] = {}

    def grant(self, ip: str, port: int | None) -> Permit:
        permit = Permit(ip, port)
        with self._lock:
            self._by_ip.setdefault(ip, []).append(permit)
        return permit

    def revoke(self, permit: Permit) -> None:
        with self._lock:
            permits = self._by_ip.get(permit.ip, [])
            if permit in permits:
                permits.remove(permit)
            if not permits:
                self._by_ip.pop(permit.ip, None)

    def allows(self, client_address: Any) -> bool:
        permits = self._by_ip.get(_plain_ip(client_address[0]))
        if not permits:
            return False
        port = client_address[1]
        with self._lock:
            for permit in permits:
                if permit.port == port and permit.address in (None, client_address):
                    permit.address = client_address
                    return True
            for permit in permits:
                if permit.port is None:
                    permit.port, permit.address = port, client_address
                    return True
        return False


def permits_of(udp: RelayUDPServer) -> Permits:
    return udp.data.setdefault("socks5.permits", Permits())


def _plain_ip(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class Socks5DatagramHandler(DatagramHandler):
    @classmethod
    def receiver(cls, server: RelayUDPServer) -> Callable[[bytes, Any], None]:
        allows = permits_of(server).allows
        send_answer = server.send_answer
        find, associate, forward, drop = server.associations.get, server.associate, server.forward, server.drop

        def receive(data: bytes, client: Any) -> None:
            if not allows(client):
                drop("not associated", client)
                return
            datagram = parse_datagram(data)
            if datagram.fragment:
                drop("fragmented", client)
                return
            association = find(client)
            if association is None:
                association = associate(client, lambda source, payload: send_answer(build_datagram(source, payload), client))
                if association is None:
                    return
            forward(association, datagram.address, datagram.payload)

        return receive


def reply_code_for(error: BaseException) -> ReplyCode:
    """The reply a client gets when its target could not be reached because of ``error``."""
    if isinstance(error, Socks5Error):
        return ReplyCode(error.reply_code)
    if isinstance(error, TargetRefused):
        return ReplyCode.CONNECTION_NOT_ALLOWED
    if isinstance(error, ConnectionRefusedError):
        return ReplyCode.CONNECTION_REFUSED
    if isinstance(error, (socket.gaierror, TimeoutError)):
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(error, OSError) and error.errno == errno.ENETUNREACH:
        return ReplyCode.NETWORK_UNREACHABLE
    if isinstance(error, OSError) and error.errno == errno.EHOSTUNREACH:
        return ReplyCode.HOST_UNREACHABLE
    return ReplyCode.GENERAL_FAILURE


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("socks5", Socks5Handler, "SOCKS5 proxy (RFC 1928): CONNECT, and UDP ASSOCIATE with --udp", Socks5DatagramHandler)]
