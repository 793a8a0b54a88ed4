"""Running ``kmgpu run`` under torchrun: ranks, devices, the split of the work.

Nothing here is home-made cluster code: torchrun starts the processes and
sets RANK, WORLD_SIZE and LOCAL_RANK; torch.distributed (NCCL on GPUs, gloo
on CPUs) carries the few collective calls (barriers, and gathering each
rank's counters). Without torchrun, every function here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from .data import Item

__all__ = ["Dist", "from_environment", "pixel_shard"]


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, spec: str) -> str:
        """Each rank takes the GPU of its LOCAL_RANK when the device is auto or cuda.

        Ranks beyond the GPU count share GPUs round-robin (two processes on one GPU
        work, for testing). An explicit cuda:N is kept as it is.
        """
        if self.active and spec in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return spec

    def backend(self, device: torch.device) -> str:
        """NCCL when every rank on this machine has a GPU of its own, else gloo.

        NCCL refuses two ranks on one GPU; the job only gathers small records
        and waits at barriers, which gloo does as well, so ranks that share
        GPUs (or run on the CPU) use gloo.
        """
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if device.type == "cuda" and local_world <= torch.cuda.device_count():
            return "nccl"
        return "gloo"

    def start(self, device: torch.device) -> None:
        """Join the process group (see :meth:`backend`)."""
        if not self.active or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=self.backend(device), timeout=datetime.timedelta(hours=2))

    def barrier(self) -> None:
        if self.active and dist.is_initialized():
            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), on every rank, in rank order."""
        if not (self.active and dist.is_initialized()):
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def from_environment() -> Dist:
    """The torchrun variables, or a single process when they are absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def _pixels(item: Item) -> int:
    """Pixel count from the image header alone; 1 for a file that has none (it will fail cheaply)."""
    try:
        with Image.open(item.path) as im:
            w, h = im.size
        return max(1, w * h)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1


def pixel_shard(items: Iterable[Item], rank: int, world: int) -> np.ndarray:
    """Which of ``items`` (the walk's order) rank ``rank`` takes: contiguous runs balanced by pixels.

    Every rank reads the same headers in the same order and cuts the running
    pixel total into ``world`` equal parts: rank r takes the images whose
    pixels' midpoint falls in the r-th part. Each rank's images stay in walk
    order, so the ranks' records, concatenated in rank order, are in walk
    order too. Returns a boolean mask over the items.
    """
    sizes = np.fromiter((_pixels(item) for item in items), dtype=np.int64)
    if sizes.size == 0:
        return np.zeros(0, dtype=bool)
    ends = np.cumsum(sizes)
    middles = ends - sizes / 2
    part = np.minimum((middles * world / ends[-1]).astype(np.int64), world - 1)
    return part == rank
