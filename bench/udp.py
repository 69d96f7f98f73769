#!/usr/bin/env python3
"""Datagram latency and throughput of relay against shadowsocks-libev, on loopback.

    python bench/udp.py [--seconds 3] [--rate-mbit 300] [--round-trips 5000] [--repeat 3]
                        [--methods M ...] [--impls relay libev direct] [--senders 1]

For each method, through

    relay    relay local --protocol tunnel --udp -> relay remote --udp    each `python -m relay -q`
                                                                          in its own process
    libev    ss-tunnel -u -> ss-server -u                                 shadowsocks-libev, default options
    direct   straight to the target                                       the loopback ceiling

two measurements against one target process (a UDP echo and a UDP sink on one port):

    latency     one 64-byte datagram in flight at a time to the echo, --round-trips of them;
                p50 and p99 of the round-trip time, in microseconds
    throughput  1200-byte datagrams offered at --rate-mbit for --seconds, paced by the sender
                process(es) (--senders of them, each offering rate/senders); the sink counts
                what arrives. Offered = what the senders really sent, over their sending time;
                delivered = what the sink counted, over its first-to-last arrival; loss = the
                share of sent datagrams the sink never saw.

Mbit/s counts UDP payload bits (10^6 bits/s), not IP/UDP headers. CPU-s/GB: utime + stime of
the local-side process (relay local / ss-tunnel) and of the remote-side process (relay remote /
ss-server) from /proc/PID/stat over one throughput run, per 10^9 payload bytes delivered.

The target, each relay, and each sender run in their own processes; this process only keeps the
time and plays the latency client. Runs are interleaved (for each repeat, for each method, for
each implementation in an order that rotates each repeat: latency, then throughput) so that a
noisy machine skews every implementation alike. Prints one table of medians over the repeats and
writes every sample to bench/results/udp.json.

Pacing: every sender sleeps while it is ahead of its schedule and sends what is due (at most
64 datagrams back to back) when it is not, so it offers the rate smoothly at ~1 ms granularity
without spinning; its achieved rate and CPU share are measured and reported, never assumed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import select
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import METHODS, STARTUP_TIMEOUT, Path_, _cpu, busy_share, collect_reports, find_libev, host_cpu, machine_info, start_libev_pair, start_relay_pair

from relay.testing import stop_process

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "udp.json"
IMPLS = ("relay", "libev", "direct")
PING_SIZE = 64
DATAGRAM_SIZE = 1200
MAX_BURST = 64  # datagrams a sender that fell behind sends back to back before it looks at the clock
PING_TIMEOUT = 1.0  # a round trip that takes longer counts as lost
WARMUP_ROUND_TRIPS = 100
PROBE_ATTEMPTS = 20  # first datagrams through a fresh path, PING_TIMEOUT each
DRAIN_QUIET = 0.3  # the sink's count must hold still this long after the senders stop
DRAIN_LIMIT = 10.0
SOCKET_BUFFER = 4 << 20  # the same as relay's own UDP sockets (capped by net.core.rmem_max)
MBIT = 1e6
GB = 1e9

# Datagrams to the target:
#   b"E" + seq (4 bytes) + padding          echoed back unchanged
#   b"S" + run (4) + sender (1) + seq (4) + padding   counted for run, never answered
ECHO = ord("E")
SINK = ord("S")
SINK_HEADER = struct.Struct("!BIBI")
PING_HEADER = struct.Struct("!BI")


# --- the target process: echo and sink on one UDP port ------------------------------------------
#
# Control on stdin/stdout, one line each way: "R <run>" -> a JSON line with that run's counts.


def run_target(port: int = 0) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    runs: dict[int, dict] = {}
    buffer = bytearray(65536)
    view = memoryview(buffer)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "udp")
    selector.register(sys.stdin, selectors.EVENT_READ, "control")
    print(sock.getsockname()[1], flush=True)
    monotonic = time.monotonic
    unpack = SINK_HEADER.unpack_from
    while True:
        for key, _ in selector.select(1.0):
            if key.data == "control":
                line = sys.stdin.readline()
                if not line:
                    return 0  # the bench went away
                run = int(line.split()[1])
                stats = runs.get(run, {"count": 0, "bytes": 0, "first": None, "last": None, "reordered": 0})
                print(json.dumps({k: v for k, v in stats.items() if k != "top"}), flush=True)
                continue
            for _ in range(1024):  # drain what is queued, then look at the control pipe again
                try:
                    n, address = sock.recvfrom_into(buffer)
                except BlockingIOError:
                    break
                if n >= SINK_HEADER.size and buffer[0] == SINK:
                    _, run, sender, seq = unpack(buffer)
                    now = monotonic()
                    stats = runs.get(run)
                    if stats is None:
                        stats = runs[run] = {
                            "count": 0,
                            "bytes": 0,
                            "first": now,
                            "last": now,
                            "reordered": 0,
                            "top": {},
                        }
                    stats["count"] += 1
                    stats["bytes"] += n
                    stats["last"] = now
                    top = stats["top"]
                    if seq < top.get(sender, -1):
                        stats["reordered"] += 1
                    else:
                        top[sender] = seq
                elif n and buffer[0] == ECHO:
                    try:
                        sock.sendto(view[:n], address)
                    except OSError:
                        pass  # the asker is gone: a lost answer, as on any network


class Target:
    """The target process, and the control pipe to ask it for a run's counts."""

    def __init__(self, stack: ExitStack, logdir: Path, port: int = 0) -> None:
        log = stack.enter_context(open(logdir / "target.err", "wb"))
        self.popen = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-target", "--target-port", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.logdir = logdir
        stack.callback(self.stop)
        self.port = int(self._line(STARTUP_TIMEOUT))

    def _line(self, timeout: float) -> str:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline() if ready else ""
        if not line.strip():
            raise RuntimeError(
                f"the target process does not answer: {(self.logdir / 'target.err').read_text(errors='replace')}"
            )
        return line

    def counts(self, run: int) -> dict:
        assert self.popen.stdin is not None
        self.popen.stdin.write(f"R {run}\n")
        self.popen.stdin.flush()
        return json.loads(self._line(5.0))

    def stop(self) -> None:
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        stop_process(self.popen)


