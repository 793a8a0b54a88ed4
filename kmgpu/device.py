"""Turning a user's device request into a ``torch.device``, and memory budgets.

Everything device-specific that the rest of the package needs to know lives
here, so that the K-means body itself stays the same on every device.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

__all__ = ["DeviceError", "resolve_device", "check_device", "chunk_budget_bytes", "exact_float32_matmul"]

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")

# CPU distance blocks: the field notes saw blocks above ~32 MB take fresh
# pages from the allocator on every chunk (2x slower at k=256). On 2 cores we
# measured 4 MiB blocks, which stay in cache between the product and the
# minimum, 10-30% faster again than 16 MiB at k=256 on the sample photos.
CPU_CHUNK_BYTES = 4 * 2**20
# GPU distance blocks: big enough to saturate the device, small enough to
# leave room on a 16 GiB card beside a 50-megapixel problem.
CUDA_CHUNK_BYTES_MAX = 1 * 2**30
CUDA_CHUNK_BYTES_MIN = 32 * 2**20


class DeviceError(ValueError):
    """A device was asked for that does not exist or cannot be used."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a ``torch.device``.

    Parameters
    ----------
    spec : str or torch.device or None
        ``"auto"`` (or None) picks the current CUDA device when one is
        available and the CPU otherwise.

    Raises
    ------
    DeviceError
        When the string is not a device name, or names a CUDA device that
        this machine does not have.
    """
    kind, index = _parsed(spec)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def check_device(spec: str | torch.device | None) -> None:
    """Raise the :class:`DeviceError` that :func:`resolve_device` would, without starting CUDA here.

    For a launcher (``kmgpu run --nproc``), whose processes take the GPUs:
    it learns whether they can, and holds no CUDA context of its own.
    """
    _parsed(spec)


def _parsed(spec: str | torch.device | None) -> tuple[str, int | None]:
    """``spec`` as (auto, cpu or cuda; the index or None), checked against this machine's GPUs."""
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec).strip().lower()
    match = _DEVICE_PATTERN.match(text)
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise DeviceError(f"device={spec!r} is not a device: use auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), None if match.group(2) is None else int(match.group(2))
    if kind != "cuda":
        return kind, None
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        )
        raise DeviceError(f"device={spec!r} was asked for, but {why}; use --device cpu or auto")
    count = torch.cuda.device_count()  # from the driver: no CUDA context is made
    if index is not None and index >= count:
        raise DeviceError(
            f"device={spec!r} does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return kind, index


def chunk_budget_bytes(device: torch.device) -> int:
    """Bytes that one block of the (points x centers) distance matrix may take.

    On the CPU a fixed 4 MiB (see ``CPU_CHUNK_BYTES``). On CUDA a quarter of
    the memory that is free right now, between 32 MiB and 1 GiB.
    """
    if device.type != "cuda":
        return CPU_CHUNK_BYTES
    free, _total = torch.cuda.mem_get_info(device)
    return int(min(CUDA_CHUNK_BYTES_MAX, max(CUDA_CHUNK_BYTES_MIN, free // 4)))


@contextlib.contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """Run float32 matrix products in full float32 precision inside the block.

    Distances between colors are differences of numbers near 1e5; TF32's
    10-bit mantissa would turn them into noise and assign pixels to the wrong
    color. A user (or another library) may have switched TF32 on globally, so
    the K-means core turns it off for its own products and restores the
    setting afterwards.
    """
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = before
