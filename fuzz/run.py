#!/usr/bin/env python3
"""Fuzz every parser of relay for a while; report inputs tried and crashes per target.

    python fuzz/run.py --minutes 12 --jobs 2          # all targets, 12 CPU-minutes split evenly
    python fuzz/run.py --targets http,socks5 --seconds 300
    python fuzz/run.py --engine plain                 # without atheris
    python fuzz/run.py --reproduce fuzz/crashes/config-OverflowError-1a2b3c4d.bin

Engines: ``atheris`` (coverage-guided libFuzzer, if ``import atheris`` works) or ``plain`` (this
script's own mutation fuzzer: seeded corpora of valid messages, bit flips, byte sets, inserts,
deletes, truncation, splicing, duplication and dictionary tokens). Either way each target runs in
its own process (fuzz/targets.py says what each one checks), and each input gets at most
--input-timeout seconds: libFuzzer's -timeout with atheris, SIGALRM with plain.

A crash is an exception other than the parser's own error, or a failed property. The first input
of each distinct crash (exception type and the relay/h11 line it came from) is saved as
fuzz/crashes/TARGET-TYPE-HASH.bin with the traceback beside it (.txt); the run goes on. A hang is
saved by libFuzzer as fuzz/crashes/TARGET-timeout-SHA1 (atheris) or as a crash of type Hang (plain).

The corpus libFuzzer grows is kept in $TMPDIR/relay-fuzz/TARGET (--corpus to change), not in git.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRASHES = HERE / "crashes"


def target_names() -> list[str]:
    """Every target, in fuzz/targets.py's order (the workers import it again, instrumented)."""
    sys.path.insert(0, str(HERE))
    import targets

    return list(targets.TARGETS)


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# -- inside a worker process: one target, one engine ---------------------------------------------


class Hang(Exception):
    pass


class Recorder:
    """Counts inputs, saves the first input of each distinct crash, and keeps a stats file current."""

    def __init__(self, target: str, stats_path: str | None, engine: str) -> None:
        self.target, self.stats_path, self.engine = target, stats_path, engine
        self.inputs = 0
        self.crashes: dict[str, dict] = {}
        self.started = time.monotonic()
        self.last_write = 0.0
        CRASHES.mkdir(exist_ok=True)

    def crash(self, data: bytes, error: BaseException) -> None:
        frames = traceback.extract_tb(error.__traceback__)
        ours = [f for f in frames if "/relay/" in f.filename or "/plugins/" in f.filename or "relay_plugins" in f.filename or "/h11/" in f.filename]
        where = ours[-1] if ours else frames[-1] if frames else None
        location = f"{Path(where.filename).name}:{where.lineno}" if where else "?"
        signature = f"{type(error).__name__} at {location}"
        if isinstance(error, AssertionError) and str(error):  # a property: which one (text before its details)
            signature += f" ({str(error).split(': ')[0][:80]})"
        if signature in self.crashes:
            self.crashes[signature]["count"] += 1
            return
        digest = hashlib.sha1(signature.encode()).hexdigest()[:8]
        stem = CRASHES / f"{self.target}-{type(error).__name__}-{digest}"
        stem.with_suffix(".bin").write_bytes(data)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        stem.with_suffix(".txt").write_text(f"target: {self.target}\nsignature: {signature}\ninput: {data!r}\n\n{text}", encoding="utf-8", errors="backslashreplace")
        self.crashes[signature] = {"signature": signature, "file": str(stem.with_suffix(".bin").relative_to(HERE.parent)), "count": 1, "message": str(error)[:200]}
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.stats_path and (force or now - self.last_write > 1.0):
            self.last_write = now
            stats = {"target": self.target, "engine": self.engine, "inputs": self.inputs, "seconds": round(now - self.started, 1), "crashes": list(self.crashes.values())}
            tmp = self.stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(stats, f)
            os.replace(tmp, self.stats_path)


def one_input(run, recorder: Recorder, data: bytes) -> None:
    recorder.inputs += 1
    try:
        run(data)
    except Exception as e:  # noqa: BLE001 - everything the target lets through is a finding
        recorder.crash(data, e)
    recorder.write()


