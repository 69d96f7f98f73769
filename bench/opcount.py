#!/usr/bin/env python3
"""Where relay's own Python goes, counted instead of timed: bytecodes and Python calls per new
connection, per round trip and per datagram, in each process of a tunnel pair, by function.

    python bench/opcount.py                                   # this Python's relay, ~25 s
    python bench/opcount.py --baseline-python /tmp/venv-base/bin/python --top 0

Counts barely move with the load of a shared machine (per round trip and per datagram, by a
few bytecodes; per new connection, by about 4%: whether a client's first data is there when the
relay first reads depends on timing), so two commits compare in one short run, where timings
need many interleaved repeats (bench/perf.py). They count only Python: time spent in C (system
calls, AEAD, hashing, the interpreter's own allocations) is not in them.

Each relay process runs relay's main with a counter of every opcode and every Python call, by
code object, in every thread but the main one (which only waits for a signal): threading.settrace
up to Python 3.11, sys.monitoring from 3.12 (where settrace's opcode events miss a loop that was
already running, the pump's). Counting makes relay some 50x slower, so the work is small and one
thing at a time. The driver asks both processes for their counts (SIGUSR1: each writes them to a
file) before and after each workload, once the pair is idle, and divides the difference by the
work done:

    new connection    connect, 64 B each way, close; --conns of them, one after another
    round trip        64 B ping-pong on one connection, --round-trips of them
    datagram          a 1200-byte datagram to the UDP echo and its answer, --datagrams of them

Counts include the pump's idle wake-ups (one a second, some 40 bytecodes each) that fall in a
workload: a fraction of a bytecode per unit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

WORKLOADS = ("new connection", "round trip", "datagram")
SIDES = ("local", "remote")
SNAPSHOT_TIMEOUT = 30.0
DATAGRAM_TIMEOUT = 5.0
SETTLE = 0.5  # seconds for a pair to finish what the last unit of work left (a session's end)


# --- in each relay process ------------------------------------------------------------------------


def serve_relay(outdir: str, argv: list[str]) -> int:
    """Run relay's main with ``argv``, counting what every thread but the main one runs (relay's
    main thread only waits for a signal once its servers run); on SIGUSR1, write the counts so far
    to OUTDIR/PID.json. The handler runs in the main thread, so it counts nothing itself."""
    import threading

    from relay.cli import main

    opcodes: Counter = Counter()
    calls: Counter = Counter()
    if hasattr(sys, "monitoring"):
        # 3.12+: settrace's opcode events are emulated on sys.monitoring there, and lost for a
        # loop that was running when they were asked for (the pump's); count with it directly.
        monitoring, get_ident, main_thread = sys.monitoring, threading.get_ident, threading.get_ident()

        def instruction(code, offset):  # type: ignore[no-untyped-def]
            if get_ident() != main_thread:
                opcodes[code] += 1

        def started(code, offset):  # type: ignore[no-untyped-def]
            if get_ident() != main_thread:
                calls[code] += 1

        tool = monitoring.PROFILER_ID
        monitoring.use_tool_id(tool, "opcount")
        monitoring.register_callback(tool, monitoring.events.INSTRUCTION, instruction)
        monitoring.register_callback(tool, monitoring.events.PY_START, started)
        monitoring.set_events(tool, monitoring.events.INSTRUCTION | monitoring.events.PY_START)
    else:

        def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "opcode":
                opcodes[frame.f_code] += 1
            elif event == "call":
                calls[frame.f_code] += 1
                frame.f_trace_lines = False
                frame.f_trace_opcodes = True
            return tracer

        threading.settrace(tracer)  # threads started from now on: every server's and the pump's

    serial = 0
    path = Path(outdir) / f"{os.getpid()}.json"

    def dump(signum: int, frame: object) -> None:
        nonlocal serial
        ops, made = dict(opcodes), dict(calls)  # one C call each: no other thread runs meanwhile
        serial += 1
        counts: dict[str, tuple[int, int]] = {}
        for code in ops.keys() | made.keys():
            key = f"{os.path.basename(code.co_filename)}:{getattr(code, 'co_qualname', code.co_name)}"
            old = counts.get(key, (0, 0))
            counts[key] = (old[0] + ops.get(code, 0), old[1] + made.get(code, 0))
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"serial": serial, "counts": counts}))
            tmp.replace(path)
        except OSError as e:  # the driver times out and says so; relay goes on
            print(f"opcount: cannot write {path}: {e}", file=sys.stderr)

    signal.signal(signal.SIGUSR1, dump)
    return main(argv)


# --- the driver -----------------------------------------------------------------------------------


class Counts:
    """Asks the processes of a pair for their counts."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.serials: dict[int, int] = {}

    def snapshot(self, procs: list[Any]) -> list[dict[str, tuple[int, int]]]:
        time.sleep(SETTLE)
        for proc in procs:
            proc.check()  # a dead child can still be signalled until it is reaped
            os.kill(proc.pid, signal.SIGUSR1)
        taken = []
        for proc in procs:
            want = self.serials.get(proc.pid, 0) + 1
            path = self.outdir / f"{proc.pid}.json"
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT
            data = None
            for _ in range(int(SNAPSHOT_TIMEOUT / 0.02) + 1):
                try:
                    written = json.loads(path.read_text())
                    if written["serial"] >= want:
                        data = written
                        break
                except (OSError, ValueError):
                    pass
                proc.check()
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if data is None:
                raise RuntimeError(f"{proc.name} wrote no counts within {SNAPSHOT_TIMEOUT:g} s:\n{proc.tail()}")
            self.serials[proc.pid] = data["serial"]
            taken.append({k: tuple(v) for k, v in data["counts"].items()})
        return taken


