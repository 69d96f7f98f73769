"""Worker processes: ``--workers N`` runs N copies of a relay, each with its own listening sockets
bound with SO_REUSEPORT, so the kernel spreads connections (and UDP flows, by address) over them
and one remote uses every core, as the original Python shadowsocks' workers did.

The parent only supervises: it forks the workers before any thread exists, passes SIGINT and
SIGTERM on, and exits once they have; a worker that dies is reported, and when none is left the
parent exits with a failure status.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

__all__ = ["run_workers"]

log = logging.getLogger("relay")


def run_workers(count: int, work: Callable[[], int]) -> int:
    children: dict[int, int] = {}  # pid -> worker number
    for number in range(1, count + 1):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = work()
            finally:
                os._exit(status)  # never return into the parent's code
        children[pid] = number
    log.info("started %d workers: %s", count, ", ".join(str(pid) for pid in children))

    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        number = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not stopping:
            failed = True
            log.error("worker %s (pid %d) exited with status %d", number, pid, code)
    time.sleep(0)  # let a pending signal handler run before deciding
    return 0 if stopping or not failed else 1
