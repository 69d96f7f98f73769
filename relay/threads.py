"""A pool of reusable threads: a session's thread is handed to the next session instead of
exiting, because starting a thread costs more than a short session's whole relay work.

Threads are created on demand (there is never a queue of sessions waiting for a thread: a task
goes to an idle thread or to a new one), and an idle thread exits after ``idle_timeout``
seconds. Each idle thread waits on a lock of its own, so a task wakes exactly one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["WorkerPool", "shared_pool"]

Task = tuple[Callable[..., Any], tuple[Any, ...]]


class _Worker:
    __slots__ = ("wake", "task")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.task: Task | None = None


class WorkerPool:
    def __init__(self, idle_timeout: float = 10.0, name: str = "relay-worker") -> None:
        self.idle_timeout = idle_timeout
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # most recently idle last: reused first, while it is warm
        self._count = 0

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` in a thread of the pool, now."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._count += 1
                number = self._count
        if worker is not None:
            worker.task = (function, args)
            worker.wake.release()
            return
        thread = threading.Thread(target=self._work, args=((function, args),), name=f"{self.name}-{number}", daemon=True)
        thread.start()

    def _work(self, task: Task | None) -> None:
        worker = _Worker()
        while task is not None:
            function, args = task
            try:
                function(*args)
            except BaseException:  # noqa: BLE001 - tasks report their own errors; the thread lives on
                pass
            task = function = args = None  # type: ignore[assignment]  # hold no references while idle
            with self._lock:
                self._idle.append(worker)
            if not worker.wake.acquire(timeout=self.idle_timeout):
                with self._lock:
                    if worker in self._idle:
                        self._idle.remove(worker)
                        return
                worker.wake.acquire()  # submit took us just as we timed out: the task is coming
            task, worker.task = worker.task, None


_shared: WorkerPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> WorkerPool:
    """The process's pool, shared by every relay in it."""
    global _shared
    shared = _shared
    if shared is not None:  # the common case, without the lock (it is called several times a session)
        return shared
    with _shared_lock:
        if _shared is None:
            _shared = WorkerPool()
        return _shared
