"""Batched, ragged, weighted K-means in PyTorch: one body for every device.

The functional core, :func:`kmeans`, fits ``B`` independent problems at once:
points of shape ``(B, N, d)`` with weights ``(B, N)``, where weight 0 marks
padding, so problems of different sizes (images of different sizes, or their
color histograms) share the same kernels. Each problem has its own number of
clusters and its own convergence, and drops out of the work once converged.

:class:`KMeans` wraps it in the scikit-learn estimator contract.

This module knows nothing of files or images.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import cpu_kernels, kernels
from .device import chunk_budget_bytes, exact_float32_matmul, resolve_device

__all__ = [
    "KMeans",
    "KMeansResult",
    "IterationStats",
    "KMeansWarning",
    "NotFittedError",
    "kmeans",
    "assign",
]

log = logging.getLogger(__name__)

# Fraction of the compacted batch below which converged problems are dropped
# from the working copy (a copy costs about as much as one iteration).
_RECOMPACT_FRACTION = 0.75


class KMeansWarning(UserWarning):
    """The fit is valid but not what was asked for (fewer distinct points than k)."""


class NotFittedError(RuntimeError):
    """``predict`` or ``transform`` was called before ``fit``."""


@dataclass(frozen=True)
class IterationStats:
    """What one Lloyd iteration did, for every problem of the batch.

    Attributes
    ----------
    iteration : int
        1-based iteration number.
    active : int
        Problems that were still iterating.
    inertia : Tensor of shape (B,), float64
        Weighted sum of squared distances to the centers the iteration
        started from; NaN for problems that had already converged.
    center_shift : Tensor of shape (B,), float64
        Sum of squared center moves; NaN for problems already converged.
    empty_repaired : int
        Empty clusters moved onto badly fitted points in this iteration.
    seconds : float
        Wall time of the iteration, device work included.
    """

    iteration: int
    active: int
    inertia: torch.Tensor
    center_shift: torch.Tensor
    empty_repaired: int
    seconds: float


@dataclass
class KMeansResult:
    """The outcome of :func:`kmeans`.

    For a batched call (points of shape ``(B, N, d)``) every field has a
    leading batch dimension; for a single problem (``(N, d)``) it is dropped.

    Attributes
    ----------
    centers : Tensor of shape (B, k_max, d), float32
        Cluster centers. Rows at and above a problem's own ``k`` are padding
        and hold zeros.
    labels : Tensor of shape (B, N), int64
        Index of the nearest center of every point, padding points included.
    inertia : Tensor of shape (B,), float64
        Weighted sum of squared distances of the points to their centers.
    n_iter : Tensor of shape (B,), int64
        Lloyd iterations run for each problem (of the best of ``n_init`` runs).
    converged : Tensor of shape (B,), bool
        Whether the center shift fell under the tolerance before ``max_iter``.
    n_clusters : Tensor of shape (B,), int64
        The number of clusters of each problem.
    history : list of IterationStats
        Per-iteration statistics of each problem's best run. When the
        ``n_init`` runs were fitted side by side (small problems), the list is
        as long as the longest run, and a problem's entries after its run
        converged hold NaN; fitted one after another, it is the first run's.
    bounds : optional
        Only with ``final_labels=False``, one run, and the compiled CPU
        search: that search's bounds after the last iteration, for
        :func:`assign` of the same points to centers near the final ones
        (the stored palette, rounded), which then searches fewer points.
        Opaque (batched, (B, N), even for a single problem); None elsewhere.
    """

    centers: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    n_clusters: torch.Tensor
    history: list[IterationStats] = field(default_factory=list)
    bounds: cpu_kernels.Bounds | None = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} cannot be read as an array: {err}") from None


def _check_finite(x: torch.Tensor, name: str) -> None:
    # A NaN or an inf makes the sum NaN or inf, so a finite sum clears every term, in a seventh of the
    # time of isfinite (12 against 83 us on 30,000 floats, one thread); a sum that overflows finite
    # terms falls to the exact test.
    if x.is_floating_point() and not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} contain NaN or inf (first at index {tuple(bad)})")


def _check_label_range(labels: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """``labels`` itself, once every value is a center's index, 0 to k - 1."""
    if labels.numel():
        low, high = torch.aminmax(labels)  # one pass, where comparing and or-ing took three (8x)
        if int(low) < 0 or int(high) >= k:
            raise ValueError(f"{name} must lie in 0 to {k - 1}")
    return labels


def _prepare(points, weights, n_clusters, device: torch.device):
    """Validate the inputs and bring them to (B, N, d) float32, (B, N) float32, (B,) int64."""
    x = _as_tensor(points, "points")
    if x.ndim not in (2, 3):
        raise ValueError(f"points must have shape (N, d) or (B, N, d), got shape {tuple(x.shape)}")
    single = x.ndim == 2
    if single:
        x = x.unsqueeze(0)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"points must hold at least one point of at least one dimension, got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"points must be real numbers, got dtype {x.dtype}")
    _check_finite(x, "points")
    x = x.to(device=device, dtype=torch.float32)
    B, N, _ = x.shape

    if weights is None:
        w = torch.ones(B, N, device=device)
    else:
        w = _as_tensor(weights, "weights")
        if single and w.ndim == 1:
            w = w.unsqueeze(0)
        if tuple(w.shape) != (B, N):
            raise ValueError(f"weights must have shape {(B, N) if not single else (N,)}, got {tuple(w.shape)}")
        _check_finite(w, "weights")
        w = w.to(device=device, dtype=torch.float32)
        if w.numel() and bool(w.amin() < 0):
            raise ValueError("weights must be >= 0 (0 marks padding)")

    if isinstance(n_clusters, (int, np.integer)):
        k = torch.full((B,), int(n_clusters), dtype=torch.int64)
    else:
        k = _as_tensor(n_clusters, "n_clusters").to(torch.int64).reshape(-1).cpu()
        if k.numel() != B:
            raise ValueError(f"n_clusters holds {k.numel()} values for {B} problems")
    if bool((k < 1).any()):
        raise ValueError(f"n_clusters={int(k.min())} is out of range: it must be >= 1")
    support = (w > 0).sum(1).cpu()
    too_many = (k > support).nonzero()
    if too_many.numel():
        b = int(too_many[0, 0])
        where = "" if single else f" of problem {b}"
        raise ValueError(f"n_clusters={int(k[b])} exceeds the {int(support[b])} points with positive weight{where}")
    return x, w, k.to(device), single


# --------------------------------------------------------------------------
# Distances, assignment and weighted sums, in memory-bounded blocks
# --------------------------------------------------------------------------


