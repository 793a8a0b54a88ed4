"""One assignment pass on CUDA: the fused Triton kernel (per block shape) against the matrix-product path.

For a few (problems B, points N, centers k) shapes of 8-bit-like data it times
``kmgpu.kernels.nearest`` with and without the cluster sums, for several
``BLOCK_N x BLOCK_K`` tiles, checks that every tile gives the same labels, and
times the generic path (``_Assigner`` with the kernel switched off) on the same
pass with sums. Needs a CUDA GPU.

    python scripts/bench_kernel.py
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kmgpu import kernels  # noqa: E402
from kmgpu.device import chunk_budget_bytes  # noqa: E402
from kmgpu.kmeans import _Assigner  # noqa: E402

SHAPES = ((64, 150_000, 64), (64, 150_000, 256), (16, 40_000, 64))
TILES = ((128, 32), (256, 32), (256, 64), (512, 32), (128, 64), (64, 64))


def timed(fn, repeats: int = 10) -> float:
    fn()  # compile (first use of a variant) and warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernel.py needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    default = (kernels.BLOCK_N, kernels.BLOCK_K)
    try:
        for b, n, k in SHAPES:
            x = torch.randint(0, 256, (b, n, 3), generator=gen).float().to(dev) - 128
            c = torch.randint(0, 256, (b, k, 3), generator=gen).float().to(dev) - 128
            ok = torch.ones(b, k, dtype=torch.bool, device=dev)
            w = torch.ones(b, n, device=dev)
            reference = None
            for block_n, block_k in TILES:
                kernels.BLOCK_N, kernels.BLOCK_K = block_n, block_k
                labels = kernels.nearest(x, c, ok, w)[0]
                reference = labels if reference is None else reference
                search = timed(functools.partial(kernels.nearest, x, c, ok))
                both = timed(functools.partial(kernels.nearest, x, c, ok, w))
                print(
                    f"B={b} N={n} k={k} tile {block_n}x{block_k}: search {search:.3f} ms "
                    f"({b * n * k * 8 / search / 1e9:.1f} TFLOP/s at 8 flops), with sums {both:.3f} ms, "
                    f"same labels {torch.equal(labels, reference)}"
                )
            asg = _Assigner(x, w, chunk_budget_bytes(dev))
            asg.fused = False
            print(f"  matrix-product path with sums: {timed(functools.partial(asg.run, c, ok, sums=True), 3):.3f} ms")
    finally:
        kernels.BLOCK_N, kernels.BLOCK_K = default


if __name__ == "__main__":
    main()
