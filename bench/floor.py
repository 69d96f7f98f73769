#!/usr/bin/env python3
"""How far down a Python relay's latency and connection rate can go: relay and libev against two
bare Python forwarder pairs, in the same run.

    python bench/floor.py [--measure latency conn] [--repeat 5] [--round-trips 3000] [--methods M ...]

For each method, bench/perf.py's `latency` (64-byte ping-pong on one connection) and `conn` (a
fresh connection per 64-byte request, 16 in flight from 2 client processes, for 3 s), through

    libev      ss-tunnel -> ss-server
    relay      relay local --protocol tunnel -> relay remote
    aead-loop  a 40-line epoll loop per side, no sessions, no plugins: the local seals the
               client's bytes with relay's AEAD stream codec, the remote opens them (one fixed
               target, so no address header); the same AEAD calls per hop as relay
    plain-loop the same loop without the codecs: bytes in, bytes out

"aead-loop" is the floor for anything built on Python and `cryptography`: what is left when the
relay's own code is gone. "plain-loop" shows what the AEAD framing costs on top of it. The loops
have no target header, salt filter or session bookkeeping, so for new connections the floor is a
low one. Runs are interleaved and the order rotates each repeat; the latency runs of the four
take turns of 100 round trips (perf.measure_latency). Prints medians over the repeats, their
ratio to libev, and each process's CPU (utime + stime from /proc) per round trip or per
connection.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import EchoTargets, Pair, Pairs, find_tools, measure_conn, measure_latency, password_for, unwind_on_sigterm
from relay.testing import free_port
from throughput import Proc

IMPLS = ("libev", "relay", "aead-loop", "plain-loop")
LOOPS = {"aead-loop": True, "plain-loop": False}
# what: (the table's header, a row from an implementation's medians and the first one's ratio to libev's)
TABLES: dict[str, tuple[str, Callable[[list[float], float], str]]] = {
    "latency": (
        f"{'latency 64 B':24s} {'impl':11s} {'p50 us':>7s} {'p99 us':>7s} {'p50/libev':>9s} {'CPU us/round trip: local':>25s} {'remote':>7s}",
        lambda m, ratio: f"{m[0]:7.0f} {m[1]:7.0f} {ratio:9.2f} {m[2]:25.1f} {m[3]:7.1f}",
    ),
    "conn": (
        f"{'new connections':24s} {'impl':11s} {'conn/s':>7s} {'/libev':>7s} {'CPU ms/conn: local':>19s} {'remote':>7s} {'failed':>7s}",
        lambda m, ratio: f"{m[0]:7.0f} {ratio:7.2f} {m[1]:19.3f} {m[2]:7.3f} {m[3]:7.0f}",
    ),
}


def serve_loop(role: str, listen_port: int, target_port: int, method: str | None) -> None:
    """One side of a bare forwarder pair. role "local": plain client, sealed upstream;
    "remote": sealed client, plain upstream. method None: no codecs at all."""
    seal = open_ = None
    if method is not None:
        from relay_plugins.shadowsocks import CIPHERS

        cipher = next(c for c in CIPHERS if c.name == method)
        key = cipher.key_from_password(password_for(method))
        seal, open_ = (lambda: cipher.encryptor(key).encode), (lambda: cipher.decryptor(key))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(128)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    ends: dict[int, tuple] = {}  # fd -> (socket, its peer, decoder or None, encoder or None)
    buffer = memoryview(bytearray(65536))
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", target_port))
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setblocking(False)
                    poller.register(sock.fileno(), select.EPOLLIN)
                sealed_client = role == "remote"
                decoder = open_() if open_ else None
                encode = seal() if seal else None
                ends[client.fileno()] = (client, upstream, decoder if sealed_client else None, None if sealed_client else encode)
                ends[upstream.fileno()] = (upstream, client, None if sealed_client else decoder, encode if sealed_client else None)
                continue
            src, dst, decoder, encode = ends[fd]
            if decoder is not None:
                n = src.recv_into(decoder.recv_buffer())
                data = decoder.received(n) if n else None
            else:
                n = src.recv_into(buffer)
                data = buffer[:n] if n else None
            if data is None:
                for sock in (src, dst):
                    poller.unregister(sock.fileno())
                    del ends[sock.fileno()]
                    sock.close()
            elif data:
                dst.sendall(encode(data) if encode else data)


def start_loop(stack: ExitStack, logdir: Path, impl: str, method: str, target_port: int) -> Pair:
    remote_port, local_port = free_port(), free_port()
    codec = [method] if LOOPS[impl] else []
    me = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    remote = Proc(f"{impl}-{method}-remote", [*me, "remote", str(remote_port), str(target_port), *codec], logdir)
    stack.callback(remote.stop)
    remote.wait_listening(remote_port)
    local = Proc(f"{impl}-{method}-local", [*me, "local", str(local_port), str(remote_port), *codec], logdir)
    stack.callback(local.stop)
    local.wait_listening(local_port)
    return Pair(impl, method, local_port, local, remote)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", nargs="+", default=["latency", "conn"], choices=["latency", "conn"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=3000)
    parser.add_argument("--methods", nargs="+", default=["aes-256-gcm", "chacha20-ietf-poly1305"])
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        role, listen, target, *method = args.serve
        serve_loop(role, int(listen), int(target), method[0] if method else None)
        return 0
    unwind_on_sigterm()
    binaries = find_tools(["libev"], ["latency"])
    conn_args = argparse.Namespace(inflight=16, conn_clients=2, conn_seconds=3)  # perf.py's defaults
    samples: dict[tuple[str, str, str], list[tuple[float, float, float, float]]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="relay-bench-floor-") as tmp:
        logdir = Path(tmp)
        echo = EchoTargets(stack, logdir, 2)
        pairs = Pairs(stack, logdir, {"relay": sys.executable}, binaries)
        started = {}
        for method in args.methods:
            for impl in IMPLS:
                if impl in LOOPS:
                    started[impl, method] = start_loop(stack, logdir, impl, method, echo.port)
                else:
                    started[impl, method] = pairs.start(impl, method, echo.port, udp=False)
                measure_latency([started[impl, method]], 20, -1)  # it works, and it is warm
        for rep in range(args.repeat):
            order = IMPLS[rep % len(IMPLS) :] + IMPLS[: rep % len(IMPLS)]
            for what in args.measure:
                for method in args.methods:
                    rows: list[tuple[str, tuple]] = []
                    if what == "latency":  # all four at once, taking turns
                        for sample in measure_latency([started[impl, method] for impl in order], args.round_trips, rep):
                            rows.append((sample.impl, (sample.p50_us, sample.p99_us, sample.local_cpu_us, sample.remote_cpu_us)))
                    else:
                        for impl in order:
                            conns = measure_conn(started[impl, method], echo, conn_args, rep)
                            per = max(conns.count, 1)
                            rows.append((impl, (conns.conn_per_s, 1e3 * conns.local_cpu / per, 1e3 * conns.remote_cpu / per, sum(conns.errors.values()))))  # type: ignore[operator]
                    for impl, row in rows:
                        samples.setdefault((what, impl, method), []).append(row)
                        print(f"rep {rep + 1} {what:7s} {method:24s} {impl:11s} {row[0]:6.0f}", file=sys.stderr, flush=True)
    for what in args.measure:
        header, row = TABLES[what]
        print(f"\n{header}")
        for method in args.methods:
            base = statistics.median(s[0] for s in samples[what, "libev", method])
            for impl in IMPLS:
                medians = [statistics.median(column) for column in zip(*samples[what, impl, method])]
                print(f"{method:24s} {impl:11s} {row(medians, medians[0] / base)}")
    print(f"\nmedians over {args.repeat} repeats; CPU from /proc at 10 ms resolution")
    return 0


if __name__ == "__main__":
    sys.exit(main())