# --- senders ----------------------------------------------------------------------------------


def send_paced(port: int, run: int, sender: int, rate_bps: float, seconds: float, start_at: float) -> dict:
    """Offer ``rate_bps`` of DATAGRAM_SIZE datagrams to 127.0.0.1:port from ``start_at``
    (time.monotonic, which every process shares) for ``seconds``; return what it achieved."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.connect(("127.0.0.1", port))
    interval = DATAGRAM_SIZE * 8 / rate_bps
    total = max(1, int(seconds / interval))
    datagram = bytearray(os.urandom(DATAGRAM_SIZE))
    pack = SINK_HEADER.pack_into
    send = sock.send
    monotonic, sleep = time.monotonic, time.sleep
    sent = failed = 0
    for _ in range(int((start_at - monotonic()) / 0.01) + 1):
        if monotonic() >= start_at:
            break
        sleep(min(0.01, max(start_at - monotonic(), 0)))
    cpu_before = time.process_time()
    first = monotonic()
    n = 0
    # Each pass either sends at least one datagram or sleeps until the next one is due; the
    # schedule ends after `total` datagrams, and a stuck clock cannot make it spin for ever.
    deadline = first + seconds * 3 + 5
    while n < total:
        now = monotonic()
        if now > deadline:
            break
        due = min(total, int((now - start_at) / interval) + 1)
        if due <= n:
            sleep(max(start_at + n * interval - now, 0.0))
            continue
        end = min(due, n + MAX_BURST)
        while n < end:
            pack(datagram, 0, SINK, run, sender, n)
            try:
                send(datagram)
                sent += 1
            except OSError:  # ECONNREFUSED after an ICMP error, ENOBUFS: not offered
                failed += 1
            n += 1
    last = monotonic()
    cpu = time.process_time() - cpu_before
    sock.close()
    return {"sent": sent, "failed": failed, "first": first, "last": last, "cpu": cpu}


def _sender_process(conn: multiprocessing.connection.Connection, *args: object) -> None:
    try:
        conn.send(send_paced(*args))  # type: ignore[arg-type]
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        conn.send({"error": repr(e)})
    finally:
        conn.close()


def offer(port: int, run: int, rate_bps: float, seconds: float, senders: int) -> list[dict]:
    """Run ``senders`` sender processes at rate/senders each, all starting at the same instant."""
    context = multiprocessing.get_context("fork")
    start_at = time.monotonic() + 0.2
    procs = []
    for sender in range(senders):
        receiver, conn = context.Pipe(duplex=False)
        proc = context.Process(
            target=_sender_process, args=(conn, port, run, sender, rate_bps / senders, seconds, start_at), daemon=True
        )
        proc.start()
        conn.close()
        procs.append((proc, receiver))
    return collect_reports(procs, seconds * 3 + 10, "sender")


# --- paths --------------------------------------------------------------------------------------


# --- latency ----------------------------------------------------------------------------------


class Pinger:
    """One connected UDP socket to a path; one 64-byte datagram in flight at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.seq = 0
        self.datagram = bytearray(PING_SIZE)

    def ping(self, timeout: float = PING_TIMEOUT) -> int | None:
        """One round trip: nanoseconds, or None when no answer came within ``timeout``."""
        self.seq += 1
        PING_HEADER.pack_into(self.datagram, 0, ECHO, self.seq)
        start = time.perf_counter_ns()
        deadline = start + int(timeout * 1e9)
        try:
            self.sock.send(self.datagram)
        except OSError:  # ECONNREFUSED: an ICMP error from an earlier datagram; this one is lost
            return None
        for _ in range(1000):  # stale answers to pings that timed out before are skipped
            left = (deadline - time.perf_counter_ns()) / 1e9
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                answer = self.sock.recv(PING_SIZE * 2)
            except TimeoutError:
                return None
            except OSError:
                return None
            if len(answer) == PING_SIZE and PING_HEADER.unpack_from(answer) == (ECHO, self.seq):
                return time.perf_counter_ns() - start
        return None

    def close(self) -> None:
        self.sock.close()


