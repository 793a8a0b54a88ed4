"""CPU kernels compiled with numba: Lloyd's passes around a nearest-center search with Hamerly's
bounds, k-means++, PSNR with SSIM in one pass, the PNG encoder's filters and the reader's unfilter,
and dithering.

The generic assignment step (``kmeans._Assigner``) forms the (B, N, k) matrix
of ``||c||^2 - 2 x.c`` block by block with one batched product and takes its
minimum: on the CPU that writes and reads k floats per point, and ran at
about 0.3 ns per point and center on 2 cores, bound by memory stores, not
arithmetic. Sessions 2 to 9 found no vectorised torch formulation faster
(see BENCHMARKS.md). The search here runs one point at a time through the
centers, in a buffer of k floats that stays in L1, and skips the search
where it can prove the point's center has not changed:

- Every point keeps a lower bound on its distance to every center but its
  own (Hamerly 2010). When centers move, the bound drops by the largest
  move of another center; a point whose exact distance to its own center is
  within that bound, or within half the distance from its center to the
  nearest other center, keeps its center without a search.
- Distances are sums of squared differences, so for 8-bit colors and an
  integer palette they are exact in float32, and ties go to the lowest
  center index (or, where a guess is given, to the guess), as on the other
  paths. The bound tests keep a margin of 1e-5 of the data's range, so
  float32 rounding never keeps a center that a full search would replace.
- Points are independent, and the cluster sums are added in float64 one
  problem at a time, in point order: the result does not depend on the
  number of threads. Threads are plain Python threads over ranges of points
  (the kernels release the GIL), as many as torch uses; numba's own
  threading layers are not used, so forked DataLoader workers are safe.

k-means++ (``_kmeans_plusplus``) draws the same centers as the torch
versions in ``kmeans.py``; ``_quality`` measures PSNR and SSIM as
``metrics.py`` defines them, in one pass down the rows; ``_filter_rows``
chooses and applies the PNG filters as ``png._filtered`` does, and ``_unfilter``
undoes them for ``pngread``; ``_dither``
is ``--dither fs``, an error diffusion that runs one pixel after another,
which no vectorised formulation expresses.

numba is a dependency; where it cannot be imported, or with
``KMGPU_NUMBA=0``, the torch and NumPy paths run (the tests run both). The
kernels are compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator

import numpy as np
import torch

from .threads import ProcessThreads, available_cores

__all__ = [
    "usable",
    "Bounds",
    "nearest",
    "lloyd",
    "grid_bins",
    "distinct_colors",
    "count_colors",
    "label_pixels",
    "filter_rows",
    "nearest_chain",
    "unfilter",
    "dither",
    "run_threads",
    "compiled",
    "unused_groups",
    "warm_up",
    "fill_cache",
]

try:  # pragma: no cover - exercised where numba is missing
    import numba
except ImportError:  # pragma: no cover
    numba = None

_BIG = np.float32(3.0e38)  # "no second center"; finite, as fastmath assumes no infinities
_INF_BITS = np.int32(0x7F800000)  # the bits of float32 infinity: above those of every finite float >= 0
# Below this many centers the search finds the minimum's index and the runner-up in one sweep of the
# k distances after the minimum; from it on, in two (the first index, then the minimum of the rest
# with the winner masked), which vectorise better there. Full searches on 200k random colors, 2-core
# VM: k=16 26 ns against 39, k=48 48 against 55; k=64 49 against 45, k=128 68 against 60.
_ONE_SWEEP_BELOW = 64
# Work of a search, in points times (centers + 32): a point costs about as much as 32 centers
# besides its centers. Below this much work per thread, fewer threads: a hand-off costs tens of
# microseconds, about what 2**18 units take.
_THREAD_WORK = 2**18
_search_threads = ProcessThreads("kmgpu-search")
_ready_lock = threading.Lock()


_ready = False  # the kernels loaded (or compiled) in this process, but the groups of _left
_left: frozenset[str] = frozenset()  # groups a command said it would not run (compiled(without=...))
_broken: str | None = None  # why numba could not compile the kernels here, once seen


def _off() -> bool:
    """Whether the compiled kernels are off here: no numba, ``KMGPU_NUMBA=0``, or numba failed to build them."""
    return _search is None or _broken is not None or os.environ.get("KMGPU_NUMBA", "1") == "0"


def unused_groups(dither: str) -> tuple[str, ...]:
    """The groups of kernels (of :data:`_WARM_GROUPS`) a command with this ``--dither`` never runs, for
    :func:`compiled` and :func:`fill_cache`: the dithering one where nothing is dithered."""
    return ("dither",) if dither == "none" else ()


def compiled(note: Callable[[str], None] | None = None, *, without: Collection[str] | None = None) -> bool:
    """Whether the compiled kernels run here: numba is present, ``KMGPU_NUMBA`` is not 0, and they build.

    The first call loads every kernel (see :func:`warm_up`, which tells ``note`` when they must
    be compiled first); if numba cannot compile them on this machine, a warning says so once and
    the torch and NumPy paths run from then on.

    ``without``: what a command passes before its work, the groups of kernels (of
    :data:`_WARM_GROUPS`) it will not run, such as ``("dither",)`` where nothing is dithered.
    Those are left out of the first call's loading, and a later call that does not name one
    loads it then, so that worker processes forked after it inherit every kernel they run.
    """
    global _ready, _broken, _left
    if _off():
        return False
    keep_out = frozenset(_WARM_GROUPS) & frozenset(without or ())
    if not _ready or (without is not None and not _left <= keep_out):
        with _ready_lock:
            if _broken is None and (not _ready or (without is not None and not _left <= keep_out)):
                first = not _ready  # then keep_out stays out; later, what an earlier call left out loads
                skip = keep_out if first else frozenset(_WARM_GROUPS) - (_left - keep_out)
                _left = keep_out if first else _left & keep_out
                try:
                    _ready = True  # warm_up runs the kernels, whose wrappers then do not ask again
                    warm_up(note, without=skip)
                except Exception as err:  # numba's errors have no common base worth naming
                    _ready, _broken = False, f"{type(err).__name__}: {err}"
                    warnings.warn(
                        f"numba could not compile kmgpu's CPU kernels ({_broken}); using the torch path",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return False
    return True


def usable(x: torch.Tensor) -> bool:
    """Whether the compiled search runs on the points ``x`` (B, N, d): a CPU tensor, numba present."""
    return x.device.type == "cpu" and compiled()


def _jit(**options):
    """numba's njit, caching compiled code on disk where it can (else compiling once per process)."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # pragma: no cover - no writable cache location
            return numba.njit(nogil=True, **options)(fn)

    return wrap