def worker_atheris(name: str, seconds: int, corpus: Path, stats: str, input_timeout: int) -> None:
    import atheris

    with atheris.instrument_imports(include=["relay", "relay_plugins", "h11", "targets"]):
        import targets
    target = targets.TARGETS[name]
    seed_corpus(corpus, target.seeds)
    dictionary = write_dictionary(corpus.parent / f"{name}.dict", target.tokens)
    recorder = Recorder(name, stats, "atheris")
    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-timeout={input_timeout}", f"-max_len={target.max_len}", "-print_final_stats=1", f"-artifact_prefix={CRASHES}/{name}-", "-rss_limit_mb=4096"]
    if dictionary:
        argv.append(f"-dict={dictionary}")
    atheris.Setup(argv, lambda data: one_input(target.run, recorder, data))
    atheris.Fuzz()


INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x3f\xff", b"\x40\x00", b"\xff\xff", b"9" * 5000, b"\\ud800", b"\xed\xa0\x80", b"%", b"@", b":", b"\r\n", b"[", b"]"]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes], tokens: list[bytes], max_len: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
        op = rng.randrange(9)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[pos % len(out)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3:
            del out[pos : pos + rng.randrange(1, 17)]
        elif op == 4:
            del out[pos:]
        elif op == 5:
            other = rng.choice(corpus)
            out[pos:] = other[rng.randrange(len(other) + 1) :]
        elif op == 6 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randrange(1, 64)]
        elif op == 7:
            out[pos:pos] = rng.choice(tokens or INTERESTING) if rng.random() < 0.7 else rng.choice(INTERESTING)
        elif op == 8 and len(out) >= 2:  # an integer field nudged
            at = rng.randrange(len(out) - 1)
            value = (int.from_bytes(out[at : at + 2], "big") + rng.choice((-1, 1, 0x100, -0x100))) & 0xFFFF
            out[at : at + 2] = value.to_bytes(2, "big")
    return bytes(out[:max_len])


def worker_plain(name: str, seconds: int, stats: str, input_timeout: int, seed: int) -> None:
    import targets

    target = targets.TARGETS[name]
    recorder = Recorder(name, stats, "plain")
    rng = random.Random(seed)
    corpus = list(target.seeds)

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"one input ran past {input_timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.05:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            data = mutate(rng.choice(corpus), rng, corpus, target.tokens, target.max_len)
        signal.setitimer(signal.ITIMER_REAL, input_timeout)
        try:
            one_input(target.run, recorder, data)
        except Hang as e:  # raised outside the target's try, between its return and here
            recorder.crash(data, e)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if roll > 0.97 and len(corpus) < 2000:  # keep some mutants as new starting points
            corpus.append(data)
    recorder.write(force=True)


def seed_corpus(corpus: Path, seeds: list[bytes]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:12]}"
        if not path.exists():
            path.write_bytes(seed)


def write_dictionary(path: Path, tokens: list[bytes]) -> Path | None:
    if not tokens:
        return None
    lines = ['"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token) + '"' for token in tokens if len(token) <= 64]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the orchestrator ------------------------------------------------------------------------------


def run_target(name: str, seconds: int, args: argparse.Namespace, engine: str) -> subprocess.Popen:
    stats = os.path.join(args.work, f"{name}.stats.json")
    if os.path.exists(stats):
        os.remove(stats)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seconds", str(seconds), "--engine", engine, "--stats", stats, "--input-timeout", str(args.input_timeout), "--corpus", args.corpus, "--seed", str(args.seed)]
    log = open(os.path.join(args.work, f"{name}.log"), "w")  # noqa: SIM115 - the worker writes to it until it exits
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(HERE))
    process.name, process.stats, process.log_path, process.started = name, stats, log.name, time.monotonic()  # type: ignore[attr-defined]
    return process


