"""The pump: the process's event loop, and the one place that moves established sessions' bytes.

One thread per process moves every session's bytes, both ways, waiting on all their sockets with
one selector (epoll on Linux). Whoever did the handshake (the loop itself for an evented
front-end, see relay.server; a pool thread otherwise) hands the two endpoints over
(``Pump.start``); from then on, for each readable socket::

    recv_into(decoder buffer) -> decoder.received -> encoder.encode -> send (non-blocking)

When the other socket cannot take a whole frame, the rest stays pending (a view of the encoder's
or decoder's buffer, which nothing touches meanwhile) and the source is not read again until it
is sent: backpressure without copies. Per chunk there is no hook call, no lock and no thread
switch; the threads a thread-per-direction design would need cost more, in CPU and in the GIL's
back-and-forth, than the relaying itself.

* Half-close: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once everything
  before it is sent, and the other direction keeps going until its own EOF.
* Idle timeout: a session with nothing read or sent either way for ``timeout`` seconds ends
  (checked once a second).
* Failure: the first error (reset, a chunk that fails authentication...) ends both directions.
* First flight: plaintext an upstream must send first (a Shadowsocks client's target header)
  waits up to ``FIRST_FLIGHT_WAIT`` for the client's first data, to leave in one packet with it.
* Connecting upstreams (``Endpoint.connecting``): nothing moves until the connect completes;
  it fails the session with its error, or with TimeoutError after ``connect_timeout``.

The loop also serves relay.server's evented sessions: ``watch``/``unwatch`` a socket for a
callback, ``call_later`` timers (handshake deadlines), ``call_soon`` from other threads. All
sockets stay in blocking mode and every recv and send says MSG_DONTWAIT: a mode switch is a
system call, and one that releases the GIL.
"""

from __future__ import annotations

import collections
import functools
import heapq
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .codec import PlainDecoder
from .endpoint import Endpoint
from .net import shutdown_quietly

__all__ = ["Pump", "PumpResult", "shared_pump", "FIRST_FLIGHT_WAIT"]

log = logging.getLogger("relay")

FIRST_FLIGHT_WAIT = 0.05
MAX_EVENTS = 256  # per epoll wait: Python's default sizes (and allocates) a buffer of 1023 each call
SWEEP_INTERVAL = 1.0

# epoll where there is one (Linux), else poll: the same register/modify/unregister/poll calls.
_EPOLL = hasattr(select, "epoll")
_IN = select.EPOLLIN if _EPOLL else select.POLLIN
_OUT = select.EPOLLOUT if _EPOLL else select.POLLOUT
_GONE = (select.EPOLLHUP | select.EPOLLERR) if _EPOLL else (select.POLLHUP | select.POLLERR | select.POLLNVAL)
# Sockets stay in blocking mode (no timeout) and every recv and send says MSG_DONTWAIT.
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_INISH = _IN | _GONE  # a hang-up or an error is read (and reported) as input...
_OUTISH = _OUT | _GONE  # ...or as output, whichever the socket waits for


@dataclass
class PumpResult:
    bytes_up: int
    bytes_down: int
    error: BaseException | None


