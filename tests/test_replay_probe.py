"""Issue 6: the remote refuses replayed, duplicated and reflected flights, and answers every kind of
probe the same way: nothing on the wire, and a close at one deadline from accept.

Real sockets on loopback. Every wait is bounded: socket timeouts, joins with timeouts, wait_until.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from collections.abc import Iterator

import pytest
from conftest import ROOT
from relay_plugins.shadowsocks import replay_guard

from relay import Address, ConfigError
from relay.address import encode_address
from relay.config import _KNOWN
from relay.replay import SaltFilter, table_slots
from relay.testing import make_config, recv_exactly, socks5_connect, start_relay, udp_echo_server, wait_until

DEADLINE = 1.0  # handshake_timeout of the remotes under test
EARLY = 0.05  # a close may not come sooner than DEADLINE - EARLY after connect...
LATE = 0.6  # ...nor later than DEADLINE + LATE (a loaded machine schedules late, never early)
PASSWORD = "replay test"


# -- fixtures: a target that counts its connections, a remote, a capturing forwarder


class CountingTarget:
    """A TCP target that counts connections and answers the first data with ANSWER: the target's
    own address in Shadowsocks form, then b"pong". Sent back at the remote, the remote's
    encryption of that answer is a client flight naming this very target, so a reflection that
    got through would show up here as one more connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(0.1)
        self.address = Address("127.0.0.1", self.listener.getsockname()[1])
        self.answer = encode_address(self.address) + b"pong"
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if conn.recv(65536):
                    conn.sendall(self.answer)
                    while conn.recv(65536):
                        pass
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


