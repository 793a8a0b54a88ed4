"""The Triton source of :func:`kmgpu.kernels.nearest` (imported only where it can run)."""

import triton
import triton.language as tl


@triton.jit
def nearest_kernel(
    x_ptr, c_ptr, ok_ptr, w_ptr, labels_ptr, dist_ptr, part_ptr, N, K, n_blocks,
    D: tl.constexpr, SUMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = offs < N
    row = b * N + offs
    x0 = tl.load(x_ptr + row * D, mask=inside, other=0.0)
    if D > 1:
        x1 = tl.load(x_ptr + row * D + 1, mask=inside, other=0.0)
    if D > 2:
        x2 = tl.load(x_ptr + row * D + 2, mask=inside, other=0.0)
    if D > 3:
        x3 = tl.load(x_ptr + row * D + 3, mask=inside, other=0.0)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    label = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        crow = b * K + kk
        ok = tl.load(ok_ptr + crow, mask=kk < K, other=0) != 0
        diff = x0[:, None] - tl.load(c_ptr + crow * D, mask=kk < K, other=0.0)[None, :]
        dist = diff * diff
        if D > 1:
            diff = x1[:, None] - tl.load(c_ptr + crow * D + 1, mask=kk < K, other=0.0)[None, :]
            dist += diff * diff
        if D > 2:
            diff = x2[:, None] - tl.load(c_ptr + crow * D + 2, mask=kk < K, other=0.0)[None, :]
            dist += diff * diff
        if D > 3:
            diff = x3[:, None] - tl.load(c_ptr + crow * D + 3, mask=kk < K, other=0.0)[None, :]
            dist += diff * diff
        dist = tl.where(ok[None, :], dist, float("inf"))
        low = tl.min(dist, axis=1)
        at = tl.argmin(dist, axis=1).to(tl.int32) + k0  # the lowest index among ties
        better = low < best  # strict: an earlier block of centers wins a tie
        best = tl.where(better, low, best)
        label = tl.where(better, at, label)
    tl.store(labels_ptr + row, label.to(tl.int64), mask=inside)
    tl.store(dist_ptr + row, best, mask=inside)
    if SUMS:
        w = tl.load(w_ptr + row, mask=inside, other=0.0)
        base = (b * n_blocks + pid) * (D + 1) * K
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            hit = label[:, None] == kk[None, :]
            out = part_ptr + base + kk
            tl.store(out + D * K, tl.sum(tl.where(hit, w[:, None], 0.0), axis=0), mask=kk < K)
            tl.store(out, tl.sum(tl.where(hit, (x0 * w)[:, None], 0.0), axis=0), mask=kk < K)
            if D > 1:
                tl.store(out + K, tl.sum(tl.where(hit, (x1 * w)[:, None], 0.0), axis=0), mask=kk < K)
            if D > 2:
                tl.store(out + 2 * K, tl.sum(tl.where(hit, (x2 * w)[:, None], 0.0), axis=0), mask=kk < K)
            if D > 3:
                tl.store(out + 3 * K, tl.sum(tl.where(hit, (x3 * w)[:, None], 0.0), axis=0), mask=kk < K)