class _Direction:
    """One way through a session: from ``src`` to ``dst``."""

    __slots__ = ("src", "dst", "decoder", "encode", "pending", "moved", "reading", "done", "head", "other")

    def __init__(self, src: Endpoint, dst: Endpoint) -> None:
        self.src = src.sock
        self.dst = dst.sock
        self.decoder = src.decoder or PlainDecoder()
        self.encode = dst.encoder.encode if dst.encoder is not None else None
        self.pending: memoryview | None = None  # framed bytes dst has not taken yet
        self.moved = 0  # payload bytes
        self.reading = True  # until EOF from src
        self.done = False  # EOF from src seen, everything before it sent, dst shut for writing
        self.head = dst.first_flight  # plaintext that must go first, with the first data
        dst.first_flight = None
        self.other: _Direction | None = None  # the way back

    def read(self) -> bool:
        """Read once and pass on what that decodes; True when what the two sockets wait for
        may have changed (EOF, or bytes left pending), so that the pump must look again."""
        try:
            n = self.src.recv_into(self.decoder.recv_buffer(), 0, _DONTWAIT)
        except BlockingIOError:
            return False
        if not n:
            self.decoder.eof()
            self.reading = False
            self.send_head()
            if self.pending is None:
                self._finish()
            return True
        data = self.decoder.received(n)
        if data:
            self.moved += len(data)
            if self.head is not None:
                data, self.head = self.head + bytes(data), None
            return self._send(data)
        return False

    def send_head(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            self._send(head)

    def _send(self, data: memoryview | bytes) -> bool:
        """Send a frame of ``data``; True when part of it is left pending."""
        frame = self.encode(data) if self.encode is not None else data
        try:
            sent = self.dst.send(frame, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            self.pending = memoryview(frame)[sent:]
            return True
        return False

    def flush(self) -> None:
        try:
            sent = self.dst.send(self.pending, _DONTWAIT)  # type: ignore[arg-type]
        except BlockingIOError:
            return
        assert self.pending is not None
        self.pending = self.pending[sent:] if sent < len(self.pending) else None
        if self.pending is None and not self.reading:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        if not self.other.done:  # type: ignore[union-attr]  # else both sockets close now, with their FINs
            shutdown_quietly(self.dst, socket.SHUT_WR)


class _Flow:
    """One session in the pump: two sockets, two directions."""

    __slots__ = ("up", "down", "client", "upstream", "timeout", "on_done", "cfd", "ufd", "cmask", "umask", "active", "connecting", "on_connected", "on_failed", "head_due", "timers", "ended")

    def __init__(
        self,
        client: Endpoint,
        upstream: Endpoint,
        timeout: float,
        on_done: Callable[[PumpResult], None],
        early: bytes,
        on_connected: Callable[[], bytes] | None = None,
        on_failed: Callable[[BaseException], bytes] | None = None,
    ) -> None:
        self.up = _Direction(client, upstream)
        self.down = _Direction(upstream, client)
        self.up.other, self.down.other = self.down, self.up
        self.client = client
        self.upstream = upstream
        self.timeout = timeout
        self.on_done = on_done
        self.cfd, self.ufd = client.sock.fileno(), upstream.sock.fileno()
        self.cmask = self.umask = 0  # what each socket is registered for (0: not registered)
        self.active = time.monotonic()
        self.connecting = upstream.connecting  # until the upstream's connect completes: nothing moves
        self.on_connected = on_connected  # what the client gets first once it does (a SOCKS5 reply)
        self.on_failed = on_failed  # what it gets if it never does
        self.head_due = False  # the first flight goes as soon as it can: the client spoke already
        self.timers: list[_Timer] = []
        if early:
            # The client spoke during the handshake: its data leaves with the head, at once.
            self.up.head = (self.up.head or b"") + early
            self.up.moved += len(early)
            self.head_due = True
        self.ended = False

    def handle(self, reader: _Direction, sender: _Direction, events: int) -> bool:
        """Act on a socket's events (``reader`` reads from it, ``sender`` sends to it); True when
        the first flight must now wait for client data."""
        if self.connecting:
            if reader is self.down:
                return self.connected(events)
            return False
        if events & _OUTISH and sender.pending is not None:
            sender.flush()
        if events & _INISH and reader.reading and reader.pending is None:
            reader.read()
        return False

    def connected(self, events: int, known: bool = False) -> bool:
        """The upstream's non-blocking connect finished: raise its error, or start moving.
        An event without an error or hang-up is checked with getpeername (``known``: it was):
        an event left over for a descriptor closed and reused within one batch of the loop's
        must not pass for the connect's."""
        if events & _GONE:
            code = self.upstream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
        elif not known and not _connected_now(self.upstream.sock):
            return False  # still connecting
        self.connecting = False
        if self.on_connected is not None:
            reply, self.on_connected = self.on_connected(), None
            self.down.head = reply
            self.down.send_head()  # plain bytes to the client, before anything from upstream
        up = self.up
        if self.head_due:
            up.send_head()
        elif up.reading and up.pending is None:
            up.read()  # the client has usually spoken by now: no need to wait for its event
        return up.head is not None  # the client has not: the first flight waits for it


class _Timer:
    """A ``call_later`` handle. A cancelled timer lets go of its function at once (a session's
    handshake deadline would otherwise keep the session alive until it was due)."""

    __slots__ = ("entry", "pump")

    def __init__(self, entry: list, pump: Pump) -> None:
        self.entry, self.pump = entry, pump

    def cancel(self) -> None:
        entry = self.entry
        if entry[2] is not None:  # still in the heap
            entry[2] = entry[3] = None
            self.pump._cancelled_timers += 1


class Pump:
    """The process's event loop: the thread that moves every session's bytes, and that runs
    evented handshakes (see relay.server). ``start`` and ``call_soon`` are thread-safe; ``watch``,
    ``unwatch`` and ``call_later`` are for code running in the loop (``in_loop()``)."""

    def __init__(self) -> None:
        self._poller = select.epoll() if _EPOLL else select.poll()
        self._wake_reader, self._waker = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._waker.setblocking(False)
        self._poller.register(self._wake_reader.fileno(), _IN)
        # fd -> (its flow, the direction reading from it, the one sending to it), or (a
        # watcher's callback, None, None)
        self._sockets: dict[int, tuple] = {}
        self._watched: dict[int, int] = {}  # fd -> the events a watcher waits for
        self._incoming: collections.deque[Callable[[], None]] = collections.deque()
        self._flows: set[_Flow] = set()
        self._timers: list[list] = []  # a heap of [when, serial, function or None, args]
        self._timer_serial = 0
        self._cancelled_timers = 0
        self._thread = threading.Thread(target=self._run, name="relay-pump", daemon=True)
        self._thread.start()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def start(
        self,
        client: Endpoint,
        upstream: Endpoint,
        *,
        timeout: float,
        on_done: Callable[[PumpResult], None],
        early: bytes = b"",
        on_connected: Callable[[], bytes] | None = None,
        on_failed: Callable[[BaseException], bytes] | None = None,
    ) -> None:
        """Move the session's bytes from now on; ``on_done(result)`` runs (in the pump thread)
        once both directions ended, after ``upstream`` was closed. The client socket is left to
        ``on_done``'s owner. ``early`` is client data read during the handshake: it goes
        upstream first (after the upstream's ``first_flight``), counted as the client's.
        ``on_connected()``, for a connecting upstream, gives bytes sent to the client first once
        the connect completes; ``on_failed(error)`` the bytes it gets if the connect fails."""
        for sock in (client.sock, upstream.sock):
            # Non-blocking per call (MSG_DONTWAIT) rather than per socket: a socket without a
            # timeout needs no mode switch, a system call that releases the GIL.
            mode = sock.gettimeout()
            if mode != 0.0 and (mode is not None or not _DONTWAIT):
                sock.setblocking(False)
        flow = _Flow(client, upstream, timeout, on_done, early, on_connected, on_failed)  # both only while connecting
        self.call_soon(self._admit, flow)

    def call_soon(self, function: Callable[..., None], *args: object) -> None:
        """Run ``function(*args)`` in the loop: now when called from it, else at its next turn."""
        if self.in_loop():
            function(*args)
            return
        self._incoming.append(functools.partial(function, *args))
        try:
            self._waker.send(b"\0")
        except BlockingIOError:
            pass  # the pump has wake-ups pending already

    def call_later(self, delay: float, function: Callable[..., None], *args: object) -> _Timer:
        """Run ``function(*args)`` in the loop after ``delay`` seconds, unless cancelled first."""
        self._timer_serial += 1
        # [when, serial, function, args]: compared by when, then serial, in C, never further
        entry = [time.monotonic() + delay, self._timer_serial, function, args]
        heapq.heappush(self._timers, entry)
        if self._cancelled_timers > 1024 and self._cancelled_timers > len(self._timers) // 2:
            self._timers[:] = [t for t in self._timers if t[2] is not None]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0
        return _Timer(entry, self)

    def watch(self, sock: socket.socket, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` whenever ``sock`` is ready for ``events`` (IN, OUT; hang-ups
        and errors always count), until ``unwatch``. Watching again changes the events."""
        fd = sock.fileno()
        if fd in self._watched:
            self._poller.modify(fd, events)
        else:
            self._poller.register(fd, events)
        self._watched[fd] = events
        self._sockets[fd] = (callback, None, None)

    def unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._watched.pop(fd, None) is not None:
            self._sockets.pop(fd, None)
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def _run(self) -> None:
        while True:
            try:
                self._serve()
            except Exception:  # noqa: BLE001 - a bug here must not freeze every session
                log.exception("pump loop failed; restarting it")
                time.sleep(0.1)

    def _serve(self) -> None:
        poll = self._poller.poll
        scale = 1.0 if _EPOLL else 1000.0  # epoll waits in seconds, poll in milliseconds
        sockets = self._sockets
        timers = self._timers
        monotonic = time.monotonic
        next_sweep = monotonic() + SWEEP_INTERVAL
        while True:
            due = timers[0][0] if timers and timers[0][0] < next_sweep else next_sweep
            wait = due - monotonic()
            if wait < 0.0:
                wait = 0.0
            events = poll(wait * scale, MAX_EVENTS) if _EPOLL else poll(wait * scale)
            now = monotonic()
            for fd, event in events:
                entry = sockets.get(fd)
                if entry is None:
                    self._run_incoming()
                    continue
                flow, reader, sender = entry
                if reader is None:  # a watcher
                    try:
                        flow(event)
                    except Exception:  # noqa: BLE001 - watchers report their own errors
                        log.exception("an event handler failed")
                    continue
                if flow.ended:
                    continue
                flow.active = now
                try:
                    if event == _IN and reader.pending is None and reader.reading and not flow.connecting:
                        # The common event: data to move on, nothing held back. What the
                        # sockets wait for changes only if the read says so.
                        if reader.read():
                            self._update(flow)
                        continue
                    if flow.handle(reader, sender, event):
                        self._wait_for_first_data(flow)
                    self._update(flow)
                except BaseException as e:  # noqa: BLE001 - whatever ends a session is its error
                    self._end(flow, e)
            flow = entry = reader = sender = None  # type: ignore[assignment]  # an ended session is not kept until the next event
            while timers and timers[0][0] <= now:
                entry = heapq.heappop(timers)
                function, args = entry[2], entry[3]
                if function is None:
                    self._cancelled_timers -= 1
                    continue
                entry[2] = entry[3] = None  # fired: a late cancel() is a no-op
                try:
                    function(*args)
                except Exception:  # noqa: BLE001
                    log.exception("a timer failed")
                function = args = None
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                for flow in [f for f in self._flows if now - f.active >= f.timeout]:
                    self._end(flow, TimeoutError("idle timeout"))
                flow = None  # type: ignore[assignment]

    def _run_incoming(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        incoming = self._incoming
        while incoming:
            function = incoming.popleft()
            try:
                function()
            except Exception:  # noqa: BLE001
                log.exception("a call in the pump failed")

    def _admit(self, flow: _Flow) -> None:
        self._flows.add(flow)
        self._sockets[flow.cfd] = (flow, flow.up, flow.down)
        self._sockets[flow.ufd] = (flow, flow.down, flow.up)
        if flow.connecting and _connected_now(flow.upstream.sock):
            # A loopback connect completes within connect() itself: waiting for the writable
            # event would cost a turn of the loop and two epoll_ctl calls per session.
            self._guard(flow, self._connected_at_once, flow)
            return
        if flow.connecting:
            # The first flight's wait starts once connected (``connected``): the client has
            # usually spoken by then, and then no timer is needed at all.
            flow.timers.append(self.call_later(flow.upstream.connect_timeout, self._connect_timed_out, flow))
        elif flow.up.head is not None and not flow.head_due:
            self._wait_for_first_data(flow)
        elif flow.head_due:
            self._guard(flow, flow.up.send_head)
            return
        self._guard(flow, _nothing)

    def _connected_at_once(self, flow: _Flow) -> None:
        if flow.connected(_OUT, known=True):
            self._wait_for_first_data(flow)

    def _wait_for_first_data(self, flow: _Flow) -> None:
        # FIRST_FLIGHT_WAIT without client data: the client waits for the server to speak first.
        flow.timers.append(self.call_later(FIRST_FLIGHT_WAIT, self._guard, flow, flow.up.send_head))

    def _connect_timed_out(self, flow: _Flow) -> None:
        if flow.connecting and not flow.ended:
            self._end(flow, TimeoutError("timed out"))

    def _guard(self, flow: _Flow, action: Callable[..., None], *args: object) -> None:
        """Run ``action`` for ``flow`` and update what its sockets wait for; any error (a
        reset, a bad chunk, a socket closed under us) ends that session, never the pump."""
        if flow.ended:
            return
        try:
            action(*args)
            self._update(flow)
        except BaseException as e:  # noqa: BLE001 - whatever ends a session is its error
            self._end(flow, e)

    def _update(self, flow: _Flow) -> None:
        if flow.ended:
            return
        up, down = flow.up, flow.down
        if up.done and down.done:
            self._end(flow, None)
            return
        # What each socket waits for: input while the direction reading it has nothing pending
        # (backpressure), output while the other direction has bytes pending for it; while the
        # upstream connects, only its completion.
        if flow.connecting:
            cmask, umask = 0, _OUT
        else:
            cmask = _IN if up.reading and up.pending is None else 0
            umask = _IN if down.reading and down.pending is None else 0
            if down.pending is not None:
                cmask |= _OUT
            if up.pending is not None:
                umask |= _OUT
        if cmask != flow.cmask:
            self._register(flow.cfd, flow.cmask, cmask)
            flow.cmask = cmask
        if umask != flow.umask:
            self._register(flow.ufd, flow.umask, umask)
            flow.umask = umask

    def _register(self, fd: int, registered: int, mask: int) -> None:
        if not registered:
            self._poller.register(fd, mask)
        elif not mask:
            self._poller.unregister(fd)
        else:
            self._poller.modify(fd, mask)

    def _end(self, flow: _Flow, error: BaseException | None) -> None:
        """Unregister, close the upstream, and report; safe to call twice."""
        if flow.ended:
            return
        flow.ended = True
        self._flows.discard(flow)
        # The two directions refer to each other: without this, a session's buffers, codecs
        # and sockets would wait for the cyclic garbage collector, which they keep busy.
        flow.up.other = flow.down.other = None
        for timer in flow.timers:
            timer.cancel()
        for fd, registered in ((flow.cfd, flow.cmask), (flow.ufd, flow.umask)):
            self._sockets.pop(fd, None)
            if registered:
                try:
                    self._poller.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
        if error is not None:
            if flow.connecting and flow.on_failed is not None:
                try:  # the client's last word (a SOCKS5 failure reply), if its buffer takes it
                    flow.client.sock.send(flow.on_failed(error), _DONTWAIT)
                except Exception:  # noqa: BLE001 - the session is over either way
                    pass
            for sock in (flow.client.sock, flow.upstream.sock):
                shutdown_quietly(sock, socket.SHUT_RDWR)
        flow.upstream.close()
        try:
            flow.on_done(PumpResult(flow.up.moved, flow.down.moved, error))
        except Exception:  # noqa: BLE001 - the pump must outlive any session's bookkeeping
            log.exception("ending a session failed")


def _nothing() -> None:
    pass


def _connected_now(sock: socket.socket) -> bool:
    """Whether a non-blocking connect has completed already (it has a peer)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


_shared: Pump | None = None
_shared_lock = threading.Lock()


def shared_pump() -> Pump:
    """The process's pump, started on first use."""
    global _shared
    shared = _shared
    if shared is not None:  # the common case, without the lock (it is called several times a session)
        return shared
    with _shared_lock:
        if _shared is None:
            _shared = Pump()
        return _shared
