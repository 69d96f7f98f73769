"""The SOCKS5 front-end (RFC 1928): CONNECT to IPv4, IPv6 and domain-name targets, and UDP
ASSOCIATE when the local relays UDP (``--udp``).

A UDP association lives as long as its TCP control connection: datagrams are accepted only from
the client that asked for it (its IP, and the port it named or, if it named none, the port of its
first datagram), and closing the control connection ends the association.
"""

from __future__ import annotations

import errno
import hmac
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay import Address, HandlerSpec, ProtocolError, RelayHandler, Socks5Error, TargetRefused, hookimpl
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
    build_datagram,
    parse_datagram,
)
from relay.udp import DatagramHandler, RelayUDPServer


class Socks5Handler(RelayHandler):
    def handle(self) -> None:
        conn = self.request
        protocol = Socks5Server()
        greeting = self.next_event(protocol)
        assert isinstance(greeting, Greeting)
        users = self.session.config.auth
        method = Method.USERNAME_PASSWORD if users else Method.NO_AUTHENTICATION
        if method not in greeting.methods:
            conn.sendall(protocol.send(MethodSelection(Method.NO_ACCEPTABLE_METHODS)))
            raise Socks5Error(ReplyCode.GENERAL_FAILURE, f"client does not offer {method.name.lower().replace('_', ' ')}")
        conn.sendall(protocol.send(MethodSelection(method)))
        if users:
            self._authenticate(protocol, users)
        try:
            request = self.next_event(protocol)
            assert isinstance(request, Request)
            if request.command is Command.UDP_ASSOCIATE:
                self._associate(protocol, request)
                return
            if request.command is not Command.CONNECT:
                raise Socks5Error(ReplyCode.COMMAND_NOT_SUPPORTED, f"{request.command.name} is not supported")
            upstream = self.open_upstream(request.target)
        except (Socks5Error, TargetRefused, OSError) as e:
            if protocol.state.name in ("REQUEST", "REPLYING"):
                try:
                    conn.sendall(protocol.send(Reply(reply_code_for(e))))
                except OSError:
                    pass  # the client is gone already
            raise
        if upstream.bound is not None:
            bound = upstream.bound
        elif upstream.encoder is None:  # a direct connection: its own address is the answer
            host, port = upstream.sock.getsockname()[:2]
            bound = Address(str(host), int(port))
        else:
            bound = Reply.bound  # through a tunnel the outgoing address is the remote's to know
        conn.sendall(protocol.send(Reply(ReplyCode.SUCCEEDED, bound)))
        self.relay(upstream, early=protocol.trailing_data)

    def _authenticate(self, protocol: Socks5Server, users: Mapping[str, str]) -> None:
        """RFC 1929: a wrong user or password is answered with failure, then the connection closes."""
        try:
            credentials = self.next_event(protocol)
            assert isinstance(credentials, Credentials)
            expected = users.get(credentials.username)
            ok = expected is not None and hmac.compare_digest(expected.encode(), credentials.password.encode())
        except ProtocolError:
            self.request.sendall(protocol.send(AuthResult(False)))
            raise
        self.request.sendall(protocol.send(AuthResult(ok)))
        if not ok:
            raise ProtocolError("SOCKS5 authentication failed")

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
    def handle(self) -> None:
        data, sock = self.request
        if not permits_of(self.server).allows(self.client_address):
            self.drop("not associated")
            return
        datagram = parse_datagram(data)
        if datagram.fragment:
            self.drop("fragmented")
            return
        client = self.client_address
        association = self.association(lambda source, payload: sock.sendto(build_datagram(source, payload), client))
        if association is not None:
            self.forward(association, datagram.address, datagram.payload)


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