def per_unit(before: dict, after: dict, units: int) -> dict[str, tuple[float, float]]:
    """(bytecodes, calls) per unit of work, by function, from two snapshots."""
    out = {}
    for key, (ops, calls) in after.items():
        old_ops, old_calls = before.get(key, (0, 0))
        if ops != old_ops or calls != old_calls:
            out[key] = ((ops - old_ops) / units, (calls - old_calls) / units)
    return out


def one_connection(port: int, payload: bytes) -> None:
    from perf import _recv_exactly

    with socket.create_connection(("127.0.0.1", port), timeout=30.0) as sock:
        sock.sendall(payload)
        _recv_exactly(sock, len(payload))


def run_workloads(port: int, procs: list[Any], counts: Counts, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Each workload between two snapshots: {workload: [per-unit counts of each process]}."""
    from perf import _recv_exactly

    payload = os.urandom(64)
    results: dict[str, list[dict]] = {}
    for _ in range(10):  # lazy set-up (imports, first sessions) before anything is counted
        one_connection(port, payload)
    before = counts.snapshot(procs)
    for _ in range(args.conns):
        one_connection(port, payload)
    after = counts.snapshot(procs)
    results["new connection"] = [per_unit(b, a, args.conns) for b, a in zip(before, after)]

    with socket.create_connection(("127.0.0.1", port), timeout=30.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(10):
            sock.sendall(payload)
            _recv_exactly(sock, len(payload))
        before = counts.snapshot(procs)
        for _ in range(args.round_trips):
            sock.sendall(payload)
            _recv_exactly(sock, len(payload))
        after = counts.snapshot(procs)
    results["round trip"] = [per_unit(b, a, args.round_trips) for b, a in zip(before, after)]

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(DATAGRAM_TIMEOUT)
        sock.connect(("127.0.0.1", port))

        def ping(seq: int) -> None:
            """One datagram to bench/udp.py's echo, and its answer (a late answer to an earlier
            one is skipped). A lost one would leave its work half counted: that stops the run."""
            datagram = (b"E" + seq.to_bytes(4, "big")).ljust(1200, b"\0")
            sock.send(datagram)
            for _ in range(8):
                try:
                    if sock.recv(2048) == datagram:
                        return
                except TimeoutError:
                    break
            for proc in procs:
                proc.check()
            raise RuntimeError(f"datagram {seq} got no answer within {DATAGRAM_TIMEOUT:g} s")

        for seq in range(10):
            ping(seq)
        before = counts.snapshot(procs)
        for seq in range(args.datagrams):
            ping(10 + seq)
        after = counts.snapshot(procs)
    results["datagram"] = [per_unit(b, a, args.datagrams) for b, a in zip(before, after)]
    return results


def totals(functions: dict[str, tuple[float, float]]) -> tuple[float, float]:
    return sum(v[0] for v in functions.values()), sum(v[1] for v in functions.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python whose relay is impl relay (default: this one)")
    parser.add_argument("--baseline-python", help="a second Python (a venv with another relay) to count beside it")
    parser.add_argument("--methods", nargs="+", default=["aes-256-gcm", "chacha20-ietf-poly1305"])
    parser.add_argument("--conns", type=int, default=300)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--datagrams", type=int, default=1000)
    parser.add_argument("--top", type=int, default=10, help="functions listed per process and workload, for the first method (0: none)")
    parser.add_argument("--json", help="write every count here")
    parser.add_argument("--serve-relay", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_relay:
        return serve_relay(args.serve_relay[0], args.serve_relay[1:])

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from perf import Pairs, start_targets, unwind_on_sigterm

    unwind_on_sigterm()

    pythons = {"relay": args.python, **({"baseline": args.baseline_python} if args.baseline_python else {})}
    results: dict[tuple[str, str], dict[str, list[dict]]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="relay-bench-opcount-") as tmp:
        logdir = Path(tmp)
        echo, _ = start_targets(stack, logdir, 1, udp=True)
        pairs = Pairs(stack, logdir, pythons, {})
        for method in args.methods:
            for impl in pythons:
                outdir = logdir / f"counts-{impl}-{method}"  # its own: a pid may come again
                outdir.mkdir()
                pairs.relay_entry = [str(Path(__file__).resolve()), "--serve-relay", str(outdir)]
                pair = pairs.start(impl, method, echo.port, udp=True, owned=False)
                try:
                    print(f"counting {impl} {method}", file=sys.stderr, flush=True)
                    results[impl, method] = run_workloads(pair.port, pair.procs, Counts(outdir), args)
                finally:
                    pair.stop()
    print_results(results, args)
    if args.json:
        Path(args.json).write_text(
            json.dumps({f"{impl} {method}": r for (impl, method), r in results.items()}, indent=1, sort_keys=True)
        )
    return 0


def print_results(results: dict[tuple[str, str], dict[str, list[dict]]], args: argparse.Namespace) -> None:
    impls = list(dict.fromkeys(impl for impl, _ in results))
    columns = [(impl, side) for impl in impls for side in SIDES]
    print(f"\n{'bytecodes (calls) per unit':40s}" + "".join(f"{impl + ' ' + side:>18s}" for impl, side in columns))
    for method in args.methods:
        for workload in WORKLOADS:
            cells = []
            for impl, side in columns:
                ops, calls = totals(results[impl, method][workload][SIDES.index(side)])
                cells.append(f"{ops:10.0f} ({calls:4.0f})")
            print(f"{method:24s}{workload:16s}" + "".join(f"{c:>18s}" for c in cells))
    if args.top <= 0:
        return
    method = args.methods[0]
    for impl in impls:
        for workload in WORKLOADS:
            for side, functions in zip(SIDES, results[impl, method][workload]):
                print(f"\n{impl} {side}, {method}, per {workload}: bytecodes, calls, function")
                for key, (ops, calls) in sorted(functions.items(), key=lambda kv: -kv[1][0])[: args.top]:
                    print(f"{ops:9.1f} {calls:6.2f}  {key}")


if __name__ == "__main__":
    sys.exit(main())
