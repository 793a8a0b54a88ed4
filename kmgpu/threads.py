"""Thread pools kept for the life of a process, made afresh in a forked child; the cores it may use.

Starting threads for every call costs more than the work of a small image (two
threads per PNG cost 0.5 ms, 7% of a 64x64 image's whole work), so the kernels'
search threads and the encoder's candidate threads are kept. A forked child
(a DataLoader worker) has none of its parent's threads, and a lock one of them
held at the fork stays held in the child: each pool starts over there.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["ProcessThreads", "available_cores"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as torch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ProcessThreads:
    """A :class:`ThreadPoolExecutor` of ``max(2, cores)`` threads, made on first use in each process."""

    def __init__(self, name: str):
        self.name = name
        self.pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()
        os.register_at_fork(after_in_child=self._start_over)

    def get(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix=self.name)
            return self.pool

    def _start_over(self) -> None:
        self.pool, self.lock = None, threading.Lock()
