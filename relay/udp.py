"""The datagram side: a socketserver UDP server per relay, NAT-style associations, upstreams.

Classes for the caller:
    RelayUDPServer        a ThreadingUDPServer: relay's own front-end handlers (DatagramHandler
                          subclasses) run inline, since they never block; any other handler
                          runs in a thread per datagram, as socketserver runs it
    DatagramHandler       base class of datagram front-ends (socks5, tunnel, shadowsocks)
    DirectDatagramUpstream, HandlerDatagramUpstream   the core's upstreams

Datagram flow, for one client address (one association, one Session)::

    client --datagram--> front-end handler --forward(target, payload)--> upstream.send
    client <--reply(source, payload)-- association <--receive()-- upstream socket (reader thread)

The reader thread waits on every upstream socket with one selector and expires idle associations.
Malformed packets, wrong keys, forbidden targets: dropped and counted in ``server.stats``; the
relay keeps serving.

Bursts travel in batches (relay.gso): on Linux the server's socket hands over a burst from one
sender whole (GRO), and an upstream with a ``batch`` holds what it sends until the server's
thread has read every datagram queued, then sends each run of like datagrams with one system
call (GSO). Every datagram on the wire stays a datagram of its own.
"""

from __future__ import annotations

import collections
import errno
import logging
import selectors
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .address import Address
from .associations import AssociationTable
from .config import Config
from .errors import ProtocolError, RelayError, TargetRefused
from .gso import GRO_CONTROL_SPACE, DatagramBatch, enable_gro, read_burst, segments
from .policy import EgressPolicy
from .net import forbidden, set_receive_timeout
from .server import ListeningAddress
from .session import Session

__all__ = [
    "RelayUDPServer",
    "DatagramHandler",
    "DatagramUpstream",
    "DirectDatagramUpstream",
    "HandlerDatagramUpstream",
    "Association",
    "MAX_DATAGRAM",
    "udp_socket",
]

log = logging.getLogger("relay")

MAX_DATAGRAM = 65535
SOCKET_BUFFER = 4 << 20  # room for bursts: the kernel caps it at net.core.rmem_max/wmem_max
SWEEP_INTERVAL = 1.0
BATCH = 64  # answers read from one upstream socket per wake-up, at most
HOLD_READS = 64  # reads in a burst before what they made is sent, at most
# A blocking read that returns sooner than this found its datagram already queued (a wake-up
# from sleep takes longer): a burst is on. Wrong either way, it only changes what is batched.
QUEUED_WITHIN = 20e-6
_CHECKED_TARGETS = 256  # per association: targets that already passed relay_target_chosen
_RESOLVE_TTL = 30.0
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class DatagramUpstream(Protocol):
    """Where an association's datagrams go. ``sock`` (or None) is read by the reader thread,
    which calls ``receive`` when it is readable; an upstream without a socket answers through
    ``on_answer(source, payload)``, which the server sets.

    An upstream may also have a ``batch`` (relay.gso.DatagramBatch) that ``send`` puts its
    packets in: the server then flushes it once the burst it is reading is over, and counts
    what the flush could not send. Without one, ``send`` sends at once and raises OSError.

    ``receive`` may return a list for a burst read in one piece (GRO): an answer, or the
    ProtocolError that one datagram of it raised, per datagram."""

    sock: socket.socket | None
    on_answer: Callable[[Address, bytes], None] | None

    def send(self, target: Address, payload: bytes) -> None: ...

    def receive(self) -> tuple[Address, bytes] | list[tuple[Address, bytes] | ProtocolError] | None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Association:
    key: Any
    session: Session
    upstream: DatagramUpstream
    reply: Callable[[Address, bytes], None]
    checked: set[Address] = field(default_factory=set)
    on_close: Callable[[], None] | None = field(default=None, repr=False)