class CapturingForwarder:
    """A TCP forwarder that records each connection's bytes both ways: ``flows[i]["up"]`` is
    what the client sent, ``flows[i]["down"]`` what the server answered."""

    def __init__(self, upstream: Address) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = Address("127.0.0.1", self.listener.getsockname()[1])
        self.flows: list[dict[str, bytearray]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            up = socket.create_connection(tuple(self.upstream), timeout=10)
            flow = {"up": bytearray(), "down": bytearray()}
            self.flows.append(flow)
            self._start(self._pipe, conn, up, flow["up"])
            self._start(self._pipe, up, conn, flow["down"])

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(65536):
                record += data
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def target() -> Iterator[CountingTarget]:
    server = CountingTarget()
    yield server
    server.close()


@contextlib.contextmanager
def remote_relay(pm, method: str = "chacha20-ietf-poly1305", **flags):
    flags = {"method": method, "password": PASSWORD, "allow_private": True, "handshake_timeout": DEADLINE, **flags}
    with start_relay(make_config("remote", pm, **flags), pm) as server:
        yield server


def flight(remote, payload: bytes) -> bytes:
    """A fresh client flight for ``remote``, as a relay local makes it: salt, then chunks."""
    config = remote.config
    return config.cipher.encryptor(config.key).encrypt(payload)


def probe(address: Address, data: bytes, half_close: bool = False, timeout: float = 5.0) -> tuple[bytes, float, str]:
    """Connect, send ``data`` (maybe half-close), read until EOF: (what came back, seconds
    from before connect to EOF, "eof" or "reset")."""
    started = time.monotonic()
    with socket.create_connection(tuple(address), timeout=timeout) as sock:
        received = bytearray()
        ending = "eof"
        try:
            if data:
                sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            ending = "reset"
        return bytes(received), time.monotonic() - started, ending


def run_concurrently(jobs, timeout: float = 10.0) -> list:
    """Call each job in its own thread at once; their results in order."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int, job) -> None:
        barrier.wait(timeout)
        try:
            results[i] = job()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a job did not finish"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def assert_refused_like_a_probe(result: tuple[bytes, float, str]) -> None:
    data, elapsed, ending = result
    assert data == b"", "the remote must never answer a probe"
    assert ending == "eof", "the remote closes with a FIN, not a reset"
    assert DEADLINE - EARLY <= elapsed <= DEADLINE + LATE, f"closed after {elapsed:.3f} s, not at the {DEADLINE} s deadline"


# -- replay, duplicates, reflection, truncation


def test_replayed_first_flight_is_refused_and_counted(pm, target, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    with remote_relay(pm) as remote:
        forwarder = CapturingForwarder(remote.address)
        try:
            local_flags = {"password": PASSWORD, "method": "chacha20-ietf-poly1305", "server": forwarder.address}
            with start_relay(make_config("local", pm, **local_flags), pm) as local, socks5_connect(local.address, target.address) as sock:
                sock.sendall(b"ping")
                assert recv_exactly(sock, len(target.answer)) == target.answer
            assert wait_until(lambda: len(forwarder.flows) == 1 and forwarder.flows[0]["down"])
        finally:
            forwarder.close()
        recorded = bytes(forwarder.flows[0]["up"])
        assert target.connections == 1
        assert len(replay_guard(remote.config).filter("tcp")) == 2  # the client's salt and the remote's own

        assert_refused_like_a_probe(probe(remote.address, recorded))
        assert_refused_like_a_probe(probe(remote.address, recorded, half_close=True))
        time.sleep(0.2)
        assert target.connections == 1, "a replayed flight reached the target"
        assert wait_until(lambda: remote.data.get("shadowsocks.replays") == 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "seen before" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one line per replay
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in warnings)


def test_replay_is_refused_because_of_the_filter(pm, target):
    """The control for the test above: the same recorded flight, sent to a remote that never saw
    it (same password, its own filter), is served. So the refusal above was the filter's."""
    with remote_relay(pm) as first, remote_relay(pm) as second:
        recorded = flight(first, encode_address(target.address) + b"ping")
        data, _, _ = probe(first.address, recorded, half_close=True)
        assert data  # served: the answer, encrypted
        assert_refused_like_a_probe(probe(first.address, recorded, half_close=True))
        data, _, _ = probe(second.address, recorded, half_close=True)
        assert data, "a remote with a filter of its own serves the flight"
        assert target.connections == 2


def test_simultaneous_connections_with_the_same_flight_reach_the_target_once(pm, target):
    with remote_relay(pm) as remote:
        same = flight(remote, encode_address(target.address) + b"ping")
        results = run_concurrently([lambda: probe(remote.address, same, half_close=True)] * 8)
        served = [result for result in results if result[0]]
        assert len(served) == 1, f"{len(served)} of 8 identical flights were served"
        for result in results:
            if not result[0]:
                assert_refused_like_a_probe(result)
        config = remote.config
        assert config.cipher.decryptor(config.key).decrypt(served[0][0]) == target.answer
        time.sleep(0.2)
        assert target.connections == 1
        assert remote.data.get("shadowsocks.replays") == 7


def test_reflected_server_flight_is_refused(pm, target):
    with remote_relay(pm) as remote, remote_relay(pm) as other:
        data, _, _ = probe(remote.address, flight(remote, encode_address(target.address) + b"ping"), half_close=True)
        assert len(data) > 32  # the remote's flight: its salt, then chunks
        assert target.connections == 1
        # The remote's own flight, sent back at it: it authenticates (same key) and its first
        # chunk names the target, but its salt is the remote's own, so it is refused.
        assert_refused_like_a_probe(probe(remote.address, data, half_close=True))
        time.sleep(0.2)
        assert target.connections == 1, "a reflected flight reached the target"
        assert remote.data.get("shadowsocks.replays") == 1
        # Control: a remote that did not send that flight serves it (it is a valid flight).
        answer, _, _ = probe(other.address, data, half_close=True)
        assert answer and target.connections == 2


def test_truncated_copies_sent_first_do_not_block_the_real_flight(pm, target):
    with remote_relay(pm) as remote:
        real = flight(remote, encode_address(target.address) + b"ping")
        salt = remote.config.cipher.key_size
        first_chunk = salt + 2 + 16 + len(encode_address(target.address) + b"ping") + 16
        assert first_chunk == len(real)
        cuts = [salt - 1, salt, salt + 10, salt + 18, salt + 19, first_chunk - 1]
        copies = []
        try:
            for cut in cuts:  # sent ahead, and still open (half-closed, or not) when the real one comes
                sock = socket.create_connection(tuple(remote.address), timeout=5)
                sock.sendall(real[:cut])
                if cut % 2:
                    sock.shutdown(socket.SHUT_WR)
                copies.append(sock)
            time.sleep(0.1)
            data, _, _ = probe(remote.address, real, half_close=True)
            config = remote.config
            assert config.cipher.decryptor(config.key).decrypt(data) == target.answer
            assert target.connections == 1
            for sock in copies:
                sock.settimeout(5)
                assert sock.recv(100) == b""  # and the copies got nothing
        finally:
            for sock in copies:
                sock.close()
        assert remote.data.get("shadowsocks.replays") is None


# -- probe resistance


COUNTS = (0, 1, 17, 33, 34, 35, 49, 50, 51, 100, 300)  # around 16+18 and 32+18: where a first length chunk fails


@pytest.mark.parametrize("method", ["chacha20-ietf-poly1305", "aes-128-gcm"])
def test_probe_close_time_is_the_deadline_whatever_was_sent(pm, method):
    """Random bytes, 0 to 300 of them, with and without a half-close: no answer, and EOF at the
    deadline every time. The probes run at once, each timed from its own connect."""
    rng = random.Random(6)
    with remote_relay(pm, method=method) as remote:
        cases = [(count, half_close) for count in COUNTS for half_close in (False, True)]
        payloads = [rng.randbytes(count) for count, _ in cases]
        jobs = [lambda data=data, half=half: probe(remote.address, data, half_close=half) for data, (_, half) in zip(payloads, cases)]
        results = run_concurrently(jobs)
        for (count, half_close), result in zip(cases, results):
            try:
                assert_refused_like_a_probe(result)
            except AssertionError as e:
                raise AssertionError(f"{count} bytes, half_close={half_close}: {e}") from None
        times = [elapsed for _, elapsed, _ in results]
        assert max(times) - min(times) < LATE, times
        assert wait_until(lambda: remote.live_sessions == 0)


def test_replayed_flight_and_garbage_close_alike(pm, target):
    """A replay, an authentic flight cut short, a wrong key and junk: the same answer (none)
    and the same close, so the prober learns nothing from which it sent."""
    with remote_relay(pm) as remote:
        good = flight(remote, encode_address(target.address) + b"ping")
        assert probe(remote.address, good, half_close=True)[0]
        with remote_relay(pm, password="another") as stranger:
            wrong_key = flight(stranger, encode_address(target.address) + b"ping")
        cases = [good, good[:40], wrong_key, os.urandom(len(good)), b""]
        results = run_concurrently([lambda data=data: probe(remote.address, data, half_close=True) for data in cases])
        for result in results:
            assert_refused_like_a_probe(result)


def test_a_prober_that_resets_ends_its_session_early(pm):
    """Only a reset ends a refused session before the deadline (nobody is left to time it)."""
    with remote_relay(pm, handshake_timeout=20.0) as remote:
        for data in (b"", os.urandom(10), os.urandom(100)):
            sock = socket.create_connection(tuple(remote.address), timeout=5)
            if data:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert wait_until(lambda: remote.live_sessions == 1)
            time.sleep(0.2)
            assert remote.live_sessions == 1  # half-closed: the remote waits for the deadline
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
            assert wait_until(lambda: remote.live_sessions == 0, timeout=3), "a reset should end the session"


# -- datagrams


def test_replayed_and_reflected_datagrams_are_dropped(pm, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    with udp_echo_server() as echo, remote_relay(pm, mode="tcp_and_udp") as remote:
        config = remote.config
        codec = config.cipher.datagram_codec(config.key)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.connect(tuple(remote.address))
            packet = codec.encode(echo, b"datagram")
            sock.send(packet)
            answer = sock.recv(65535)
            assert codec.decode(answer) == (echo, b"datagram")
            sock.settimeout(0.5)
            sock.send(packet)  # replayed
            sock.send(answer)  # the remote's own packet, reflected
            with pytest.raises(TimeoutError):
                sock.recv(65535)
            stats = remote.udp_server.stats
            assert wait_until(lambda: stats["replay"] == 2), stats
            sock.settimeout(2)
            sock.send(codec.encode(echo, b"fresh"))  # a fresh packet is still served
            assert codec.decode(sock.recv(65535)) == (echo, b"fresh")
    assert any("seen before" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# -- the remote's filter object and its config


def test_one_filter_per_remote_config_shared_by_its_listeners(pm):
    with remote_relay(pm, replay_capacity=1000, replay_window=60) as remote, remote_relay(pm) as other:
        guard = replay_guard(remote.config)
        assert guard is replay_guard(remote.config) and guard is not replay_guard(other.config)
        salts = guard.filter("tcp")
        assert (salts.capacity, salts.window) == (1000, 60.0)
        assert salts.nbytes == 2 * table_slots(1000) * 8


def test_a_guard_lives_no_longer_than_its_config(pm):
    config = make_config("remote", pm, password="p", replay_capacity=10)
    replay_guard(config).filter("tcp")
    alive = weakref.ref(config)
    del config
    gc.collect()
    assert alive() is None, "the replay guard keeps its config (and its filters' memory) alive"


def test_replay_config_keys(pm):
    config = make_config("remote", pm, file={"replay_capacity": 5000, "replay_window": 600}, password="p")
    assert (config.replay_capacity, config.replay_window) == (5000, 600.0)
    assert not config.warnings  # known keys
    assert {"replay_capacity", "replay_window"} <= _KNOWN
    for bad in ({"replay_capacity": 0}, {"replay_capacity": "many"}, {"replay_capacity": 10**12}, {"replay_window": 0}, {"replay_window": "long"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            make_config("remote", pm, file=bad, password="p")


# -- relay.replay, the filter itself


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def salt(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_filter_records_and_reports_salts():
    salts = SaltFilter(capacity=100, window=60)
    assert salts.add_if_new(b"a" * 32)
    assert b"a" * 32 in salts
    assert not salts.add_if_new(b"a" * 32)
    assert b"b" * 32 not in salts
    salts.add(b"b" * 32)
    assert not salts.add_if_new(b"b" * 32)
    assert len(salts) == 2


@pytest.mark.parametrize("seed", ["random", "0"])
def test_filter_fingerprints_with_and_without_hash_randomization(seed):
    """Fingerprints are Python's SipHash of the salt when the process's hash key is random, and
    the filter's own keyed BLAKE2b when PYTHONHASHSEED fixes it (an attacker could compute
    SipHash then); either way salts of any bytes-like type are remembered alike."""
    script = (
        "import os\n"
        "from relay import replay\n"
        "salts = replay.SaltFilter(capacity=1000, window=60)\n"
        "for i in range(500):\n"
        "    salt = os.urandom(32)\n"
        "    assert salts.add_if_new(salt)\n"
        "    assert not salts.add_if_new(bytearray(salt)) and memoryview(salt) in salts\n"
        "assert salts.add_if_new(b'x' * 32) and bytearray(b'x' * 32) in salts\n"
        "print(replay._SIPHASH)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("True" if seed == "random" else "False")


def test_filter_window_with_an_injected_clock():
    clock = FakeClock()
    rotations = []
    salts = SaltFilter(capacity=1000, window=100, clock=clock, on_rotate=lambda lifetime, full: rotations.append((lifetime, full)))
    assert salts.add_if_new(salt(1))
    clock.now += 99.9
    assert salt(1) in salts
    assert salts.add_if_new(salt(2))  # recorded at 99.9: now in the same generation as salt 1
    clock.now += 0.2  # 100.1: the generation retires, and is still consulted
    assert salt(1) in salts and salt(2) in salts
    assert rotations == [(pytest.approx(100.1), False)]
    clock.now += 99.8  # 199.9: salt 2 is 100 s old, and still remembered
    assert salt(2) in salts
    clock.now += 0.2  # 200.1: the old generation was opened 200.1 s ago: gone
    assert salt(1) not in salts and salt(2) not in salts
    assert salts.add_if_new(salt(1))


def test_filter_remembers_every_salt_for_the_window_at_least_and_twice_the_window_at_most():
    rng = random.Random(7)
    clock = FakeClock()
    window = 10.0
    salts = SaltFilter(capacity=10_000, window=window, clock=clock)
    recorded: dict[int, float] = {}
    for i in range(3000):
        clock.now += rng.expovariate(100.0)  # about 100 salts per simulated second
        if rng.random() < 0.5:
            assert salts.add_if_new(salt(i))
            recorded[i] = clock.now
        for j in rng.sample(sorted(recorded), min(5, len(recorded))):
            age = clock.now - recorded[j]
            if age < window:
                assert salt(j) in salts, f"forgotten after {age:.2f} s, within the {window} s window"
            elif age >= 2 * window:
                assert salt(j) not in salts, f"still remembered after {age:.2f} s"


def test_filter_capacity_bounds_count_and_memory():
    rotations = []
    salts = SaltFilter(capacity=100, window=3600, on_rotate=lambda lifetime, full: rotations.append(full))
    assert salts.nbytes == 2 * table_slots(100) * 8 and table_slots(100) == 134
    assert salts.allocated == salts.nbytes // 2  # the second generation comes with the first rotation
    for i in range(1000):
        assert salts.add_if_new(salt(i))
        assert len(salts) <= 200
    assert salts.allocated == salts.nbytes
    assert all(rotations) and len(rotations) == 9  # every 100 salts, because full
    assert all(salt(i) in salts for i in range(900, 1000))  # at least the last `capacity`
    assert sum(salt(i) in salts for i in range(800)) == 0
    # The bound holds in bytes: what relay/replay.py holds is its two tables, however many salts
    # come, and a rotation frees a table before allocating its replacement.
    only_replay = [tracemalloc.Filter(True, str(ROOT / "relay" / "replay.py"))]
    tracemalloc.start()
    try:
        big = SaltFilter(capacity=10_000, window=3600)
        held = []
        for start in range(0, 100_000, 20_000):
            for i in range(start, start + 20_000):
                big.add(salt(i))
            held.append(sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(only_replay).statistics("filename")))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(big.nbytes <= size <= big.nbytes + 2048 for size in held), (held, big.nbytes)
    assert peak - current < table_slots(10_000) * 8 // 2, "three tables at once during a rotation"


def test_filter_default_size_is_as_documented():
    salts = SaltFilter()
    assert (salts.capacity, salts.slots, salts.nbytes) == (1_000_000, 1_333_334, 21_333_344)


def test_filter_has_no_false_positives_in_practice():
    salts = SaltFilter(capacity=50_000)
    for i in range(50_000):
        salts.add(os.urandom(32))
    assert not any(os.urandom(32) in salts for _ in range(50_000))


def test_filter_check_and_record_is_atomic_across_threads():
    salts = SaltFilter(capacity=100_000)
    wanted = [salt(i) for i in range(3000)]
    wins = [0] * 8

    def contend(n: int) -> None:
        order = list(wanted)
        random.Random(n).shuffle(order)
        wins[n] = sum(salts.add_if_new(s) for s in order)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert sum(wins) == len(wanted)  # every salt won by exactly one thread
    assert len(salts) == len(wanted)


def test_filter_rejects_nonsense_sizes():
    for capacity in (0, -1, 1.5, True, 10**9):
        with pytest.raises(ValueError):
            SaltFilter(capacity=capacity)
    with pytest.raises(ValueError):
        SaltFilter(window=0)


def test_replay_module_is_pure():
    """relay.replay sits in the pure layer (DESIGN.md): no socket, thread or other I/O module."""
    tree = ast.parse((ROOT / "relay" / "replay.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"socket", "select", "selectors", "socketserver", "subprocess", "asyncio", "logging"}