if numba is not None:

    @_jit(fastmath=True)
    def _search(
        x, ct, kb, labels, known, dist, lower, nn_sq, d_max, d_arg, d_second, margin, active, guessed, start, stop
    ):
        """Points start..stop of the flattened (B, N), of the problems ``active``: each one's nearest center.

        On entry ``labels`` holds each point's guess (if ``guessed``) and
        ``known[b, i]`` the center its ``lower`` bound was taken against
        (-1: none). Writes ``labels``, ``known``, ``dist`` (squared) and
        ``lower``; returns how many points were searched in full.
        """
        n_points, d = x.shape[1], x.shape[2]
        k_max = ct.shape[2]
        buf = np.empty(k_max, np.float32)
        bits = buf.view(np.int32)
        # The runner-up's bits read back as a float through this one-word view: 7 ns a search less at
        # k=64 (15%) than rebuilding the float from its exponent and mantissa.
        word = np.empty(1, np.int32)
        word_value = word.view(np.float32)
        searched = 0
        for b in range(start // n_points, (stop + n_points - 1) // n_points):
            if not active[b]:
                continue
            xb, cb, k = x[b], ct[b], kb[b]
            labels_b, known_b, lower_b, nn_b = labels[b], known[b], lower[b], nn_sq[b]
            move_other, move_own, own, slack = d_max[b], d_second[b], d_arg[b], margin[b]
            for i in range(max(start - b * n_points, 0), min(stop - b * n_points, n_points)):
                a = labels_b[i]
                if guessed and 0 <= a < k:
                    sq = np.float32(0.0)
                    for c in range(d):
                        t = xb[i, c] - cb[c, a]
                        sq += t * t
                    # No other center is nearer than half the way to a's nearest neighbour.
                    keep = np.float32(4.0) * sq <= nn_b[a]
                    du = np.sqrt(sq)
                    lo = np.sqrt(nn_b[a]) - du  # a bound on every other center's distance
                    if known_b[i] == a:
                        moved = lower_b[i] - (move_own if a == own else move_other)
                        lo = max(lo, moved)
                        keep = keep or du <= moved - slack
                    if keep:
                        dist[b, i] = sq
                        lower_b[i] = lo
                        known_b[i] = a
                        continue
                searched += 1
                if d == 3:  # colors: one pass, the three channels in registers
                    x0, x1, x2 = xb[i, 0], xb[i, 1], xb[i, 2]
                    c0, c1, c2 = cb[0], cb[1], cb[2]
                    for j in range(k):
                        t0 = x0 - c0[j]
                        t1 = x1 - c1[j]
                        t2 = x2 - c2[j]
                        buf[j] = t0 * t0 + t1 * t1 + t2 * t2
                else:
                    for j in range(k):
                        buf[j] = 0.0
                    for c in range(d):
                        xc = xb[i, c]
                        cc = cb[c]
                        for j in range(k):
                            t = xc - cc[j]
                            buf[j] += t * t
                # The minimum, its first index and the runner-up, on the bits: for floats >= 0
                # the order is that of their bits as integers, and integer reductions vectorise
                # (float min reductions did not: 4x slower).
                m = _INF_BITS
                for j in range(k):
                    m = min(m, bits[j])
                keep = guessed and 0 <= a < k and bits[a] == m  # a tie keeps the guess
                if k < _ONE_SWEEP_BELOW:
                    # One more sweep: the first index at the minimum, how many sit there, and the
                    # least value above it (the runner-up, unless the minimum is shared).
                    j1, ties, m2 = np.int32(k), 0, _INF_BITS
                    for j in range(k):
                        v = bits[j]
                        j1 = min(j1, np.int32(j) if v == m else np.int32(k))
                        ties += v == m
                        m2 = min(m2, v if v > m else _INF_BITS)
                    if ties > 1:
                        m2 = m
                    if keep:
                        j1 = np.int32(a)
                    d1 = buf[j1]
                else:
                    if keep:
                        j1 = np.int32(a)
                    else:
                        j1 = np.int32(k)
                        for j in range(k):
                            j1 = min(j1, np.int32(j) if bits[j] == m else np.int32(k))
                    d1 = buf[j1]
                    bits[j1] = _INF_BITS
                    m2 = _INF_BITS
                    for j in range(k):
                        m2 = min(m2, bits[j])
                labels_b[i] = j1
                known_b[i] = j1
                dist[b, i] = d1
                word[0] = m2
                lower_b[i] = np.sqrt(word_value[0]) if m2 < _INF_BITS else _BIG
        return searched

    @_jit()
    def _geometry_of(c, ct, prev, k, nn_sq, row, word):
        """One problem's: each center's squared distance to its nearest other center (into ``nn_sq``), and the
        largest two moves of a center since ``prev``, with the largest's center.

        ``ct`` holds the centers ``c`` laid out (d, k); ``row`` (k,) float64 and
        ``word`` (1,) int64 are scratch. Each center's distances to all the
        others are written out in a row (a loop LLVM vectorises), and the
        least is taken on their bits, as :func:`_search` does: for floats >= 0
        the order of the bits as integers is theirs. The same values as one
        pair at a time, in float64, in a fifth of the time (a 64-center
        problem: 2 us against 11, some 20 times a fit).
        """
        d = c.shape[1]
        bits = row.view(np.int64)
        least = word.view(np.float64)
        for j in range(k):
            if d == 3:
                x0, x1, x2 = np.float64(c[j, 0]), np.float64(c[j, 1]), np.float64(c[j, 2])
                for other in range(k):
                    t0 = x0 - np.float64(ct[0, other])
                    t1 = x1 - np.float64(ct[1, other])
                    t2 = x2 - np.float64(ct[2, other])
                    row[other] = t0 * t0 + t1 * t1 + t2 * t2
            else:
                for other in range(k):
                    s = 0.0
                    for q in range(d):
                        t = np.float64(c[j, q]) - np.float64(ct[q, other])
                        s += t * t
                    row[other] = s
            row[j] = np.inf
            m = bits[0]
            for other in range(k):
                m = min(m, bits[other])
            word[0] = m
            nn_sq[j] = least[0] if k > 1 else _BIG
        first, second, arg = 0.0, 0.0, -1
        for j in range(k):
            s = 0.0
            for q in range(d):
                t = np.float64(c[j, q]) - prev[j, q]
                s += t * t
            move = np.sqrt(s)
            if move > first:
                first, second, arg = move, first, j
            elif move > second:
                second = move
        return first, second, arg

    @_jit()
    def _cluster_sums(x, w, labels, sum_x, sum_w):
        """One problem's weighted sums of each cluster's points, in float64, in point order, added into
        ``sum_x`` (k, d) and ``sum_w`` (k,)."""
        for i in range(x.shape[0]):
            a = labels[i]
            wi = np.float64(w[i])
            sum_w[a] += wi
            for c in range(x.shape[1]):
                sum_x[a, c] += wi * x[i, c]

    @_jit()
    def _sums(x, w, labels, sum_x, sum_w):
        """Weighted sums of each cluster's points, in float64, in point order (B, k, d) and (B, k)."""
        for b in range(x.shape[0]):
            _cluster_sums(x[b], w[b], labels[b], sum_x[b], sum_w[b])

    @_jit()
    def _prepare_search(c, prev, ct, kb, active, nn_sq, d_max, d_arg, d_second):
        """Before a search, for each problem ``active``: the geometry of its centers (:func:`_geometry_of`),
        and the centers laid out (B, d, k), as the search reads them."""
        n_problems, k_max, d = c.shape
        row, word = np.empty(k_max, np.float64), np.empty(1, np.int64)
        for b in range(n_problems):
            if active[b]:
                for j in range(k_max):
                    for q in range(d):
                        ct[b, q, j] = c[b, j, q]
                d_max[b], d_second[b], d_arg[b] = _geometry_of(c[b], ct[b], prev[b], kb[b], nn_sq[b], row, word)

    @_jit()
    def _lloyd_update(
        x, w, c, prev, kb, active, labels, dist, sum_x, sum_w, held, step, relax, check_rise, last_inertia, tol_abs,
        converged, n_iter, inertia, shift,
    ):  # fmt: skip
        """After the search of a Lloyd pass, for each problem ``active``: what ``kmeans._lloyd`` does in torch.

        The clusters' weighted sums; each empty cluster moved onto the worst-fitted point left
        (``kmeans._repair_empty``); the inertia; the over-relaxed update, with plain steps from the
        first pass whose inertia rose beyond the rounding of float32 distances; the center shift
        and convergence. The centers of the search go to ``prev``, the new ones to ``c``; a
        converged problem leaves ``active``. Returns the number of clusters repaired.
        """
        n_problems, n_points, d = x.shape
        one = np.float32(1.0)
        repaired = 0
        for b in range(n_problems):
            if not active[b]:
                inertia[b] = np.nan
                shift[b] = np.nan
                continue
            k = kb[b]
            sx, sw = sum_x[b], sum_w[b]
            sx[:] = 0.0
            sw[:] = 0.0
            _cluster_sums(x[b], w[b], labels[b], sx, sw)
            for j in range(k):
                held[j] = sw[j] > 0
            for j in range(k):  # empty clusters in slot order, each onto the worst-fitted point left
                if held[j]:
                    continue
                worst, p = np.float32(0.0), -1
                for i in range(n_points):
                    if w[b, i] > 0 and dist[b, i] > worst:
                        worst, p = dist[b, i], i
                if p < 0:  # every point lies on a center: the cluster stays empty
                    break
                pw = np.float64(w[b, p])
                old = labels[b, p]
                for q in range(d):
                    px = np.float64(x[b, p, q]) * pw
                    sx[old, q] -= px
                    sx[j, q] = px
                sw[old] -= pw
                sw[j] = pw
                labels[b, p] = j
                dist[b, p] = 0.0
                repaired += 1
            total = 0.0
            for i in range(n_points):
                total += np.float64(dist[b, i]) * np.float64(w[b, i])
            if relax != 1.0 and check_rise and total > last_inertia[b] * (1 + 1e-5):
                step[b] = one
            moved = 0.0
            for j in range(k):
                for q in range(d):
                    now = c[b, j, q]
                    new = np.float32(sx[j, q] / sw[j]) if sw[j] > 0 else now
                    if relax != 1.0:
                        new = now + (step[b] if held[j] else one) * (new - now)
                    t = np.float64(new - now)
                    moved += t * t
                    prev[b, j, q] = now
                    c[b, j, q] = new
            inertia[b] = total
            shift[b] = moved
            last_inertia[b] = total
            n_iter[b] += 1
            if moved <= tol_abs[b]:
                converged[b] = True
                active[b] = False
        return repaired

    @_jit()
    def _lloyd_pass(
        x, w, c, prev, ct, kb, active, labels, known, dist, lower, nn_sq, d_max, d_arg, d_second, margin, guessed,
        sum_x, sum_w, held, step, relax, check_rise, last_inertia, tol_abs, converged, n_iter, inertia, shift,
    ):  # fmt: skip
        """One Lloyd pass on one thread: :func:`_prepare_search`, the search, :func:`_lloyd_update`."""
        _prepare_search(c, prev, ct, kb, active, nn_sq, d_max, d_arg, d_second)
        total = x.shape[0] * x.shape[1]
        _search(x, ct, kb, labels, known, dist, lower, nn_sq, d_max, d_arg, d_second, margin, active, guessed, 0, total)
        return _lloyd_update(
            x, w, c, prev, kb, active, labels, dist, sum_x, sum_w, held, step, relax, check_rise, last_inertia,
            tol_abs, converged, n_iter, inertia, shift,
        )  # fmt: skip

    @_jit(inline="always")
    def _packed(values, i, bits):
        """The key of row ``i`` as ``quantize._pack(values, bits)`` makes it: at 8 bits channel 0 in the low
        byte, below 8 the top ``bits`` of each channel with channel 0 highest."""
        key = np.int64(0)
        for ch in range(values.shape[1]):
            if bits == 8:
                key |= np.int64(values[i, ch]) << (8 * ch)
            else:
                key = (key << bits) | (np.int64(values[i, ch]) >> (8 - bits))
        return key

    @_jit()
    def _sort_keys(keys, scratch, digit_bits):
        """Sort ``keys`` (below 2**(2 * digit_bits)) in place: two passes of a radix sort on ``digit_bits``
        bits (on 12 bits, 12x numba's quicksort on 100k colors). ``scratch`` holds as many int32."""
        src, dst = keys, scratch
        mask = (1 << digit_bits) - 1
        count = np.empty(mask + 2, np.int64)
        for shift in (0, digit_bits):
            count[:] = 0
            for v in src:
                count[((v >> shift) & mask) + 1] += 1
            for j in range(mask + 1):
                count[j + 1] += count[j]
            for v in src:
                digit = (v >> shift) & mask
                dst[count[digit]] = v
                count[digit] += 1
            src, dst = dst, src

    @_jit()
    def _rank_keys(values, start, stop, bits, table, listed, scratch):
        """The distinct keys (below 2**24) of rows start..stop of ``values``, sorted, into ``listed``; each one's
        rank left in ``table`` (all zeros on entry). Returns how many. ``scratch`` holds as many int32 as
        ``listed``."""
        m = 0
        for i in range(start, stop):
            key = _packed(values, i, bits)
            if table[key] == 0:
                listed[m] = key
                m += 1
                table[key] = 1
        mine = listed[:m]
        _sort_keys(mine, scratch[:m], 12)
        for r in range(m):
            table[mine[r]] = r
        return m

    @_jit()
    def _unrank_keys(table, listed):
        """Zero the entries of ``table`` that :func:`_rank_keys` filled for the keys ``listed``."""
        for key in listed:
            table[key] = 0

    @_jit()
    def _grid_bins(colors, counts, per_image, bits, table):
        """Each image's colors merged onto a grid of ``2**bits`` levels per channel, as ``quantize._coarse_bins``.

        ``colors`` (U, C) and ``counts`` (U,) hold each image's distinct colors,
        image by image, ``per_image`` (B,) how many; ``bits`` below 8, at most 24
        in all. ``table`` (2**24,) int32 is zeros, and is so again on return.
        Returns, image by image and by key, each bin's pixel count and the
        pixel-weighted sums of its colors (float64; exact: integers below
        2**53), the bin of each color, and each image's number of bins.
        """
        n, d = colors.shape
        listed = np.empty(n, np.int32)
        scratch = np.empty(n, np.int32)
        bin_of = np.empty(n, np.int64)
        weight = np.zeros(n, np.float64)
        sums = np.zeros((n, d), np.float64)
        bins_per_image = np.zeros(per_image.shape[0], np.int64)
        start = rows = 0
        for b in range(per_image.shape[0]):
            stop = start + per_image[b]
            m = _rank_keys(colors, start, stop, bits, table, listed[rows:], scratch)
            for i in range(start, stop):
                row = rows + table[_packed(colors, i, bits)]
                bin_of[i] = row
                w = np.float64(counts[i])
                weight[row] += w
                for ch in range(d):
                    sums[row, ch] += w * colors[i, ch]
            _unrank_keys(table, listed[rows : rows + m])
            bins_per_image[b] = m
            rows += m
            start = stop
        return weight[:rows].copy(), sums[:rows].copy(), bin_of, bins_per_image

    @_jit()
    def _distinct_by_channel(pixels, start, stop, rows, listed, counts, inverse, order, low):
        """:func:`_distinct` of the image in rows start..stop of ``pixels``, its colors' rows from ``rows`` on,
        working in a table of 2**16 entries (256 KiB, in cache) rather than 2**24.

        The pixels are first put in order of their channel 2 (a counting sort of
        their positions, and each one's two other channels), then each run of
        one channel-2 value goes through the table: its keys listed at their
        first sight, radix-sorted, then each pixel's row written and counted.
        ``order`` and ``low`` hold stop - start int32 (8 bytes a pixel, which is
        why only smaller images come here). Returns the number of colors.
        """
        three = pixels.shape[1] == 3
        first = np.zeros(257, np.int64)  # where each channel-2 value's run starts
        for i in range(start, stop):
            first[(np.int64(pixels[i, 2]) if three else 0) + 1] += 1
        for h in range(256):
            first[h + 1] += first[h]
        at = first[:256].copy()
        for i in range(start, stop):
            h = np.int64(pixels[i, 2]) if three else 0
            key = np.int64(pixels[i, 0])
            if pixels.shape[1] >= 2:
                key |= np.int64(pixels[i, 1]) << 8
            order[at[h]] = i
            low[at[h]] = key
            at[h] += 1
        table = np.zeros(1 << 16, np.int32)
        m = 0
        for h in range(256):
            if first[h] == first[h + 1]:
                continue
            base = rows + m
            seen = 0
            for q in range(first[h], first[h + 1]):
                if table[low[q]] == 0:
                    listed[base + seen] = low[q]
                    seen += 1
                    table[low[q]] = 1
            mine = listed[base : base + seen]
            _sort_keys(mine, counts[base:].view(np.int32)[:seen], 8)  # counts lends bytes not yet written
            for r in range(seen):
                table[mine[r]] = base + r
                counts[base + r] = 0
            for q in range(first[h], first[h + 1]):
                row = table[low[q]]
                inverse[order[q]] = row
                counts[row] += 1
            for r in range(seen):
                table[mine[r]] = 0
                mine[r] |= np.int32(h << 16)
            m += seen
        return m

    @_jit()
    def _distinct(pixels, sizes):
        """Each image's distinct colors (up to 3 channels), sorted, with their counts and each pixel's row.

        ``pixels`` (N, C) holds the images one after another, ``sizes`` (B,) their
        pixels; each image goes through :func:`_distinct_by_channel`, whose table
        stays in cache. Returns the keys and counts of every image's colors, image
        by image, each pixel's row among them (int32: fewer than 2**31 pixels),
        and each image's number of colors.
        """
        n = pixels.shape[0]
        inverse = np.empty(n, np.int32)  # 4 bytes a pixel written at random, not 8: 0.8x the time
        listed = np.empty(n, np.int32)
        counts = np.empty(n, np.int64)
        per_image = np.zeros(sizes.shape[0], np.int64)
        largest = 0
        for b in range(sizes.shape[0]):
            largest = max(largest, sizes[b])
        order, low = np.empty(largest, np.int32), np.empty(largest, np.int32)
        start = rows = 0
        for b in range(sizes.shape[0]):
            stop = start + sizes[b]
            m = _distinct_by_channel(pixels, start, stop, rows, listed, counts, inverse, order, low)
            per_image[b] = m
            rows += m
            start = stop
        return listed[:rows].copy(), counts[:rows].copy(), inverse, per_image

    @_jit()
    def _count_colors(pixels, sizes, table):
        """Each image's distinct colors (up to 3 channels), sorted by packed key, with their counts, and each
        image's number of them; no row per pixel. ``pixels`` (N, C) holds the images one after another,
        ``sizes`` (B,) their pixels. One pass over an image counts each key in ``table`` (2**24,) int32,
        listing it at its first sight; the keys listed are radix-sorted and their counts read back.
        ``table`` is all zeros on entry and again on return."""
        cap = largest = 0
        for b in range(sizes.shape[0]):
            most = min(sizes[b], 1 << 24)  # colors an image can have
            cap += most
            largest = max(largest, most)
        keys = np.empty(cap, np.int32)
        counts = np.empty(cap, np.int64)
        scratch = np.empty(largest, np.int32)
        per_image = np.zeros(sizes.shape[0], np.int64)
        start = rows = 0
        for b in range(sizes.shape[0]):
            m = 0
            for i in range(start, start + sizes[b]):
                key = _packed(pixels, i, 8)
                if table[key] == 0:
                    keys[rows + m] = key
                    m += 1
                table[key] += 1
            mine = keys[rows : rows + m]
            _sort_keys(mine, scratch[:m], 12)
            for r in range(m):
                counts[rows + r] = table[mine[r]]
                table[mine[r]] = 0
            per_image[b] = m
            rows += m
            start += sizes[b]
        return keys[:rows].copy(), counts[:rows].copy(), per_image

    @_jit()
    def _label_pixels(pixels, sizes, keys, per_image, labels, table, out):
        """Each pixel's label into ``out``: ``labels[r]`` where ``keys[r]`` is its color packed at 8 bits (up to
        3 channels), among its own image's keys. ``pixels`` and ``sizes`` as :func:`_count_colors` takes them,
        ``keys`` and ``per_image`` as it gives them. Through ``table`` (2**24,) int32, all zeros on entry and
        again on return. Every pixel's color must be among its image's keys."""
        start = rows = 0
        for b in range(sizes.shape[0]):
            m = per_image[b]
            for r in range(rows, rows + m):
                table[keys[r]] = labels[r]
            for i in range(start, start + sizes[b]):
                out[i] = table[_packed(pixels, i, 8)]
            for r in range(rows, rows + m):
                table[keys[r]] = 0
            rows += m
            start += sizes[b]

    @_jit()
    def _draw(cum, target):
        """The first index whose cumulative sum exceeds ``target`` (NumPy's searchsorted, side="right"), at most
        the last."""
        lo, hi = 0, cum.shape[0]
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[mid] <= target:
                lo = mid + 1
            else:
                hi = mid
        return min(lo, cum.shape[0] - 1)

    @_jit(fastmath=True)
    def _kmeans_plusplus(g, w, by_weight, u, k, n_trials, chosen):
        """Greedy k-means++ on one problem's grid points ``g`` (d, N), laid out by channel: the indices of its k
        centers into ``chosen``.

        The distances of grid points are integers below 2**24, exact in float32,
        and the weights integers (counts) where kmgpu calls it, so every
        potential is an exact float64 sum in any order: the draws are those of
        the torch versions.
        """
        d, n = g.shape
        closest = np.zeros(n, np.float32)
        trial = np.empty((n_trials, n), np.float32)
        cum = np.empty(n, np.float64)
        cand = np.empty(n_trials, np.int64)
        first = _draw(by_weight, u[0] * by_weight[n - 1])
        chosen[0] = first
        for q in range(d):
            gq, cq = g[q], g[q, first]
            for i in range(n):
                v = gq[i] - cq
                closest[i] += v * v
        for c in range(1, k):
            total = 0.0
            for i in range(n):
                total += closest[i] * w[i]
                cum[i] = total
            source = cum if total > 0 else by_weight  # every point on a center: draw by weight alone
            for t in range(n_trials):
                cand[t] = _draw(source, u[1 + (c - 1) * n_trials + t] * source[n - 1])
            best, best_potential = 0, np.inf
            for t in range(n_trials):
                row = trial[t]
                potential = 0.0
                if d == 3:  # colors: one pass
                    g0, g1, g2 = g[0], g[1], g[2]
                    c0, c1, c2 = g0[cand[t]], g1[cand[t]], g2[cand[t]]
                    for i in range(n):
                        v0, v1, v2 = g0[i] - c0, g1[i] - c1, g2[i] - c2
                        s = min(v0 * v0 + v1 * v1 + v2 * v2, closest[i])
                        row[i] = s
                        potential += s * w[i]
                else:
                    row[:] = 0.0
                    for q in range(d):
                        gq, cq = g[q], g[q, cand[t]]
                        for i in range(n):
                            v = gq[i] - cq
                            row[i] += v * v
                    for i in range(n):
                        s = min(row[i], closest[i])
                        row[i] = s
                        potential += s * w[i]
                if potential < best_potential:
                    best, best_potential = t, potential
            closest[:] = trial[best]
            chosen[c] = cand[best]

    @_jit()
    def _luma_row(img, r, weights, out):
        """Row ``r`` of an (H, W, C) uint8 image as float64 luma (as ``metrics.luma``) into ``out``."""
        if img.shape[2] >= 3:
            for j in range(img.shape[1]):
                out[j] = img[r, j, 0] * weights[0] + img[r, j, 1] * weights[1] + img[r, j, 2] * weights[2]
        else:
            for j in range(img.shape[1]):
                out[j] = img[r, j, 0]

    @_jit(inline="always")
    def _tap11(s, j, t):
        """The 11 taps ``t`` applied to ``s[j:j + 11]``, written out so that the loop over ``j`` vectorises."""
        return (
            s[j] * t[0] + s[j + 1] * t[1] + s[j + 2] * t[2] + s[j + 3] * t[3] + s[j + 4] * t[4] + s[j + 5] * t[5]
            + s[j + 6] * t[6] + s[j + 7] * t[7] + s[j + 8] * t[8] + s[j + 9] * t[9] + s[j + 10] * t[10]
        )  # fmt: skip

    @_jit(inline="always")
    def _tap11_down(b, j, t):
        """The 11 taps ``t`` applied down column ``j`` of the (11, W) block ``b``."""
        return (
            b[0, j] * t[0] + b[1, j] * t[1] + b[2, j] * t[2] + b[3, j] * t[3] + b[4, j] * t[4] + b[5, j] * t[5]
            + b[6, j] * t[6] + b[7, j] * t[7] + b[8, j] * t[8] + b[9, j] * t[9] + b[10, j] * t[10]
        )  # fmt: skip

    @_jit(fastmath=True)
    def _blur_along(src, taps, out):
        """``out[j] = sum over t of src[j + t] * taps[t]`` for every j of ``out``."""
        if taps.shape[0] == 11:  # SSIM's window: one output at a time, all in registers
            for j in range(out.shape[0]):
                out[j] = _tap11(src, j, taps)
            return
        out[:] = src[: out.shape[0]] * taps[0]
        for t in range(1, taps.shape[0]):
            tap = taps[t]
            for j in range(out.shape[0]):
                out[j] += src[j + t] * tap

    @_jit(fastmath=True)
    def _blur_down(block, taps, out):
        """``out[j] = sum over t of block[t, j] * taps[t]`` for every j of ``out``."""
        if taps.shape[0] == 11:
            for j in range(out.shape[0]):
                out[j] = _tap11_down(block, j, taps)
            return
        out[:] = block[0] * taps[0]
        for t in range(1, taps.shape[0]):
            tap = taps[t]
            for j in range(out.shape[0]):
                out[j] += block[t, j] * tap

    @_jit(fastmath=True)
    def _quality(a, b, palette, lut, idx, indexed, weights, taps, c1, c2, top, bottom, err_stop):
        """Squared error summed over every channel value (int64) of rows ``top`` to ``err_stop``, and the SSIM
        map summed over the window positions whose top row lies in ``top`` to ``bottom``, of ``a`` (H, W,
        C) uint8 against ``b``, or, if ``indexed``, against ``palette[idx]`` (whose luma is ``lut[idx]``).

        One pass down the rows: the four maps SSIM blurs (x, y, x^2 + y^2, xy)
        are blurred along each row as it comes, into a ring of the last
        ``len(taps)`` rows, and down the columns as each window row completes.
        Memory is a few rows, whatever the image. Each blurred value is summed
        in registers, one map at a time (1.6x the speed of adding one tap at a
        time over a whole row, which stores the row at every tap).
        """
        height, width, channels = a.shape
        n = taps.shape[0]
        cols = width - n + 1
        ring = np.empty((4, n, cols))  # map, row of the window (row r in slot r mod n), column
        lx, ly, sq, xy = np.empty(width), np.empty(width), np.empty(width), np.empty(width)
        acc = np.empty((4, cols))
        turned = np.empty(n)
        err = 0
        total = 0.0
        for r in range(top, bottom + n - 1):
            _luma_row(a, r, weights, lx)
            counted = r < err_stop  # a band's last rows only complete its windows
            if indexed and counted and channels == 3:  # RGB, the channels in registers (0.8 ns/px less)
                for j in range(width):
                    p = idx[r, j]
                    ly[j] = lut[p]
                    e0 = np.int32(a[r, j, 0]) - np.int32(palette[p, 0])
                    e1 = np.int32(a[r, j, 1]) - np.int32(palette[p, 1])
                    e2 = np.int32(a[r, j, 2]) - np.int32(palette[p, 2])
                    err += e0 * e0 + e1 * e1 + e2 * e2
            elif indexed:
                for j in range(width):
                    p = idx[r, j]
                    ly[j] = lut[p]
                    if counted:
                        for c in range(channels):
                            e = np.int64(a[r, j, c]) - np.int64(palette[p, c])
                            err += e * e
            else:
                _luma_row(b, r, weights, ly)
                if counted:
                    for j in range(width):
                        for c in range(channels):
                            e = np.int64(a[r, j, c]) - np.int64(b[r, j, c])
                            err += e * e
            for j in range(width):
                sq[j] = lx[j] * lx[j] + ly[j] * ly[j]
                xy[j] = lx[j] * ly[j]
            slot = (r - top) % n
            for m, src in enumerate((lx, ly, sq, xy)):
                _blur_along(src, taps, ring[m, slot])
            if r - top < n - 1:
                continue
            done = r - n + 1 - top  # the window row that is now complete, counted from ``top``
            for s in range(n):  # slot s holds that window's row (s - done) mod n
                turned[s] = taps[(s - done) % n]
            for m in range(4):
                _blur_down(ring[m], turned, acc[m])
            for j in range(cols):
                mx, my = acc[0, j], acc[1, j]
                m_sq, m_xy = mx * mx + my * my, mx * my
                total += ((2 * m_xy + c1) * (2 * (acc[3, j] - m_xy) + c2)) / ((m_sq + c1) * (acc[2, j] - m_sq + c2))
        return err, total

    @_jit(inline="always")
    def _byte_cost(u):
        """libpng's cost of a filtered byte ``u`` (0 to 255): its magnitude read as a signed byte."""
        return min(u, 256 - u)

    @_jit(inline="always")
    def _paeth(a, b, c):
        """The Paeth predictor of a byte from its left ``a``, upper ``b`` and upper-left ``c`` neighbours."""
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
        return a if pa <= pb and pa <= pc else (b if pb <= pc else c)

    @_jit()
    def _nearest_chain(p, start, order):
        """Fill ``order`` (k,) with the chain of :func:`kmgpu.png.smooth_order`: from ``start``, each next entry
        the nearest not yet taken (squared distance over the columns of ``p``, (k, C) float64 of integers, so
        exact), the lowest index winning a tie."""
        k = p.shape[0]
        taken = np.zeros(k, np.bool_)
        current = start
        for i in range(k):
            order[i] = current
            taken[current] = True
            best, best_d = -1, np.inf
            for j in range(k):
                if not taken[j]:
                    d = 0.0
                    for c in range(p.shape[1]):
                        diff = p[current, c] - p[j, c]
                        d += diff * diff
                    if d < best_d:
                        best, best_d = j, d
            current = best

    @_jit()
    def _filter_rows(rows, above, filters, out):
        """PNG scanlines of ``rows`` (H, W) uint8 into ``out`` (H, W + 1), as ``png._filtered`` makes them.

        ``above`` (W,) is the row before (zeros before an image's first);
        each row takes the filter type of ``filters`` whose bytes have the
        smallest sum of magnitudes, the first of equal sums. One pass sums
        the five filters' costs, a second writes the chosen one's bytes.
        """
        h, w = rows.shape
        cost = np.zeros(5, np.int64)
        for r in range(h):
            x = rows[r]
            up = rows[r - 1] if r > 0 else above
            v, b = np.int32(x[0]), np.int32(up[0])  # the first byte: no left neighbour, left and upper-left 0
            c0 = c1 = _byte_cost(v)
            c2 = c4 = _byte_cost((v - b) & 255)
            c3 = _byte_cost((v - (b >> 1)) & 255)
            for i in range(1, w):
                v, a, b, c = np.int32(x[i]), np.int32(x[i - 1]), np.int32(up[i]), np.int32(up[i - 1])
                c0 += _byte_cost(v)
                c1 += _byte_cost((v - a) & 255)
                c2 += _byte_cost((v - b) & 255)
                c3 += _byte_cost((v - ((a + b) >> 1)) & 255)
                c4 += _byte_cost((v - _paeth(a, b, c)) & 255)
            cost[0], cost[1], cost[2], cost[3], cost[4] = c0, c1, c2, c3, c4
            best = filters[0]
            for j in range(1, filters.shape[0]):
                if cost[filters[j]] < cost[best]:
                    best = filters[j]
            o = out[r]
            o[0] = best
            if best == 0:
                o[1:] = x
            elif best == 1:
                o[1] = x[0]
                for i in range(1, w):
                    o[i + 1] = x[i] - x[i - 1]
            elif best == 2:
                for i in range(w):
                    o[i + 1] = x[i] - up[i]
            elif best == 3:
                o[1] = x[0] - (up[0] >> 1)
                for i in range(1, w):
                    o[i + 1] = np.uint8((np.int32(x[i]) - ((np.int32(x[i - 1]) + np.int32(up[i])) >> 1)) & 255)
            else:
                o[1] = x[0] - up[0]
                for i in range(1, w):
                    p = _paeth(np.int32(x[i - 1]), np.int32(up[i]), np.int32(up[i - 1]))
                    o[i + 1] = np.uint8((np.int32(x[i]) - p) & 255)

    @_jit()
    def _contrast_row(px, r, out):
        """Each pixel's contrast in row ``r`` of ``px`` (H, W, C) uint8: the largest magnitude, over the
        channels and the two axes, of the second difference (left + right - 2 x centre), borders repeated."""
        h, w, c = px.shape
        up, down = max(r - 1, 0), min(r + 1, h - 1)
        for i in range(w):
            left, right = max(i - 1, 0), min(i + 1, w - 1)
            most = np.float32(0.0)
            for ch in range(c):
                twice = np.float32(2.0) * np.float32(px[r, i, ch])
                across = abs(np.float32(px[r, left, ch]) + np.float32(px[r, right, ch]) - twice)
                down_ = abs(np.float32(px[up, i, ch]) + np.float32(px[down, i, ch]) - twice)
                most = max(most, across, down_)
            out[i] = most

    @_jit()
    def _cell_candidates(palette, cell, per, size, cand, n_cand):
        """List in ``cand[cell]`` the entries of ``palette`` (k, C) float32 that can be nearest to a point of
        grid cell ``cell`` (``per`` cells of ``size`` levels a channel, channel 0 the fastest): those whose
        distance to the cell's box is at most the smallest distance from any entry to the box's far corner."""
        k, c = palette.shape
        low = np.empty(c, np.float32)
        rest = cell
        for ch in range(c):
            low[ch] = (rest % per) * size
            rest //= per
        near = np.empty(k, np.float32)
        limit = np.float32(3.0e38)
        for j in range(k):
            inside = np.float32(0.0)
            far = np.float32(0.0)
            for ch in range(c):
                p, lo, hi = palette[j, ch], low[ch], low[ch] + size
                t = lo - p if p < lo else (p - hi if p > hi else np.float32(0.0))
                inside += t * t
                f = max(p - lo, hi - p)
                far += f * f
            near[j] = inside
            limit = min(limit, far)
        n = 0
        for j in range(k):
            if near[j] <= limit:
                cand[cell, n] = j
                n += 1
        n_cand[cell] = n

    @_jit()
    def _dither(px, palette_u8, labels, attenuation, cap_rms, cap_least, dead, flat_below, out):
        """Floyd-Steinberg error diffusion of ``px`` (H, W, C) uint8 onto ``palette_u8`` (k, C) into ``out``.

        ``labels`` (H, W) is each pixel's undithered nearest entry. Rows
        alternate direction (serpentine). The error a pixel receives is
        scaled by ``attenuation`` and by the pixel's flatness (1 - contrast
        / ``flat_below``, at least 0, the contrast the largest of
        :func:`_contrast_row` in its 3 x 3 neighbourhood); its length is
        capped at ``cap_rms`` times the undithered image's RMS error per
        pixel (at least ``cap_least``) and ignored below ``dead``; the
        adjusted color is clipped to 0-255.
        """
        h, w, c = px.shape
        k = palette_u8.shape[0]
        palette = palette_u8.astype(np.float32)
        sq_err = 0.0
        for r in range(h):
            for i in range(w):
                g = labels[r, i]
                for ch in range(c):
                    t = np.float64(px[r, i, ch]) - np.float64(palette_u8[g, ch])
                    sq_err += t * t
        cap = np.float32(max(cap_least, cap_rms * np.sqrt(sq_err / (h * w))))
        # The nearest entry of an adjusted color is found among its grid cell's candidates, listed the
        # first time a color falls in the cell: at most 2**15 cells (32 levels a channel for RGB).
        per = 256
        while per**c > 2**15:
            per //= 2
        step = 256 // per
        cand = np.empty((per**c, k), np.uint8)
        n_cand = np.full(per**c, -1, np.int32)
        err = np.zeros((w + 2, c), np.float32)  # the error that row r receives, at column + 1
        below = np.zeros((w + 2, c), np.float32)  # ... and row r + 1
        contrast = np.zeros((3, w), np.float32)  # rows r - 1, r, r + 1
        _contrast_row(px, 0, contrast[0])
        _contrast_row(px, 0, contrast[1])
        _contrast_row(px, min(1, h - 1), contrast[2])
        column_max = np.empty(w, np.float32)
        gain = np.empty(w, np.float32)
        x = np.empty(c, np.float32)
        e = np.empty(c, np.float32)
        for r in range(h):
            if r > 0:
                contrast[0, :] = contrast[1]
                contrast[1, :] = contrast[2]
                _contrast_row(px, min(r + 1, h - 1), contrast[2])
            for i in range(w):
                column_max[i] = max(contrast[0, i], contrast[1, i], contrast[2, i])
            for i in range(w):
                most = max(column_max[max(i - 1, 0)], column_max[i], column_max[min(i + 1, w - 1)])
                gain[i] = attenuation * max(np.float32(0.0), np.float32(1.0) - most / flat_below)
            below[:, :] = 0
            forward = r % 2 == 0
            for t in range(w):
                i = t if forward else w - 1 - t
                length = np.float32(0.0)
                for ch in range(c):
                    e[ch] = err[i + 1, ch] * gain[i]
                    length += e[ch] * e[ch]
                length = np.sqrt(length)
                scale = np.float32(0.0) if length < dead else (cap / length if length > cap else np.float32(1.0))
                cell, weight = 0, 1
                for ch in range(c):
                    x[ch] = min(max(np.float32(px[r, i, ch]) + e[ch] * scale, np.float32(0.0)), np.float32(255.0))
                    cell += (int(x[ch]) // step) * weight
                    weight *= per
                if n_cand[cell] < 0:
                    _cell_candidates(palette, cell, per, np.float32(step), cand, n_cand)
                best, d_best = 0, np.float32(3.0e38)
                for m in range(n_cand[cell]):  # in index order: ties go to the lowest
                    j = cand[cell, m]
                    d = np.float32(0.0)
                    for ch in range(c):
                        t2 = x[ch] - palette[j, ch]
                        d += t2 * t2
                    if d < d_best:
                        best, d_best = j, d
                out[r, i] = best
                ahead, behind = (i + 2, i) if forward else (i, i + 2)
                for ch in range(c):
                    q = x[ch] - palette[best, ch]
                    err[ahead, ch] += q * np.float32(7 / 16)
                    below[ahead, ch] += q * np.float32(1 / 16)
                    below[i + 1, ch] += q * np.float32(5 / 16)
                    below[behind, ch] += q * np.float32(3 / 16)
            err, below = below, err

    @_jit()
    def _unfilter(raw, h, stride, bpp, out):
        """Undo the PNG filters of ``raw`` (h * (stride + 1),) uint8, the inflated scanlines of an 8-bit,
        non-interlaced PNG with ``bpp`` bytes a pixel, into ``out`` (h, stride) uint8 (PNG 1.2, section
        6). Returns -1, or the first row whose filter type is not 0 to 4 (the rest are not written)."""
        zero = np.zeros(stride, np.uint8)  # the row above the first
        for y in range(h):
            s = y * (stride + 1) + 1
            kind = raw[s - 1]
            o, up = out[y], out[y - 1] if y > 0 else zero
            if kind == 0:
                o[:] = raw[s : s + stride]
            elif kind == 1:
                o[:bpp] = raw[s : s + bpp]
                for x in range(bpp, stride):
                    o[x] = raw[s + x] + o[x - bpp]
            elif kind == 2:
                for x in range(stride):
                    o[x] = raw[s + x] + up[x]
            elif kind == 3:
                for x in range(bpp):
                    o[x] = raw[s + x] + (up[x] >> 1)
                for x in range(bpp, stride):
                    o[x] = raw[s + x] + np.uint8((np.int32(o[x - bpp]) + np.int32(up[x])) >> 1)
            elif kind == 4:
                for x in range(bpp):
                    o[x] = raw[s + x] + up[x]
                for x in range(bpp, stride):
                    # The Paeth predictor as stb_image writes it: the spec's choice of a, b or c (nearest
                    # to a + b - c, in that order of ties) without its branches, which mispredict on photos
                    # (7.3 against 13.3 ms/MP on the bench folder; the tests check all 2**24 triples).
                    a, b, c = np.int32(o[x - bpp]), np.int32(up[x]), np.int32(up[x - bpp])
                    thresh = 3 * c - (a + b)
                    lo, hi = min(a, b), max(a, b)
                    nearer = lo if hi <= thresh else c
                    o[x] = raw[s + x] + np.uint8(hi if thresh <= lo else nearer)
            else:
                return y
        return -1

else:  # pragma: no cover
    _unfilter = None
    _tap11 = _tap11_down = _blur_along = _blur_down = None
    _luma_row = _quality = _filter_rows = _contrast_row = _cell_candidates = _dither = _nearest_chain = None
    _search = _geometry_of = _cluster_sums = _sums = _draw = _kmeans_plusplus = None
    _prepare_search = _lloyd_update = _lloyd_pass = _packed = _sort_keys = _rank_keys = _unrank_keys = None
    _distinct_by_channel = _distinct = _count_colors = _label_pixels = _grid_bins = None


class Bounds:
    """What the search keeps between the Lloyd passes of one set of points (B, N, d)."""

    def __init__(self, x: torch.Tensor, *, kept: bool = True):
        """``kept=False``: for one search only, whose bounds nothing reads again (no margin to measure)."""
        B, N, _ = x.shape
        self.known = torch.full((B, N), -1, dtype=torch.int64)
        self.lower = torch.zeros(B, N, dtype=torch.float32)
        self.centers: torch.Tensor | None = None  # the centers ``lower`` refers to
        # A float32 distance between points of magnitude r is off by a few ulps of r at most.
        self.margin = (x.abs().amax((1, 2)) * 1e-5).contiguous() if N and kept else torch.zeros(B)

    def reference(self, centers: torch.Tensor) -> torch.Tensor:
        """The centers the bounds were taken against, for a search against ``centers``; where there are
        none of that shape, the bounds are forgotten and ``centers`` themselves are returned (no move)."""
        if self.centers is not None and self.centers.shape == centers.shape:
            return self.centers
        self.known.fill_(-1)
        return centers

    def shifted(self, offset: torch.Tensor) -> Bounds:
        """The same bounds for the points and centers moved by ``offset`` (B, 1, d), which leaves every
        distance as it was: only the reference centers move, and the margin grows by the rounding of
        the larger coordinates."""
        new = Bounds.__new__(Bounds)
        new.known, new.lower = self.known, self.lower
        new.centers = None if self.centers is None else self.centers + offset
        new.margin = self.margin + offset.abs().amax((1, 2)) * 1e-5
        return new

    def subset(self, idx: torch.Tensor) -> Bounds:
        new = Bounds.__new__(Bounds)
        new.known, new.lower, new.margin = self.known[idx], self.lower[idx], self.margin[idx]
        new.centers = None if self.centers is None else self.centers[idx]
        return new


def _warm_search() -> None:
    x = torch.zeros(1, 4, 3)
    x[0, 1:, 0] = torch.arange(3.0)
    labels, *_ = nearest(x, torch.ones(1, 4), x[:, :2], torch.tensor([2]), bounds=Bounds(x), sums=True)
    nearest(x, torch.ones(1, 4), x[:, :2], torch.tensor([2]), bounds=None, previous=labels)
    for split in (False, True):
        lloyd(x, torch.ones(1, 4), x[:, :2], torch.tensor([2]), torch.zeros(1, dtype=torch.float64), 2,
              bounds=Bounds(x), relax=1.5, split=split)  # fmt: skip


def _warm_colors() -> None:
    pixels = torch.tensor([[1, 2, 3], [1, 2, 3], [200, 0, 9]], dtype=torch.uint8)
    distinct_colors(pixels, [3])
    keys, counts, per_image = count_colors(pixels, [3])
    label_pixels(pixels, [3], keys, per_image.tolist(), torch.zeros(keys.shape[0], dtype=torch.uint8))
    grid_bins(pixels[1:], counts, per_image.tolist(), 6)  # its two distinct colors


def _warm_seeds() -> None:
    g = np.zeros((3, 4), dtype=np.float32)  # as kmeans calls it: the transposed float32 colors
    g[0, 1:] = np.arange(3.0)
    _kmeans_plusplus(g, np.ones(4), np.arange(1.0, 5.0), np.full(8, 0.5), 2, 2, np.zeros(2, dtype=np.int64))


def _warm_quality() -> None:
    img, idx = np.zeros((3, 3, 3), dtype=np.uint8), np.zeros((3, 3), dtype=np.uint8)
    for indexed in (False, True):  # as metrics calls it
        _quality(img, img, np.zeros((1, 3), dtype=np.uint8), np.zeros(1), idx, indexed, np.ones(3), np.ones(1),
                 1.0, 1.0, 0, 3, 3)  # fmt: skip


def _warm_png() -> None:
    filter_rows(np.zeros((3, 3), dtype=np.uint8), None, (0, 1, 2, 3, 4))
    nearest_chain(np.zeros((3, 3)), 0)


def _warm_decode() -> None:
    unfilter(np.frombuffer(bytearray(range(10)), dtype=np.uint8) % 5, 2, 4, 1)  # as pngread calls it


def _warm_dither() -> None:
    dither(np.zeros((3, 3, 3), dtype=np.uint8), np.array([[0, 0, 0], [9, 9, 9]], dtype=np.uint8),
           np.zeros((3, 3), dtype=np.uint8))  # fmt: skip


# The kernels in groups that share no compiled helper, each group loaded by one function, with its
# kernels and the seconds it took to compile alone in a fresh process on the 2-core VM. Where
# numba's cache lacks some, they compile side by side, one group in one process only: numba's
# cache of a function is an index file that two processes writing different signatures at once
# can leave pointing at the wrong code.
_WARM_GROUPS = {
    "search": (_warm_search, ("_search", "_sums", "_lloyd_pass"), 6.0),
    "colors": (_warm_colors, ("_distinct", "_count_colors", "_label_pixels", "_grid_bins"), 6.4),
    "seeds": (_warm_seeds, ("_kmeans_plusplus",), 3.5),
    "png": (_warm_png, ("_filter_rows", "_nearest_chain"), 3.7),
    "dither": (_warm_dither, ("_dither",), 5.3),
    "quality": (_warm_quality, ("_quality",), 1.9),
    "decode": (_warm_decode, ("_unfilter",), 3.3),
}
_CHILD_TIMEOUT_S = 600


def _uncached(group: str) -> bool:
    """Whether numba's disk cache lacks ``group``'s kernels for this version of this file.

    Best effort, through numba's cache index (not public API): False where it cannot be read so,
    and then whatever is missing compiles in this process, as numba does by itself.
    """
    try:
        return any(not globals()[name]._cache._cache_file._load_index() for name in _WARM_GROUPS[group][1])
    except Exception:  # a numba without these internals: whatever is missing compiles here
        return False


def _compile_side_by_side(groups: list[str]) -> None:
    """Compile ``groups`` into numba's disk cache, split over this process and child processes.

    A child that fails or hangs costs nothing but its time: whatever it did not cache, this
    process then compiles itself.
    """
    parts: list[list[str]] = [[] for _ in range(min(available_cores(), len(groups)))]
    load = [0.0] * len(parts)
    for name in sorted(groups, key=lambda g: -_WARM_GROUPS[g][2]):  # longest first, each to the least loaded
        i = load.index(min(load))
        parts[i].append(name)
        load[i] += _WARM_GROUPS[name][2]
    # This very kmgpu, whether or not its folder is on the child's path (but not ahead of the
    # standard library where it is, as site-packages is).
    code = (
        "import sys; root = sys.argv[1]; root in sys.path or sys.path.insert(0, root); "
        "from kmgpu import cpu_kernels; cpu_kernels._warm(sys.argv[2:])"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    children = []
    try:
        if sys.executable:
            for part in parts[1:]:
                children.append(
                    subprocess.Popen(
                        [sys.executable, "-c", code, root, *part],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        _warm(parts[0])
        deadline = time.monotonic() + _CHILD_TIMEOUT_S
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _warm(groups: list[str]) -> None:
    """Load (or compile) ``groups``' kernels in this process; a child of :func:`_compile_side_by_side`."""
    global _ready
    _ready = True  # the kernels' wrappers ask compiled(), which must not warm up again
    for name in groups:
        _WARM_GROUPS[name][0]()


def warm_up(note: Callable[[str], None] | None = None, *, without: Collection[str] = ()) -> None:
    """Load (or, the first time, compile) every kernel now: forked workers then inherit them.

    Loading them from numba's disk cache takes about 0.4 s a process. Compiling them, the first
    time kmgpu runs on a machine (or after an upgrade), took 22 s one after another on the 2-core
    VM; where the cache lacks them, they compile side by side in up to one process a core, and
    ``note`` is told first. The groups ``without`` names are neither loaded nor compiled: the
    dithering kernel, where nothing is dithered, cost a first run on 2 cores 1.6 s of its 17.7.
    One that runs after all loads (or compiles) on its first call, which is safe in one process
    but not in worker processes side by side (see :func:`compiled`).
    """
    if _search is None:
        return
    groups = [name for name in _WARM_GROUPS if name not in without]
    _compile_missing(groups, note)  # but one alone, which compiles as it loads here
    _warm(groups)


def _compile_missing(groups: list[str], note: Callable[[str], None] | None) -> list[str]:
    """Compile into numba's disk cache those of ``groups`` it lacks, telling ``note`` first: several side by
    side (:func:`_compile_side_by_side`). Returns those left to compile, none or one alone (or all of them
    on one core), which :func:`_warm` compiles in this process."""
    missing = [name for name in groups if _uncached(name)]
    if missing and note is not None:
        note("compiling kmgpu's CPU kernels for this machine; numba caches them, so only this run waits for it")
    if len(missing) > 1 and available_cores() > 1:
        _compile_side_by_side(missing)
        return []
    return missing


def fill_cache(note: Callable[[str], None] | None = None, *, without: Collection[str] = ()) -> None:
    """Compile into numba's disk cache the groups of kernels it lacks (but those ``without`` names),
    as :func:`warm_up` would, and load no others: what ``kmgpu run --nproc N`` does before it
    starts its ranks, which would otherwise each compile them at once (the first run of the samples
    with ``--nproc 2``, 2-core VM: 34.9 s, 61.7 s of CPU). Where numba cannot compile them here,
    nothing is said: each rank then warns and takes the torch path, as one process would."""
    if _off():
        return
    with contextlib.suppress(Exception):  # numba's errors have no common base worth naming
        left = _compile_missing([name for name in _WARM_GROUPS if name not in without], note)
        if left:
            _warm(left)


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // _THREAD_WORK))


def run_threads(fn, items, threads: int) -> list:
    """``[fn(item) for item in items]``, on up to ``threads`` of this process's kernel threads (the compiled
    kernels release the GIL), the results in the order of ``items``."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = _search_threads.get()
    cut = -(-len(items) // min(threads, len(items)))  # a few calls of several items each, not one per item
    chunks = [items[i : i + cut] for i in range(0, len(items), cut)]
    jobs = [pool.submit(lambda part: [fn(item) for item in part], chunk) for chunk in chunks]
    return [result for job in jobs for result in job.result()]


def _search_buffers(B: int, k: int, d: int) -> tuple[np.ndarray, ...]:
    """What :func:`_prepare_search` fills for a search of B problems of up to k centers in d dimensions: the
    centers laid out (B, d, k), each one's squared distance to its nearest other (B, k), and per problem the
    largest move, its center and the second largest move (B,)."""
    ct = np.empty((B, d, k), dtype=np.float32)
    nn_sq = np.empty((B, k), dtype=np.float32)
    d_max, d_second = np.empty(B, dtype=np.float32), np.empty(B, dtype=np.float32)
    return ct, nn_sq, d_max, np.empty(B, dtype=np.int64), d_second


def _search_all(args: list, active: np.ndarray, guessed: bool, total: int, k: int) -> None:
    """``_search(*args, active, guessed, ...)`` over all ``total`` points, split among threads by its work."""
    threads = _threads(total * (k + 32))
    if threads == 1:
        _search(*args, active, guessed, 0, total)
        return
    cuts = [total * t // threads for t in range(threads + 1)]
    pool = _search_threads.get()
    jobs = [pool.submit(_search, *args, active, guessed, lo, hi) for lo, hi in zip(cuts, cuts[1:])]
    for job in jobs:
        job.result()


def lloyd(
    x, w, centers, n_clusters, tol_abs, max_iter: int, *, bounds: Bounds, labels=None, relax: float = 1.0, split=None
):
    """Lloyd passes until each problem's center shift is at most its tolerance: ``kmeans._lloyd``, compiled.

    Each pass is one call of the compiled kernels (on one thread; where the
    search is large enough for several, the search is split among threads
    between two calls), where the torch formulation ran some forty small
    operations, about 1 ms a pass on the CPU whatever the problem's size.
    Problems are independent: a problem's result does not depend on the
    rest of its batch, nor on the number of threads.

    Parameters
    ----------
    x : Tensor of shape (B, N, d), float32, on the CPU
    w : Tensor of shape (B, N), float32
    centers : Tensor of shape (B, k_max, d), the initial centers
    n_clusters : Tensor of shape (B,), int64
    tol_abs : Tensor of shape (B,), float64
    max_iter : int
    bounds : Bounds
        The search's bounds for these points, kept for the passes after (``kmeans`` assigns once more).
    labels : Tensor of shape (B, N), optional
        A guess of each point's nearest initial center.
    relax : float
        Over-relaxation of the update (see ``kmeans._lloyd``).
    split : bool, optional
        Run the search apart, among threads (by default where it is large enough for several).

    Returns
    -------
    centers (B, k_max, d) float32, n_iter (B,) int64, converged (B,) bool, the passes as (iteration,
    problems active, inertia (B,), shift (B,), clusters repaired, seconds), and from each problem's
    last pass its labels (B, N) int64, inertia (B,) float64 and cluster weights (B, k_max) float64.
    """
    B, N, d = x.shape
    k_max = centers.shape[1]
    xs = x.to(torch.float32).contiguous().numpy()
    ws = w.to(torch.float32).contiguous().numpy()
    c = centers.to(torch.float32).contiguous().clone()
    prev = bounds.reference(c).clone()
    guessed = labels is not None
    lab = labels.to(torch.int64, copy=True).contiguous() if guessed else torch.zeros(B, N, dtype=torch.int64)
    sum_w = torch.zeros(B, k_max, dtype=torch.float64)
    last_inertia = torch.zeros(B, dtype=torch.float64)
    n_iter = torch.zeros(B, dtype=torch.int64)
    converged = torch.zeros(B, dtype=torch.bool)
    kb = n_clusters.to(torch.int64).contiguous().numpy()
    active = np.ones(B, dtype=np.bool_)
    ct, nn_sq, d_max, d_arg, d_second = _search_buffers(B, k_max, d)
    dist = np.empty((B, N), dtype=np.float32)
    sum_x = np.zeros((B, k_max, d), dtype=np.float64)
    held = np.empty(k_max, dtype=np.bool_)
    step = np.full(B, relax, dtype=np.float32)
    tol = tol_abs.to(torch.float64).contiguous().numpy()
    inertia, shift = np.empty(B), np.empty(B)
    cn, pn, ln, sw, li = c.numpy(), prev.numpy(), lab.numpy(), sum_w.numpy(), last_inertia.numpy()
    known, lower, margin = bounds.known.numpy(), bounds.lower.numpy(), bounds.margin.numpy()
    search_args = [xs, ct, kb, ln, known, dist, lower, nn_sq, d_max, d_arg, d_second, margin]
    one_thread = _threads(B * N * (k_max + 32)) == 1 if split is None else not split
    passes = []
    # Per pass only the kernels' calls: a thumbnail's fit runs some 25 passes of 0.2 ms, where NumPy's
    # sum and any on ``active`` and fresh views of the outputs took 10 us more each.
    relax, done, steps = float(relax), converged.numpy(), n_iter.numpy()
    live = int(np.count_nonzero(active))
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        if one_thread:
            repaired = _lloyd_pass(
                xs, ws, cn, pn, ct, kb, active, ln, known, dist, lower, nn_sq, d_max, d_arg, d_second, margin,
                guessed, sum_x, sw, held, step, relax, it > 1, li, tol, done, steps, inertia, shift,
            )  # fmt: skip
        else:
            _prepare_search(cn, pn, ct, kb, active, nn_sq, d_max, d_arg, d_second)
            _search_all(search_args, active, guessed, B * N, k_max)
            repaired = _lloyd_update(
                xs, ws, cn, pn, kb, active, ln, dist, sum_x, sw, held, step, relax, it > 1, li, tol, done, steps,
                inertia, shift,
            )  # fmt: skip
        passes.append((it, live, inertia.copy(), shift.copy(), int(repaired), time.perf_counter() - t0))
        guessed = True
        live = int(np.count_nonzero(active))
        if not live:
            break
    bounds.centers = prev  # the centers of each problem's last search, which the bounds refer to
    return c, n_iter, converged, passes, lab, last_inertia, sum_w


_tables = threading.local()


def distinct_colors(pixels: torch.Tensor, sizes: list[int]):
    """Each image's distinct colors, sorted by packed key, with their counts and each pixel's row.

    What sorting the packed keys (``torch.unique``) gives, for small images:
    each is first ordered by its channel 2, and each run of one channel-2
    value goes through a table of 2**16 counts, which stays in cache (1.75x
    the table of 2**24 on 0.2 MP images, 10-20% faster on photos of 1 to 4 MP).
    It takes 24 bytes a pixel while it runs; ``quantize`` gives images of 4 MP
    and more to :func:`count_colors` and :func:`label_pixels` instead.

    Parameters
    ----------
    pixels : Tensor of shape (N, C), uint8, C of 1 to 3, on the CPU
        The pixels of the images one after another, fewer than 2**31.
    sizes : list of int
        Pixels of each image.

    Returns
    -------
    keys (U,) int32, counts (U,) int64, inverse (N,) int32, colors per image (B,) int64
    """
    if pixels.shape[0] >= 2**31:
        raise ValueError(f"{pixels.shape[0]} pixels: distinct_colors takes fewer than 2**31")
    keys, counts, inverse, per_image = _distinct(pixels.contiguous().numpy(), np.asarray(sizes, dtype=np.int64))
    return torch.from_numpy(keys), torch.from_numpy(counts), torch.from_numpy(inverse), torch.from_numpy(per_image)


@contextlib.contextmanager
def _table() -> Iterator[np.ndarray]:
    """This thread's table of 2**24 int32 zeros (NumPy asks the kernel for huge pages for it), lent to
    a kernel that leaves it zeros; should the kernel fail half way, the next call gets a new table."""
    table = getattr(_tables, "table", None)
    if table is None:
        table = np.zeros(1 << 24, dtype=np.int32)
    _tables.table = None
    yield table
    _tables.table = table


def grid_bins(colors: torch.Tensor, counts: torch.Tensor, per_image: list[int], bits: int):
    """Each image's distinct colors merged onto a grid of ``2**bits`` levels per channel.

    What ``quantize._coarse_bins`` makes with a sort, from the table of
    :func:`count_colors`: ``bits`` below 8 (``quantize._pack`` puts channel 0
    highest there), up to 24 bits of key (``bits`` times the channels).

    Returns
    -------
    means (M, C) float32, bin counts (M,) float64, the bin of each color (U,) int64, bins per image (B,) int64
    """
    with _table() as table:
        weight, sums, bin_of, per_bins = _grid_bins(
            colors.contiguous().numpy(), counts.contiguous().numpy(), np.asarray(per_image, dtype=np.int64), bits, table
        )
    means = torch.from_numpy(sums / weight[:, None]).float()
    return means, torch.from_numpy(weight), torch.from_numpy(bin_of), torch.from_numpy(per_bins)


def count_colors(pixels: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's distinct colors, sorted, with their counts: what sorting the packed keys gives.

    One pass over each image's pixels through a table of 2**24 counts, which
    keeps no row per pixel (a pixel's palette entry is then looked up with
    :func:`label_pixels`): a 12-megapixel photo in 0.08 s, against 0.28 s
    with a second pass that writes each pixel's row (kmgpu's way before; see
    BENCHMARKS.md, session 29) and 0.26 s for sorting its packed keys in
    chunks. The table (64 MiB, its pages taken as colors touch them) is kept
    for the next call, one per thread.

    Parameters
    ----------
    pixels : Tensor of shape (N, C), uint8, C of 1 to 3, on the CPU
        The pixels of the images one after another.
    sizes : list of int
        Pixels of each image.

    Returns
    -------
    keys (U,) int32 (packed as ``quantize._pack_narrow`` packs them), counts (U,) int64, colors per image (B,) int64
    """
    with _table() as table:
        keys, counts, per_image = _count_colors(pixels.contiguous().numpy(), np.asarray(sizes, dtype=np.int64), table)
    return torch.from_numpy(keys), torch.from_numpy(counts), torch.from_numpy(per_image)


def label_pixels(
    pixels: torch.Tensor, sizes: list[int], keys: torch.Tensor, per_image: list[int], labels: torch.Tensor
) -> torch.Tensor:
    """Each pixel's palette entry (N,) uint8: ``labels`` (U,) of its image's colors ``keys`` (U,) int32, as
    :func:`count_colors` gives them (``per_image`` of them an image), for ``pixels`` and ``sizes`` as it takes
    them. One pass through the table: what a binary search of each image's sorted keys finds
    (``quantize._chunked_labels``), a 24-megapixel photo in 0.12 s against 1.2 s.
    """
    out = np.empty(pixels.shape[0], dtype=np.uint8)
    with _table() as table:
        _label_pixels(
            pixels.contiguous().numpy(), np.asarray(sizes, dtype=np.int64), keys.contiguous().numpy(),
            np.asarray(per_image, dtype=np.int64), labels.contiguous().numpy(), table, out,
        )  # fmt: skip
    return torch.from_numpy(out)


def nearest_chain(palette: np.ndarray, start: int) -> np.ndarray:
    """The nearest-neighbour chain through the rows of ``palette`` (k, C) from row ``start``: what
    ``png.smooth_order`` makes, index for index (k=64: 19 us against 0.21 ms in NumPy)."""
    order = np.empty(len(palette), dtype=np.int64)
    _nearest_chain(np.ascontiguousarray(palette, dtype=np.float64), int(start), order)
    return order


def filter_rows(rows: np.ndarray, above: np.ndarray | None, filters: tuple[int, ...]) -> np.ndarray:
    """PNG scanlines of ``rows`` (H, W) uint8 with adaptive filters: what ``png._filtered`` makes, bit for bit.

    ``above`` (1, W) is the row before ``rows`` (None: an image's first row);
    ``filters`` the filter types a row may take, the first of equal costs
    winning. One pass over each row for the five costs, one for the bytes:
    on a 12-megapixel index map 0.03 s against 0.19 s for the NumPy
    formulation, which builds every candidate in full.
    """
    h, w = rows.shape
    out = np.empty((h, w + 1), dtype=np.uint8)
    up = np.zeros(w, dtype=np.uint8) if above is None else np.ascontiguousarray(above[0], dtype=np.uint8)
    _filter_rows(np.ascontiguousarray(rows, dtype=np.uint8), up, np.asarray(filters, dtype=np.int64), out)
    return out


def unfilter(raw: np.ndarray, height: int, stride: int, bpp: int) -> np.ndarray | None:
    """The pixels of an 8-bit, non-interlaced PNG from its inflated scanlines ``raw`` (height * (stride + 1),)
    uint8: (height, stride) uint8, or None where a row names no filter type (0 to 4)."""
    out = np.empty((height, stride), dtype=np.uint8)
    return out if _unfilter(raw, height, stride, bpp, out) < 0 else None


# Floyd-Steinberg dithering (``dither``): serpentine rows, and four refinements of the textbook's
# diffusion, each measured by undoing it (scripts/bench_dither.py --extra --ablate, BENCHMARKS.md):
# - 0.9 of the error is passed on, not all of it, so that it does not build up into noise;
# - the error a pixel receives is capped at twice the image's RMS error (at least 8 levels), which
#   stops the runs of wrong colors that a large error drives through an area the palette covers well;
# - an error below one level is not applied: flat areas stay flat, and cost fewer bytes;
# - the error reaches a pixel in proportion to how flat its 3 x 3 neighbourhood is (no second
#   difference of 32 levels or more: none at all), since at edges dithering only makes them jagged
#   and in textures, which hide banding anyway, it adds noise and bytes.
_DITHER_ATTENUATION = 0.9
_DITHER_CAP_RMS, _DITHER_CAP_LEAST = 2.0, 8.0
_DITHER_DEAD = 1.0
_DITHER_FLAT_BELOW = 32.0


def dither(pixels: np.ndarray, palette: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each pixel of ``pixels`` (H, W, C) uint8 mapped to ``palette`` (k, C) uint8 by error diffusion.

    ``labels`` (H, W) are the pixels' nearest entries without dithering.
    Returns the (H, W) uint8 indices. Serpentine Floyd-Steinberg, the error
    attenuated, capped, and kept off edges and textures (see the notes
    above); each pixel takes the exactly nearest entry to its adjusted
    color (ties to the lowest index). One pass down the rows, with a few
    rows of state and at most 8 MB of candidate lists.
    """
    h, w, _ = pixels.shape
    out = np.empty((h, w), dtype=np.uint8)
    _dither(
        np.ascontiguousarray(pixels, dtype=np.uint8),
        np.ascontiguousarray(palette, dtype=np.uint8),
        np.ascontiguousarray(labels, dtype=np.uint8),
        _DITHER_ATTENUATION, _DITHER_CAP_RMS, _DITHER_CAP_LEAST, _DITHER_DEAD, _DITHER_FLAT_BELOW, out,
    )  # fmt: skip
    return out


def nearest(x, w, centers, n_clusters, *, bounds: Bounds | None = None, previous=None, sums: bool = False):
    """Each point's nearest center among the first ``n_clusters`` of its problem.

    Parameters
    ----------
    x : Tensor of shape (B, N, d), float32, on the CPU
    w : Tensor of shape (B, N), float32 (read only with ``sums``)
    centers : Tensor of shape (B, k, d), float32
    n_clusters : Tensor of shape (B,), int64
    bounds : Bounds, optional
        Kept across the calls of one fit: lets points skip the search.
    previous : Tensor of shape (B, N), int64, optional
        Each point's likely center; where the bounds prove it still nearest
        (or it ties), it is kept.
    sums : bool
        Also return each cluster's weighted sums (B, k, d) and weights (B, k), float64.

    Returns
    -------
    labels (B, N) int64, min_dist (B, N) float32, sum_x, sum_w (or None, None)
    """
    B, N, d = x.shape
    k = centers.shape[1]
    x = x.to(torch.float32).contiguous()
    c = centers.to(torch.float32).contiguous()
    kb = n_clusters.to(torch.int64).contiguous().numpy()
    guessed = previous is not None
    labels = previous.to(torch.int64, copy=True).contiguous() if guessed else torch.zeros(B, N, dtype=torch.int64)
    dist = np.empty((B, N), dtype=np.float32)
    if bounds is None:  # a single search: only the guess and the centers' spacing can spare one
        bounds = Bounds(x, kept=False)
    prev = bounds.reference(c)
    ct, nn_sq, d_max, d_arg, d_second = _search_buffers(B, k, d)
    every = np.ones(B, dtype=np.bool_)
    _prepare_search(c.numpy(), prev.numpy(), ct, kb, every, nn_sq, d_max, d_arg, d_second)
    state = (labels.numpy(), bounds.known.numpy(), dist, bounds.lower.numpy())
    args = [x.numpy(), ct, kb, *state, nn_sq, d_max, d_arg, d_second, bounds.margin.numpy()]
    _search_all(args, every, guessed, B * N, k)
    bounds.centers = c.clone()  # the caller may update its centers in place
    sum_x = sum_w = None
    if sums:
        sum_x = torch.zeros(B, k, d, dtype=torch.float64)
        sum_w = torch.zeros(B, k, dtype=torch.float64)
        _sums(x.numpy(), w.to(torch.float32).contiguous().numpy(), labels.numpy(), sum_x.numpy(), sum_w.numpy())
    return labels, torch.from_numpy(dist), sum_x, sum_w