def udp_socket(family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
    return sock


def _host(sockaddr: tuple) -> str:
    host = str(sockaddr[0])
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class DirectDatagramUpstream:
    """One dual-stack UDP socket per association, to any target the policy allows.

    Every datagram's target is resolved (cached for 30 s) and every resolved address checked;
    the checked address is the one the datagram is sent to.
    """

    on_answer = None

    def __init__(self, egress: EgressPolicy) -> None:
        self._egress = egress
        self._cache: dict[Address, tuple[tuple, float]] = {}
        try:
            self.sock = udp_socket(socket.AF_INET6)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self._dual = True
        except OSError:  # no IPv6 on this host
            self.sock = udp_socket(socket.AF_INET)
            self._dual = False
        self.sock.bind(("::" if self._dual else "0.0.0.0", 0))
        self._space = GRO_CONTROL_SPACE if enable_gro(self.sock) else 0
        self.batch = DatagramBatch(self.sock)
        self._add = self.batch.add

    def send(self, target: Address, payload: bytes) -> None:
        self._add(payload, self._resolve(target))

    def receive(self) -> tuple[Address, bytes] | list[tuple[Address, bytes]]:
        data, sockaddr = read_burst(self.sock, self._space, MAX_DATAGRAM)
        source = Address(_host(sockaddr), sockaddr[1])
        if type(data) is list:  # the target's burst, read whole
            return [(source, datagram) for datagram in data]
        return source, data

    def close(self) -> None:
        self.sock.close()

    def _resolve(self, target: Address) -> tuple:
        now = time.monotonic()
        cached = self._cache.get(target)
        if cached is not None and cached[1] > now:
            return cached[0]
        refused = []
        check = self._egress.for_target(target.host)
        for family, _, _, _, sockaddr in socket.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM):
            ip = str(sockaddr[0])
            reason = check(ip)
            if reason:
                refused.append(f"{ip} ({reason})")
                continue
            if family == socket.AF_INET6 and not self._dual:
                continue
            if family == socket.AF_INET and self._dual:
                sockaddr = ("::ffff:" + ip, sockaddr[1], 0, 0)
            if len(self._cache) >= _CHECKED_TARGETS:
                self._cache.clear()
            self._cache[target] = (sockaddr, now + _RESOLVE_TTL)
            return sockaddr
        if refused:
            raise forbidden(target, refused)
        raise OSError(errno.EAFNOSUPPORT, f"no usable address for {target.host}")


class _AnswerSocket:
    """What a datagram handler at the far end of a tunnel gets as its socket: ``sendto`` answers
    the tunnelled client (the address given is ignored; the answer comes from the target)."""

    def __init__(self, answer: Callable[[Address, bytes], None], source: Address) -> None:
        self._answer = answer
        self._source = source

    def sendto(self, data: bytes, address: Any = None) -> int:
        self._answer(self._source, bytes(data))
        return len(data)


class HandlerDatagramUpstream:
    """A remote's ``--handler`` answering tunnelled datagrams: each one runs the handler's
    datagram class as socketserver's UDP servers do, ``self.request == (data, socket)``."""

    sock = None

    def __init__(self, session: Session, handler_class: type[socketserver.BaseRequestHandler]) -> None:
        self.session = session
        self.handler_class = handler_class
        self.on_answer: Callable[[Address, bytes], None] | None = None

    def send(self, target: Address, payload: bytes) -> None:
        assert self.on_answer is not None
        request = (payload, _AnswerSocket(self.on_answer, target))
        run_datagram_handler(self.session.server, self.handler_class, request, tuple(self.session.client), self.session)

    def receive(self) -> None:
        return None

    def close(self) -> None:
        pass


def run_datagram_handler(server: Any, handler_class: type, request: Any, client_address: Any, session: Session) -> None:
    handler = handler_class.__new__(handler_class)
    handler.session = session
    handler_class.__init__(handler, request, client_address, server)


