"""Datagrams in batches: UDP generic segmentation offload (GSO) out, generic receive offload
(GRO) in, on Linux. Each datagram on the wire stays what it was; only system calls are shared.

Sending: ``DatagramBatch`` holds the packets a relay produced from one burst of input and
sends each run of them (consecutive packets to one address, all of one size but the last,
which may be shorter) with a single ``sendmsg`` carrying a ``UDP_SEGMENT`` control message.
The kernel cuts the run back into datagrams, on loopback only when the receiver asked for them
whole. Measured on loopback, 1248-byte datagrams: a lone sendto costs the sender about 8 us of
CPU; in runs of 8 the sender's cost falls to 1.3-2.2 us a datagram, the receiver's from 4.8 to
0.9-2.3 us.

Receiving: with ``UDP_GRO`` on, one ``recvmsg`` may return several datagrams of one sender,
glued together, and a control message with the size of each; ``segments`` cuts them apart.

Where the kernel or the route refuses GSO (no Linux, a kernel before 4.18, a device without
checksum offload), a batch falls back to one system call per datagram for good; where a route
refuses runs of datagrams larger than its MTU allows, it sends those one by one.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["DatagramBatch", "enable_gro", "read_burst", "segments", "GRO_CONTROL_SPACE", "MAX_SEGMENTS"]

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of kernels before 6.x: a run never holds more
MAX_RUN_BYTES = 65000  # a run goes out as one IP packet's worth of payload (65507 at most over IPv4)
_LINUX = sys.platform.startswith("linux")
_segment_size = struct.Struct("=H").pack
_gro_size = struct.Struct("=i").unpack_from
# Errors of a run's sendmsg that mean "not with GSO on this socket" (EIO: no checksum offload on
# the route's device, or IPsec), and "not with segments this large" (larger than the path's MTU
# allows; after a few of those, not at all).
_GSO_REFUSED = {errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_SIZE_REFUSED = {errno.EINVAL, errno.EMSGSIZE}
_MAX_REFUSALS = 3

GRO_CONTROL_SPACE = socket.CMSG_SPACE(4) if _LINUX else 0


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to hand over bursts of one sender's datagrams whole; False where it cannot.
    The caller must then read with ``recvmsg(size, GRO_CONTROL_SPACE)`` and cut with ``segments``."""
    if not _LINUX:
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def segments(data: bytes, ancillary: list[tuple[int, int, bytes]]) -> Iterator[bytes]:
    """The datagrams in what one ``recvmsg`` returned: one unless a GRO size came with it."""
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            size = _gro_size(value)[0]
            if 0 < size < len(data):
                return (data[start : start + size] for start in range(0, len(data), size))
    return iter((data,))


def read_burst(sock: socket.socket, space: int, size: int = 65535) -> tuple[bytes | list[bytes], Any]:
    """One read of ``sock``: ``(datagram, address)``, or ``(datagrams, address)`` with a list
    when a burst came whole. ``space`` is GRO_CONTROL_SPACE on a socket ``enable_gro`` took,
    else 0: then a plain recvfrom (there may be no recvmsg)."""
    if not space:
        return sock.recvfrom(size)
    data, ancillary, _, address = sock.recvmsg(size, space)
    if ancillary:
        return list(segments(data, ancillary)), address
    return data, address


class DatagramBatch:
    """Packets waiting to leave by one socket, sent together by ``flush``.

    ``add(packet, address)`` holds a packet (``address`` None on a connected socket). Who
    flushes is the owner's business: whenever the batch stops being empty, ``on_queued(batch)``
    is asked whether the owner will ``flush`` it soon (relay's UDP server: at the end of the
    burst it is reading); if not, or with ``on_queued`` unset, ``add`` sends at once. A batch
    of ``MAX_SEGMENTS`` packets flushes itself.

    ``flush`` sends everything held, every datagram as a datagram of its own, in order. A run
    that fails for any reason but GSO's is sent again one datagram at a time, so that an error
    costs what it cost without batches: each datagram a send refuses goes to ``on_error(error)``
    and the rest still goes (with ``on_error`` unset, the error is raised and what the batch
    still held is dropped). ``sent`` and ``calls`` count the datagrams handed to the kernel
    and the system calls that took them. One thread adds and flushes: a batch has no lock.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.on_queued: Callable[[DatagramBatch], bool] | None = None
        self.on_error: Callable[[OSError], None] | None = None
        self.gso = _gso_supported(sock)
        self.max_segment = MAX_RUN_BYTES  # lowered when a route refuses runs of larger datagrams
        self.sent = 0
        self.calls = 0
        self._refusals = 0
        self._packets: list[Any] = []
        self._addresses: list[Any] = []

    def __len__(self) -> int:
        return len(self._packets)

    def add(self, packet: Any, address: Any = None) -> None:
        packets = self._packets
        packets.append(packet)
        self._addresses.append(address)
        held = len(packets)
        if held == 1:
            on_queued = self.on_queued
            if on_queued is None or not on_queued(self):
                self.flush()
        elif held >= MAX_SEGMENTS:
            self.flush()

    def flush(self) -> None:
        packets, addresses = self._packets, self._addresses
        if not packets:
            return
        self._packets, self._addresses = [], []
        count = len(packets)
        if count == 1:  # a quiet moment's lone datagram
            self._send(packets, 0, 1, 0, addresses[0])
            return
        start = 0
        while start < count:
            # The run from `start`: one address, one size, the last one possibly shorter. An
            # empty datagram never joins one: the kernel would send nothing for it.
            address = addresses[start]
            size = len(packets[start])
            end = start + 1
            if self.gso and 0 < size <= self.max_segment:
                total = size
                while end < count and addresses[end] == address:
                    length = len(packets[end])
                    if length > size or length == 0 or total + length > MAX_RUN_BYTES:
                        break
                    total += length
                    end += 1
                    if length < size:
                        break
            self._send(packets, start, end, size, address)
            start = end

    def _send(self, packets: list[Any], start: int, end: int, size: int, address: Any) -> None:
        sock = self.sock
        self.calls += 1
        try:
            if end - start == 1:
                if address is None:
                    sock.send(packets[start])
                else:
                    sock.sendto(packets[start], address)
                self.sent += 1
                return
            control = [(SOL_UDP, UDP_SEGMENT, _segment_size(size))]
            if address is None:
                sock.sendmsg(packets[start:end], control)
            else:
                sock.sendmsg(packets[start:end], control, 0, address)
            self.sent += end - start
        except OSError as e:
            if end - start > 1:
                if e.errno in _SIZE_REFUSED and self._refusals < _MAX_REFUSALS:
                    # Larger than this route's MTU allows a segment to be (or SO_NO_CHECK):
                    # runs of datagrams this large go one by one from now on.
                    self._refusals += 1
                    self.max_segment = size - 1
                elif e.errno in _GSO_REFUSED or e.errno in _SIZE_REFUSED:
                    self.gso = False  # this socket takes no GSO: one datagram per call for good
                for index in range(start, end):  # any other error: as if sent one by one
                    self._send(packets, index, index + 1, size, address)
                return
            if self.on_error is None:
                raise
            self.on_error(e)


def _gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel knows UDP_SEGMENT on this socket. Kernels before 4.18 would ignore the
    control message and send a run as one datagram of everything: never risk that."""
    if not _LINUX:
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True
