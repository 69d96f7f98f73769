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
import select
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .address import Address
from .config import Config
from .endpoint import Endpoint
from .errors import ProtocolError, RelayError, TargetRefused, WouldBlock
from .hookspecs import is_nonblocking
from .net import close_quietly, set_receive_timeout, shutdown_quietly, tcp_byte_counts, tune
from .protocol import NEED_DATA, SansIO
from .pump import _DONTWAIT, PumpResult, shared_pump
from .session import Session
from .threads import shared_pool

__all__ = ["ListeningAddress", "RelayServer", "RelayHandler", "Handshake", "Ready", "drain", "discard_pending", "send_quietly", "refusal", "run_handler", "start_terminal_handler", "log"]

log = logging.getLogger("relay")

BACKLOG = 1024
ACCEPT_BACKOFF = 0.1  # seconds the accept loop sleeps when the process is out of descriptors
ACCEPT_BATCH = 64  # connections the event loop accepts in one turn before serving others
_INHERITS_NODELAY = sys.platform.startswith("linux")  # a listener's TCP_NODELAY passes to what it accepts
_LISTEN_EVENTS = select.EPOLLIN if hasattr(select, "epoll") else select.POLLIN
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


class SessionHooks:
    """Which session hooks have implementations, and which may run in the event loop: looked up
    once when a server starts serving (plugins are registered by then), not per session.

    ``open_upstream(session, target, evented)`` calls relay_open_upstream's implementations as
    pluggy would (its order, the first result that is not None), without pluggy's dispatch,
    which costs a few microseconds a call; with a wrapper registered, it is pluggy's call."""

    __slots__ = ("started", "started_in_loop", "chosen", "open_in_loop", "finished", "open_upstream")

    def __init__(self, hook: Any) -> None:
        self.started = bool(hook.relay_session_started.get_hookimpls())
        self.started_in_loop = is_nonblocking(hook.relay_session_started)
        self.chosen = bool(hook.relay_target_chosen.get_hookimpls())
        self.open_in_loop = is_nonblocking(hook.relay_target_chosen) and is_nonblocking(hook.relay_open_upstream)
        self.finished = bool(hook.relay_session_finished.get_hookimpls())
        self.open_upstream = _first_result(hook.relay_open_upstream, ("session", "target", "evented"))