class DatagramHandler(socketserver.BaseRequestHandler):
    """Base class of datagram front-ends; they run inline in the server's thread.

    ``self.request`` is ``(data, socket)`` as in socketserver. Helpers for subclasses:
        association(reply)        the client's association, created on its first datagram
        forward(association, target, payload)
        drop(reason)              count (and debug-log) a datagram that goes nowhere

    A front-end may also override ``receiver``, which the server calls once: what it returns
    handles every datagram, without a handler instance per datagram.
    """

    inline = True
    server: RelayUDPServer

    @classmethod
    def receiver(cls, server: RelayUDPServer) -> Callable[[bytes, Any], None]:
        """The function that handles each datagram of ``server``: ``receive(data,
        client_address)``, called in the server's thread; whatever it raises drops that datagram
        (counted, see ``RelayUDPServer.handle_error``).

        Called once per server, when it starts serving. The default runs the class as
        socketserver does, an instance per datagram. At tens of thousands of datagrams a second,
        that instance and the per-server state each ``handle`` looks up again (codecs, the
        association table) are a good part of the cost: a front-end can return a closure that
        holds them instead, using ``server.associations.get``, ``server.associate``,
        ``server.forward`` and ``server.drop`` as the helpers above do, and
        ``server.send_answer`` in its ``reply`` functions, so that a burst of answers leaves in
        a few system calls."""
        sock = server.socket

        def receive(data: bytes, client_address: Any) -> None:
            cls((data, sock), client_address, server)

        return receive

    def association(
        self, reply: Callable[[Address, bytes], None], key: Any = None, on_close: Callable[[], None] | None = None
    ) -> Association | None:
        return self.server.associate(self.client_address, reply, key, on_close)

    def forward(self, association: Association, target: Address, payload: bytes) -> None:
        self.server.forward(association, target, payload)

    def drop(self, reason: str) -> None:
        self.server.drop(reason, self.client_address)


