"""The socketserver core: listening servers, the session life cycle, and the front-end base class.

Classes for the caller:
    RelayServer     a ThreadingTCPServer that runs one relay's handler for every connection
    RelayHandler    base class of front-end handlers (socks5, tunnel, shadowsocks): adds
                    ``open_upstream`` (the upstream hooks) and ``relay`` (the pump)

Every accepted connection becomes a Session: ``relay_session_started`` fires, the handler class
runs as socketserver runs it (setup, handle, finish), ``relay_session_finished`` fires, and one
log line says how the session ended.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import socketserver
import threading
import time
from typing import Any

from .address import Address
from .config import Config
from .endpoint import Endpoint
from .errors import ProtocolError, RelayError, TargetRefused
from .net import close_quietly, shutdown_quietly, tcp_byte_counts, tune
from .protocol import NEED_DATA, SansIO
from .pump import PumpResult, shared_pump
from .session import Session
from .threads import shared_pool

__all__ = ["ListeningAddress", "RelayServer", "RelayHandler", "run_handler", "start_terminal_handler", "log"]

log = logging.getLogger("relay")

BACKLOG = 1024
ACCEPT_BACKOFF = 0.1  # seconds the accept loop sleeps when the process is out of descriptors
_ACCEPT_BACKOFF = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class _RateLimit:
    """At most one log line per ``interval`` for a flood of the same event."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0

    def allow(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True


class ListeningAddress:
    """What relay's TCP and UDP servers share: resolving the listen address, and binding an IPv6
    socket to IPv6 only when the relay also listens elsewhere (``"server": ["::", "0.0.0.0"]``,
    as shadowsocks-libev configs have it)."""

    address_family: int
    socket_type: int
    config: Config
    server_address: Any
    socket: socket.socket
    v6only = False

    def _resolve(self, address: Address) -> tuple:
        infos = socket.getaddrinfo(address.host, address.port, type=self.socket_type, flags=socket.AI_PASSIVE)
        self.address_family = infos[0][0]
        return infos[0][4][:2]

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.v6only:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.config.workers > 1:  # type: ignore[attr-defined]
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()  # type: ignore[misc]

    @property
    def address(self) -> Address:
        host, port = self.server_address[:2]
        return Address(str(host), int(port))


class RelayServer(ListeningAddress, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """One listening socket of a relay.

    Methods for the caller: ``serve_forever()``, ``shutdown()``, ``server_close()`` (socketserver's)
    and ``close_sessions()``, which ends every live session.

    Class variables: socketserver's, set for a proxy: daemon threads, a large listen backlog,
    SO_REUSEADDR, and no joining of session threads on close (``close_sessions`` ends them).
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, config: Config, hook: Any, address: Address, v6only: bool = False) -> None:
        self.config = config
        self.hook = hook
        self.v6only = v6only
        self.udp_server: Any = None  # the RelayUDPServer on the same port, when UDP is on
        self.data: dict[str, Any] = {}  # free for plugins to keep per-server state in, as on RelayUDPServer
        self._live: set[socket.socket] = set()
        self._detached: set[socket.socket] = set()
        self._live_lock = threading.Lock()
        self._sessions = 0
        self._per_client: collections.Counter[str] = collections.Counter()
        self._refusal_log = _RateLimit(1.0)
        self.stats: collections.Counter[str] = collections.Counter()
        super().__init__(self._resolve(address), config.handler.handler)

    def verify_request(self, request: socket.socket, client_address: Any) -> bool:
        """socketserver's admission hook: refuse (close at once) beyond the session caps."""
        host = client_address[0]
        with self._live_lock:
            if self._sessions >= self.config.max_sessions:
                reason = f"{self._sessions} sessions are open (max_sessions)"
            elif self._per_client[host] >= self.config.max_sessions_per_client:
                reason = f"{host} has {self._per_client[host]} sessions open (max_sessions_per_client)"
            else:
                self._sessions += 1
                self._per_client[host] += 1
                return True
        self.stats["refused"] += 1
        if self._refusal_log.allow():
            log.warning("refusing a connection from %s: %s", _format_peer(client_address), reason)
        return False

    def session_ended(self, client_address: Any) -> None:
        host = client_address[0]
        with self._live_lock:
            self._sessions -= 1
            self._per_client[host] -= 1
            if not self._per_client[host]:
                del self._per_client[host]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """ThreadingMixIn's, with a reused thread instead of a new one per connection."""
        shared_pool().submit(self.process_request_thread, request, client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        # socket.accept() without its wrapper, which converts family and type to enums per call.
        try:
            fd, client_address = self.socket._accept()  # type: ignore[attr-defined]
        except OSError as e:
            if e.errno in _ACCEPT_BACKOFF:
                # Out of descriptors or memory: the connection stays queued and the socket stays
                # readable, so socketserver would retry at once, forever, at 100% CPU. Wait instead.
                self.stats["accept backoff"] += 1
                if self._refusal_log.allow():
                    log.warning("cannot accept: %s; backing off %.1f s", (e.strerror or str(e)).lower(), ACCEPT_BACKOFF)
                time.sleep(ACCEPT_BACKOFF)
            raise
        conn = socket.socket(self.address_family, socket.SOCK_STREAM, 0, fd)
        tune(conn)
        return conn, client_address

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        run_handler(self, self.RequestHandlerClass, request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error in the session from %s", _format_peer(client_address))

    def detach(self, request: socket.socket) -> None:
        """The pump owns ``request`` now: socketserver must not close it when handle returns."""
        with self._live_lock:
            self._detached.add(request)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._live_lock:
            if request in self._detached:
                self._detached.discard(request)
                return
        if request.fileno() != -1:
            super().shutdown_request(request)

    def track(self, sock: socket.socket) -> None:
        with self._live_lock:
            self._live.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._live_lock:
            self._live.discard(sock)

    @property
    def live_sessions(self) -> int:
        with self._live_lock:
            return len(self._live)

    def close_sessions(self) -> None:
        """Shut every live socket down: the sessions' threads wake up and end."""
        with self._live_lock:
            live = list(self._live)
        for sock in live:
            shutdown_quietly(sock, socket.SHUT_RDWR)


class RelayHandler(socketserver.BaseRequestHandler):
    """Base class of handlers that find a target and relay to it.

    Methods for subclasses:
        next_event(protocol)   drive a sans-I/O protocol object until it has an event
        open_upstream(target)  run the target hooks, return the upstream Endpoint
        close_upstream(up)     close an upstream that will not be relayed after all
        relay(upstream, ...)   hand the client and the upstream to the pump, last thing

    ``self.session`` is set before ``setup``; ``self.error`` is what ended the relay abnormally.
    While ``handle`` runs before ``relay``, the client socket has the handshake timeout.
    """

    session: Session
    server: RelayServer
    error: BaseException | None = None
    detached = False  # relay() handed the session to the pump, which ends it
    _unrelayed: list[Endpoint] | None = None  # upstreams opened but not (yet) handed to the pump

    def next_event(self, protocol: SansIO) -> Any:
        while True:
            event = protocol.next_event()
            if event is not NEED_DATA:
                return event
            protocol.receive_data(self.recv_handshake(4096))

    def recv_handshake(self, size: int) -> bytes:
        """recv for the handshake: one deadline from accept (handshake_timeout) for all of it, so
        a client trickling a byte at a time cannot hold the session open longer."""
        left = self.session.started + self.session.config.handshake_timeout - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake timeout")
        self.request.settimeout(left)
        return self.request.recv(size)

    def open_upstream(self, target: Address) -> Endpoint:
        session = self.session
        session.target = target
        hook = self.server.hook
        hook.relay_target_chosen(session=session, target=target)
        upstream = hook.relay_open_upstream(session=session, target=target)
        if upstream is None:
            raise RelayError("no plugin opened an upstream (is the core plugin registered?)")
        self.server.track(upstream.sock)
        if self._unrelayed is None:
            self._unrelayed = []
        self._unrelayed.append(upstream)
        return upstream

    def relay(self, upstream: Endpoint, decoder: Any = None, encoder: Any = None, early: bytes = b"") -> None:
        """Hand the session to the pump, which moves its bytes until it ends and then ends it.
        ``decoder``/``encoder`` frame the client's side; ``early`` is client data the handshake
        already read past, sent upstream first. Call it last in ``handle``."""
        session = self.session
        if self._unrelayed and upstream in self._unrelayed:
            self._unrelayed.remove(upstream)
        try:
            if early:
                # The client has spoken already: no reason to wait for more before the first flight.
                first = (upstream.first_flight or b"") + early
                upstream.first_flight = None
                upstream.sock.sendall(upstream.encoder.encode(first) if upstream.encoder else first)
        except BaseException:
            self.server.untrack(upstream.sock)
            upstream.close()
            raise
        client = Endpoint(self.request, decoder, encoder)
        server, request, sent_early = self.server, self.request, len(early)

        def done(result: PumpResult) -> None:
            session.bytes_up, session.bytes_down = result.bytes_up + sent_early, result.bytes_down
            server.untrack(upstream.sock)
            end_session(server, session, request, result.error)

        # From here the pump owns both sockets: this thread goes back to the pool, and the pump
        # ends the session (closes the client, logs, fires relay_session_finished).
        self.detached = True
        server.detach(request)
        shared_pump().start(client, upstream, timeout=session.config.timeout, on_done=done)

    def close_upstream(self, upstream: Endpoint) -> None:
        """Close an upstream that ``open_upstream`` gave and that will not be relayed."""
        if self._unrelayed and upstream in self._unrelayed:
            self._unrelayed.remove(upstream)
        self.server.untrack(upstream.sock)
        upstream.close()

    def finish(self) -> None:
        """Close what ``handle`` opened but never relayed (a failed reply, an early error)."""
        for upstream in self._unrelayed or ():
            self.server.untrack(upstream.sock)
            upstream.close()
        self._unrelayed = None


def run_handler(
    server: RelayServer,
    handler_class: type[socketserver.BaseRequestHandler],
    request: socket.socket,
    client_address: Any,
    session: Session | None = None,
) -> None:
    """Run ``handler_class`` on ``request`` as socketserver would, inside a session.

    Without ``session``, a new one is opened with the session hooks and closed with one log
    line. With one (a terminal handler answering a remote's tunnelled stream), the handler just
    runs in it.
    """
    config = server.config
    owner = session is None
    if session is None:
        session = Session(config=config, client=Address(*client_address[:2]), server=server, client_address=client_address)
    error: BaseException | None = None
    is_front_end = issubclass(handler_class, RelayHandler)
    server.track(request)
    try:
        if owner:
            server.hook.relay_session_started(session=session)
            request.settimeout(config.handshake_timeout if is_front_end else config.timeout)
        handler = handler_class.__new__(handler_class)
        handler.session = session  # type: ignore[attr-defined]
        handler_class.__init__(handler, request, client_address, server)
        error = getattr(handler, "error", None)
        if getattr(handler, "detached", False):
            return  # the pump ends the session
    except Exception as e:  # noqa: BLE001 - a session's failure ends that session only
        error = e
    if owner:
        if not is_front_end and session.bytes_up == session.bytes_down == 0:
            # Nothing pumped this session's bytes: ask the kernel what the handler moved.
            session.bytes_up, session.bytes_down = tcp_byte_counts(request) or (0, 0)
        end_session(server, session, request, error)
    else:
        server.untrack(request)
    if not owner and error is not None:
        log.warning("%s: handler %s failed: %s", session, handler_class.__name__, _describe(error))


def end_session(server: RelayServer, session: Session, request: socket.socket, error: BaseException | None) -> None:
    """Close the client (it sees EOF now, not after the hooks), log one line, and fire
    relay_session_finished, in a pool thread when a plugin implements it: a slow hook must not
    hold up the thread it was called from (the pump's, after a relayed session)."""
    server.untrack(request)
    server.session_ended(session.client_address)
    shutdown_quietly(request, socket.SHUT_WR)
    close_quietly(request)
    _log_end(session, error)
    if server.hook.relay_session_finished.get_hookimpls():
        shared_pool().submit(_session_finished, server, session, error)


def _session_finished(server: RelayServer, session: Session, error: BaseException | None) -> None:
    try:
        server.hook.relay_session_finished(session=session, error=error)
    except Exception:  # noqa: BLE001
        log.exception("%s: relay_session_finished hook failed", session)


def _log_end(session: Session, error: BaseException | None) -> None:
    summary = f"{session}: {session.bytes_up} B up, {session.bytes_down} B down, {session.duration:.1f} s"
    if error is None:
        log.info("%s", summary)
    elif isinstance(error, (ProtocolError, TargetRefused)):
        log.warning("%s: %s", summary, _describe(error))
    elif isinstance(error, (OSError, RelayError)):
        log.info("%s: %s", summary, _describe(error))
    else:
        log.error("%s: %s", summary, _describe(error), exc_info=error)


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = str(error)
    return f"{type(error).__name__}: {text}" if not isinstance(error, RelayError) else text


def _format_peer(address: Any) -> str:
    try:
        return str(Address(*address[:2]))
    except TypeError:
        return repr(address)


def start_terminal_handler(session: Session, handler_class: type[socketserver.BaseRequestHandler]) -> Endpoint:
    """Run a terminal handler (echo, uppercase...) for ``session`` in a thread, on one end of a
    socket pair, and return the other end as the session's upstream."""
    ours, theirs = socket.socketpair()

    def serve() -> None:
        try:
            run_handler(session.server, handler_class, theirs, tuple(session.client), session)
        finally:
            shutdown_quietly(theirs, socket.SHUT_RDWR)
            close_quietly(theirs)

    threading.Thread(target=serve, name=f"session-{session.id}-{handler_class.__name__}", daemon=True).start()
    return Endpoint(ours)