def _first_result(caller: Any, argnames: tuple[str, ...]) -> Callable[..., Any]:
    """A firstresult hook as a plain function of ``argnames`` (positional), calling its
    implementations in pluggy's order (tryfirst first, trylast last, later registrations
    before earlier ones) until one returns something other than None."""
    impls = list(reversed(caller.get_hookimpls()))
    if any(impl.hookwrapper or getattr(impl, "wrapper", False) for impl in impls):
        return lambda *args: caller(**dict(zip(argnames, args)))
    in_order = tuple(range(len(argnames)))
    calls = []
    for impl in impls:
        positions = tuple(argnames.index(name) for name in impl.argnames)
        calls.append((impl.function, None if positions == in_order else positions))  # None: pass args as they are
    if len(calls) == 1 and calls[0][1] is None:
        return calls[0][0]  # one implementation, taking the arguments in order: it is the call

    def first_result(*args: Any) -> Any:
        for function, positions in calls:
            result = function(*args) if positions is None else function(*[args[i] for i in positions])
            if result is not None:
                return result
        return None

    return first_result


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
        self._accepting = threading.Lock()
        self._idle_acceptors = 0
        self._shutdown_requested = False
        self._is_shut_down = threading.Event()
        self._is_shut_down.set()
        self._stop_serving = threading.Event()
        self._backoff: Any = None  # the pump timer that resumes accepting after a backoff
        self.session_hooks = SessionHooks(hook)
        super().__init__(self._resolve(address), config.handler.handler)

    def verify_request(self, request: socket.socket, client_address: Any, track: bool = False) -> bool:
        """socketserver's admission hook: refuse (close at once) beyond the session caps.
        ``track``: and, when admitted, track ``request`` as live (under the same lock)."""
        host = client_address[0]
        with self._live_lock:
            if self._sessions >= self.config.max_sessions:
                reason = f"{self._sessions} sessions are open (max_sessions)"
            elif self._per_client[host] >= self.config.max_sessions_per_client:
                reason = f"{host} has {self._per_client[host]} sessions open (max_sessions_per_client)"
            else:
                self._sessions += 1
                self._per_client[host] += 1
                if track:
                    self._live.add(request)
                return True
        self.stats["refused"] += 1
        if self._refusal_log.allow():
            log.warning("refusing a connection from %s: %s", _format_peer(client_address), reason)
        return False

    def session_ended(self, client_address: Any, request: socket.socket, upstream: socket.socket | None = None) -> None:
        """A session admitted by ``verify_request`` ended: forget its sockets (``untrack``) and
        count it out, under one lock."""
        host = client_address[0]
        with self._live_lock:
            self._live.discard(request)
            if upstream is not None:
                self._live.discard(upstream)
            self._sessions -= 1
            self._per_client[host] -= 1
            if not self._per_client[host]:
                del self._per_client[host]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and serve until ``shutdown()``, in one of two ways.

        Evented (``serves_evented()``): the process's event loop (the pump) accepts, runs each
        session's handshake and relays it; no thread per connection.

        Otherwise, leader/followers: every serving thread blocks in accept() itself and runs the
        session it accepted, so a connection is never handed from an accepting thread to a
        serving one (a wake-up and a GIL transfer per connection). The kernel wakes one waiting
        thread per connection. When the last idle acceptor takes a connection, it starts another
        first (from the shared pool), so someone is always accepting; an extra acceptor idle for
        the pool's idle timeout leaves.

        ``poll_interval`` is socketserver's and unused: shutdown() wakes the acceptors at once.
        """
        self._is_shut_down.clear()
        self.session_hooks = SessionHooks(self.hook)
        try:
            if self.serves_evented():
                self._serve_in_loop()
            else:
                # The acceptors are pool threads: this one only waits, so that a session an
                # acceptor is running does not hold up shutdown().
                shared_pool().submit(self._accept_loop, True)
                self._stop_serving.wait()
        finally:
            self._is_shut_down.set()

    def shutdown(self) -> None:
        """Stop accepting and wait for serve_forever to return; sessions already accepted run on
        (``close_sessions`` ends them). The listening socket refuses new connections from now."""
        self._shutdown_requested = True
        self._stop_serving.set()
        # Shutting a listening socket down wakes every thread blocked in accept() on it.
        shutdown_quietly(self.socket, socket.SHUT_RD)
        self._is_shut_down.wait()

    def serves_evented(self) -> bool:
        """Whether sessions run in the event loop: the handler has a sans-I/O handshake (and
        no handle of its own) and every relay_session_started implementation is nonblocking."""
        handler = self.RequestHandlerClass
        return (
            isinstance(handler, type)
            and issubclass(handler, RelayHandler)
            and handler.handshake is not RelayHandler.handshake
            and all(getattr(handler, name) is getattr(RelayHandler, name) for name in ("setup", "handle", "finish"))
            and self.session_hooks.started_in_loop
        )

    def _serve_in_loop(self) -> None:
        """The pump's loop accepts and runs every session's handshake; this thread waits."""
        pump = shared_pump()
        self.socket.setblocking(False)
        pump.call_soon(pump.watch, self.socket, _LISTEN_EVENTS, self._accept_ready)
        self._stop_serving.wait()
        stopped = threading.Event()
        pump.call_soon(lambda: (self._stop_accepting(), stopped.set()))
        stopped.wait(5.0)

    def _stop_accepting(self) -> None:
        if self._backoff is not None:
            self._backoff.cancel()
        shared_pump().unwatch(self.socket)

    def _accept_ready(self, events: int) -> None:
        """In the loop: accept what is queued (a bounded batch), and start each session."""
        listener = self.socket
        if self._shutdown_requested:
            self._stop_accepting()  # shutdown() shut the listener down: it reports a hang-up now
            return
        for _ in range(ACCEPT_BATCH):
            try:
                fd, client_address = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _ACCEPT_BACKOFF:
                    # Out of descriptors or memory: stop watching the listener for a while
                    # instead of spinning on a socket that stays readable.
                    self._note_backoff(e)
                    pump = shared_pump()
                    pump.unwatch(listener)
                    self._backoff = pump.call_later(ACCEPT_BACKOFF, self._resume_accepting)
                    return
                continue  # ECONNABORTED and the like: that connection is gone
            conn = socket.socket(self.address_family, socket.SOCK_STREAM, 0, fd)
            if not _INHERITS_NODELAY:
                tune(conn)
            if not _DONTWAIT:
                conn.setblocking(False)
            if self.verify_request(conn, client_address, track=True):
                _EventedSession(self, conn, client_address).begin()
            else:
                close_quietly(conn)

    def _resume_accepting(self) -> None:
        self._backoff = None
        if not self._shutdown_requested:
            shared_pump().watch(self.socket, _LISTEN_EVENTS, self._accept_ready)

    def _note_backoff(self, error: OSError) -> None:
        self.stats["accept backoff"] += 1
        if self._refusal_log.allow():
            log.warning("cannot accept: %s; backing off %.1f s", (error.strerror or str(error)).lower(), ACCEPT_BACKOFF)

    def _accept_loop(self, permanent: bool = False) -> None:
        accepting = self._accepting
        while not self._shutdown_requested:
            with accepting:
                self._idle_acceptors += 1
            try:
                request, client_address = self.get_request()
            except OSError as e:
                with accepting:
                    self._idle_acceptors -= 1
                    leave = isinstance(e, BlockingIOError) and not permanent and self._idle_acceptors > 0
                if leave:  # idle for the idle timeout (SO_RCVTIMEO), and another acceptor waits
                    return
                continue
            with accepting:
                self._idle_acceptors -= 1
                follower = self._idle_acceptors == 0
            if follower:
                shared_pool().submit(self._accept_loop)
            if self.verify_request(request, client_address):
                self.process_request_thread(request, client_address)
            else:
                self.shutdown_request(request)

    def server_activate(self) -> None:
        super().server_activate()
        tune(self.socket)  # accepted connections inherit TCP_NODELAY (on Linux: _INHERITS_NODELAY)
        # accept() gives up after the idle timeout (EAGAIN), so that an extra acceptor can leave.
        set_receive_timeout(self.socket, shared_pool().idle_timeout)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """ThreadingMixIn's, with a reused thread instead of a new one per connection (for
        ``handle_request``; serve_forever serves in the accepting thread)."""
        shared_pool().submit(self.process_request_thread, request, client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        # socket.accept() without its wrapper, which converts family and type to enums per call.
        try:
            fd, client_address = self.socket._accept()  # type: ignore[attr-defined]
        except OSError as e:
            if e.errno in _ACCEPT_BACKOFF:
                # Out of descriptors or memory: the connection stays queued and the socket stays
                # readable, so socketserver would retry at once, forever, at 100% CPU. Wait instead.
                self._note_backoff(e)
                time.sleep(ACCEPT_BACKOFF)
            raise
        conn = socket.socket(self.address_family, socket.SOCK_STREAM, 0, fd)
        if not _INHERITS_NODELAY:
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
        """``sock`` is closed, or about to be: forget it."""
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
    evented = False  # run by the event loop (not by socketserver, which would close the request after handle())
    _unrelayed: list[Endpoint] | None = None  # upstreams opened but not (yet) handed to the pump

    @classmethod
    def handshake(cls, session: Session) -> Handshake | None:
        """The front-end's handshake as a sans-I/O object, or None (the default) for a handler
        that does its work in ``handle``.

        A handler that returns one and leaves ``handle`` to RelayHandler needs no thread of its
        own: relay's event loop reads the client into the handshake until it is ``ready``, opens
        the upstream it names and relays (see relay.hookspecs on where hooks run then). Called
        once per session, in the loop; ``session.server`` is the relay's server.
        """
        return None

    def handle(self) -> None:
        """Without an event loop (a blocking session hook, or a subclass's own ``handle``):
        the same handshake, driven by blocking reads in this thread."""
        handshake = self.handshake(self.session)
        if handshake is None:
            raise NotImplementedError(f"{type(self).__name__} has neither handle() nor handshake()")
        ready = self.run_handshake(handshake)
        if ready.serve is not None:
            ready.serve(self)
            return
        assert ready.target is not None
        try:
            upstream = self.open_upstream(ready.target)
            if ready.connected is not None:
                self.request.sendall(ready.connected(upstream))
        except Exception as e:
            if ready.failed is not None:
                send_quietly(self.request, ready.failed(e))
            raise
        self.relay(upstream, decoder=ready.decoder, encoder=ready.encoder, early=ready.early)

    def run_handshake(self, handshake: Handshake) -> Ready:
        """Read the client into ``handshake`` until it is ready, within the handshake deadline.
        A handshake that refuses by draining has the connection drained (``drain``) first."""
        conn = self.request
        deadline = self.session.started + self.session.config.handshake_timeout
        try:
            while handshake.ready is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("handshake timeout")
                conn.settimeout(left)
                n = conn.recv_into(handshake.recv_buffer())
                if not n:
                    handshake.eof()
                    raise ProtocolError("closed during the handshake")
                handshake.received(n)
                if handshake.reply:
                    conn.sendall(handshake.take_reply())
            return handshake.take_ready()  # type: ignore[return-value]  # set: the loop ended
        except ProtocolError as e:
            if handshake.reply:
                answer(conn, handshake.take_reply())
            if not handshake.drain_on_failure:
                raise
            failure = e
        except TimeoutError:
            discard_pending(conn)  # close with a FIN: unread bytes would make it a reset
            raise
        del handshake  # its buffers are freed before the connection waits out its deadline
        drain(conn, deadline)
        raise refusal(failure)

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

    def open_upstream(self, target: Address, *, evented: bool = False) -> Endpoint:
        """Run the target hooks and return the upstream; ``evented``: from the event loop, so
        the upstream may still be connecting, or ``WouldBlock`` says to call ``reopen_upstream``
        from a thread."""
        session = self.session
        session.target = target
        if self.server.session_hooks.chosen:  # pluggy's call costs microseconds even with nobody to call
            self.server.hook.relay_target_chosen(session=session, target=target)
        return self.reopen_upstream(target, evented=evented)

    def reopen_upstream(self, target: Address, *, evented: bool = False) -> Endpoint:
        """``open_upstream`` without the target hook: after a ``WouldBlock``."""
        upstream = self.server.session_hooks.open_upstream(self.session, target, evented)
        if upstream is None:
            raise RelayError("no plugin opened an upstream (is the core plugin registered?)")
        self.server.track(upstream.sock)
        if self._unrelayed is None:
            self._unrelayed = []
        self._unrelayed.append(upstream)
        return upstream

    def relay(
        self,
        upstream: Endpoint,
        decoder: Any = None,
        encoder: Any = None,
        early: bytes = b"",
        *,
        connected: Callable[[Endpoint], bytes] | None = None,
        failed: Callable[[BaseException], bytes] | None = None,
    ) -> None:
        """Hand the session to the pump, which moves its bytes until it ends and then ends it.
        ``decoder``/``encoder`` frame the client's side; ``early`` is client data the handshake
        already read past, sent upstream first. Call it last in ``handle``. For an upstream
        still connecting (``Endpoint.connecting``), ``connected(upstream)`` gives what the client
        gets first once it connects, ``failed(error)`` what it gets if it does not."""
        session = self.session
        if self._unrelayed and upstream in self._unrelayed:
            self._unrelayed.remove(upstream)
        client = Endpoint(self.request, decoder, encoder)
        server, request = self.server, self.request

        def done(result: PumpResult) -> None:
            session.bytes_up, session.bytes_down = result.bytes_up, result.bytes_down
            end_session(server, session, request, result.error, upstream.sock)

        # From here the pump owns both sockets: this thread goes back to the pool, and the pump
        # ends the session (closes the client, logs, fires relay_session_finished). The client
        # has spoken already when there is early data: it leaves with the first flight at once.
        self.detached = True
        if not self.evented:
            server.detach(request)
        shared_pump().start(
            client,
            upstream,
            timeout=session.config.timeout,
            on_done=done,
            early=early,
            on_connected=(lambda: connected(upstream)) if connected is not None else None,
            on_failed=failed,
        )

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


@dataclass
class Ready:
    """What a finished handshake says: where to connect, how the client's side is framed
    (``decoder``/``encoder``, None for plain bytes), and client data read past the handshake.

    ``connected(upstream)`` gives the bytes the client must get once the upstream is connected
    (a SOCKS5 reply, which names the bound address), ``failed(error)`` those it gets when the
    upstream cannot be opened or connected. ``serve(handler)``, instead of a target: the rest of
    the session runs in a thread with the handler (a SOCKS5 UDP ASSOCIATE holds its control
    connection open), and the session ends when it returns.
    """

    target: Address | None
    decoder: Any = None
    encoder: Any = None
    early: bytes = b""
    connected: Callable[[Endpoint], bytes] | None = None
    failed: Callable[[BaseException], bytes] | None = None
    serve: Callable[[Any], None] | None = None


class Handshake:
    """A front-end's handshake, sans-I/O: the client's bytes in, a ``Ready`` out.

    The driver (relay's event loop, or ``RelayHandler.run_handshake`` in a thread) receives into
    ``recv_buffer()`` and reports the count with ``received(n)`` until ``ready`` is set; at EOF
    it calls ``eof()``. ``received`` and ``eof`` raise ``ProtocolError`` to refuse the client.
    A handshake that is ready at once (a tunnel's) sets ``ready`` before any read. ``reply``
    holds bytes for the client (a SOCKS5 method selection): the driver sends them after every
    ``received``, and before the session ends when ``received`` raised. The driver takes them
    with ``take_reply()`` and the Ready with ``take_ready()``; a handshake that computes
    ``reply`` or ``ready`` (a wrapper around another) overrides those too.

    ``drain_on_failure``: refuse silently, as a Shadowsocks remote must (probe resistance): read
    and discard until the handshake deadline, after the client's EOF wait out the deadline all
    the same, and only then close; a refusal that was logged already sets ``reported`` on its
    error, so the session's end line is not a second warning.
    """

    ready: Ready | None = None
    drain_on_failure = False
    reply = b""

    def take_reply(self) -> bytes:
        reply, self.reply = self.reply, b""
        return reply

    def take_ready(self) -> Ready | None:
        """``ready``, which the handshake lets go of: the driver takes it once. (Its callbacks
        are often the handshake's own methods; holding each other, the two would outlive the
        session until the cyclic garbage collector ran.)"""
        ready = self.ready
        try:
            self.ready = None
        except AttributeError:
            pass  # computed (a wrapper's read-only property) and not overridden: nothing to let go of
        return ready

    def recv_buffer(self) -> memoryview:
        raise NotImplementedError

    def received(self, nbytes: int) -> None:
        raise NotImplementedError

    def eof(self) -> None:
        raise ProtocolError("closed during the handshake")


HANDSHAKE_BUFFER = 4096
"""Bytes a ``ParsedHandshake`` receives into: a SOCKS greeting, credentials and request, or a
first read of an HTTP request head, with a first chunk of data."""


class ParsedHandshake(Handshake):
    """A handshake read by a sans-I/O parser (``protocol.receive_data(bytes)``, ``b""`` at EOF,
    as relay's SOCKS parsers and h11 take it): what the driver receives goes to the parser
    (``feed``), and at EOF ``received(0)`` lets the parser say what the client left unfinished.
    Subclasses set ``protocol`` and ``what`` and act on the parser's events in ``received``.
    ``buffer``: where to receive, when a front-end read the first bytes already (``mixed``)."""

    protocol: SansIO
    what = "the handshake"

    def __init__(self, buffer: memoryview | None = None) -> None:
        self.buffer = buffer if buffer is not None else memoryview(bytearray(HANDSHAKE_BUFFER))

    def recv_buffer(self) -> memoryview:
        return self.buffer

    def eof(self) -> None:
        self.protocol.receive_data(b"")
        self.received(0)  # the parser raises for what the client left unfinished
        raise ProtocolError(f"closed during {self.what}")

    def feed(self, nbytes: int) -> None:
        if nbytes:
            self.protocol.receive_data(bytes(self.buffer[:nbytes]))


def refusal(failure: ProtocolError) -> RelayError:
    """The error a drained session ends with."""
    return (RelayError if getattr(failure, "reported", False) else ProtocolError)(f"refused: {failure}")


# What a refused peer sends is read into this and dropped: every draining session shares it, so
# a draining session costs its socket (and, without the event loop, its thread), not a buffer.
_DISCARD = bytearray(64 * 1024)


def drain(conn: socket.socket, deadline: float) -> None:
    """Say nothing to a refused peer: read and discard until ``deadline``. After its EOF, wait
    out the deadline all the same; only a reset (the peer is gone) ends it sooner."""
    try:
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            if not conn.recv_into(_DISCARD):
                _wait_for_reset(conn, deadline)
                return
    except TimeoutError:
        discard_pending(conn)
    except OSError:
        return


def send_quietly(conn: socket.socket, data: bytes) -> None:
    """Send a last word (an error reply) without waiting: the client may be gone already."""
    try:
        conn.send(data, _DONTWAIT)
    except OSError:
        pass


def answer(conn: socket.socket, data: bytes) -> None:
    """A refusal's last word (an error response, a failure reply) before the close: sent
    without waiting, then what the client had sent already is read, so that the close is a FIN
    and the client gets to read the answer (a close with unread bytes would be a reset)."""
    send_quietly(conn, data)
    discard_pending(conn)


def discard_pending(conn: socket.socket) -> None:
    """Read what has arrived already, without waiting, so that closing sends a FIN: a socket
    closed with unread bytes sends a reset, which would tell a prober something."""
    try:
        if conn.gettimeout():  # a timeout makes recv wait first, whatever the flags say
            conn.setblocking(False)
        for _ in range(64):
            if not conn.recv_into(_DISCARD, 0, _DONTWAIT):
                return
    except OSError:
        return


def _wait_for_reset(conn: socket.socket, deadline: float) -> None:
    """Sleep until ``deadline`` unless the peer resets: poll for nothing but the errors and
    hang-ups that poll always reports (the peer's FIN alone reports neither)."""
    if not hasattr(select, "poll"):
        time.sleep(max(deadline - time.monotonic(), 0))
        return
    poller = select.poll()
    poller.register(conn, 0)
    while (left := deadline - time.monotonic()) > 0:
        if poller.poll(max(1, int(left * 1000 + 0.999))):
            return


class _EventedSession:
    """A session whose handshake runs in the event loop: accept -> ``relay_session_started`` ->
    the handler's Handshake fed from readable events -> the upstream opened (in the loop when
    its hooks are nonblocking, else in a pool thread) -> the pump. Refusals drain in the loop
    too, and the handshake deadline is a loop timer."""

    __slots__ = ("server", "conn", "session", "handshake", "handler", "timer", "failure", "ended")

    def __init__(self, server: RelayServer, conn: socket.socket, client_address: Any) -> None:
        self.server = server
        self.conn = conn
        self.session = Session(config=server.config, client=Address(*client_address[:2]), server=server, client_address=client_address)
        handler_class = server.RequestHandlerClass
        handler = handler_class.__new__(handler_class)  # set up as socketserver would, but not run
        handler.request, handler.client_address, handler.server, handler.session = conn, client_address, server, self.session
        handler.evented = True
        self.handler: RelayHandler = handler
        self.handshake: Handshake | None = None
        self.timer: Any = None
        self.failure: ProtocolError | None = None
        self.ended = False

    def begin(self) -> None:
        server = self.server  # it tracks self.conn already (verify_request)
        try:
            if server.session_hooks.started:
                server.hook.relay_session_started(session=self.session)
            self.handshake = self.handler.handshake(self.session)
            if self.handshake is None:
                raise RelayError(f"{type(self.handler).__name__}.handshake() returned None")
        except Exception as e:  # noqa: BLE001 - a session's failure ends that session only
            self.end(e)
            return
        if self.handshake.ready is not None:
            self.proceed()
            return
        # The client's first bytes have usually arrived by now (a Shadowsocks local sends its
        # first flight as it connects): read them at once, and a handshake they complete needs
        # neither a watch nor a deadline timer, two epoll_ctl calls and a heap entry fewer.
        self.readable(0)
        handshake = self.handshake
        if self.ended or (handshake is None and self.failure is None):
            return  # ended, or proceeding: relayed, or opening the upstream in a thread
        pump = shared_pump()
        self.timer = pump.call_later(self.session.started + self.session.config.handshake_timeout - time.monotonic(), self.deadline)
        if handshake is not None:  # not ready yet (else it is draining, and watched for that)
            pump.watch(self.conn, _LISTEN_EVENTS, self.readable)

    def readable(self, events: int) -> None:
        handshake = self.handshake
        assert handshake is not None
        try:
            n = self.conn.recv_into(handshake.recv_buffer(), 0, _DONTWAIT)
            if not n:
                handshake.eof()
                raise ProtocolError("closed during the handshake")
            handshake.received(n)
            reply = handshake.take_reply()
            # A handshake's replies are a few bytes to a socket that has sent nothing back
            # yet: they fit its send buffer whole.
            if reply and self.conn.send(reply, _DONTWAIT) < len(reply):
                raise ProtocolError("the client does not read its replies")
        except BlockingIOError:
            return
        except ProtocolError as e:
            if handshake.reply:
                answer(self.conn, handshake.take_reply())
            if not handshake.drain_on_failure:
                self.end(e)
                return
            self.handshake = None  # its buffers go now, not when the deadline comes
            self.failure = e
            shared_pump().watch(self.conn, _LISTEN_EVENTS, self.draining)
            return
        except Exception as e:  # noqa: BLE001
            self.end(e)
            return
        if handshake.ready is not None:
            self.proceed()

    def draining(self, events: int) -> None:
        try:
            if self.conn.recv_into(_DISCARD, 0, _DONTWAIT):
                return
        except BlockingIOError:
            return
        except OSError:
            self.end(refusal(self.failure))  # type: ignore[arg-type]  # reset: nobody is left to see the close
            return
        # EOF: wait out the deadline all the same; only hang-ups and errors wake us now.
        shared_pump().watch(self.conn, 0, self.reset)

    def reset(self, events: int) -> None:
        self.end(refusal(self.failure))  # type: ignore[arg-type]

    def deadline(self) -> None:
        self.timer = None
        if self.ended:
            return
        discard_pending(self.conn)
        self.end(refusal(self.failure) if self.failure is not None else TimeoutError("handshake timeout"))

    def proceed(self) -> None:
        pump = shared_pump()
        pump.unwatch(self.conn)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ready = self.handshake.take_ready()  # type: ignore[union-attr]
        self.handshake = None
        if ready.serve is not None:
            shared_pool().submit(self.serve_in_thread, ready.serve)
            return
        if not self.server.session_hooks.open_in_loop:
            shared_pool().submit(self.open_in_thread, ready, True)
            return
        try:
            upstream = self.handler.open_upstream(ready.target, evented=True)  # type: ignore[arg-type]
        except WouldBlock:
            shared_pool().submit(self.open_in_thread, ready, False)
            return
        except Exception as e:  # noqa: BLE001
            self.fail(ready, e)
            return
        self.relay(upstream, ready)

    def open_in_thread(self, ready: Ready, with_target_hook: bool) -> None:
        handler = self.handler
        try:
            if with_target_hook:
                upstream = handler.open_upstream(ready.target)  # type: ignore[arg-type]
            else:
                upstream = handler.reopen_upstream(ready.target)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001
            self.fail(ready, e)
            return
        self.relay(upstream, ready)

    def serve_in_thread(self, serve: Callable[[Any], None]) -> None:
        error: BaseException | None = None
        try:
            serve(self.handler)
        except Exception as e:  # noqa: BLE001 - a session's failure ends that session only
            error = e
        if self.handler.detached:
            self.ended = True  # it relayed: the pump ends the session
            return
        # A handler that answered a failure itself (an HTTP 502) says so in ``error``, as
        # run_handler reads it for a session in a thread.
        self.end(error or getattr(self.handler, "error", None))

    def relay(self, upstream: Endpoint, ready: Ready) -> None:
        try:
            if ready.connected is not None and not upstream.connecting:
                self.conn.sendall(ready.connected(upstream))  # a few bytes, to a socket that has room
            self.handler.relay(
                upstream,
                decoder=ready.decoder,
                encoder=ready.encoder,
                early=ready.early,
                connected=ready.connected if upstream.connecting else None,
                failed=ready.failed,
            )
        except Exception as e:  # noqa: BLE001
            self.fail(ready, e)
            return
        self.ended = True  # the pump ends it

    def fail(self, ready: Ready, error: BaseException) -> None:
        if ready.failed is not None:
            send_quietly(self.conn, ready.failed(error))
        self.end(error)

    def end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
        pump = shared_pump()
        if pump.in_loop():
            pump.unwatch(self.conn)
        self.handler.finish()
        end_session(self.server, self.session, self.conn, error)


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


def end_session(
    server: RelayServer, session: Session, request: socket.socket, error: BaseException | None, upstream: socket.socket | None = None
) -> None:
    """Close the client (it sees EOF now, not after the hooks), log one line, and fire
    relay_session_finished, in a pool thread when a plugin implements it: a slow hook must not
    hold up the thread it was called from (the pump's, after a relayed session). ``upstream``:
    a socket of the session's to forget with it (the pump closed it)."""
    server.session_ended(session.client_address, request, upstream)
    close_quietly(request)
    _log_end(session, error)
    if server.session_hooks.finished:
        shared_pool().submit(_session_finished, server, session, error)


def _session_finished(server: RelayServer, session: Session, error: BaseException | None) -> None:
    try:
        server.hook.relay_session_finished(session=session, error=error)
    except Exception:  # noqa: BLE001
        log.exception("%s: relay_session_finished hook failed", session)


def _log_end(session: Session, error: BaseException | None) -> None:
    if error is None:
        level = logging.INFO
    elif isinstance(error, (ProtocolError, TargetRefused)):
        level = logging.WARNING
    elif isinstance(error, (OSError, RelayError)):
        level = logging.INFO
    else:
        level = logging.ERROR
    if not log.isEnabledFor(level):
        return  # the line is not built at all: most sessions of a quiet relay end here
    summary = f"{session}: {session.bytes_up} B up, {session.bytes_down} B down, {session.duration:.1f} s"
    if error is None:
        log.log(level, "%s", summary)
    else:
        log.log(level, "%s: %s", summary, _describe(error), exc_info=error if level == logging.ERROR else None)


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
