"""Socket helpers: the one place where names are resolved, addresses checked and sockets tuned."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Callable

from .address import Address
from .errors import TargetRefused, WouldBlock

__all__ = ["connect_tcp", "start_connect", "tune", "set_receive_timeout", "set_io_timeout", "wait_readable", "tcp_byte_counts", "shutdown_quietly", "close_quietly"]

Check = Callable[[str], "str | None"]


def connect_tcp(target: Address, timeout: float, check: Check | None = None) -> socket.socket:
    """Resolve ``target`` once, and connect to the first address that ``check`` allows.

    ``check(ip)`` returns why an address is forbidden, or None. The socket that comes back is
    connected to an address that was checked, never to a name resolved again. Raises
    ``TargetRefused`` when every address is forbidden, ``socket.gaierror`` when the name does not
    resolve, and the last connect error otherwise.
    """
    infos = _literal_address(target) or socket.getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    refused: list[str] = []
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        ip = str(sockaddr[0])
        reason = check(ip) if check else None
        if reason:
            refused.append(f"{ip} ({reason})")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            # A blocking connect bounded by SO_SNDTIMEO: one system call, where settimeout()
            # takes five (two mode switches, connect, poll, SO_ERROR).
            _set_timeval(sock, socket.SO_SNDTIMEO, timeout)
            sock.connect(sockaddr)
            _set_timeval(sock, socket.SO_SNDTIMEO, 0)
        except OSError as e:
            sock.close()
            last_error = TimeoutError("timed out") if e.errno == errno.EINPROGRESS else e
            continue
        tune(sock)
        return sock
    if last_error is not None:
        raise last_error
    raise forbidden(target, refused)


def start_connect(target: Address, check: Check | None = None) -> socket.socket:
    """``connect_tcp`` for the event loop: start a non-blocking connect to an IP literal and
    return the socket at once (the pump sees the connect complete). A host name would have to
    be resolved, which blocks: ``WouldBlock`` says so, and the caller connects from a thread."""
    infos = _literal_address(target)
    if infos is None:
        raise WouldBlock(f"{target.host} is a name to resolve")
    family, kind, proto, _, sockaddr = infos[0]
    reason = check(str(sockaddr[0])) if check else None
    if reason:
        raise forbidden(target, [f"{sockaddr[0]} ({reason})"])
    sock = socket.socket(family, kind | _NONBLOCK, proto)
    if not _NONBLOCK:
        sock.setblocking(False)
    code = sock.connect_ex(sockaddr)
    if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
        sock.close()
        raise OSError(code, os.strerror(code))
    tune(sock)
    return sock


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def forbidden(target: Address, refused: list[str]) -> TargetRefused:
    """The error for a target whose every address the egress policy refused."""
    return TargetRefused(f"{target.host} is forbidden: {', '.join(refused)}; start the remote with --allow-private to allow it")


def tune(sock: socket.socket) -> None:
    """Whole frames go out in one send, so Nagle's algorithm would only add latency."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a socketpair standing in for a handler)


def _literal_address(target: Address) -> list | None:
    """getaddrinfo's answer for an IP literal, without the call (it would release the GIL)."""
    host = target.host
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sockaddr = (host, target.port) if family == socket.AF_INET else (host, target.port, 0, 0)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
    return None


def _set_timeval(sock: socket.socket, option: int, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO: a blocking recv or accept fails with EAGAIN (``BlockingIOError``) after
    ``seconds``, at no cost per call."""
    _set_timeval(sock, socket.SO_RCVTIMEO, seconds)


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel-side receive and send timeouts on a blocking socket.

    A blocked recv or send then fails with EAGAIN (``BlockingIOError``) after ``seconds``, which
    costs nothing per call, unlike ``settimeout`` that polls before every operation.
    """
    sock.settimeout(None)
    _set_timeval(sock, socket.SO_RCVTIMEO, seconds)
    _set_timeval(sock, socket.SO_SNDTIMEO, seconds)


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


_TCP_INFO_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received (Linux 4.1+)
_TCP_INFO_BYTES_OFFSET = 120
_FIN_RECEIVED_STATES = frozenset((6, 8, 9, 11))  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING (tcpi_state)


def tcp_byte_counts(sock: socket.socket) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) on a TCP socket, as the kernel counted them.

    Lets the core report a handler's traffic without wrapping its socket; None where the
    platform or the socket (a socket pair) does not say.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_OFFSET)
    if received and info[0] in _FIN_RECEIVED_STATES:
        received -= 1  # the peer's FIN takes one sequence number, and the kernel counts it
    return received, acked


def shutdown_quietly(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or reset: nothing left to tell the peer


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
