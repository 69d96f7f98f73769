"""The pump: the one place that moves a session's bytes.

Two directions, each a tight loop in its own thread (the session's thread carries the client's
bytes up, a helper thread carries the answers down)::

    recv_into(decoder buffer) -> decoder.received -> encoder.encode -> sendall (whole frames)

* Half-close: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other, and the other
  direction keeps going until its own EOF.
* Idle timeout: kernel receive/send timeouts (SO_RCVTIMEO, SO_SNDTIMEO) wake a direction that
  waited ``timeout`` seconds; the session ends if the other direction moved nothing meanwhile
  either, so it ends between ``timeout`` and ``2 * timeout`` after the last byte.
* Failure: an error in one direction shuts both sockets down, which wakes the other direction;
  the first error is the session's.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from .codec import PlainDecoder
from .endpoint import Endpoint
from .net import set_io_timeout, shutdown_quietly, wait_readable

__all__ = ["relay", "PumpResult", "FIRST_FLIGHT_WAIT"]

FIRST_FLIGHT_WAIT = 0.05
"""How long a first flight waits for the client's first data, to leave in one packet with it."""


@dataclass
class PumpResult:
    bytes_up: int
    bytes_down: int
    error: BaseException | None


class _Pump:
    def __init__(self, client: Endpoint, upstream: Endpoint, timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.moved = [0, 0]  # payload bytes: [up, down]
        self.seen = [0, 0]  # what each direction last saw of the other's count, at a timeout
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        for endpoint in (client, upstream):
            set_io_timeout(endpoint.sock, timeout)

    def forward(self, index: int, src: Endpoint, dst: Endpoint) -> None:
        try:
            self._forward(index, src, dst)
        except BaseException as e:  # noqa: BLE001 - every failure ends the session, the first one is reported
            self.abort(e)

    def _forward(self, index: int, src: Endpoint, dst: Endpoint) -> None:
        recv_into = src.sock.recv_into
        sendall = dst.sock.sendall
        decoder = src.decoder or PlainDecoder()
        recv_buffer = decoder.recv_buffer
        received = decoder.received
        encode = dst.encoder.encode if dst.encoder is not None else None
        moved = self.moved
        head = dst.first_flight
        if head is not None:
            dst.first_flight = None
            if not wait_readable(src.sock, FIRST_FLIGHT_WAIT):
                sendall(encode(head) if encode else head)
                head = None
        while True:
            try:
                n = recv_into(recv_buffer())
            except BlockingIOError:
                if self._idle(index):
                    raise TimeoutError("idle timeout") from None
                continue
            if not n:
                decoder.eof()
                if head is not None:
                    sendall(encode(head) if encode else head)
                shutdown_quietly(dst.sock, socket.SHUT_WR)
                return
            data = received(n)
            if data:
                moved[index] += len(data)
                if head is not None:
                    data, head = head + bytes(data), None
                sendall(encode(data) if encode else data)

    def _idle(self, index: int) -> bool:
        other = self.moved[1 - index]
        if other != self.seen[index]:
            self.seen[index] = other
            return False
        return True

    def abort(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
        for endpoint in (self.client, self.upstream):
            shutdown_quietly(endpoint.sock, socket.SHUT_RDWR)


def relay(client: Endpoint, upstream: Endpoint, *, timeout: float, name: str = "pump") -> PumpResult:
    """Move bytes between ``client`` and ``upstream`` until both directions end; close ``upstream``.

    The client socket is left for its owner (socketserver) to close.
    """
    pump = _Pump(client, upstream, timeout)
    down = threading.Thread(target=pump.forward, args=(1, upstream, client), name=f"{name}-down", daemon=True)
    down.start()
    try:
        pump.forward(0, client, upstream)
    finally:
        down.join()
        upstream.close()
    return PumpResult(pump.moved[0], pump.moved[1], pump.error)