def _blocks(B: int, N: int, k: int, budget: int) -> Iterator[tuple[slice, slice]]:
    """Cut the (B, N, k) float32 distance tensor into blocks of at most ``budget`` bytes."""
    rows = max(1, budget // (4 * k))
    if rows >= N:
        per = max(1, rows // N)
        for b0 in range(0, B, per):
            yield slice(b0, min(B, b0 + per)), slice(0, N)
    else:
        for b in range(B):
            for n0 in range(0, N, rows):
                yield slice(b, b + 1), slice(n0, min(N, n0 + rows))


def _augment_centers(centers: torch.Tensor, slot_ok: torch.Tensor) -> torch.Tensor:
    """(B, k, d) centers -> (B, d + 1, k): [-2c; ||c||^2], +inf for unused slots.

    With points augmented by a column of ones, one batched product then gives
    ||c||^2 - 2 x.c, which differs from the squared distance by ||x||^2 alone
    and so has the same argmin. A single plain product measured 3x faster on
    the CPU than ``baddbmm`` with ``alpha=-2``.
    """
    sq = (centers * centers).sum(-1)
    sq = torch.where(slot_ok, sq, torch.full_like(sq, float("inf")))
    return torch.cat([-2.0 * centers, sq.unsqueeze(-1)], dim=-1).transpose(1, 2)


def _nearest_into(part: torch.Tensor, best: torch.Tensor, labels: torch.Tensor, guessed: bool) -> None:
    """Write the minimum along the last axis of ``part`` (b, n, k) and its index into ``best`` and ``labels`` (b, n).

    With ``guessed``, ``labels`` holds each point's previous center on entry.
    On the CPU, ``min`` with indices runs about 6 times slower than ``amin``
    alone (measured on 2 cores, k = 64 to 256). After the first Lloyd
    iterations almost every point keeps its center, so there the minimum is
    taken without indices, and the index is searched only for the points
    whose previous center is no longer at the minimum. A point whose old
    center ties with another keeps the old one. On CUDA the plain ``min`` is
    cheap and needs no host synchronisation, so callers guess only on the CPU.
    """
    if not guessed:
        torch.min(part, -1, out=(best, labels))
        return
    torch.amin(part, -1, out=best)
    kept = part.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    stale = (kept > best).view(-1).nonzero().squeeze(1)
    if stale.numel():
        # Rows by index_select and index_copy_: about 1.5x faster than indexing with (b, n) pairs.
        k = part.shape[-1]
        labels.view(-1).index_copy_(0, stale, part.view(-1, k).index_select(0, stale).argmin(-1))


class _Assigner:
    """Nearest-center search and weighted sums over (B, N, d) points, in blocks.

    Holds the points and weights, and, once the product path first needs
    them, the points with a column of ones appended and their squared norms,
    so that every Lloyd iteration reuses them. (The fused CUDA kernel needs
    neither: there they are never made.)
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor, budget: int):
        self.x = x
        self.w = w
        self.budget = budget
        # scatter_add on CUDA uses float atomics, whose order (and so whose
        # rounding) changes from run to run; a one-hot product is
        # deterministic. On the CPU scatter_add is deterministic and cheaper.
        self.one_hot_sums = x.device.type == "cuda"
        # On CUDA (with Triton) a fused kernel does the search and the sums (see kernels.py); on
        # the CPU (with numba) a compiled search that keeps bounds across passes (cpu_kernels.py).
        self.fused = kernels.usable(x)
        self.compiled = not self.fused and cpu_kernels.usable(x)
        self.bounds: cpu_kernels.Bounds | None = None
        self._scratch = torch.empty(0, device=x.device)
        self._xw = self._w64 = self._xa = self._x_sq = None

    def subset(self, idx: torch.Tensor) -> _Assigner:
        new = _Assigner.__new__(_Assigner)
        new.x, new.w = self.x[idx], self.w[idx]
        new.budget, new.one_hot_sums, new._scratch = self.budget, self.one_hot_sums, self._scratch
        new.fused, new.compiled = self.fused, self.compiled
        new.bounds = None if self.bounds is None else self.bounds.subset(idx)
        new._xw = None if self._xw is None else self._xw[idx]
        new._w64 = None if self._w64 is None else self._w64[idx]
        new._xa = None if self._xa is None else self._xa[idx]
        new._x_sq = None if self._x_sq is None else self._x_sq[idx]
        return new

    def _augmented(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The points with a column of ones appended (B, N, d + 1) and their squared norms (B, N), made on first use."""
        if self._xa is None:
            self._xa = torch.cat([self.x, torch.ones_like(self.x[..., :1])], dim=-1)
            self._x_sq = (self.x * self.x).sum(-1)
        return self._xa, self._x_sq

    def _weighted_channels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x * w in float64, channels first (B, d, N), and w in float64, made on first use.

        Summing one contiguous channel at a time with a 1-D index measured
        about 4 times faster on the CPU than one scatter of (n, d) rows.
        """
        if self._xw is None:
            w64 = self.w.double()
            self._xw = (self.x.double() * w64.unsqueeze(-1)).transpose(1, 2).contiguous()
            self._w64 = w64
        return self._xw, self._w64

    def _block_buffer(self, b: int, n: int, k: int) -> torch.Tensor:
        """A (b, n, k) float32 view of one scratch buffer kept across blocks and iterations.

        A fresh 4 MiB tensor per block comes from mmap and pays a page fault on
        every page at first touch: reusing one buffer made the whole fit of a
        photo 15-25% faster on the CPU (the field notes saw the same).
        """
        size = b * n * k
        if self._scratch.numel() < size:
            self._scratch = torch.empty(size, device=self.x.device)
        return self._scratch[:size].view(b, n, k)

    def run(self, centers: torch.Tensor, slot_ok: torch.Tensor, *, sums: bool, previous=None):
        """Assign every point to its nearest center.

        Parameters
        ----------
        previous : Tensor of shape (B, N), int64, optional
            Labels of the last iteration; a point whose old center is still
            at the minimum distance keeps its label (see ``_nearest_into``).

        Returns
        -------
        labels : (B, N) int64
        min_dist : (B, N) float32, squared distance to the nearest center
        sum_x : (B, k, d) float64 weighted sums of the points of each cluster (if ``sums``)
        sum_w : (B, k) float64 total weight of each cluster (if ``sums``)
        """
        if self.fused:
            try:
                return kernels.nearest(self.x, centers, slot_ok, self.w if sums else None)
            except kernels.KernelUnavailable:
                self.fused = False
                self.compiled = cpu_kernels.usable(self.x)
        if self.compiled:
            n_clusters = slot_ok.sum(1)
            if bool((slot_ok == (torch.arange(slot_ok.shape[1]) < n_clusters.unsqueeze(1))).all()):
                if sums and self.bounds is None:
                    self.bounds = cpu_kernels.Bounds(self.x)
                return cpu_kernels.nearest(
                    self.x, self.w, centers, n_clusters, bounds=self.bounds, previous=previous, sums=sums
                )
        B, N, d = self.x.shape
        k = centers.shape[1]
        ca = _augment_centers(centers, slot_ok)
        points, x_sq = self._augmented()
        # Each block writes straight into these: a block costs a handful of operations, whose
        # overhead (about 200 us per block before) was 40% of a pass over 100k colors at k=256.
        guessed = previous is not None and self.x.device.type != "cuda"  # see _nearest_into
        labels = previous.clone() if guessed else torch.empty(B, N, dtype=torch.int64, device=self.x.device)
        min_dist = torch.empty(B, N, dtype=torch.float32, device=self.x.device)
        sum_x = sum_w = None
        if sums:
            sum_x = torch.zeros(B, k, d, dtype=torch.float64, device=self.x.device)
            sum_w = torch.zeros(B, k, dtype=torch.float64, device=self.x.device)
        with exact_float32_matmul():
            for bs, ns in _blocks(B, N, k, self.budget):
                xa = points[bs, ns]
                part = torch.bmm(xa, ca[bs], out=self._block_buffer(xa.shape[0], xa.shape[1], k))
                _nearest_into(part, min_dist[bs, ns], labels[bs, ns], guessed)
                if sums and self.one_hot_sums:
                    sx, sw = self._one_hot_sums(labels[bs, ns], bs, ns, part)
                    sum_x[bs] += sx
                    sum_w[bs] += sw
        min_dist.add_(x_sq).clamp_min_(0.0)
        if sums and not self.one_hot_sums:
            sum_x, sum_w = self._cluster_sums(labels, k)
        return labels, min_dist, sum_x, sum_w

    def _one_hot_sums(self, lab, bs: slice, ns: slice, scratch):
        """CUDA: weighted sums (b, k, d) and total weights (b, k) of one block's clusters, as a product."""
        w = self.w[bs, ns]
        one_hot = scratch.zero_().scatter_(2, lab.unsqueeze(-1), w.unsqueeze(-1))
        return torch.bmm(one_hot.transpose(1, 2), self.x[bs, ns]).double(), one_hot.sum(1).double()

    def _cluster_sums(self, labels, k: int):
        """CPU: weighted sums (B, k, d) and total weights (B, k) of every cluster, in float64.

        Summed in float64, in one pass after the search, so that the result
        does not depend on the block size.
        """
        xw, w64 = self._weighted_channels()
        B, d = labels.shape[0], xw.shape[1]
        sx = torch.zeros(B, d, k, dtype=torch.float64, device=labels.device)
        for c in range(d):
            sx[:, c].scatter_add_(1, labels, xw[:, c])
        sw = torch.zeros(B, k, dtype=torch.float64, device=labels.device).scatter_add_(1, labels, w64)
        return sx.transpose(1, 2), sw


def assign(points, centers, *, n_clusters=None, chunk_bytes: int | None = None, guess=None, bounds=None):
    """Label every point with its nearest center, in memory-bounded blocks.

    Parameters
    ----------
    points : Tensor of shape (B, N, d) or (N, d)
    centers : Tensor of shape (B, k, d) or (k, d)
    n_clusters : int or Tensor of shape (B,), optional
        Use only the first ``n_clusters`` centers of each problem.
    chunk_bytes : int, optional
        Bytes per block of the distance matrix; by default from the device.
    guess : Tensor of shape (B, N) or (N,), int64, optional
        Likely labels (from a fit against nearby centers). The result is the
        same, but for ties, where a point keeps its guess; on the CPU only
        the points whose guess is not at the minimum are searched.
    bounds : optional
        The ``bounds`` of a :func:`kmeans` result fitted to these very
        points, in the same order (the assignment updates them): on the
        CPU they spare the search of most points whose guess is still
        their nearest center. The labels are the same.

    Returns
    -------
    labels : Tensor of shape (B, N) or (N,), int64
    sq_dist : Tensor of shape (B, N) or (N,), float32
        Squared distance of each point to its center.
    """
    single = points.ndim == 2
    x = points.unsqueeze(0) if single else points
    c = centers.unsqueeze(0) if centers.ndim == 2 else centers
    x = x.to(torch.float32)
    c = c.to(device=x.device, dtype=torch.float32)
    if c.shape[0] == 1 and x.shape[0] > 1:
        c = c.expand(x.shape[0], -1, -1)
    k = c.shape[1]
    slots = torch.arange(k, device=x.device).expand(x.shape[0], k)
    if n_clusters is None:
        slot_ok = torch.ones_like(slots, dtype=torch.bool)
    else:
        slot_ok = slots < torch.as_tensor(n_clusters, device=x.device).reshape(-1, 1)
    budget = chunk_bytes or chunk_budget_bytes(x.device)
    # No shift of origin here: for integer data of small range (uint8 colors
    # and a uint8 palette) every term of ||c||^2 - 2x.c is an integer below
    # 2**24, so the distances are exact in float32, ties are true ties, and
    # the first nearest center wins whatever the batch or the block size.
    asg = _Assigner(x, torch.ones(x.shape[:2], device=x.device), budget)
    if guess is not None:
        guess = _check_label_range(guess.to(device=x.device, dtype=torch.int64).reshape(x.shape[:2]), k, "guess")
    asg.bounds = bounds
    labels, dist, _, _ = _run_with_oom_retry(asg, c, slot_ok, sums=False, previous=guess)
    return (labels[0], dist[0]) if single else (labels, dist)


def _run_with_oom_retry(asg: _Assigner, centers, slot_ok, *, sums: bool, previous=None):
    """Run an assignment pass; on CUDA out-of-memory, halve the block size and retry."""
    while True:
        try:
            return asg.run(centers, slot_ok, sums=sums, previous=previous)
        except torch.cuda.OutOfMemoryError:
            if asg.budget <= 2**20:
                raise
            asg.budget //= 2
            torch.cuda.empty_cache()
            log.debug("CUDA out of memory: retrying with %d-byte distance blocks", asg.budget)


# --------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------


_MASK64 = 2**64 - 1


def _splitmix64(z: int) -> int:
    """One step of splitmix64 (Steele, Lea & Flood): a well-mixed 64-bit hash."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# Stream tags used by one run: the init sample, k-means++, random init (one spare).
_TAGS_PER_RUN = 4
# n_init runs are fitted side by side, as one batch of copies, when the copies
# hold at most this many points: several small fits share each operation.
_BATCHED_STARTS_POINTS = 2**21


class _Streams:
    """Random streams per problem, so that no problem's draws depend on its batch.

    Each problem has its own CPU ``torch.Generator`` for each use (a tag: the
    init sample, k-means++, random init, and the run number of ``n_init``),
    seeded from the run's seed, the problem's key and the tag. A problem
    draws the same numbers whatever else is in its batch and on any device,
    so it starts from the same centers fitted alone, in a batch, in another
    batch after a pipeline resumes, or on CUDA instead of the CPU.
    """

    def __init__(self, base_seed: int, keys: torch.Tensor, device: torch.device):
        self.device = device
        self.base = _splitmix64(base_seed & _MASK64)
        self.keys = [int(key) & _MASK64 for key in keys.tolist()]
        self.offsets = [0] * len(self.keys)

    def starts(self, runs: int) -> _Streams:
        """Streams of ``runs`` copies of the batch, copy r drawing what the r-th of ``n_init`` runs draws."""
        new = _Streams.__new__(_Streams)
        new.device, new.base = self.device, self.base
        new.keys = self.keys * runs
        new.offsets = [_TAGS_PER_RUN * r for r in range(runs) for _ in self.keys]
        return new

    def uniform(self, n: int, tag: int) -> torch.Tensor:
        """(B, n) float64 uniforms on [0, 1), the first n of each problem's stream ``tag``."""
        rows = []
        for key, offset in zip(self.keys, self.offsets):
            g = torch.Generator()
            g.manual_seed(_splitmix64(_splitmix64(self.base ^ key) ^ (tag + offset)) >> 1)
            rows.append(torch.rand(n, generator=g, dtype=torch.float64))
        return torch.stack(rows).to(self.device)


def _weighted_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices (B, n) drawn with replacement proportional to ``probs`` (B, N), from uniforms ``u`` (B, n).

    A cumulative sum and a binary search, as scikit-learn's k-means++ does;
    unlike ``torch.multinomial`` it has no 2**24 limit on N. Every row must
    have some positive probability.
    """
    return _draw_from_cumulative(probs.double().cumsum(1), u)


def _draw_from_cumulative(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`_weighted_draw` from the cumulative sums (B, N) of the probabilities."""
    idx = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    return idx.clamp_max_(cum.shape[1] - 1)


def _gather_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, d), idx (B, m) -> (B, m, d)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _init_sample(x, w, size: int, streams: _Streams, tag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``size`` points per problem for the initialisation.

    A problem whose points with positive weight all lie among its first
    ``size`` keeps them with their weights; a larger one gets ``size`` points
    drawn by weight, as unit-weight points. What a problem gets does not
    depend on how far its batch is padded.
    """
    if x.shape[1] <= size:
        return x, w
    x_head, w_head = x[:, :size], w[:, :size]
    whole = ((w_head > 0).sum(1) == (w > 0).sum(1)).view(-1, 1)
    drawn = _gather_points(x, _weighted_draw(w, streams.uniform(size, tag)))
    return torch.where(whole.unsqueeze(-1), x_head, drawn), torch.where(whole, w_head, torch.ones_like(w_head))


# k-means++ measures its distances on a grid: each problem's points are scaled by a power of two
# and rounded to integers of magnitude at most _GRID_REACH / sqrt(d). Every term of
# ||c||^2 - 2 x.c + ||x||^2 is then an integer, and so is every partial sum, all below 2**24:
# float32 products are exact, whatever the kernel, the blocking or the number of threads.
_GRID_REACH = 2048


def _kpp_grid(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, N, d) points -> the same points on k-means++'s integer grid (float32; see ``_GRID_REACH``).

    The scale is the largest power of two that keeps a problem's points with
    positive weight within reach: colors centred on their mean (at most 255
    away) get 4 grid steps a level, and k-means++ draws by their distances to
    within a sixteenth of a level squared.
    """
    reach = math.floor(_GRID_REACH / math.sqrt(x.shape[-1]) - 1e-9)
    held = torch.where(w.unsqueeze(-1) > 0, x, 0.0)  # padding neither sets the scale nor leaves the grid
    extent = held.abs().amax((1, 2)).double().clamp_min(2.0**-100)
    scale = torch.exp2(torch.floor(torch.log2(reach / extent)).clamp(-100, 100)).float()
    return torch.round(held * scale.view(-1, 1, 1))


def _kmeans_plusplus(x, w, k: torch.Tensor, k_max: int, streams: _Streams, tag: int):
    """Greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's variant), batched.

    Each step draws ``2 + floor(ln k_max)`` candidates proportional to the
    weighted squared distance to the centers chosen so far and keeps the one
    that lowers the potential most. All the uniforms a problem needs are drawn
    up front from its own stream, in one call per problem.

    Distances are taken between the points rounded to a grid (see
    :func:`_kpp_grid`), exactly, in float32; the centers are the points
    themselves. Potentials are weighted in float64.

    The k - 1 steps run one after another, each on small tensors, so their
    cost is mostly the number of operations: a step is a dozen of them.
    Distances are laid out (candidates, points): a product with a wide output
    ran 5x faster on the CPU than the tall, 8-column one of the (points,
    candidates) layout, and the sums over points run along contiguous memory.
    """
    B, N, d = x.shape
    n_trials = 2 + int(math.log(k_max))
    u = streams.uniform(1 + (k_max - 1) * n_trials, tag)
    g = _kpp_grid(x, w)
    g_sq = (g * g).sum(-1)
    # Rows [g, ||g||^2] to gather candidates from, and [-2g; 1] laid out (d + 1, N): one
    # product of the two, plus ||g||^2, is every candidate's squared distance to every point.
    rows_aug = torch.cat([g, g_sq.unsqueeze(-1)], dim=-1)
    cols_aug = torch.cat([-2.0 * g, torch.ones_like(g[..., :1])], dim=-1).transpose(1, 2).contiguous()
    g_sq = g_sq.unsqueeze(1)
    w64 = w.double()
    w_col = w64.unsqueeze(-1)
    centers = torch.zeros(B, k_max, d, device=x.device)
    uniform_k = bool((k == k_max).all())

    def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """(B, m) indices of points drawn by ``weights`` (B, N)."""
        cum = weights.cumsum(1)
        # Where every point of a problem sits on a center (fewer distinct points than k), draw by
        # weight alone. The CPU checks first, to skip that pass over the points when no problem
        # needs it; CUDA does not wait for the answer.
        if x.device.type == "cuda" or not bool((cum[:, -1] > 0).all()):
            cum = torch.where(cum[:, -1:] > 0, cum, w64.cumsum(1))
        return _draw_from_cumulative(cum, uniforms)

    def sq_dist(idx: torch.Tensor, sl: slice) -> torch.Tensor:
        """(b, m, N) squared grid distances of the points of problems ``sl`` to their points ``idx`` (b, m)."""
        with exact_float32_matmul():
            return torch.baddbmm(g_sq[sl], _gather_points(rows_aug[sl], idx), cols_aug[sl])

    def step(sl: slice, cand: torch.Tensor, closest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate of problems ``sl`` that lowers the potential most, and the distances it leaves."""
        trial = torch.minimum(sq_dist(cand, sl), closest)
        best = torch.bmm(trial.double(), w_col[sl]).argmin(1)  # (b, 1)
        return _gather_points(x[sl], cand.gather(1, best))[:, 0], _gather_points(trial, best)

    first = draw(w64, u[:, :1])
    centers[:, 0] = _gather_points(x, first)[:, 0]
    closest = sq_dist(first, slice(None))  # (B, 1, N)
    potential = closest.squeeze(1) * w64
    # Candidate distance blocks (b, trials, N) of at most 32 MiB: one block, without slicing, in most calls.
    per_block = max(1, (32 * 2**20) // (8 * n_trials * N))
    for c in range(1, k_max):
        cand = draw(potential, u[:, 1 + (c - 1) * n_trials : 1 + c * n_trials])
        if per_block >= B:
            centers[:, c], new_closest = step(slice(None), cand, closest)
        else:
            new_closest = torch.empty_like(closest)
            for b0 in range(0, B, per_block):
                sl = slice(b0, b0 + per_block)
                centers[sl, c], new_closest[sl] = step(sl, cand[sl], closest[sl])
        closest = new_closest if uniform_k else torch.where((k > c).view(-1, 1, 1), new_closest, closest)
        potential = closest.squeeze(1) * w64
    return centers


def _draw_host(potential: np.ndarray, u: np.ndarray, by_weight: np.ndarray) -> np.ndarray:
    """:func:`_weighted_draw` for one problem, in NumPy.

    Where the potential is 0 everywhere (every point already a center), the
    draw is by weight alone, from ``by_weight``, the weights' cumulative sums.
    """
    cum = torch.from_numpy(potential).cumsum(0).numpy()  # 4x faster than NumPy's cumsum
    if not cum[-1] > 0:
        cum = by_weight
    return np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), len(cum) - 1)


def _kmeans_plusplus_host(x, w, k: torch.Tensor, k_max: int, streams: _Streams, tag: int):
    """:func:`_kmeans_plusplus` on the CPU: the same draws and the same centers, one problem at a time.

    The k - 1 steps are sequential and small, so on the CPU their cost is the
    overhead of each operation: about 50 torch calls a step (views and
    gathers included), against a dozen NumPy calls at a fifth of the cost
    each. This loop measured 1.6x (10k points) to 3.5x (500 points) faster
    at k=256, and 1.9x on a batch of 16. The products stay in torch: NumPy's
    BLAS keeps its worker threads spinning after a call, and they took a core
    from the Lloyd passes that came next (about 1.6x slower).
    """
    B, N, d = x.shape
    n_trials = 2 + int(math.log(k_max))
    uniforms = streams.uniform(1 + (k_max - 1) * n_trials, tag).numpy()
    centers = np.zeros((B, k_max, d), dtype=np.float32)
    grid = _kpp_grid(x, w)
    compiled = cpu_kernels.usable(x)
    for b in range(B):
        g, wb, u = grid[b], w[b].double(), uniforms[b]
        by_weight = wb.cumsum(0).numpy()
        if compiled:  # the same draws, 3-4x faster: one compiled loop instead of a dozen calls a step
            chosen = np.zeros(k_max, dtype=np.int64)
            g_t = g.T.contiguous().numpy()  # by channel: the loops over points vectorise
            cpu_kernels._kmeans_plusplus(g_t, wb.numpy(), by_weight, u, int(k[b]), n_trials, chosen)
            centers[b, : int(k[b])] = x[b].numpy()[chosen[: int(k[b])]]
            continue
        g_sq = (g * g).sum(1, keepdim=True)
        ones = torch.ones_like(g_sq)
        # [c, ||c||^2, 1] . [-2g; 1; ||g||^2] = ||g - c||^2: one exact product gives every candidate's distances.
        rows = torch.cat([g, g_sq, ones], dim=1).numpy()
        cols = torch.cat([-2.0 * g, ones, g_sq], dim=1).T.contiguous()
        points, weights, w_col = x[b].numpy(), wb.numpy(), wb.unsqueeze(1)

        first = _draw_host(weights, u[:1], by_weight)
        centers[b, 0] = points[first[0]]
        closest = torch.mm(torch.from_numpy(rows[first]), cols).numpy()[0]
        for c in range(1, int(k[b])):
            cand = _draw_host(closest * weights, u[1 + (c - 1) * n_trials : 1 + c * n_trials], by_weight)
            trial = torch.mm(torch.from_numpy(rows[cand]), cols).numpy()
            np.minimum(trial, closest, out=trial)
            best = int(torch.mm(torch.from_numpy(trial).double(), w_col).argmin())
            centers[b, c] = points[cand[best]]
            closest = trial[best]
    return torch.from_numpy(centers)


def _random_init(x, w, k_max: int, streams: _Streams, tag: int):
    """k distinct points per problem, drawn without replacement proportional to weight.

    The Gumbel top-k trick: distinct points, so no cluster starts empty for
    want of a point (the field notes saw 223 of 256 colors used by a library
    that drew with replacement).
    """
    u = streams.uniform(w.shape[1], tag).clamp_min_(1e-300)
    keys = torch.log(w.double()) - torch.log(-torch.log(u))
    idx = keys.topk(k_max, dim=1).indices
    return _gather_points(x, idx)


# --------------------------------------------------------------------------
# Lloyd iterations
# --------------------------------------------------------------------------


def _repair_empty(asg, labels, min_dist, sum_x, sum_w, slot_ok) -> int:
    """Move each empty cluster onto one of the worst-fitted points of its problem.

    As scikit-learn's ``_relocate_empty_clusters``: the point leaves its old
    cluster's sums and becomes the whole of the empty one. Points already at
    distance 0 are never taken (their problem has fewer distinct points than
    clusters), so such clusters stay empty and keep their previous center.
    Updates the tensors in place and returns the number of clusters repaired.
    """
    empty = (sum_w <= 0) & slot_ok
    n_empty = empty.sum(1)
    most = int(n_empty.max())
    if most == 0:
        return 0
    score = torch.where(asg.w > 0, min_dist, torch.full_like(min_dist, -1.0))
    worst = score.topk(min(most, score.shape[1]), dim=1).indices
    most = worst.shape[1]
    slots = torch.sort(empty.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :most]
    take = (torch.arange(most, device=labels.device) < n_empty.unsqueeze(1)) & (score.gather(1, worst) > 0)
    b, j = take.nonzero(as_tuple=True)
    if b.numel() == 0:
        return 0
    p, s = worst[b, j], slots[b, j]
    pw = asg.w[b, p].double()
    px = asg.x[b, p].double() * pw.unsqueeze(1)
    old = labels[b, p]
    sum_x.index_put_((b, old), -px, accumulate=True)
    sum_w.index_put_((b, old), -pw, accumulate=True)
    sum_x[b, s] = px
    sum_w[b, s] = pw
    labels[b, p] = s
    min_dist[b, p] = 0.0
    return int(b.numel())


def _compiled_passes(asg: _Assigner, slot_ok: torch.Tensor) -> bool:
    """Whether Lloyd's passes run compiled: the compiled search, and each problem's clusters its first slots."""
    return asg.compiled and bool((slot_ok == (torch.arange(slot_ok.shape[1]) < slot_ok.sum(1, keepdim=True))).all())


def _lloyd(asg: _Assigner, centers, slot_ok, tol_abs, max_iter: int, labels=None, relax: float = 1.0):
    """Run Lloyd iterations until each problem's center shift is <= its tolerance.

    ``labels`` (B, N), optional, is a guess of each point's nearest initial
    center, which lets the first pass skip most of the index search.

    ``relax`` over-relaxes the update: each center moves ``relax`` times the
    way to its cluster's weighted mean m. For the labels just found, the
    objective of a cluster is then W |c' - m|^2 = (1 - relax)^2 W |c - m|^2
    above its minimum, so for 0 < relax < 2 the inertia still never rises,
    and a fixed point (c = m) is one of Lloyd's; the centers just travel
    further along the directions they keep moving in. A problem whose inertia
    rises all the same, beyond the rounding of its float32 distances, goes on
    with plain Lloyd steps; a cluster repaired from empty is placed on its
    point exactly.

    Returns the centers, iterations, convergence flags and history, and, from
    each problem's last iteration: its labels (B, N) (against the centers
    that iteration started from), inertia (B,) and cluster weights (B, k).

    With the compiled CPU search, the same passes run compiled
    (:func:`kmgpu.cpu_kernels.lloyd`): the forty-odd small torch operations
    of a pass cost about 1 ms on the CPU, more than the search itself on
    most images' bins.
    """
    if _compiled_passes(asg, slot_ok):
        # The same passes, each one call of the compiled kernels (see cpu_kernels.lloyd).
        if asg.bounds is None:
            asg.bounds = cpu_kernels.Bounds(asg.x)
        centers, n_iter, converged, passes, labels, inertia, sum_w = cpu_kernels.lloyd(
            asg.x, asg.w, centers, slot_ok.sum(1), tol_abs, max_iter, bounds=asg.bounds, labels=labels, relax=relax
        )
        history = [
            IterationStats(it, live, torch.from_numpy(i), torch.from_numpy(s), repaired, seconds)
            for it, live, i, s, repaired, seconds in passes
        ]
        return centers, n_iter, converged, history, labels, inertia, sum_w
    B, N = asg.w.shape
    device = centers.device
    n_iter = torch.zeros(B, dtype=torch.int64, device=device)
    converged = torch.zeros(B, dtype=torch.bool, device=device)
    history: list[IterationStats] = []
    idx = torch.arange(B, device=device)  # problems in the working copy
    work = asg
    all_labels = torch.zeros(B, N, dtype=torch.int64, device=device)
    last_inertia = torch.zeros(B, dtype=torch.float64, device=device)
    last_sum_w = torch.zeros(B, centers.shape[1], dtype=torch.float64, device=device)
    step = torch.full((B,), float(relax), dtype=torch.float32, device=device)
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        whole = idx.numel() == B  # nothing compacted yet: the working copy is the batch
        c = centers if whole else centers[idx]
        ok = slot_ok if whole else slot_ok[idx]
        labels, min_dist, sum_x, sum_w = _run_with_oom_retry(work, c, ok, sums=True, previous=labels)
        held = sum_w > 0  # clusters that kept points, before any repair
        repaired = _repair_empty(work, labels, min_dist, sum_x, sum_w, ok)
        inertia = (min_dist.double() * work.w).sum(1)
        new_c = torch.where((sum_w > 0).unsqueeze(-1), (sum_x / sum_w.clamp_min(1e-300).unsqueeze(-1)).float(), c)
        if relax != 1.0:
            if it > 1:
                rose = inertia > last_inertia[idx] * (1 + 1e-5)  # beyond the rounding of float32 distances
                step[idx] = torch.where(rose, 1.0, step[idx])
            s = torch.where(held, step[idx].unsqueeze(1), 1.0).unsqueeze(-1)
            new_c = c + s * (new_c - c)
        shift = ((new_c - c).double().square() * ok.unsqueeze(-1)).sum((1, 2))
        live = ~converged[idx]
        n_live = int(live.sum())
        if whole and n_live == B:
            # Every problem still iterating (always so for a single one): plain updates, no scatter.
            centers, n_iter = new_c, n_iter + 1
            converged = shift <= tol_abs
            all_labels, last_inertia, last_sum_w = labels, inertia, sum_w
            history.append(IterationStats(it, n_live, inertia.cpu(), shift.cpu(), repaired, time.perf_counter() - t0))
        else:
            # Problems that converged earlier but are still in the working copy keep their centers.
            centers = centers.clone()
            centers[idx] = torch.where(live.view(-1, 1, 1), new_c, c)
            n_iter = n_iter.clone()
            n_iter[idx] += live.long()
            converged = converged.clone()
            converged[idx] |= live & (shift <= tol_abs[idx])
            mine = idx[live]
            full_inertia = torch.full((B,), float("nan"), dtype=torch.float64, device=device)
            full_shift = full_inertia.clone()
            full_inertia[mine] = inertia[live]
            full_shift[mine] = shift[live]
            # A problem's last labels are those of its last live iteration, whatever else is in its batch.
            # (all_labels may be an earlier iteration's labels, which nothing reads any more; the
            # other two may be in the history, so they are copied.)
            last_inertia, last_sum_w = last_inertia.clone(), last_sum_w.clone()
            all_labels[mine] = labels[live]
            last_inertia[mine] = inertia[live]
            last_sum_w[mine] = sum_w[live]
            history.append(
                IterationStats(it, n_live, full_inertia.cpu(), full_shift.cpu(), repaired, time.perf_counter() - t0)
            )
        log.debug("iteration %d: %d active, %d empty clusters repaired", it, n_live, repaired)
        still = ~converged[idx]
        n_still = int(still.sum())
        if n_still == 0:
            break
        if n_still <= _RECOMPACT_FRACTION * idx.numel():
            keep = still.nonzero().squeeze(1)
            idx = idx[keep]
            work = work.subset(keep)
            labels = labels[keep]
    return centers, n_iter, converged, history, all_labels, last_inertia, last_sum_w


# --------------------------------------------------------------------------
# The functional entry point
# --------------------------------------------------------------------------


def kmeans(
    points,
    n_clusters: int | Sequence[int] | torch.Tensor,
    weights=None,
    *,
    init: str | torch.Tensor | np.ndarray = "k-means++",
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    problem_keys=None,
    device: str | torch.device | None = None,
    init_size: int | None = None,
    chunk_bytes: int | None = None,
    init_labels=None,
    final_labels: bool = True,
    relax: float = 1.0,
) -> KMeansResult:
    """Fit K-means to one problem or a batch of independent problems.

    Parameters
    ----------
    points : Tensor or array of shape (B, N, d) or (N, d)
        The points; any real dtype (uint8 colors are fine). Problems of
        different sizes are padded to a common N with weight 0.
    n_clusters : int, or sequence or Tensor of shape (B,)
        Clusters per problem, each between 1 and its number of points with
        positive weight.
    weights : Tensor or array of shape (B, N) or (N,), optional
        Non-negative weight of each point (a pixel count when the points are
        an image's distinct colors); 0 marks padding. Default: all ones.
    init : "k-means++", "random", or array of shape (B, k_max, d) or (k_max, d)
        Greedy k-means++, k distinct points drawn by weight, or the initial
        centers themselves (rows past a problem's k are ignored).
    n_init : int
        Runs from different initialisations; each problem keeps its best.
    max_iter : int
        Lloyd iterations at most, per run.
    tol : float
        A problem has converged when the sum of squared center moves in one
        iteration is at most ``tol`` times the mean per-dimension (weighted)
        variance of its points, scikit-learn's convention.
    seed : int, optional
        Seed of the initialisation; with the same seed, device and input,
        the result is the same bit for bit. Default: a fresh random seed.
    generator : torch.Generator, optional
        Draws the seed when ``seed`` is None.
    problem_keys : sequence or Tensor of shape (B,) of int, optional
        A key per problem (an image's id, say). Each problem draws its random
        numbers from its own stream, seeded by ``seed`` and its key, so its
        initialisation does not depend on the rest of the batch. Default:
        the problem's position in the batch.
    device : "auto", "cpu", "cuda", "cuda:N" or torch.device, optional
        Where to compute. Default: the device of ``points`` if it is a
        tensor, else ``"auto"``.
    init_size : int, optional
        k-means++ runs on this many points per problem, drawn by weight, when
        the problem has more. Default ``max(20000, 20 * k_max)``.
    chunk_bytes : int, optional
        Size of one block of the distance matrix. Default: 4 MiB on the CPU,
        a quarter of the free memory (32 MiB to 1 GiB) on CUDA.
    init_labels : Tensor or array of shape (B, N) or (N,) of int, optional
        With ``init`` given as centers, a guess of each point's nearest one,
        such as the labels of the coarser fit that gave them. The result is
        the same (but for ties, where a point keeps its guess); on the CPU
        the first pass then searches only the points whose guess fails.
    final_labels : bool
        Assign the points to the final centers in one more pass (default).
        When False, ``labels``, ``inertia`` and the empty-cluster check are
        those of each problem's last Lloyd iteration, made against the
        centers that iteration started from: one pass less, for callers that
        need only the centers.
    relax : float
        Over-relaxation of the Lloyd update, 0 < relax < 2: each center moves
        ``relax`` times the way to its cluster's mean. 1 (the default) is
        Lloyd's algorithm; above 1 the inertia still never rises and the
        fixed points are the same, reached in fewer iterations (the image
        path uses 1.8: see :func:`kmgpu.quantize.fit_palettes`).

    Returns
    -------
    KMeansResult
        Centers, labels, inertia, iteration counts, convergence flags and
        per-iteration statistics. When a problem has fewer distinct points
        than clusters, a :class:`KMeansWarning` is issued and its surplus
        centers are duplicates of points that already are centers: they own
        no points, and the inertia is 0.

    Raises
    ------
    ValueError
        For bad shapes, NaN or inf, negative weights, or a number of clusters
        below 1 or above the number of points.
    """
    if device is None:
        device = points.device if isinstance(points, torch.Tensor) else "auto"
    dev = resolve_device(device)
    if int(n_init) < 1:
        raise ValueError(f"n_init={n_init} is out of range: it must be >= 1")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter={max_iter} is out of range: it must be >= 1")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol={tol} is out of range: it must be a finite number >= 0")
    if not 0 < relax < 2:
        raise ValueError(f"relax={relax} is out of range: it must lie between 0 and 2, exclusive")
    x, w, k, single = _prepare(points, weights, n_clusters, dev)
    B, N, d = x.shape
    k_max = int(k.max())
    slot_ok = torch.arange(k_max, device=dev).unsqueeze(0) < k.unsqueeze(1)

    given = None
    if not isinstance(init, str):
        given = _as_tensor(init, "init").to(device=dev, dtype=torch.float32)
        if given.ndim == 2:
            given = given.unsqueeze(0).expand(B, -1, -1)
        if given.ndim != 3 or given.shape[0] != B or given.shape[1] < k_max or given.shape[2] != d:
            raise ValueError(
                f"init centers must have shape {(B, k_max, d) if not single else (k_max, d)}, got {tuple(given.shape)}"
            )
        _check_finite(given, "init centers")
        given = given[:, :k_max]
        if n_init != 1:
            warnings.warn("init centers are given, so n_init is set to 1", KMeansWarning, stacklevel=2)
            n_init = 1
    elif init not in ("k-means++", "random"):
        raise ValueError(f"init={init!r} is not an initialisation: use 'k-means++', 'random' or an array of centers")

    hint = None
    if init_labels is not None:
        hint = _as_tensor(init_labels, "init_labels")
        hint = hint.unsqueeze(0) if single and hint.ndim == 1 else hint
        if tuple(hint.shape) != (B, N) or hint.is_floating_point() or hint.dtype == torch.bool:
            raise ValueError(f"init_labels must be integers of shape {(B, N) if not single else (N,)}")
        hint = _check_label_range(hint.to(device=dev, dtype=torch.int64), k_max, "init_labels")

    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    keys = torch.arange(B) if problem_keys is None else _as_tensor(problem_keys, "problem_keys").reshape(-1)
    if keys.numel() != B:
        raise ValueError(f"problem_keys holds {keys.numel()} keys for {B} problems")
    streams = _Streams(int(seed), keys.to(torch.int64), dev)

    # Work in a frame centred on each problem's weighted mean: smaller norms,
    # smaller rounding errors in ||x||^2 - 2x.c + ||c||^2. Means and
    # variances are summed in float64, so padding does not change them.
    wd = w.double()
    w_sum = wd.sum(1, keepdim=True)
    origin = ((x.double() * wd.unsqueeze(-1)).sum(1, keepdim=True) / w_sum.unsqueeze(-1)).float()
    xc = x - origin
    variance = (xc.double().square() * wd.unsqueeze(-1)).sum(1) / w_sum
    tol_abs = variance.mean(1) * tol

    budget = chunk_bytes or chunk_budget_bytes(dev)
    asg = _Assigner(xc, w, budget)
    size = init_size or max(20000, 20 * k_max)

    def start(x_, w_, k_, slot_, streams_, asg_, tol_, hint_):
        """Initial centers, Lloyd, and the final assignment of one run (or of copies, one per run)."""
        if given is not None:
            centers = given - origin
        else:
            xs, ws = _init_sample(x_, w_, size, streams_, 0)
            if init == "k-means++":
                kpp = _kmeans_plusplus_host if dev.type == "cpu" else _kmeans_plusplus
                centers = kpp(xs, ws, k_, k_max, streams_, 1)
            else:
                centers = _random_init(xs, ws, k_max, streams_, 2)
        centers = torch.where(slot_.unsqueeze(-1), centers, torch.zeros_like(centers)).contiguous()
        centers, n_iter, converged, history, last, inertia, sum_w = _lloyd(
            asg_, centers, slot_, tol_, int(max_iter), labels=hint_, relax=float(relax)
        )
        if not final_labels:
            return centers, last, inertia, n_iter, converged, history, sum_w
        labels, min_dist, _, sum_w = _run_with_oom_retry(asg_, centers, slot_, sums=True, previous=last)
        inertia = (min_dist.double() * w_.double()).sum(1)
        return centers, labels, inertia, n_iter, converged, history, sum_w

    runs = int(n_init)
    if runs > 1 and B * N * runs <= _BATCHED_STARTS_POINTS:
        # All runs at once: copy r of problem b is row r * B + b, and draws what run r would.
        rep = (runs,) + (1,) * (xc.ndim - 1)
        copies = start(
            xc.repeat(*rep), w.repeat(runs, 1), k.repeat(runs), slot_ok.repeat(runs, 1),
            streams.starts(runs), _Assigner(xc.repeat(*rep), w.repeat(runs, 1), budget), tol_abs.repeat(runs),
            None if hint is None else hint.repeat(runs, 1),
        )  # fmt: skip
        all_centers, all_labels, all_inertia, all_iter, all_converged, all_history, all_sum_w = copies
        choice = all_inertia.view(runs, B).argmin(0)  # the first of equal inertias, as one by one
        rows = choice * B + torch.arange(B, device=dev)
        centers, labels, inertia = all_centers[rows], all_labels[rows], all_inertia[rows]
        n_iter, converged, sum_w = all_iter[rows], all_converged[rows], all_sum_w[rows]
        kept = rows.cpu()
        history = [
            IterationStats(h.iteration, int((~torch.isnan(h.inertia[kept])).sum()), h.inertia[kept],
                           h.center_shift[kept], h.empty_repaired, h.seconds)
            for h in all_history
        ]  # fmt: skip
    else:
        best = None
        for run_index in range(runs):
            streams.offsets = [_TAGS_PER_RUN * run_index] * B
            run = start(xc, w, k, slot_ok, streams, asg, tol_abs, hint)
            if best is None:
                best = run
            else:
                better = run[2] < best[2]
                best = tuple(
                    torch.where(better.view((-1,) + (1,) * (new.ndim - 1)), new, old)
                    if isinstance(new, torch.Tensor)
                    else old
                    for new, old in zip(run, best)
                )
        centers, labels, inertia, n_iter, converged, history, sum_w = best

    starved = ((sum_w <= 0) & slot_ok).sum(1)
    if bool((starved > 0).any()):
        b = int(starved.nonzero()[0, 0])
        where = "" if single else f" (problem {b} and {int((starved > 0).sum()) - 1} more)"
        warnings.warn(
            f"only {int(k[b] - starved[b])} distinct points for n_clusters={int(k[b])}{where}: "
            "the surplus centers duplicate existing ones and own no points",
            KMeansWarning,
            stacklevel=2,
        )

    centers = torch.where(slot_ok.unsqueeze(-1), centers + origin, torch.zeros_like(centers))
    # The last search's bounds, for an assignment after this one (see KMeansResult.bounds); with
    # several runs they might be another run's.
    bounds = asg.bounds.shifted(origin) if not final_labels and runs == 1 and asg.bounds is not None else None
    result = KMeansResult(centers, labels, inertia, n_iter, converged, k, history, bounds)
    if single:
        result = KMeansResult(
            centers[0],
            labels[0],
            inertia[0],
            n_iter[0],
            converged[0],
            k[0],
            [
                IterationStats(h.iteration, h.active, h.inertia[0], h.center_shift[0], h.empty_repaired, h.seconds)
                for h in history
            ],
            bounds,
        )
    return result


# --------------------------------------------------------------------------
# The scikit-learn-style estimator
# --------------------------------------------------------------------------


class KMeans:
    """K-means clustering with the scikit-learn estimator contract.

    Parameters
    ----------
    n_clusters : int
        Number of clusters.
    init : "k-means++", "random" or array of shape (n_clusters, d)
    n_init : int
        Runs from different initialisations; the lowest inertia wins.
    max_iter : int
        Lloyd iterations at most per run.
    tol : float
        Relative tolerance on the center shift (see :func:`kmeans`).
    seed : int, optional
        Same seed, device and data: the same result, bit for bit.
    device : "auto", "cpu", "cuda" or "cuda:N"

    Attributes
    ----------
    cluster_centers_ : ndarray or Tensor of shape (n_clusters, d)
        The type follows what ``fit`` was given.
    labels_ : ndarray or Tensor of shape (N,)
    inertia_ : float
    n_iter_ : int
    history_ : list of IterationStats
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray | torch.Tensor = "k-means++",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        seed: int | None = None,
        device: str = "auto",
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.device = device

    def __repr__(self) -> str:
        return f"KMeans(n_clusters={self.n_clusters}, n_init={self.n_init}, seed={self.seed}, device={self.device!r})"

    @staticmethod
    def _check_2d(X, name: str = "X") -> torch.Tensor:
        t = _as_tensor(X, name)
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape (n_samples, n_features), got shape {tuple(t.shape)}")
        return t

    def _like(self, out: torch.Tensor, X):
        return out if isinstance(X, torch.Tensor) else out.cpu().numpy()

    def fit(self, X, y=None, sample_weight=None) -> KMeans:
        """Fit to X of shape (n_samples, n_features), optionally weighted."""
        t = self._check_2d(X)
        dev = resolve_device(self.device)
        r = kmeans(
            t,
            int(self.n_clusters),
            sample_weight,
            init=self.init,
            n_init=self.n_init,
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self.seed,
            device=dev,
        )
        self._centers = r.centers
        self.cluster_centers_ = self._like(r.centers, X)
        self.labels_ = self._like(r.labels, X)
        self.inertia_ = float(r.inertia)
        self.n_iter_ = int(r.n_iter)
        self.history_ = r.history
        self.n_features_in_ = t.shape[1]
        return self

    def _fitted_input(self, X) -> torch.Tensor:
        if not hasattr(self, "_centers"):
            raise NotFittedError("this KMeans is not fitted yet: call fit before predict or transform")
        t = self._check_2d(X)
        if t.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {t.shape[1]} features, but KMeans was fitted with {self.n_features_in_}")
        _check_finite(t, "X")
        return t.to(self._centers.device)

    def predict(self, X):
        """Index of the nearest center for each row of X."""
        labels, _ = assign(self._fitted_input(X), self._centers)
        return self._like(labels, X)

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the labels of the training points."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X):
        """Euclidean distance of each row of X to every center, shape (n_samples, n_clusters)."""
        t = self._fitted_input(X).to(torch.float32)
        out = torch.cdist(t.double(), self._centers.double()).float()
        return self._like(out, X)

    def fit_transform(self, X, y=None, sample_weight=None):
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X, y=None) -> float:
        """Opposite of the inertia of X under the fitted centers."""
        _, dist = assign(self._fitted_input(X), self._centers)
        return -float(dist.double().sum())