def summarize(process: subprocess.Popen) -> dict:
    stats = {"target": process.name, "inputs": 0, "seconds": 0.0, "crashes": []}  # type: ignore[attr-defined]
    if os.path.exists(process.stats):  # type: ignore[attr-defined]
        with open(process.stats) as f:  # type: ignore[attr-defined]
            stats.update(json.load(f))
    log = Path(process.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
    executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    if executed:  # libFuzzer's own count includes the inputs after the last stats write
        stats["inputs"] = max(stats["inputs"], int(executed[-1]))
    coverage = re.findall(r"\bcov: (\d+) ft: (\d+)", log)
    if coverage:
        stats["coverage"] = f"cov {coverage[-1][0]} ft {coverage[-1][1]}"
    stats["seconds"] = round(time.monotonic() - process.started, 1)  # type: ignore[attr-defined]
    if "ERROR: libFuzzer: timeout" in log:
        stats["crashes"].append({"signature": "timeout (hang)", "file": "see " + process.log_path, "count": 1})  # type: ignore[attr-defined]
    elif process.returncode not in (0, None) and not stats["crashes"]:
        stats["crashes"].append({"signature": f"worker exited {process.returncode}", "file": "see " + process.log_path, "count": 1})  # type: ignore[attr-defined]
    return stats


def orchestrate(args: argparse.Namespace) -> int:
    known = target_names()
    names = args.targets.split(",") if args.targets else known
    unknown = set(names) - set(known)
    if unknown:
        sys.exit(f"unknown targets: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "plain"
    seconds = args.seconds or max(int(args.minutes * 60 / len(names)), 5)
    os.makedirs(args.work, exist_ok=True)
    print(f"engine {engine}; {len(names)} targets x {seconds} s, {args.jobs} at a time; logs in {args.work}", flush=True)
    queue, running, results = list(names), [], []
    while queue or running:
        while queue and len(running) < args.jobs:
            running.append(run_target(queue.pop(0), seconds, args, engine))
        time.sleep(0.5)
        for process in list(running):
            if process.poll() is None and time.monotonic() - process.started > seconds + 120:
                process.kill()  # libFuzzer checks its time between inputs: a stuck one is ended here
                process.wait()
            if process.poll() is not None:
                running.remove(process)
                stats = summarize(process)
                results.append(stats)
                found = "; ".join(f"{c['signature']} ({c['count']}x) -> {c['file']}" for c in stats["crashes"]) or "no crash"
                print(f"{stats['target']:<12} {stats['inputs']:>10} inputs in {stats['seconds']:>6.1f} s  {stats.get('coverage', ''):<18} {found}", flush=True)
    total_inputs = sum(r["inputs"] for r in results)
    total_seconds = sum(r["seconds"] for r in results)
    crashes = sum(len(r["crashes"]) for r in results)
    print(f"total: {total_inputs} inputs, {total_seconds / 60:.1f} target-minutes, {crashes} distinct crashes", flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps({"engine": engine, "targets": results}, indent=1))
    return 1 if crashes else 0


def reproduce(path: str) -> int:
    """Run one saved input on the target its file name starts with; show what it raises."""
    sys.path.insert(0, str(HERE))
    import targets

    name = next((n for n in sorted(target_names(), key=len, reverse=True) if Path(path).name.startswith(n + "-")), None)
    if name is None:
        sys.exit(f"cannot tell the target from {path}: file names start with one of {', '.join(target_names())}")
    data = Path(path).read_bytes()
    print(f"{name}: {data!r}")
    targets.TARGETS[name].run(data)
    print("no crash")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="total fuzzing time, split evenly across the targets (default 10)")
    parser.add_argument("--seconds", type=int, default=0, help="seconds per target instead of --minutes")
    parser.add_argument("--targets", default="", help="comma-separated subset of the targets (default: all; fuzz/README.md lists them)")
    parser.add_argument("--engine", choices=("auto", "atheris", "plain"), default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at the same time (one process each)")
    parser.add_argument("--input-timeout", type=int, default=10, help="seconds one input may take before it counts as a hang")
    parser.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "relay-fuzz"), help="where libFuzzer keeps each target's growing corpus")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "relay-fuzz-logs"), help="worker logs and stats")
    parser.add_argument("--summary", help="write the per-target results here as JSON")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the plain engine")
    parser.add_argument("--reproduce", metavar="FILE", help="run one saved crash input again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.reproduce:
        return reproduce(args.reproduce)
    if args.worker:
        sys.path.insert(0, str(HERE))
        sys.argv = sys.argv[:1]  # libFuzzer reads its own flags from what worker_atheris passes
        if args.engine == "atheris":
            worker_atheris(args.worker, args.seconds, Path(args.corpus) / args.worker, args.stats, args.input_timeout)
        else:
            worker_plain(args.worker, args.seconds, args.stats, args.input_timeout, args.seed)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
