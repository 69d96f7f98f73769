"""Datagram batches (relay.gso): runs of like datagrams in one system call, bursts read whole,
and every datagram on the wire still a datagram of its own, in order, through real sockets."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import time

import pytest

from relay.gso import GRO_CONTROL_SPACE, MAX_SEGMENTS, DatagramBatch, enable_gro, read_burst, segments

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDP GSO and GRO are Linux's")
SO_NO_CHECK = 11  # Linux: UDP without checksums, which the kernel will not segment


@pytest.fixture
def receiver():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


@pytest.fixture
def sender(receiver):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(receiver.getsockname())
    yield sock
    sock.close()


def held(sock: socket.socket) -> DatagramBatch:
    """A batch whose owner flushes it by hand (the UDP server's way)."""
    batch = DatagramBatch(sock)
    batch.on_queued = lambda batch: True  # flushed by hand
    return batch


def read_whole(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` datagrams, cut apart where the kernel handed them over whole."""
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        data, ancillary, _, _ = sock.recvmsg(65535, GRO_CONTROL_SPACE)
        got.extend(segments(data, ancillary))
    return got


# A burst as a relay makes one: equal sizes, a shorter last one, then other sizes and a tiny one.
MIXED = [os.urandom(1200) for _ in range(5)] + [os.urandom(700)] + [os.urandom(1200) for _ in range(3)] + [b"x"]


def test_a_burst_arrives_datagram_by_datagram_in_order(sender, receiver):
    batch = held(sender)
    for packet in MIXED:
        batch.add(packet)
    assert len(batch) == len(MIXED)
    batch.flush()
    assert len(batch) == 0
    assert [receiver.recv(65535) for _ in MIXED] == MIXED


@linux
def test_a_receiver_that_asks_gets_runs_whole_and_cuts_them_apart(sender, receiver):
    assert enable_gro(receiver)
    batch = held(sender)
    for packet in MIXED:
        batch.add(packet)
    batch.flush()
    calls = 0
    got: list[bytes] = []
    while len(got) < len(MIXED) and calls < len(MIXED):
        data, ancillary, _, _ = receiver.recvmsg(65535, GRO_CONTROL_SPACE)
        got.extend(segments(data, ancillary))
        calls += 1
    assert got == MIXED
    assert calls < len(MIXED)  # some run came in one piece: that is what GSO and GRO are for


def test_without_an_owner_a_batch_sends_at_once(sender, receiver):
    batch = DatagramBatch(sender)
    batch.add(b"now")
    assert len(batch) == 0
    assert receiver.recv(100) == b"now"
    batch.on_queued = lambda batch: False  # an owner that will not flush this one: at once too
    batch.add(b"also now")
    assert len(batch) == 0
    assert receiver.recv(100) == b"also now"


@linux
def test_a_full_batch_sends_itself(sender, receiver):
    enable_gro(receiver)
    queued = []
    batch = DatagramBatch(sender)
    batch.on_queued = lambda batch: queued.append(batch) or True
    packets = [struct.pack("!I", i) * 100 for i in range(MAX_SEGMENTS + 3)]
    for packet in packets:
        batch.add(packet)
    assert len(batch) == 3 and len(queued) == 2  # emptied once at MAX_SEGMENTS, then queued again
    assert read_whole(receiver, MAX_SEGMENTS) == packets[:MAX_SEGMENTS]
    batch.flush()
    assert read_whole(receiver, 3) == packets[MAX_SEGMENTS:]


def test_runs_follow_the_address_of_each_packet(receiver):
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with other, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        other.bind(("127.0.0.1", 0))
        other.settimeout(2)
        batch = held(sock)
        to_first = [b"a" * 300, b"b" * 300, b"c" * 300]
        to_other = [b"d" * 300, b"e" * 300]
        for packet, address in zip(to_first[:2] + to_other + to_first[2:], [receiver.getsockname()] * 2 + [other.getsockname()] * 2 + [receiver.getsockname()]):
            batch.add(packet, address)
        batch.flush()
        assert [receiver.recv(1000) for _ in to_first] == to_first
        assert [other.recv(1000) for _ in to_other] == to_other


@linux
def test_a_route_that_refuses_gso_gets_one_datagram_per_call(sender, receiver):
    """SO_NO_CHECK: the kernel refuses to segment. Each refusal sends that run one by one and
    stops trying runs of datagrams that large; after a few, the batch stops trying at all."""
    sender.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    batch = held(sender)
    total = 0
    for size in (1200, 900, 600, 300, 100):
        burst = [bytes([size % 251]) * size] * 4 + [b"short"]
        for packet in burst:
            batch.add(packet)
        batch.flush()
        total += len(burst)
        assert [receiver.recv(65535) for _ in burst] == burst
        if not batch.gso:
            break
    assert not batch.gso and size == 300  # three refusals lowered the size, the fourth ended GSO
    assert batch.sent == total


@linux
def test_a_socket_without_udp_segmentation_sends_one_datagram_per_call():
    """A Unix datagram socket has no UDP_SEGMENT: as on a kernel before 4.18, whose sendmsg
    would ignore the control message and glue the run into one datagram, GSO is never tried."""
    first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with first, second:
        second.settimeout(2)
        batch = held(first)
        assert not batch.gso
        for packet in MIXED:
            batch.add(packet)
        batch.flush()
        assert [second.recv(65535) for _ in MIXED] == MIXED
        assert batch.calls == batch.sent == len(MIXED)


def test_empty_datagrams_stay_datagrams(sender, receiver):
    """The kernel would send nothing for an empty segment: an empty datagram never joins a run."""
    enable_gro(receiver)
    burst = [b"a" * 100, b"", b"b" * 100, b"c" * 100, b"", b"", b"d" * 40]
    batch = held(sender)
    for packet in burst:
        batch.add(packet)
    batch.flush()
    assert read_whole(receiver, len(burst)) == burst
    assert batch.sent == len(burst)


def test_a_run_that_fails_goes_one_by_one_and_costs_one_datagram(receiver):
    """A connected socket with an ICMP error pending: the run's sendmsg reports it and sends
    nothing, so the run goes again one datagram at a time. As with one send per datagram, the
    error costs one datagram at most, and each failure is reported on its own."""
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    gone = closed.getsockname()
    closed.close()
    errors = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        batch = held(sock)
        batch.on_error = lambda error: errors.append(error.errno)
        sock.connect(gone)
        sock.send(b"lost")  # loopback answers with ICMP port unreachable
        poller = select.poll()
        poller.register(sock, select.POLLERR)
        assert poller.poll(2000), "no ICMP error came back"
        for packet in (b"1" * 50, b"2" * 50, b"3" * 50):
            batch.add(packet)
        batch.flush()
        batch.flush()  # nothing held: nothing happens
    assert set(errors) <= {errno.ECONNREFUSED} and len(errors) <= 1  # later ICMP errors, if in time
    assert batch.sent + len(errors) == 3 and batch.sent >= 2
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        batch = held(sock)
        reported = []
        batch.on_error = lambda error: reported.append(error.errno)
        batch.add(b"x" * 70000, receiver.getsockname())  # larger than any datagram
        batch.add(b"fine", receiver.getsockname())
        batch.flush()
        assert reported == [errno.EMSGSIZE]
        assert receiver.recv(100) == b"fine"


def test_an_error_with_no_one_to_report_to_is_raised(receiver):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        batch = DatagramBatch(sock)
        with pytest.raises(OSError) as info:
            batch.add(b"x" * 70000, receiver.getsockname())
        assert info.value.errno == errno.EMSGSIZE


def test_segments_without_a_gro_size_is_the_datagram_itself():
    assert list(segments(b"whole", [])) == [b"whole"]
    assert list(segments(b"abcdef", [(socket.SOL_SOCKET, 1, struct.pack("=i", 2))])) == [b"abcdef"]
    assert list(segments(b"abcdefg", [(17, 104, struct.pack("=i", 3))])) == [b"abc", b"def", b"g"]
    assert list(segments(b"abc", [(17, 104, struct.pack("=i", 3))])) == [b"abc"]


@linux
def test_read_burst_gives_a_list_for_a_burst_and_the_datagram_otherwise(sender, receiver):
    space = GRO_CONTROL_SPACE if enable_gro(receiver) else 0
    batch = held(sender)
    for packet in MIXED[:6]:  # five of 1200 bytes and a shorter last one: one run
        batch.add(packet)
    batch.flush()
    sender.send(b"alone")
    data, address = read_burst(receiver, space)
    assert data == MIXED[:6] and address == sender.getsockname()
    assert read_burst(receiver, space) == (b"alone", sender.getsockname())
    sender.send(b"without GRO")
    assert read_burst(receiver, 0) == (b"without GRO", sender.getsockname())
