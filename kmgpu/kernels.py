"""A fused nearest-center kernel for CUDA, written in Triton.

The generic assignment step (``kmeans._Assigner``) forms the (B, N, k) matrix
of ``||c||^2 - 2 x.c`` block by block with one batched product and then takes
its minimum: 8 bytes through memory per point and center, for 9 flops. On an
H100 that was 80% of the fit of 64 one-megapixel photos at k=64 (a skinny
float32 product and a reduction, 540 of 740 ms). This kernel keeps a block of
points in registers, runs through the centers, and writes only each point's
label and distance.

- Distances are the sum of squared differences, so for 8-bit colors and an
  integer palette they are exact in float32, and ties go to the lowest center
  index, as with ``torch.min``.
- With ``sums``, each block of points also writes its clusters' weighted sums
  (float32, over at most ``BLOCK_N`` points); torch adds the blocks up in
  float64 in a fixed order. No atomics: the same input gives the same bits.

Triton ships with PyTorch's CUDA wheels; where it is missing (or
``KMGPU_TRITON=0``), or the device is not CUDA, the generic path runs. Under
``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors, which is how the
tests check it on machines without a GPU.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["KernelUnavailable", "usable", "nearest", "BLOCK_N", "BLOCK_K"]

# Measured on an H100 (64 problems x 150k points, k = 64 and 256; 16 x 40k, k = 64): 128 x 32
# was fastest in every case, 1.3x to 1.4x faster than 256 x 32; 64-wide center tiles spill.
BLOCK_N = 128  # points per program
BLOCK_K = 32  # centers compared at a time
_MAX_PROBLEMS = 65_535  # the grid's second axis
_broken: str | None = None  # why Triton cannot run here, once seen


class KernelUnavailable(RuntimeError):
    """Triton could not build or launch the kernel here (no compiler, say): use the generic path."""


def _shape_ok(x: torch.Tensor) -> bool:
    """(B, N, d) points the kernel takes: 1 to 4 channels, at most _MAX_PROBLEMS problems."""
    return 1 <= x.shape[-1] <= 4 and x.shape[0] <= _MAX_PROBLEMS


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernel runs on the points ``x`` (B, N, d) here (Triton is imported on first need only)."""
    global _broken
    if _broken is not None or os.environ.get("KMGPU_TRITON", "1") == "0" or not _shape_ok(x):
        return False
    device = x.device
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        from . import _triton  # noqa: F401
    except Exception as err:  # pragma: no cover - no Triton, or one that cannot start here
        _broken = f"Triton cannot be imported: {err}"
        return False
    return True


def nearest(x: torch.Tensor, centers: torch.Tensor, slot_ok: torch.Tensor, w: torch.Tensor | None = None):
    """Nearest center of every point, and with weights ``w`` the clusters' weighted sums.

    Parameters
    ----------
    x : (B, N, d) float32, d from 1 to 4
    centers : (B, k, d) float32
    slot_ok : (B, k) bool; centers where it is False are never chosen
    w : (B, N) float32, optional; with it, the sums are returned too

    Returns
    -------
    labels (B, N) int64, squared distances (B, N) float32, and, with ``w``,
    sum_x (B, k, d) float64 and sum_w (B, k) float64; else None, None.
    """
    B, N, D = x.shape
    K = centers.shape[1]
    if not _shape_ok(x):
        raise ValueError(f"the fused kernel takes 1 to 4 channels and at most {_MAX_PROBLEMS} problems")
    x = x.to(torch.float32).contiguous()
    c = centers.to(device=x.device, dtype=torch.float32).contiguous()
    ok = slot_ok.to(device=x.device, dtype=torch.int8).contiguous()
    labels = torch.empty(B, N, dtype=torch.int64, device=x.device)
    dist = torch.empty(B, N, dtype=torch.float32, device=x.device)
    if N == 0 or B == 0:
        zeros = torch.zeros(B, K, D + 1, dtype=torch.float64, device=x.device)
        return (labels, dist, None, None) if w is None else (labels, dist, zeros[..., :D], zeros[..., D])
    from ._triton import nearest_kernel

    n_blocks = -(-N // BLOCK_N)
    sums = w is not None
    part = torch.empty(B, n_blocks, D + 1, K, dtype=torch.float32, device=x.device) if sums else dist
    w_arg = w.to(torch.float32).contiguous() if sums else dist
    try:
        nearest_kernel[(n_blocks, B)](
            x, c, ok, w_arg, labels, dist, part, N, K, n_blocks, D=D, SUMS=sums, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # a compiler or driver problem: the generic path still works
        global _broken
        _broken = f"{type(err).__name__}: {err}".splitlines()[0]
        warnings.warn(f"the fused CUDA kernel is not available ({_broken}); using the generic path", stacklevel=2)
        raise KernelUnavailable(_broken) from err
    if not sums:
        return labels, dist, None, None
    total = part.sum(1, dtype=torch.float64)  # (B, D + 1, K), in a fixed order
    return labels, dist, total[:, :D].transpose(1, 2), total[:, D]
