#!/usr/bin/env python3
"""Bulk TCP throughput of relay against shadowsocks-libev, on loopback.

    python bench/throughput.py [--size-mib 256] [--methods M ...] [--repeat 3] [--impls relay libev direct]

For each method, one transfer of --size-mib MiB in each direction through:

    relay    relay local (--protocol tunnel) -> relay remote   each `python -m relay` in its own process
    libev    ss-tunnel -> ss-server                           shadowsocks-libev, default options
    direct   straight to the target                           the loopback ceiling

    upload    the client sends, the target (a sink) counts
    download  the target (a source) sends, the client reads

The target is a separate Python process, and so is each relay, so no two of them share a GIL.
Runs are interleaved (for each repeat, for each method, for each implementation, both
directions) so that a noisy machine skews every implementation alike. Wall time runs from the
client's first byte sent to the last byte counted; CPU time is utime + stime of each relay
process from /proc/PID/stat, read just before and just after each transfer.

Prints one table of medians and writes every sample to bench/results/throughput.json.
Datagrams (latency and paced throughput over UDP) have their own bench: bench/udp.py.

Note: shadowsocks-libev closes both of its connections on the first EOF (no half-close), so
neither side half-closes here: the sink acknowledges the byte count and the source waits for the
client to hang up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from relay.testing import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "throughput.json"
METHODS = ("aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305")
IMPLS = ("relay", "libev", "direct")
DIRECTIONS = ("upload", "download")
PASSWORD = "bench password"
CHUNK = 1 << 20
IO_TIMEOUT = 60.0  # any single send or recv that waits longer fails the run
STARTUP_TIMEOUT = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1e6
GB = 1e9

# --- the target process: sink and source ------------------------------------------------------
#
# Request: 1 byte kind (b"U" or b"D") + 8 bytes big-endian size.
#   U: the target reads exactly size bytes, answers the 8-byte count, waits for the client to close.
#   D: the target sends size bytes, then waits for the client to close.


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    for _ in range(n):  # each pass reads at least one byte or raises
        if len(data) == n:
            break
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def _wait_for_close(sock: socket.socket) -> None:
    """Read and discard until the peer closes (bounded by the socket timeout)."""
    for _ in range(1 << 20):
        if not sock.recv(1 << 16):
            return


class _TargetHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IO_TIMEOUT)
        try:
            head = sock.recv(1)
            if not head:
                return  # a readiness probe
            kind = head + _recv_exactly(sock, 8)
            size = int.from_bytes(kind[1:], "big")
            if kind[:1] == b"U":
                buffer = memoryview(bytearray(CHUNK))
                count = 0
                for _ in range(size):  # each pass reads at least one byte or stops
                    if count >= size:
                        break
                    n = sock.recv_into(buffer[: min(CHUNK, size - count)])
                    if not n:
                        break
                    count += n
                sock.sendall(count.to_bytes(8, "big"))
            elif kind[:1] == b"D":
                data = memoryview(os.urandom(CHUNK))
                sent = 0
                while sent < size:  # size / CHUNK passes
                    n = min(CHUNK, size - sent)
                    sock.sendall(data[:n])
                    sent += n
            _wait_for_close(sock)
        except OSError:
            pass


class _TargetServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


def run_target() -> int:
    """The target process: serve on an ephemeral port, print it, serve until killed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with _TargetServer(("127.0.0.1", 0), _TargetHandler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever(0.2)
    return 0


# --- processes --------------------------------------------------------------------------------


def collect_reports(procs: list, timeout: float, what: str) -> list[dict]:
    """The one report each of ``procs`` ((process, receiving end of its pipe) pairs) sends, as
    a dict with "error" when it failed; the processes are joined (killed if they hang) whatever
    happens."""
    results = []
    try:
        for proc, receiver in procs:
            if not receiver.poll(timeout):
                raise RuntimeError(f"{what} {proc.pid} did not report within {timeout:.0f} s")
            result = receiver.recv()
            if "error" in result:
                raise RuntimeError(f"{what} {proc.pid} failed: {result['error']}")
            results.append(result)
    finally:
        for proc, receiver in procs:
            receiver.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return results


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all the host's CPUs, from /proc/stat (idle and iowait are not busy)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    total = sum(values[:8])  # guest time is already in user
    return total - values[3] - values[4], total


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share (0..1) of the host's CPU time that was busy between two ``host_cpu()`` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def machine_info(binaries: dict[str, str]) -> dict:
    """What a results file says of where it was measured."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "libev": libev_version(binaries["ss-server"]) if "ss-server" in binaries else None,
    }


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc:
    """A child process whose output goes to a log file."""

    def __init__(self, name: str, argv: list[str], logdir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def wait_listening(self, port: int, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            self.check()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} is not listening on 127.0.0.1:{port} after {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        stop_process(self.popen)


def start_target(stack: ExitStack, logdir: Path) -> int:
    """The sink/source process; returns its port."""
    log = open(logdir / "target.err", "wb")
    stack.callback(log.close)
    popen = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-target"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )

    def stop() -> None:
        stop_process(popen)
        if popen.stdout:
            popen.stdout.close()

    stack.callback(stop)
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], STARTUP_TIMEOUT)
    line = popen.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        raise RuntimeError(f"the target process did not start: {(logdir / 'target.err').read_text(errors='replace')}")
    return int(line)


@dataclass
class Path_:
    """Where the client connects for one (method, impl), and the processes to meter."""

    impl: str
    method: str
    port: int
    local: Proc | None = None
    remote: Proc | None = None

    def check(self) -> None:
        for proc in (self.local, self.remote):
            if proc is not None:
                proc.check()


def start_relay_pair(stack: ExitStack, logdir: Path, method: str, target_port: int, udp: bool = False) -> Path_:
    relay = [sys.executable, "-m", "relay"]
    remote_port, local_port = free_port(), free_port()
    common = ["--method", method, "--password", PASSWORD, *(["--udp"] if udp else []), "-q"]
    remote_argv = [*relay, "remote", "--listen", f"127.0.0.1:{remote_port}", *common, "--allow-private"]
    remote = Proc(f"relay-remote-{method}", remote_argv, logdir)
    stack.callback(remote.stop)
    remote.wait_listening(remote_port)
    local_argv = [
        *relay, "local", "--listen", f"127.0.0.1:{local_port}", "--server", f"127.0.0.1:{remote_port}", *common,
        "--protocol", "tunnel", "--forward", f"127.0.0.1:{target_port}",
    ]  # fmt: skip
    local = Proc(f"relay-local-{method}", local_argv, logdir)
    stack.callback(local.stop)
    local.wait_listening(local_port)
    return Path_("relay", method, local_port, local, remote)


def start_libev_pair(
    stack: ExitStack, logdir: Path, method: str, target_port: int, binaries: dict[str, str], udp: bool = False
) -> Path_:
    server_port, tunnel_port = free_port(), free_port()
    common = ["-k", PASSWORD, "-m", method, *(["-u"] if udp else [])]
    remote = Proc(f"ss-server-{method}", [binaries["ss-server"], "-s", "127.0.0.1", "-p", str(server_port), *common], logdir)
    stack.callback(remote.stop)
    remote.wait_listening(server_port)
    tunnel_argv = [
        binaries["ss-tunnel"], "-s", "127.0.0.1", "-p", str(server_port), "-b", "127.0.0.1", "-l", str(tunnel_port),
        *common, "-L", f"127.0.0.1:{target_port}",
    ]  # fmt: skip
    local = Proc(f"ss-tunnel-{method}", tunnel_argv, logdir)
    stack.callback(local.stop)
    local.wait_listening(tunnel_port)
    return Path_("libev", method, tunnel_port, local, remote)


# --- one transfer -----------------------------------------------------------------------------


@dataclass
class Sample:
    rep: int
    method: str
    impl: str
    direction: str
    bytes: int
    seconds: float
    local_cpu: float | None
    remote_cpu: float | None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB


def _cpu(path: Path_) -> tuple[float | None, float | None]:
    return (
        cpu_seconds(path.local.pid) if path.local else None,
        cpu_seconds(path.remote.pid) if path.remote else None,
    )


def transfer(path: Path_, direction: str, size: int, data: memoryview, rep: int) -> Sample:
    with socket.create_connection(("127.0.0.1", path.port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        before = _cpu(path)
        start = time.perf_counter()
        if direction == "upload":
            sock.sendall(b"U" + size.to_bytes(8, "big"))
            sent = 0
            while sent < size:  # size / CHUNK passes
                n = min(len(data), size - sent)
                sock.sendall(data[:n])
                sent += n
            counted = int.from_bytes(_recv_exactly(sock, 8), "big")
            if counted != size:
                raise RuntimeError(f"{path.impl} {path.method} upload: the sink counted {counted} of {size} bytes")
        else:
            sock.sendall(b"D" + size.to_bytes(8, "big"))
            buffer = memoryview(bytearray(CHUNK))
            got = 0
            for _ in range(size):  # each pass reads at least one byte or stops
                if got >= size:
                    break
                n = sock.recv_into(buffer[: min(CHUNK, size - got)])
                if not n:
                    raise RuntimeError(f"{path.impl} {path.method} download: EOF after {got} of {size} bytes")
                got += n
        seconds = time.perf_counter() - start
        after = _cpu(path)
    local_cpu = None if before[0] is None or after[0] is None else after[0] - before[0]
    remote_cpu = None if before[1] is None or after[1] is None else after[1] - before[1]
    return Sample(rep, path.method, path.impl, direction, size, seconds, local_cpu, remote_cpu)


# --- the run ----------------------------------------------------------------------------------


def find_libev() -> dict[str, str]:
    found = {name: shutil.which(name) for name in ("ss-server", "ss-tunnel")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        sys.exit(
            f"throughput: {', '.join(missing)} not found on PATH; install shadowsocks-libev "
            "(Debian/Ubuntu: sudo apt-get install shadowsocks-libev), or leave it out with --impls relay direct"
        )
    return {name: str(path) for name, path in found.items()}


def libev_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in out.splitlines():
        if "shadowsocks-libev" in line:
            return line.strip()
    return "unknown"


def summarize(samples: list[Sample], methods: list[str], impls: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        for direction in DIRECTIONS:
            medians: dict[str, float] = {}
            for impl in impls:
                group = [s for s in samples if s.method == method and s.impl == impl and s.direction == direction]
                if not group:
                    continue
                medians[impl] = statistics.median(s.mb_per_s for s in group)
                local = [s.local_cpu / (s.bytes / GB) for s in group if s.local_cpu is not None]
                remote = [s.remote_cpu / (s.bytes / GB) for s in group if s.remote_cpu is not None]
                rows.append(
                    {
                        "method": method,
                        "impl": impl,
                        "direction": direction,
                        "runs": len(group),
                        "mb_per_s": medians[impl],
                        "local_cpu_s_per_gb": statistics.median(local) if local else None,
                        "remote_cpu_s_per_gb": statistics.median(remote) if remote else None,
                    }
                )
            for row in rows:
                if row["method"] == method and row["direction"] == direction:
                    libev = medians.get("libev")
                    row["vs_libev"] = row["mb_per_s"] / libev if libev else None
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = ("method", "impl", "direction", "MB/s", "local CPU-s/GB", "remote CPU-s/GB", "vs libev")
    table = [header] + [
        (
            r["method"],
            r["impl"],
            r["direction"],
            fmt(r["mb_per_s"], ".0f"),
            fmt(r["local_cpu_s_per_gb"], ".2f"),
            fmt(r["remote_cpu_s_per_gb"], ".2f"),
            fmt(r["vs_libev"], ".2f"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {3, 4, 5, 6}
    for n, row in enumerate(table):
        print("  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "\nMB/s: median wall-clock throughput, 10^6 bytes/s. CPU-s/GB: median utime+stime of the local-side "
        "process (relay local / ss-tunnel) and the remote-side process (relay remote / ss-server) per 10^9 "
        "bytes. vs libev: MB/s over libev's MB/s, same method and direction."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per transfer, in MiB (default 256)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD", help="default: all three")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, metavar="IMPL", help="relay, libev, direct (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per method, implementation and direction (default 3)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the samples (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--serve-target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_target:
        return run_target()
    if args.size_mib < 1 or args.repeat < 1:
        parser.error("--size-mib and --repeat must be at least 1")

    binaries = find_libev() if "libev" in args.impls else {}
    if "relay" in args.impls and importlib.util.find_spec("relay") is None:
        sys.exit(f"throughput: {sys.executable} cannot import relay; run `pip install -e .` in {ROOT} first, or use that venv's python")

    size = args.size_mib << 20
    data = memoryview(os.urandom(CHUNK))
    samples: list[Sample] = []
    began = time.monotonic()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        logdir = Path(tmp)
        target_port = start_target(stack, logdir)
        paths: dict[tuple[str, str], Path_] = {}
        for method in args.methods:
            for impl in args.impls:
                if impl == "relay":
                    paths[method, impl] = start_relay_pair(stack, logdir, method, target_port)
                elif impl == "libev":
                    paths[method, impl] = start_libev_pair(stack, logdir, method, target_port, binaries)
                else:
                    paths[method, impl] = Path_("direct", method, target_port)
        # Warm up every path (and prove it works) with a small transfer each way.
        for path in paths.values():
            for direction in DIRECTIONS:
                transfer(path, direction, min(size, 4 << 20), data, rep=-1)
        total = args.repeat * len(args.methods) * len(args.impls) * len(DIRECTIONS)
        done = 0
        for rep in range(args.repeat):
            # Rotate the implementations each repeat so none always runs first.
            order = args.impls[rep % len(args.impls) :] + args.impls[: rep % len(args.impls)]
            for method in args.methods:
                for impl in order:
                    path = paths[method, impl]
                    for direction in DIRECTIONS:
                        for proc in (path.local, path.remote):
                            if proc:
                                proc.check()
                        sample = transfer(path, direction, size, data, rep)
                        samples.append(sample)
                        done += 1
                        print(
                            f"[{done}/{total}] rep {rep + 1} {method:<22} {impl:<6} {direction:<8} "
                            f"{sample.mb_per_s:8.0f} MB/s",
                            file=sys.stderr,
                            flush=True,
                        )
    elapsed = time.monotonic() - began

    rows = summarize(samples, args.methods, args.impls)
    print(f"\n{args.size_mib} MiB per transfer, {args.repeat} repeat(s), {elapsed:.0f} s in all\n")
    print_table(rows)

    result = {
        "size_bytes": size,
        "repeat": args.repeat,
        "methods": args.methods,
        "impls": args.impls,
        "elapsed_s": elapsed,
        "machine": machine_info(binaries),
        "summary": rows,
        "samples": [{**asdict(s), "mb_per_s": s.mb_per_s} for s in samples],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
