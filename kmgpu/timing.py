"""Where the time goes: wall seconds added up per named stage of the work."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

__all__ = ["StageClock"]


class StageClock:
    """Adds up wall time per stage (decode, colors, fit, assign, encode, metrics, write).

    On CUDA it synchronises the device at the edges of each stage, so that
    asynchronous GPU work is counted in the stage that queued it; pass a
    clock only where the breakdown is wanted. Thread-safe.
    """

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add({name: time.perf_counter() - t0})

    def add(self, seconds: dict[str, float]) -> None:
        with self._lock:
            for name, value in seconds.items():
                self.seconds[name] = self.seconds.get(name, 0.0) + value


def stage(clock: StageClock | None, name: str):
    """``clock.stage(name)``, or nothing when there is no clock."""
    return contextlib.nullcontext() if clock is None else clock.stage(name)