def probe(path: Path_) -> None:
    """A fresh path may still be binding its UDP socket (TCP is what we waited for): ping until
    one answer comes back."""
    pinger = Pinger(path.port)
    try:
        for _ in range(PROBE_ATTEMPTS):
            path.check()
            if pinger.ping() is not None:
                return
        raise RuntimeError(f"{path.impl} {path.method}: no answer to {PROBE_ATTEMPTS} datagrams of {PING_SIZE} bytes")
    finally:
        pinger.close()


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(sorted_values) - 1, int(-(-fraction * len(sorted_values) // 1)) - 1))
    return float(sorted_values[index])


@dataclass
class LatencySample:
    rep: int
    method: str
    impl: str
    round_trips: int
    lost: int
    p50_us: float | None
    p99_us: float | None
    mean_us: float | None


def measure_latency(path: Path_, round_trips: int, rep: int) -> LatencySample:
    pinger = Pinger(path.port)
    try:
        for _ in range(WARMUP_ROUND_TRIPS):
            pinger.ping()
        times = []
        lost = 0
        for _ in range(round_trips):
            rtt = pinger.ping()
            if rtt is None:
                lost += 1
            else:
                times.append(rtt)
    finally:
        pinger.close()
    times.sort()
    if not times:
        return LatencySample(rep, path.method, path.impl, round_trips, lost, None, None, None)
    return LatencySample(
        rep, path.method, path.impl, round_trips, lost,
        percentile(times, 0.50) / 1e3, percentile(times, 0.99) / 1e3, statistics.fmean(times) / 1e3,
    )  # fmt: skip


# --- throughput -------------------------------------------------------------------------------


@dataclass
class ThroughputSample:
    rep: int
    method: str
    impl: str
    senders: int
    target_mbit: float
    sent: int
    send_failed: int
    delivered: int
    reordered: int
    offered_mbit: float
    delivered_mbit: float
    loss_pct: float
    sender_cpu_pct: float  # CPU time of the busiest sender over its sending time
    drain_ms: float  # from the last datagram sent to the last one counted: time spent queued in buffers
    rcvbuf_errors: int | None  # host-wide datagrams dropped at a full receive buffer during the run
    local_cpu: float | None
    remote_cpu: float | None
    host_busy: float | None = None  # share of all the host's CPU time that was busy while the senders sent (0..1)


def udp_rcvbuf_errors() -> int | None:
    """The host's count of datagrams dropped because a receive buffer was full (/proc/net/snmp)."""
    try:
        with open("/proc/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def measure_throughput(
    path: Path_, target: Target, run: int, rate_bps: float, seconds: float, senders: int, rep: int
) -> ThroughputSample:
    before = _cpu(path)
    errors_before = udp_rcvbuf_errors()
    host_before = host_cpu()
    results = offer(path.port, run, rate_bps, seconds, senders)
    host_after = host_cpu()
    # Wait for the sink's count to hold still: what is still queued in the relays arrives.
    counts = target.counts(run)
    still_since = time.monotonic()
    deadline = still_since + DRAIN_LIMIT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = target.counts(run)
        if now["count"] != counts["count"]:
            counts, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= DRAIN_QUIET:
            break
    after = _cpu(path)
    errors_after = udp_rcvbuf_errors()
    sent = sum(r["sent"] for r in results)
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    arrived = counts["count"]
    arrival_span = (counts["last"] - counts["first"]) if arrived > 1 else 0.0
    local_cpu = None if before[0] is None or after[0] is None else after[0] - before[0]
    remote_cpu = None if before[1] is None or after[1] is None else after[1] - before[1]
    return ThroughputSample(
        rep=rep,
        method=path.method,
        impl=path.impl,
        senders=senders,
        target_mbit=rate_bps / MBIT,
        sent=sent,
        send_failed=sum(r["failed"] for r in results),
        delivered=arrived,
        reordered=counts["reordered"],
        offered_mbit=sent * DATAGRAM_SIZE * 8 / span / MBIT if span > 0 else 0.0,
        delivered_mbit=counts["bytes"] * 8 / arrival_span / MBIT if arrival_span > 0 else 0.0,
        loss_pct=100.0 * (sent - arrived) / sent if sent else 100.0,
        sender_cpu_pct=max(100.0 * r["cpu"] / (r["last"] - r["first"]) for r in results if r["last"] > r["first"]),
        drain_ms=max(0.0, (counts["last"] - max(r["last"] for r in results)) * 1e3) if arrived else 0.0,
        rcvbuf_errors=None if errors_before is None or errors_after is None else errors_after - errors_before,
        local_cpu=local_cpu,
        remote_cpu=remote_cpu,
        host_busy=busy_share(host_before, host_after),
    )


# --- the run ----------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(
    latency: list[LatencySample], throughput: list[ThroughputSample], methods: list[str], impls: list[str]
) -> list[dict]:
    rows = []
    for method in methods:
        group_rows = []
        for impl in impls:
            lat = [s for s in latency if s.method == method and s.impl == impl]
            thr = [s for s in throughput if s.method == method and s.impl == impl]
            if not lat and not thr:
                continue

            def per_gb(cpu: float | None, sample: ThroughputSample) -> float | None:
                payload = sample.delivered * DATAGRAM_SIZE
                return None if cpu is None or payload == 0 else cpu / (payload / GB)

            group_rows.append(
                {
                    "method": method,
                    "impl": impl,
                    "runs": len(thr),
                    "p50_us": _median([s.p50_us for s in lat]),
                    "p99_us": _median([s.p99_us for s in lat]),
                    "ping_lost": sum(s.lost for s in lat),
                    "offered_mbit": _median([s.offered_mbit for s in thr]),
                    "delivered_mbit": _median([s.delivered_mbit for s in thr]),
                    "loss_pct": _median([s.loss_pct for s in thr]),
                    "reordered": sum(s.reordered for s in thr),
                    "sender_cpu_pct": _median([s.sender_cpu_pct for s in thr]),
                    "drain_ms": _median([s.drain_ms for s in thr]),
                    "local_cpu_s_per_gb": _median([per_gb(s.local_cpu, s) for s in thr]),
                    "remote_cpu_s_per_gb": _median([per_gb(s.remote_cpu, s) for s in thr]),
                }
            )
        libev = next((r for r in group_rows if r["impl"] == "libev"), None)
        for row in group_rows:
            row["delivered_vs_libev"] = (
                row["delivered_mbit"] / libev["delivered_mbit"] if libev and libev["delivered_mbit"] else None
            )
            row["p50_vs_libev"] = (
                row["p50_us"] / libev["p50_us"] if libev and libev["p50_us"] and row["p50_us"] else None
            )
        rows += group_rows
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (
        "method", "impl", "p50 us", "p99 us", "offered Mbit/s", "delivered Mbit/s", "loss %", "drain ms",
        "local CPU-s/GB", "remote CPU-s/GB", "delivered vs libev",
    )  # fmt: skip
    table = [header] + [
        (
            r["method"],
            r["impl"],
            fmt(r["p50_us"], ".0f"),
            fmt(r["p99_us"], ".0f"),
            fmt(r["offered_mbit"], ".0f"),
            fmt(r["delivered_mbit"], ".0f"),
            fmt(r["loss_pct"], ".1f"),
            fmt(r["drain_ms"], ".0f"),
            fmt(r["local_cpu_s_per_gb"], ".1f"),
            fmt(r["remote_cpu_s_per_gb"], ".1f"),
            fmt(r["delivered_vs_libev"], ".2f"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"\np50/p99 us: round-trip time of one {PING_SIZE}-byte datagram in flight, median over the repeats. "
        f"offered: {DATAGRAM_SIZE}-byte datagrams the sender(s) really sent, per second of sending; "
        "delivered: what the sink counted, per second from its first to its last arrival; loss: sent but "
        "never counted (all Mbit/s are payload, 10^6 bit/s); drain: from the last datagram sent to the last "
        "one counted, the time the backlog sat in socket buffers. CPU-s/GB: utime+stime of the local-side "
        "process (relay local / ss-tunnel) and the remote-side process (relay remote / ss-server) per 10^9 "
        "payload bytes delivered. vs libev: delivered Mbit/s over libev's, same method."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="sending time of one throughput run (default 3)")
    parser.add_argument("--rate-mbit", type=float, default=300.0, help="offered rate, Mbit/s of payload (default 300)")
    parser.add_argument("--senders", type=int, default=1, help="sender processes sharing the rate (default 1)")
    parser.add_argument(
        "--round-trips", type=int, default=5000, help="timed round trips per latency run (default 5000)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD", help="default: all three"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLS),
        choices=IMPLS,
        metavar="IMPL",
        help="relay, libev, direct (default: all)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per method and implementation (default 3)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help=f"where to write the samples (default {RESULTS.relative_to(ROOT)})"
    )
    parser.add_argument("--serve-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_target:
        return run_target(args.target_port)
    if args.seconds <= 0 or args.rate_mbit <= 0 or args.senders < 1 or args.round_trips < 1 or args.repeat < 1:
        parser.error("--seconds, --rate-mbit, --senders, --round-trips and --repeat must be positive")

    binaries = find_libev() if "libev" in args.impls else {}
    if "relay" in args.impls and importlib.util.find_spec("relay") is None:
        sys.exit(
            f"udp: {sys.executable} cannot import relay; run `pip install -e .` in {ROOT} first, or use that venv's python"
        )

    rate_bps = args.rate_mbit * MBIT
    latency: list[LatencySample] = []
    throughput: list[ThroughputSample] = []
    began = time.monotonic()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="relay-bench-udp-") as tmp:
        logdir = Path(tmp)
        target = Target(stack, logdir)
        paths: dict[tuple[str, str], Path_] = {}
        for method in args.methods:
            for impl in args.impls:
                if impl == "relay":
                    paths[method, impl] = start_relay_pair(stack, logdir, method, target.port, udp=True)
                elif impl == "libev":
                    paths[method, impl] = start_libev_pair(stack, logdir, method, target.port, binaries, udp=True)
                else:
                    paths[method, impl] = Path_("direct", method, target.port)
        for path in paths.values():
            probe(path)  # proves the path works before anything is timed
        total = args.repeat * len(args.methods) * len(args.impls)
        done = run = 0
        for rep in range(args.repeat):
            order = args.impls[rep % len(args.impls) :] + args.impls[: rep % len(args.impls)]
            for method in args.methods:
                for impl in order:
                    path = paths[method, impl]
                    path.check()
                    lat = measure_latency(path, args.round_trips, rep)
                    latency.append(lat)
                    run += 1
                    thr = measure_throughput(path, target, run, rate_bps, args.seconds, args.senders, rep)
                    throughput.append(thr)
                    path.check()
                    done += 1
                    print(
                        f"[{done}/{total}] rep {rep + 1} {method:<22} {impl:<6} "
                        f"p50 {lat.p50_us or 0:6.0f} us  p99 {lat.p99_us or 0:6.0f} us  "
                        f"offered {thr.offered_mbit:5.0f}  delivered {thr.delivered_mbit:5.0f} Mbit/s  "
                        f"loss {thr.loss_pct:5.1f} %  drain {thr.drain_ms:4.0f} ms  sender CPU {thr.sender_cpu_pct:3.0f} %",
                        file=sys.stderr,
                        flush=True,
                    )
    elapsed = time.monotonic() - began

    rows = summarize(latency, throughput, args.methods, args.impls)
    print(
        f"\n{args.round_trips} round trips per latency run; {DATAGRAM_SIZE}-byte datagrams at {args.rate_mbit:g} Mbit/s "
        f"for {args.seconds:g} s from {args.senders} sender process(es) per throughput run; "
        f"{args.repeat} repeat(s), {elapsed:.0f} s in all\n"
    )
    print_table(rows)
    short = [r for r in rows if r["offered_mbit"] is not None and r["offered_mbit"] < 0.95 * args.rate_mbit]
    if short:
        print(
            f"\nNOTE: the sender(s) offered less than 95% of {args.rate_mbit:g} Mbit/s on "
            + ", ".join(f"{r['impl']}/{r['method']} ({r['offered_mbit']:.0f})" for r in short)
            + "; try --senders 2 (the offered column is what was really sent)."
        )

    result = {
        "seconds": args.seconds,
        "rate_mbit": args.rate_mbit,
        "senders": args.senders,
        "datagram_size": DATAGRAM_SIZE,
        "ping_size": PING_SIZE,
        "round_trips": args.round_trips,
        "repeat": args.repeat,
        "methods": args.methods,
        "impls": args.impls,
        "elapsed_s": elapsed,
        "machine": machine_info(binaries),
        "summary": rows,
        "latency_samples": [asdict(s) for s in latency],
        "throughput_samples": [asdict(s) for s in throughput],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