class RelayUDPServer(ListeningAddress, socketserver.ThreadingMixIn, socketserver.UDPServer):
    """One UDP socket of a relay and its association table.

    Methods for the caller: socketserver's, ``close_sessions()``, and ``send_answer`` for
    front-ends' replies. ``stats`` counts what was dropped and why; ``answer_batch`` is where
    the reader thread's answers wait for the end of its round (its ``sent`` and ``calls``
    count them). ``data`` is free for plugins to keep per-server state in.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False  # on UDP it would let a second process share the port
    max_packet_size = MAX_DATAGRAM

    def __init__(self, config: Config, hook: Any, address: Address, v6only: bool = False) -> None:
        handler = config.handler.datagram_handler
        if handler is None:
            raise RelayError(f"handler {config.handler.name!r} does not handle datagrams")
        self.config = config
        self.hook = hook
        self.stats: collections.Counter[str] = collections.Counter()
        self.data: dict[str, Any] = {}
        self.associations: AssociationTable[Any, Association] = AssociationTable(config.udp_max_associations, config.udp_timeout)
        self.v6only = v6only
        super().__init__(self._resolve(address), handler)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        self._selector = selectors.DefaultSelector()
        self._stopping = threading.Event()
        self._shutdown_asked = False
        self._served = threading.Event()  # serve_forever is not running
        self._receive: Callable[[bytes, Any], None] | None = None
        self._loop_thread: int | None = None  # the thread in serve_forever's own loop, if any
        self._holding = False  # that loop is inside a burst: batches wait for its end
        self._unflushed: list[DatagramBatch] = []  # batches that loop flushes at a burst's end
        self._served.set()
        self._wake_reader, self._waker = socket.socketpair()  # server_close wakes the reader at once
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        # Answers the reader thread sends to clients wait for the end of its round (send_answer).
        self.answer_batch = DatagramBatch(self.socket)
        self.answer_batch.on_queued = _flushed_by_the_reader
        self._answers_held = False  # the reader thread is past a round's first answer
        self.answer_batch.on_error = lambda error: self.drop("reply failed", None, error)
        self._reader_thread: int | None = None  # set by the reader thread itself, first thing
        self._reader = threading.Thread(target=self._read_answers, name=f"udp-answers-{self.address}", daemon=True)
        self._reader.start()

    @property
    def live_sessions(self) -> int:
        return len(self.associations)

    # -- socketserver's request path

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's loop, without its select for relay's inline handlers: a blocking
        recvmsg takes each datagram (or, with GRO, each burst from one sender) in one system
        call, where select, recvfrom and a final EAGAIN took up to three (and the selector's
        Python more). SO_RCVTIMEO, set to ``poll_interval``, lets the loop see a shutdown request.

        Bursts travel in batches, lone datagrams at once. What a datagram that had to be waited
        for makes is sent at once, and the next read waits again. A datagram that was already
        queued (the read came back within QUEUED_WITHIN), or a GRO burst, starts a burst: what
        it makes waits in batches, and the loop reads on without waiting until it finds nothing
        more; then it flushes them, and only then waits."""
        if not self._own_loop:
            super().serve_forever(poll_interval)
            return
        sock = self.socket
        self._served.clear()  # before the flag is read: a shutdown() from now on waits for us
        try:
            if self._shutdown_asked:
                return  # shut down before it started: the socket may be closed already
            set_receive_timeout(sock, poll_interval)
            space = GRO_CONTROL_SPACE if enable_gro(sock) else 0
            size = self.max_packet_size
            receive = self._receiver()
            recvmsg = sock.recvmsg
            unflushed = self._unflushed
            self._loop_thread = threading.get_ident()
            wait = True  # whether the next read may wait: not inside a burst
            reads = 0  # read in this burst since its batches were last flushed
            clock = time.perf_counter
            while not self._shutdown_asked:
                try:
                    if wait:
                        started = clock()
                        data, ancillary, _, client_address = recvmsg(size, space)
                        burst = clock() - started < QUEUED_WITHIN or bool(ancillary)
                    else:
                        data, ancillary, _, client_address = recvmsg(size, space, _DONTWAIT)
                        burst = True
                except (BlockingIOError, InterruptedError):
                    # Nothing more queued (or the receive timeout): a burst is over.
                    self._holding = False
                    if unflushed:
                        self._flush()
                    wait = True
                    reads = 0
                    continue
                except OSError:
                    if self._shutdown_asked or sock.fileno() == -1:
                        return
                    continue  # an ICMP error queued on the socket: reported once, and gone
                self._holding = burst
                wait = not burst
                if burst:
                    reads += 1
                    if reads >= HOLD_READS:  # a burst that does not end: flush as it goes
                        reads = 0
                        self._flush()
                if ancillary:
                    for datagram in segments(data, ancillary):
                        try:
                            receive(datagram, client_address)
                        except Exception:  # noqa: BLE001 - one datagram's failure drops that datagram
                            self.handle_error((datagram, sock), client_address)
                    continue
                try:
                    receive(data, client_address)
                except Exception:  # noqa: BLE001 - one datagram's failure drops that datagram
                    self.handle_error((data, sock), client_address)
        finally:
            self._loop_thread = None
            self._holding = False
            self._flush()
            self._shutdown_asked = False  # as socketserver's own loop: it may serve again
            self._served.set()

    def _queued(self, batch: DatagramBatch) -> bool:
        """A batch has packets to send: serve_forever's loop flushes it once the burst it is
        reading is over (True); outside a burst, or from any other thread, it goes at once."""
        if self._holding and threading.get_ident() == self._loop_thread:
            self._unflushed.append(batch)
            return True
        return False

    def _flush_before_blocking(self) -> None:
        """About to wait for something else than datagrams (a hook, a name lookup): first send
        what the burst made so far, rather than hold it through the wait."""
        if self._unflushed and threading.get_ident() == self._loop_thread:
            self._flush()

    def _flush(self) -> None:
        unflushed = self._unflushed
        while unflushed:
            try:
                unflushed.pop().flush()
            except Exception:  # noqa: BLE001 - its errors are the batch's on_error's; this is a bug
                log.exception("datagram batch: flush failed")

    def _receiver(self) -> Callable[[bytes, Any], None]:
        """The inline handler's per-datagram function (``DatagramHandler.receiver``), built on
        first use: plugins' ``relay_configure`` and the server's own setup have run by then."""
        receive = self._receive
        if receive is None:
            handler_class = self.RequestHandlerClass
            if issubclass(handler_class, DatagramHandler):
                receive = handler_class.receiver(self)
            else:
                sock = self.socket

                def receive(data: bytes, client_address: Any) -> None:
                    self.finish_request((data, sock), client_address)

            self._receive = receive
        return receive

    @property
    def _own_loop(self) -> bool:
        """Whether serve_forever runs its own loop (inline handlers, where recvmsg exists)."""
        return getattr(self.RequestHandlerClass, "inline", False) and hasattr(self.socket, "recvmsg")

    def shutdown(self) -> None:
        if not self._own_loop:
            super().shutdown()
            return
        self._shutdown_asked = True
        self._served.wait()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Inline handlers (relay's own front-ends, which never block) run in this thread; any
        other handler in a thread of its own, as socketserver runs it."""
        if not getattr(self.RequestHandlerClass, "inline", False):
            super().process_request(request, client_address)
            return
        try:
            self._receiver()(request[0], client_address)
        except Exception:  # noqa: BLE001 - one datagram's failure drops that datagram
            self.handle_error(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        handler_class = self.RequestHandlerClass
        if issubclass(handler_class, DatagramHandler):
            handler_class(request, client_address, self)  # its session is the association's
        else:
            session = Session(config=self.config, client=Address(_host(client_address), client_address[1]), server=self)
            run_datagram_handler(self, handler_class, request, client_address, session)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (ProtocolError, OSError, TargetRefused)):
            self.drop(type(error).__name__, client_address, error)
        else:
            self.stats["handler error"] += 1
            log.exception("datagram from %s: handler failed", _peer(client_address))

    # -- associations

    def associate(
        self,
        client_address: Any,
        reply: Callable[[Address, bytes], None],
        key: Any = None,
        on_close: Callable[[], None] | None = None,
    ) -> Association | None:
        """The client's association, opening it (session hooks, upstream hook) on first use.

        Associations are found by ``key``: the client's address unless the protocol names its
        sessions itself (SIP022's client session id, which survives a NAT rebinding).
        ``on_close`` runs when the association ends (expired, evicted, closed)."""
        key = client_address if key is None else key
        association = self.associations.get(key)
        if association is not None:
            return association
        self._flush_before_blocking()  # hooks, and an eviction that closes an upstream
        session = Session(config=self.config, client=Address(_host(client_address), client_address[1]), server=self)
        try:
            self.hook.relay_session_started(session=session)
            upstream = self.hook.relay_open_datagram_upstream(session=session)
            if upstream is None:
                raise RelayError("no plugin opened a datagram upstream")
        except Exception as e:  # noqa: BLE001 - a failed association drops its datagram only
            self.drop("association failed", client_address, e)
            self._finish(session, e)
            return None
        association = Association(key, session, upstream, reply, on_close=on_close)
        upstream.on_answer = lambda source, payload: self._answer(association, source, payload)
        batch = getattr(upstream, "batch", None)
        if batch is not None:
            batch.on_queued = self._queued
            batch.on_error = lambda error: self._send_failed(association, error)
        if upstream.sock is not None:
            upstream.sock.setblocking(False)  # drained until EAGAIN; a full send buffer drops, as UDP may
            self._selector.register(upstream.sock, selectors.EVENT_READ, association)
        for _, evicted in self.associations.add(key, association):
            self.stats["evicted"] += 1
            log.info("%s: evicted (the table is full at %d associations)", evicted.session, self.associations.capacity)
            self._close(evicted, None)
        return association

    def forward(self, association: Association, target: Address, payload: bytes) -> None:
        """Send ``payload`` to ``target`` by the association's upstream, from the server's
        thread (where front-ends' receive functions run: an upstream's batch has no lock). An
        upstream with a batch may hold it until the burst being read is over: pass bytes, or a
        view of memory left alone until then."""
        session = association.session
        try:
            if target not in association.checked:
                self._flush_before_blocking()  # a hook, and the target's name lookup
                self.hook.relay_target_chosen(session=session, target=target)
                if len(association.checked) >= _CHECKED_TARGETS:
                    association.checked.clear()
                association.checked.add(target)
                if session.target is None:
                    session.target = target
            association.upstream.send(target, payload)
        except TargetRefused as e:
            self.stats["forbidden"] += 1
            log.warning("%s: datagram to %s dropped: %s", session, target, e)
            return
        except OSError as e:
            self._send_failed(association, e)
            return
        session.bytes_up += len(payload)

    def _send_failed(self, association: Association, error: OSError) -> None:
        """A datagram of ``association`` that its upstream could not send."""
        if error.errno == errno.EMSGSIZE:
            self.stats["too large"] += 1
            log.warning("%s: a datagram dropped: too large to send", association.session)
        else:
            self.drop("send failed", association.key, error)

    def close_association(self, key: Any) -> None:
        association = self.associations.pop(key)
        if association is not None:
            self._close(association, None)

    def drop(self, reason: str, client_address: Any, error: BaseException | None = None) -> None:
        self.stats[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("datagram from %s dropped: %s%s", _peer(client_address), reason, f": {error}" if error else "")

    def send_answer(self, packet: bytes, client_address: Any) -> None:
        """Send ``packet`` to a client from this server's socket: what front-ends' ``reply``
        functions use. Answers from upstream sockets go out in batches, once the reader
        thread's round of them is over (all but the first); from any other thread, at once
        (raising OSError)."""
        if self._answers_held and threading.get_ident() == self._reader_thread:
            self.answer_batch.add(packet, client_address)
        else:
            self.socket.sendto(packet, client_address)

    def _answer(self, association: Association, source: Address, payload: bytes) -> None:
        try:
            association.reply(source, payload)
        except OSError as e:
            self.drop("reply failed", association.key, e)
            return
        association.session.bytes_down += len(payload)

    def _read_answers(self) -> None:
        self._reader_thread = threading.get_ident()
        try:
            self._serve_answers()
        finally:
            self._answers_held = False
            self._flush_answers()

    def _flush_answers(self) -> None:
        try:
            self.answer_batch.flush()
        except Exception:  # noqa: BLE001 - its errors are on_error's; this is a bug, not the reader's end
            log.exception("answers: flush failed")

    def _serve_answers(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while not self._stopping.is_set():
            try:
                events = self._selector.select(SWEEP_INTERVAL)
            except (OSError, ValueError):
                if self._stopping.is_set():
                    return
                raise
            for key, _ in events:
                association: Association | None = key.data
                if association is None:
                    return  # woken by server_close
                for _ in range(BATCH):  # every answer already queued on this socket
                    try:
                        answer = association.upstream.receive()
                    except (BlockingIOError, InterruptedError):
                        break
                    except ProtocolError as e:
                        self.drop("bad answer", association.key, e)
                        continue
                    except OSError as e:
                        # An ICMP error reported once, or the association closed under us: not
                        # one drop per remaining batch slot.
                        if association.upstream.sock is not None and association.upstream.sock.fileno() != -1:
                            self.drop("answer error", association.key, e)
                        break
                    if type(answer) is list:  # a burst read whole
                        self._answers_held = True
                        for one in answer:
                            if isinstance(one, ProtocolError):
                                self.drop("bad answer", association.key, one)
                            else:
                                self._answer(association, *one)
                    elif answer is not None:
                        self._answer(association, *answer)
                    self._answers_held = True  # the first answer went at once; the rest wait
                self.associations.touch(association.key)
            self._answers_held = False
            self._flush_answers()  # the round's answers, in a few system calls
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                for _, association in self.associations.expire():
                    self._close(association, TimeoutError("idle timeout"))

    def _close(self, association: Association, error: BaseException | None) -> None:
        sock = association.upstream.sock
        if sock is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
        association.upstream.close()
        if association.on_close is not None:
            association.on_close()
        self._finish(association.session, error)

    def _finish(self, session: Session, error: BaseException | None) -> None:
        summary = f"{session} (udp): {session.bytes_up} B up, {session.bytes_down} B down, {session.duration:.1f} s"
        if error is None or isinstance(error, TimeoutError):
            log.info("%s%s", summary, ": idle" if error is not None else "")
        else:
            log.warning("%s: %s", summary, error)
        try:
            self.hook.relay_session_finished(session=session, error=error)
        except Exception:  # noqa: BLE001
            log.exception("%s: relay_session_finished hook failed", session)

    def close_sessions(self) -> None:
        for _, association in self.associations.clear():
            self._close(association, None)

    def server_close(self) -> None:
        self._stopping.set()
        self._waker.send(b"\0")
        self._reader.join(SWEEP_INTERVAL + 1)
        self.close_sessions()
        self._selector.close()
        self._waker.close()
        self._wake_reader.close()
        super().server_close()


def _flushed_by_the_reader(batch: DatagramBatch) -> bool:
    """The reader thread flushes its batch of answers at the end of every round."""
    return True


def _peer(address: Any) -> str:
    try:
        return str(Address(_host(address), address[1]))
    except (TypeError, IndexError):
        return repr(address)
