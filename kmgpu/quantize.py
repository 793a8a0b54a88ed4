"""Color quantization of images: pixels -> palette + index map.

The fit runs on an image's color histogram rather than on its pixels: the
distinct colors with their counts are the same K-means objective with far
fewer points, and unlike a uniform pixel sample they keep every rare color
(a logo's few flat colors, a star field's bright points) in view.

Single-channel (gray) images are solved exactly instead, by dynamic
programming over their at most 256 levels (:func:`_fit_exact_1d`). Other
images are fitted coarse to fine:

1. The colors are binned on a grid of ``2**coarse_bits`` levels per channel;
   each occupied bin becomes one point at its members' mean color, weighted
   by their count. K-means++ and up to ``max_iter`` over-relaxed Lloyd
   iterations run there (a photo's 100k distinct colors become about 10k
   bins). Images with few distinct colors (at most 8,192: graphics, logos)
   skip this step and are fitted on their exact colors the same way: as
   cheap, and a graphic's heavy flat colors need centers exactly on them,
   which bin means miss.
2. A few Lloyd iterations on the exact distinct colors polish the centers.
3. The centers are rounded to the uint8 palette that will be stored, and
   every distinct color is assigned to its nearest palette entry, exactly,
   so every pixel gets the nearest stored color (the field notes saw 5% of
   labels miss it when assigned to float centers instead).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import cpu_kernels
from .config import dither_error
from .device import resolve_device
from .imageio import (
    DEFAULT_MAX_PIXELS,
    LoadedImage,
    from_pil,
    in_png_order,
    load_image,
    normalize_alpha,
    palette_png_bytes,
    write_atomic,
)
from .kmeans import assign, kmeans
from .metrics import quality_indexed, quality_of
from .png import DEFAULT_LEVEL, palette_size_error
from .timing import StageClock, stage

__all__ = [
    "ColorHistogram",
    "Palette",
    "QuantizedImage",
    "as_loaded",
    "color_histogram",
    "fit_palette",
    "fit_palettes",
    "quantize",
    "quantize_batch",
    "quantize_pixels",
]


@dataclass
class ColorHistogram:
    """The distinct colors of an image and how many pixels hold each.

    Attributes
    ----------
    colors : Tensor of shape (M, C), uint8
        In increasing order of their packed value.
    counts : Tensor of shape (M,), int64
    inverse : Tensor of shape (N,), int64
        Row of ``colors`` of each pixel.
    """

    colors: torch.Tensor
    counts: torch.Tensor
    inverse: torch.Tensor


@dataclass
class Palette:
    """A fitted palette and the index of every pixel of one image.

    Attributes
    ----------
    colors : Tensor of shape (k, C), uint8
        At most the k asked for: fewer when the image has fewer colors.
    indices : Tensor of shape (N,), uint8
        Palette entry of each pixel, the nearest one exactly.
    n_iter : int
        Lloyd iterations of the coarse fit plus the refinement.
    """

    colors: torch.Tensor
    indices: torch.Tensor
    n_iter: int

    def reconstruct(self) -> torch.Tensor:
        """The quantized pixels, shape (N, C), uint8."""
        return self.colors[self.indices.long()]


def _pack(pixels: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, C) uint8 -> (N,) int64 keys of the top ``bits`` bits of each channel.

    Full 8-bit colors are packed by reading each pixel's bytes, zero-padded
    to four, as one little-endian int32 (channel 0 in the low byte): one copy
    instead of a shift and an OR per channel, 7x faster on 6 megapixels.
    """
    n, c = pixels.shape
    if bits == 8:
        return _pack_narrow(pixels).to(torch.int64)
    shift = 8 - bits
    keys = torch.zeros(n, dtype=torch.int64, device=pixels.device)
    for ch in range(c):
        keys = (keys << bits) | (pixels[:, ch].to(torch.int64) >> shift)
    return keys


def _key_dtype(channels: int) -> torch.dtype:
    """Dtype of packed 8-bit colors: int32 for up to 3 channels (24 bits; sorts and searches faster)."""
    return torch.int32 if channels <= 3 else torch.int64


def _pack_narrow(pixels: torch.Tensor) -> torch.Tensor:
    """``_pack(pixels, 8)`` as ``_key_dtype``: int32 for up to 3 channels (below 2**24), else int64."""
    n, c = pixels.shape
    padded = torch.zeros(n, 4, dtype=torch.uint8, device=pixels.device)
    padded[:, :c] = pixels
    keys = padded.view(torch.int32).squeeze(1)
    return keys if _key_dtype(c) == torch.int32 else keys.to(torch.int64) & 0xFFFFFFFF


def _unpack(keys: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of ``_pack(pixels, 8)``: each key's low bytes, read in place (little-endian, as ``_pack_narrow``
    writes them) rather than shifted and masked a channel at a time (5x on a thumbnail's colors)."""
    keys = keys.to(torch.int64).contiguous()
    return keys.view(torch.uint8).view(-1, 8)[:, :channels].contiguous()


def color_histogram(pixels: torch.Tensor) -> ColorHistogram:
    """Distinct colors of ``pixels`` (N, C) uint8 with their counts."""
    keys = _pack(pixels, 8)
    uniq, inverse, counts = torch.unique(keys, sorted=True, return_inverse=True, return_counts=True)
    return ColorHistogram(_unpack(uniq, pixels.shape[1]), counts, inverse)


# Images with at most this many distinct colors are fitted on them directly.
_DIRECT_COLORS = 8192

# Packed colors take at most 32 bits (4 channels of 8); the image number goes above.
_IMAGE_SHIFT = 32


class _Ragged:
    """Values grouped by image, contiguous and in image order, and their padded (G, M, ...) layouts.

    Attributes
    ----------
    image : (U,) int64, the image of each value
    slot : (U,) int64, its position within its image
    sizes : (B,) int64, values per image (``host_sizes``: the same as a list)
    """

    def __init__(self, image: torch.Tensor, n_images: int):
        self.image = image
        self.sizes = torch.bincount(image, minlength=n_images)
        starts = self.sizes.cumsum(0) - self.sizes
        self.slot = torch.arange(image.numel(), device=image.device) - starts[image]
        self.host_sizes: list[int] = self.sizes.tolist()
        self.host_starts: list[int] = starts.tolist()

    @classmethod
    def of_sizes(cls, sizes: torch.Tensor) -> _Ragged:
        """The layout of values already grouped by image, ``sizes[b]`` of image b: what ``_Ragged(image, B)``
        makes, without its bincount and gathers (one image, the common case on the CPU: just a range)."""
        new = cls.__new__(cls)
        new.sizes = sizes
        new.host_sizes = sizes.tolist()
        new.host_starts = [0]
        for size in new.host_sizes[:-1]:
            new.host_starts.append(new.host_starts[-1] + size)
        total = sum(new.host_sizes)
        if len(new.host_sizes) == 1:
            new.image = torch.zeros(total, dtype=torch.int64, device=sizes.device)
            new.slot = torch.arange(total, device=sizes.device)
        else:
            starts = torch.tensor(new.host_starts, dtype=torch.int64, device=sizes.device)
            new.image = torch.repeat_interleave(torch.arange(len(new.host_sizes), device=sizes.device), sizes)
            new.slot = torch.arange(total, device=sizes.device) - torch.repeat_interleave(starts, sizes)
        return new

    def values_of(self, values: torch.Tensor, b: int) -> torch.Tensor:
        """The rows of ``values`` (U, ...) that belong to image ``b``."""
        return values[self.host_starts[b] : self.host_starts[b] + self.host_sizes[b]]

    def pad(self, values: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """The values (U, ...) of the images ``rows``, in a zero tensor (len(rows), M, ...).

        M is the largest of those images' sizes, not the whole batch's: padding
        costs the engine as much as real points.
        """
        width = max([1] + [self.host_sizes[b] for b in rows])
        out = values.new_zeros((len(rows), width) + values.shape[1:])
        for i, b in enumerate(rows):
            out[i, : self.host_sizes[b]] = self.values_of(values, b)
        return out

    def unpad_into(self, out: torch.Tensor, padded: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Inverse of :meth:`pad`: write the values of the images ``rows`` from ``padded`` into ``out`` (U, ...)."""
        for i, b in enumerate(rows):
            self.values_of(out, b).copy_(padded[i, : self.host_sizes[b]])
        return out


def _grouped_unique(composite: torch.Tensor, n_images: int, weights=None):
    """Distinct (image, key) pairs of many images at once, in one sort.

    ``composite`` holds each input's key, with its image's number above the
    key's 32 bits (``_IMAGE_SHIFT``). Returns the keys, a :class:`_Ragged` of
    their images, the inverse index of each input, and the count (or the
    summed ``weights``) of each pair.
    """
    if n_images == 1 and composite.numel() and (composite.dtype == torch.int32 or int(composite.max()) < 2**31):
        # One image, keys below 2**31: sorting int32 measured 1.6x faster than int64.
        narrow = composite.to(torch.int32)
        uniq, inverse, counts = torch.unique(narrow, sorted=True, return_inverse=True, return_counts=True)
        uniq = uniq.to(torch.int64)
    else:  # as int64, whatever arrives (one empty image packs to int32)
        uniq, inverse, counts = torch.unique(
            composite.to(torch.int64), sorted=True, return_inverse=True, return_counts=True
        )
    if weights is not None:
        counts = torch.zeros(uniq.numel(), dtype=weights.dtype, device=weights.device).index_add_(0, inverse, weights)
    return uniq & ((1 << _IMAGE_SHIFT) - 1), _Ragged(uniq >> _IMAGE_SHIFT, n_images), inverse, counts


# A batch of more pixels than this takes its histograms chunk by chunk (_chunked_histograms).
_CHUNKED_PIXELS = 2**24
# On the CPU, a batch with an image of this many pixels or more keeps no row per pixel (_tabled_histograms).
# Below it each pixel's row comes from cpu_kernels.distinct_colors, whose small table stays in cache. One
# thread, fit_palettes' "colors" and "assign" stages, rows against the large table's count and lookup:
# bench-folder images (0.17 MP, groups of 6) 6.8-7.3 against 7.1-7.4 ms an image, 1 MP photos 18.2-18.6
# against 17.3-18.1, 2.2-3.6 MP photos 58-59 against 53-57 (but in `kmgpu run`, 3 workers on 2 cores,
# no faster: 7.7 s either way for 40 of them), a 12 MP photo 270 against 190 (in `kmgpu run`, 8 of them:
# 5.4 s against 5.9-6.4).
_ROWS_BELOW = 4_000_000
_CHUNK = 2**22


def _chunks(pixels: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
    """``pixels`` (N, C) in slices of ``_CHUNK`` rows, on ``device``."""
    for r in range(0, pixels.shape[0], _CHUNK):
        yield pixels[r : r + _CHUNK].to(device)


def _chunked_histograms(images: Sequence[torch.Tensor], device: torch.device):
    """Each image's distinct packed colors and counts, made ``_CHUNK`` pixels at a time.

    What :func:`_grouped_unique` returns for the pixels of ``images`` (but
    for the inverse index, which would take 8 bytes a pixel): the sorted
    keys, a :class:`_Ragged` of their images and the counts. Memory grows
    with a chunk and the number of distinct colors, not with the pixels.
    """
    keys, counts, image = [], [], []
    for b, im in enumerate(images):
        uniq = total = None
        for chunk in _chunks(im, device):
            u, c = torch.unique(_pack_narrow(chunk), sorted=True, return_counts=True)
            if uniq is not None:  # merge with the colors so far
                u, inv = torch.unique(torch.cat([uniq, u]), sorted=True, return_inverse=True)
                c = torch.zeros(u.numel(), dtype=torch.int64, device=device).index_add_(0, inv, torch.cat([total, c]))
            uniq, total = u, c
        if uniq is None:  # an image with no pixels
            uniq = total = torch.zeros(0, dtype=torch.int64, device=device)
        keys.append(uniq.to(torch.int64))
        counts.append(total)
        image.append(torch.full((uniq.numel(),), b, dtype=torch.int64, device=device))
    return torch.cat(keys), _Ragged(torch.cat(image), len(images)), torch.cat(counts)


def _chunked_labels(images, color_keys, colors_of: _Ragged, label_of_color, device) -> list[torch.Tensor]:
    """Each pixel's label (uint8), looked up chunk by chunk among its image's sorted keys."""
    out = []
    for b, im in enumerate(images):
        mine = colors_of.values_of(color_keys, b).to(_key_dtype(im.shape[1]))  # as _pack_narrow packs them
        labels = colors_of.values_of(label_of_color, b).to(torch.uint8)
        parts = [labels.index_select(0, torch.searchsorted(mine, _pack_narrow(chunk))) for chunk in _chunks(im, device)]
        out.append(torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device))
    return out


def _table_runs(images: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, list[int]]]:
    """``images`` as the table kernels take them, pixels and sizes: joined in one call where they hold at most
    ``_CHUNKED_PIXELS`` pixels (small images share a call's fixed costs), else one at a time (no copy)."""
    sizes = [im.shape[0] for im in images]
    if len(images) > 1 and sum(sizes) <= _CHUNKED_PIXELS:
        return [(_joined(images), sizes)]
    return [(im, [n]) for im, n in zip(images, sizes)]


def _tabled_histograms(runs: list[tuple[torch.Tensor, list[int]]]):
    """What :func:`_chunked_histograms` returns (but int32 keys), from a table of counts
    (:func:`kmgpu.cpu_kernels.count_colors`; on the CPU, up to 3 channels), for the images in ``runs``
    (:func:`_table_runs`): no index per pixel either."""
    keys, counts, per_image = [], [], []
    for pixels, sizes in runs:
        k, c, m = cpu_kernels.count_colors(pixels, sizes)
        keys.append(k)
        counts.append(c)
        per_image.append(m)
    return torch.cat(keys), _Ragged.of_sizes(torch.cat(per_image)), torch.cat(counts)


def _tabled_labels(runs, color_keys, colors_of: _Ragged, label_of_color) -> list[torch.Tensor]:
    """Each pixel's label (uint8), through the table (:func:`kmgpu.cpu_kernels.label_pixels`), for the keys of
    :func:`_tabled_histograms`."""
    labels = label_of_color.to(torch.uint8)
    out, first = [], 0
    for pixels, sizes in runs:
        last = first + len(sizes)
        rows = slice(colors_of.host_starts[first], colors_of.host_starts[last - 1] + colors_of.host_sizes[last - 1])
        per_image = colors_of.host_sizes[first:last]
        out.extend(cpu_kernels.label_pixels(pixels, sizes, color_keys[rows], per_image, labels[rows]).split(sizes))
        first = last
    return out


def _coarse_bins(colors, counts, colors_of: _Ragged, bits: int, n_images: int):
    """Merge each image's distinct colors onto a grid of ``2**bits`` levels per channel.

    Returns the mean color of each occupied bin (float32), a :class:`_Ragged`
    of their images, the pixel count of each bin (float64), and the bin of
    each color.
    """
    if colors.device.type == "cpu" and bits < 8 and colors.shape[1] * bits <= 24 and cpu_kernels.compiled():
        # The same from a table instead of a sort (cpu_kernels.grid_bins): one image's 6 ms become 1.
        means, bin_counts, inverse, per_image = cpu_kernels.grid_bins(colors, counts, colors_of.host_sizes, bits)
        return means, _Ragged.of_sizes(per_image), bin_counts, inverse
    weights = counts.double()
    composite = (colors_of.image << _IMAGE_SHIFT) | _pack(colors, bits)
    _, bins_of, inverse, bin_counts = _grouped_unique(composite, n_images, weights)
    sums = torch.zeros(bin_counts.numel(), colors.shape[1], dtype=torch.float64, device=colors.device)
    sums.index_add_(0, inverse, colors.double() * weights.unsqueeze(1))
    return (sums / bin_counts.unsqueeze(1)).float(), bins_of, bin_counts, inverse


def _fit_group(bins, plan, colors, counts, colors_of, group, k, keys, *, seed, tol, relax, n_init, device, clock):
    """Fit the images ``group`` (indices into the batch), which share one ``plan``, in batched engine calls.

    ``plan`` lists the stages as (points, Lloyd steps at most): K-means on
    the ``"coarse"`` grid's bins (from :func:`_coarse_bins`) or on the exact
    distinct ``"colors"``, each stage starting from the centers of the one
    before and the first from k-means++.

    Returns the stored palettes (G, k_max, C) uint8, the palette entry of
    each padded distinct color (G, M_max), and the iterations run (G,).
    """
    rows = group.tolist()
    options = dict(tol=tol, relax=relax, seed=seed, problem_keys=keys, device=device)
    with stage(clock, "colors"):
        distinct = colors_of.pad(colors.float(), rows)
    init, iters = "k-means++", torch.zeros(group.numel(), dtype=torch.int64)
    labels = None  # each stage's last labels: the next one's guess of the nearest center
    bounds = None  # the last search's bounds, where its points are the distinct colors
    with stage(clock, "fit"):
        for i, (level, steps) in enumerate(plan):
            if level == "colors":
                points, weight = distinct, colors_of.pad(counts.float(), rows)
                if labels is not None:  # after the coarse grid: each color starts with its bin's label
                    means, of, _, bin_of_color = bins
                    label_of_bin = of.unpad_into(labels.new_zeros(means.shape[0]), labels, rows)
                    bin_of = colors_of.pad(bin_of_color, rows)
                    labels = label_of_bin.index_select(0, bin_of.view(-1)).view(bin_of.shape)
            else:
                means, of, bin_counts, _ = bins
                points, weight = of.pad(means, rows), of.pad(bin_counts.float(), rows)
            fit = kmeans(
                points, k, weight, init=init, max_iter=steps, n_init=n_init if i == 0 else 1,
                init_labels=labels, final_labels=i + 1 < len(plan), **options,
            )  # fmt: skip
            init, labels, iters = fit.centers, fit.labels, iters + fit.n_iter.cpu()
            bounds = fit.bounds if level == "colors" else None
    with stage(clock, "assign"):
        # Round to the palette that is stored, and give each color its nearest stored entry. The
        # rounding moves the centers half a level at most, so the fit's bounds spare most colors
        # the search (75 bench-folder images at k=64: 21% of the colors searched, against 48%).
        stored = init.round().clamp(0, 255).to(torch.uint8)
        labels, _ = assign(distinct, stored.float(), n_clusters=k.to(device), guess=labels, bounds=bounds)
        if distinct.shape[2] in (2, 4) and _exact_alpha_extremes(stored, distinct, colors_of.pad(counts, rows), labels):
            labels, _ = assign(distinct, stored.float(), n_clusters=k.to(device), guess=labels, bounds=bounds)
    return stored, labels, iters


def _exact_alpha_extremes(stored, distinct, counts, labels) -> bool:
    """Give an entry of ``stored`` (G, k, C) uint8 alpha 255 where most of its pixels are opaque, and make
    it (0, ..., 0) where most are fully transparent (as ``normalize_alpha`` stores those pixels); True if
    any entry changed. ``distinct`` (G, M, C) are the distinct colors, ``counts`` (G, M) their pixels and
    ``labels`` (G, M) their entries.

    A center is the mean of its pixels, so an entry that holds an opaque
    area and a few pixels of its soft edge comes out at alpha 246 to 254:
    the whole area turns slightly see-through, and a transparent background
    takes a faint haze. The majority's alpha is the median of the entry's
    alpha and exact for most of its pixels. On five images with soft
    transparency (scripts/bench_alpha.py) at k=16, the opaque pixels kept
    opaque went from 20% to all and the transparent ones from 60% to all,
    for 0.07 dB less PSNR of the images as seen on black, white and magenta
    (at k=64 from 64% to all, 0.01 dB; at 256 from 90%, 0.00 dB).
    """
    alpha, w = distinct[:, :, -1], counts.to(torch.float64)  # counts are integers: exact in any order
    total = torch.zeros(stored.shape[:2], dtype=torch.float64, device=stored.device)
    opaque, clear = torch.zeros_like(total), torch.zeros_like(total)
    total.scatter_add_(1, labels, w)
    opaque.scatter_add_(1, labels, w * (alpha == 255))
    clear.scatter_add_(1, labels, w * (alpha == 0))
    used = total > 0
    to_opaque = used & (2 * opaque >= total) & (stored[:, :, -1] != 255)
    to_clear = used & (2 * clear > total) & (stored != 0).any(-1)
    stored[:, :, -1][to_opaque] = 255
    stored[to_clear] = 0
    return bool((to_opaque | to_clear).any())


def _fit_exact_1d(colors, counts, colors_of: _Ragged, rows: list[int], k: int):
    """Globally optimal palettes for single-channel images, by dynamic programming.

    In one dimension the clusters of an optimal K-means solution are runs of
    consecutive sorted values, so the best split of an image's at most 256
    distinct gray levels into ``k`` runs is found exactly: ``f[m][j]``, the
    least squared error of the first ``j`` levels in ``m`` runs, is the
    minimum over ``i`` of ``f[m-1][i]`` plus the error of levels ``i..j-1``
    as one run, each run's error from prefix sums. That is k steps of a
    (257 x 257) min-plus product, batched over the images ``rows``
    (indices into the batch; all with ``k`` < their number of levels). No
    start, no iterations, and no local optimum: on 16 grayscale images it
    gave 0.10 dB (k=16), 0.52 dB (k=64) and 0.56 dB (k=128) more PSNR than
    Lloyd's K-means.

    Returns the stored palettes (G, k, 1) uint8 and the palette entry of each
    padded distinct level (G, M), the nearest stored entry exactly.
    """
    weight = colors_of.pad(counts.double(), rows)  # (G, M), 0 past each image's levels
    level = colors_of.pad(colors[:, 0].double(), rows)
    total = weight.sum(1, keepdim=True)
    mean = (weight * level).sum(1, keepdim=True) / total
    centered = level - mean  # smaller prefix sums, less cancellation in q - s^2 / n
    zero = weight.new_zeros(len(rows), 1)
    n = torch.cat([zero, weight.cumsum(1)], 1)  # (G, M + 1): the first j levels' pixels, sum and squares
    s = torch.cat([zero, (weight * centered).cumsum(1)], 1)
    q = torch.cat([zero, (weight * centered * centered).cumsum(1)], 1)
    # run_error[g, i, j]: squared error of levels i..j-1 as one run about its mean rounded to the
    # stored uint8 level (inf where j <= i, or no pixels): the optimum over uint8 palettes, exactly.
    pixels = n.unsqueeze(1) - n.unsqueeze(2)
    sums = s.unsqueeze(1) - s.unsqueeze(2)
    mu = sums / pixels
    off = mu + mean.unsqueeze(2)
    off -= off.round()
    run_error = (q.unsqueeze(1) - q.unsqueeze(2)) - sums * mu + pixels * off * off
    run_error = torch.where(pixels > 0, run_error.clamp_min_(0), torch.full_like(run_error, torch.inf))
    # Run m ends at j in [m, m + slack]: the k - m runs after it need a level each.
    slack = weight.shape[1] - k
    best = run_error[:, 0, 1 : slack + 2]  # one run: levels 0..j-1, j in [1, 1 + slack]
    splits = []
    for m in range(1, k):  # m runs -> m + 1: run m + 1 holds levels i..j-1, i in [m, m + slack]
        block = run_error[:, m : m + slack + 1, m + 1 : m + slack + 2]
        best, split = (best.unsqueeze(2) + block).min(1)
        splits.append(split + m)
    cuts = [torch.tensor([colors_of.host_sizes[b] for b in rows], device=best.device)]
    for m in range(k - 1, 0, -1):  # where run m + 1 starts, given where it ends
        cuts.append(splits[m - 1].gather(1, (cuts[-1] - (m + 1)).unsqueeze(1)).squeeze(1))
    cuts.append(torch.zeros_like(cuts[0]))
    cuts = torch.stack(cuts[::-1], 1)  # (G, k + 1): 0 = cut_0 < cut_1 < ... < cut_k = levels of image g
    lo, hi = cuts[:, :-1], cuts[:, 1:]
    centers = (s.gather(1, hi) - s.gather(1, lo)) / (n.gather(1, hi) - n.gather(1, lo)) + mean
    stored = centers.round().clamp(0, 255).to(torch.uint8).unsqueeze(2)
    labels, _ = assign(level.float().unsqueeze(2), stored.float())
    return stored, labels


# Every problem of a group is padded to the group's largest, and padding costs as much as real
# points. On the CPU, where an operation's fixed cost is microseconds, batching pays only where
# that cost dominates: small images. There a batch is cut into groups of at most _SMALL_GROUP
# padded points, padded by at most a quarter; larger images are fitted one by one. (16 crops and
# scales of the samples, 13k to 158k colors, k=64, one thread: 2.0 s/MP as one group padded to
# the largest, 1.0 s/MP in groups padded by at most a quarter, 0.8 s/MP one by one.) On CUDA a
# plan stays one group: launches dominate there, not arithmetic.
_CPU_PADDING = 1.25
_SMALL_GROUP = 2**15


def _size_groups(members: list[int], sizes: list[int], *, cpu: bool) -> list[list[int]]:
    """Cut ``members`` (image indices) into the groups to fit together (see ``_CPU_PADDING``).

    Images are taken largest first, so each group is padded to its first
    member's size.
    """
    if not cpu:
        return [members]
    groups: list[list[int]] = []
    total = 0
    for b in sorted(members, key=lambda b: -sizes[b]):
        if groups:
            group = groups[-1]
            padded = sizes[group[0]] * (len(group) + 1)
            if padded <= _SMALL_GROUP and padded <= _CPU_PADDING * (total + sizes[b]):
                group.append(b)
                total += sizes[b]
                continue
        groups.append([b])
        total = sizes[b]
    return groups


# Lloyd steps of the first stage, at most, when max_iter is not given. A coarse fit that the
# refinement follows stops sooner above k=128: on 12 photos at k=256, 10 steps instead of 20 were
# 10% faster fits for 0.001 dB (the mean over three seeds), while at k = 64 and 128 they cost
# 0.003-0.008 dB. There the refinement's steps do what the coarse fit's last ones would.
_FIRST_STAGE_ITER = 20
_COARSE_ITER_LARGE_K = 10
_LARGE_K = 128


def _plan(n_colors: int, n_bins: int, k: int, *, max_iter: int | None, refine_iter: int) -> tuple[tuple[str, int], ...]:
    """The stages of one image's fit, as (points, Lloyd steps at most); see :func:`_fit_group`.

    The coarse grid takes part only where the image has more than
    ``_DIRECT_COLORS`` distinct colors and the grid more cells than k: below
    that, fitting the distinct colors themselves costs no more, and a coarse
    fit can settle in a poor optimum that the refinement does not leave (on
    a 2,100-color logo at k=256 it cost 3.8 dB against a full fit).
    """
    first = _FIRST_STAGE_ITER if max_iter is None else max_iter
    if n_colors <= _DIRECT_COLORS or n_bins <= k:
        return (("colors", first),)
    if refine_iter <= 0:
        return (("coarse", first),)
    coarse = _COARSE_ITER_LARGE_K if max_iter is None and k > _LARGE_K else first
    return (("coarse", coarse), ("colors", refine_iter))


def _joined(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The pixels (N_i, C) of every image, one image after another (N, C); one image is not copied."""
    return torch.cat([im.reshape(-1, im.shape[1]) for im in images]) if len(images) > 1 else images[0]


def fit_palettes(
    images: Sequence[torch.Tensor],
    k: int | Sequence[int],
    *,
    seed: int = 0,
    keys: Sequence[int] | None = None,
    device: str | torch.device | None = "auto",
    coarse_bits: int = 6,
    refine_iter: int = 10,
    coarse_n_init: int | None = None,
    max_iter: int | None = None,
    tol: float = 1e-4,
    relax: float = 1.8,
    clock: StageClock | None = None,
) -> list[Palette]:
    """Fit a palette to each image of a batch, in batched calls of the engine.

    Parameters
    ----------
    images : sequence of Tensor of shape (N_b, C), uint8
        The pixels of each image; all with the same C (1 to 4). With C = 1
        the palettes are exact (:func:`_fit_exact_1d`), and the options of
        the K-means fit below (seed to relax) do not apply.
    k : int or sequence of int
        Palette size of each image, 2 to 256.
    seed : int
        Seed of the K-means initialisation.
    keys : sequence of int, optional
        A key per image (see ``problem_keys`` of :func:`kmgpu.kmeans.kmeans`):
        an image's palette then does not depend on the rest of its batch.
        Default: the images' positions.
    device : "auto", "cpu", "cuda", "cuda:N" or torch.device
    coarse_bits : int
        Levels per channel of the grid of the coarse fit, as bits (1 to 8;
        8 skips the coarse fit).
    refine_iter : int
        Lloyd iterations on the exact distinct colors after the coarse fit.
    coarse_n_init : int, optional
        Initialisations of the first stage (the coarse fit, or the direct fit
        of an image with few colors); the best goes on. Default: 3 for k <= 32,
        where a poor local optimum costs most (on the samples at k=16, 3 starts
        gave +0.05 to +0.2 dB) and that stage is cheap; 1 above.
    max_iter, tol
        Limits of the first stage (the coarse fit, or the direct fit of an
        image with few colors); ``tol`` also ends the refinement early.
        Default ``max_iter``: 20, but 10 for a coarse fit followed by the
        refinement at k > 128, where the refinement's steps do the work of
        the coarse fit's last ones (see ``_FIRST_STAGE_ITER``).
    relax : float
        Over-relaxation of every stage's Lloyd steps (see
        :func:`kmgpu.kmeans.kmeans`). On 12 photos, 1.8 with at most 20
        coarse steps fitted palettes about 0.02 dB closer to a full K-means
        fit, at k = 16, 64 and 256, than plain Lloyd steps with up to 300, in
        about 12% (k = 64, 256) to 28% (k = 16) less time.
    clock : StageClock, optional
        Adds the time of the stages "colors", "fit" and "assign" to it.

    Returns
    -------
    list of Palette, one per image, on ``device``
    """
    dev = resolve_device(device)
    n = len(images)
    if n == 0:
        return []
    channels = {int(im.shape[1]) for im in images}
    if len(channels) != 1 or not 1 <= next(iter(channels)) <= 4:
        raise ValueError(f"images must all have the same number of channels, 1 to 4; got {sorted(channels)}")
    ks = torch.as_tensor([k] * n if isinstance(k, int) else list(k), dtype=torch.int64)
    if ks.numel() != n:
        raise ValueError(f"k holds {ks.numel()} values for {n} images")
    problems = [p for p in (palette_size_error(v) for v in sorted(set(ks.tolist()))) if p]
    if problems:
        raise ValueError(problems[0])
    if not 1 <= coarse_bits <= 8:
        raise ValueError(f"coarse_bits={coarse_bits} is out of range: 1 to 8")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter={max_iter} is out of range: it must be >= 1")
    ids = torch.arange(n) if keys is None else torch.as_tensor(list(keys), dtype=torch.int64)
    if coarse_n_init is None:
        coarse_n_init = 3 if int(ks.max()) <= 32 else 1

    sizes = torch.tensor([im.shape[0] for im in images])
    # On the CPU (up to 3 channels, with numba) colors are counted in tables, not sorted. A batch with an
    # image of _ROWS_BELOW pixels or more keeps no index per pixel: its pixels are labelled through the
    # table at step 4, a 12 MP photo's colors and labels in half the time of writing each pixel's row
    # and reading it back (the kernels alone: 0.13 s against 0.30). Elsewhere a batch too large to hold
    # that index (bounded memory for huge images) is taken in chunks.
    on_tables = dev.type == "cpu" and next(iter(channels)) <= 3 and cpu_kernels.compiled()
    tabled = on_tables and int(sizes.max()) >= _ROWS_BELOW
    chunked = not tabled and int(sizes.sum()) > _CHUNKED_PIXELS
    with stage(clock, "colors"):
        if tabled:
            runs = _table_runs(images)
            color_keys, colors_of, counts = _tabled_histograms(runs)
        elif chunked:
            color_keys, colors_of, counts = _chunked_histograms(images, dev)
        elif on_tables:  # small images: each pixel's row, from a table that stays in cache
            pixels = _joined(images)
            color_keys, counts, inverse, per_image = cpu_kernels.distinct_colors(pixels.cpu(), sizes.tolist())
            colors_of = _Ragged.of_sizes(per_image)
        else:
            pixels = _joined(images)
            if dev.type == "cuda" and pixels.device.type == "cpu":  # pinned pages let the copy run asynchronously
                pixels = pixels.pin_memory()
            pixels = pixels.to(dev, non_blocking=True)
            # 1. Every image's distinct colors with their counts, all in one sort. One image's keys
            # stay int32 (up to 3 channels); a batch's carry each image's number above them.
            keys = _pack_narrow(pixels)
            if n > 1:
                keys = keys.to(torch.int64)
                for b, (start, size) in enumerate(zip(sizes.cumsum(0).sub_(sizes).tolist(), sizes.tolist())):
                    keys[start : start + size] |= b << _IMAGE_SHIFT
            color_keys, colors_of, inverse, counts = _grouped_unique(keys, n)
        colors = _unpack(color_keys, next(iter(channels)))
        n_colors = colors_of.sizes.cpu()
    label_of_color = colors_of.slot.clone()  # images with <= k colors keep them all, exactly
    palettes: list[torch.Tensor | None] = [None] * n
    n_iters = [0] * n
    fit = (n_colors > ks).nonzero().squeeze(1)
    for b in (n_colors <= ks).nonzero().squeeze(1).tolist():
        palettes[b] = colors_of.values_of(colors, b)

    if fit.numel() and next(iter(channels)) == 1:  # gray levels: solved exactly, see _fit_exact_1d
        with stage(clock, "fit"):
            for k_value in ks[fit].unique().tolist():
                members = fit[ks[fit] == k_value].tolist()
                stored, labels = _fit_exact_1d(colors, counts, colors_of, members, int(k_value))
                colors_of.unpad_into(label_of_color, labels, members)
                for i, b in enumerate(members):
                    palettes[b] = stored[i]
    elif fit.numel():
        bins, n_bins = None, torch.zeros_like(n_colors)  # no grid: every image on its colors
        if coarse_bits < 8:
            with stage(clock, "colors"):
                bins = _coarse_bins(colors, counts, colors_of, coarse_bits, n)
            n_bins = bins[1].sizes.cpu()
        plans: dict[tuple, list[int]] = {}
        for b in fit.tolist():
            plan = _plan(int(n_colors[b]), int(n_bins[b]), int(ks[b]), max_iter=max_iter, refine_iter=refine_iter)
            plans.setdefault(plan, []).append(b)
        cpu = dev.type == "cpu"
        groups = [
            (plan, part) for plan, ms in plans.items() for part in _size_groups(ms, colors_of.host_sizes, cpu=cpu)
        ]
        for plan, members in groups:
            group = torch.tensor(members, dtype=torch.int64)
            stored, labels, iters = _fit_group(
                bins, plan, colors, counts, colors_of, group, ks[group], ids[group],
                seed=seed, tol=tol, relax=relax, n_init=coarse_n_init, device=dev, clock=clock,
            )  # fmt: skip
            colors_of.unpad_into(label_of_color, labels, members)
            for i, b in enumerate(members):
                palettes[b] = stored[i, : int(ks[b])]
                n_iters[b] = int(iters[i])

    with stage(clock, "assign"):
        if tabled:
            indices = _tabled_labels(runs, color_keys, colors_of, label_of_color)
        elif chunked:
            indices = _chunked_labels(images, color_keys, colors_of, label_of_color, dev)
        else:
            # Bytes gathered, not int64 (6x), by index_select: 6x faster again than indexing with a tensor
            indices = label_of_color.to(torch.uint8).index_select(0, inverse).split(sizes.tolist())
    return [Palette(palettes[b], indices[b], n_iters[b]) for b in range(n)]


def fit_palette(pixels: torch.Tensor, k: int, *, seed: int = 0, device="auto", **options) -> Palette:
    """Fit a ``k``-color palette to one image's pixels (N, C) uint8; see :func:`fit_palettes`."""
    return fit_palettes([pixels], k, seed=seed, device=device, **options)[0]


def quantize_pixels(
    pixels: np.ndarray, k: int, *, seed: int = 0, device: str | torch.device | None = "auto", **options
) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize one decoded image (H, W, C) uint8 to at most ``k`` colors, without dithering.

    Returns
    -------
    palette : ndarray of shape (k', C), uint8, k' <= k
    indices : ndarray of shape (H, W), uint8
    n_iter : int
    """
    h, w, c = pixels.shape
    flat = torch.from_numpy(np.require(pixels, np.uint8, ["C", "W"]).reshape(h * w, c))
    pal = fit_palette(flat, int(k), seed=seed, device=device, **options)
    return pal.colors.cpu().numpy(), pal.indices.reshape(h, w).cpu().numpy(), pal.n_iter


# --------------------------------------------------------------------------
# Whole images: the public entry points
# --------------------------------------------------------------------------

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor | LoadedImage


def as_loaded(image: ImageLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Bring any supported image input to a :class:`LoadedImage` of uint8 pixels.

    Paths are decoded (see :func:`kmgpu.imageio.load_image`); Pillow images
    are converted; numpy arrays are (H, W) or (H, W, C) and tensors (H, W) or
    (C, H, W) as torchvision decodes them, uint8 with C = 1 to 4 (L, LA, RGB,
    RGBA).
    """
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return from_pil(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        image = (t.permute(1, 2, 0) if t.ndim == 3 else t).numpy()
    if isinstance(image, np.ndarray):
        a = image[:, :, None] if image.ndim == 2 else image
        if a.dtype != np.uint8 or a.ndim != 3 or not 1 <= a.shape[2] <= 4 or 0 in a.shape:
            raise ValueError(
                f"an image array must be uint8 of shape (H, W) or (H, W, C) with C = 1 to 4 "
                f"(tensors: (C, H, W)); got {a.dtype} {tuple(image.shape)}"
            )
        return LoadedImage(normalize_alpha(np.array(a, copy=True)))
    raise TypeError(f"cannot read an image from {type(image).__name__}")


@dataclass
class QuantizedImage:
    """One image reduced to a palette and an index map.

    Attributes
    ----------
    palette : ndarray of shape (k', C), uint8
        The stored colors (C = 1, 2, 3, 4 for L, LA, RGB, RGBA); k' <= k.
    indices : ndarray of shape (H, W), uint8
    source : LoadedImage
        The decoded input: its pixels, ICC profile, path, size and notes.
    k : int
        The palette size asked for.
    dither : str
        "none" or "fs".
    seconds : float
        Time of the fit and the mapping of every pixel.
    n_iter : int
        Lloyd iterations.
    measured : (float, float), optional
        PSNR and SSIM, when they were measured where the fit ran (on CUDA,
        with the pixels already there); else they are computed, both at
        once, on first use of either.
    """

    palette: np.ndarray
    indices: np.ndarray
    source: LoadedImage
    k: int
    dither: str = "none"
    seconds: float = 0.0
    n_iter: int = 0
    measured: tuple[float, float] | None = None
    # The palette's shape and bytes when it was put in the writer's order (in_png_order), so that
    # the writer need not work that order out again; a palette changed since is ordered afresh.
    _ordered: tuple | None = field(default=None, repr=False, compare=False)

    def reconstruct(self) -> np.ndarray:
        """The quantized pixels, (H, W, C) uint8, as a viewer decodes the PNG."""
        return self.palette[self.indices]

    def _measure(self) -> tuple[float, float]:
        if self.measured is None:  # both at once: one pass over the pixels
            self.measured = quality_indexed(self.source.pixels, self.palette, self.indices)
        return self.measured

    @property
    def psnr(self) -> float:
        """PSNR in dB against the decoded input, over every channel value."""
        return self._measure()[0]

    @property
    def ssim(self) -> float:
        """SSIM of the luma against the decoded input."""
        return self._measure()[1]

    def png_bytes(self, *, level: int = DEFAULT_LEVEL) -> bytes:
        """The palette PNG, with the input's RGB ICC profile."""
        ordered = self._ordered == (self.palette.shape, self.palette.tobytes())
        return palette_png_bytes(
            self.indices, self.palette, icc_profile=self.source.icc_profile, level=level, in_writer_order=ordered
        )

    def save(self, path: str | os.PathLike, *, level: int = DEFAULT_LEVEL) -> int:
        """Write the palette PNG atomically; refuses to overwrite the input. Returns its size in bytes."""
        dest = Path(path)
        src = self.source.path
        if src is not None and (dest.resolve() == src.resolve() or (dest.exists() and os.path.samefile(dest, src))):
            raise ValueError(f"{dest}: the output would overwrite the input")
        return write_atomic(dest, self.png_bytes(level=level))

    def to_pil(self) -> Image.Image:
        """The result as a Pillow image in mode P."""
        return Image.open(io.BytesIO(self.png_bytes(level=1)))


def _dither_fs(pixels: np.ndarray, palette: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Map pixels (H, W, C) to ``palette`` with Floyd-Steinberg error diffusion: (H, W) uint8 indices.

    ``labels`` are the undithered nearest entries. The compiled kernel
    (:func:`kmgpu.cpu_kernels.dither`: serpentine, the error attenuated,
    capped and kept off edges); without numba, Pillow's remap.
    """
    if cpu_kernels.compiled():
        return cpu_kernels.dither(pixels, palette, labels)
    return _pillow_fs(pixels, palette)


def _pillow_fs(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Pillow's Floyd-Steinberg remap of ``pixels`` (1 or 3 channels) onto ``palette``."""
    rgb_palette = np.repeat(palette, 3, axis=1) if palette.shape[1] == 1 else palette
    holder = Image.new("P", (1, 1))
    holder.putpalette(rgb_palette.reshape(-1).tolist())
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    mapped = Image.fromarray(rgb).quantize(palette=holder, dither=Image.Dither.FLOYDSTEINBERG)
    return np.asarray(mapped).copy()


_GPU_METRICS_PIXELS = 32_000_000


def quantize_batch(
    images: Sequence[ImageLike],
    k: int = 64,
    *,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    dither: str = "none",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keys: Sequence[int] | None = None,
    clock: StageClock | None = None,
    **options,
) -> list[QuantizedImage]:
    """Quantize many images in batched engine calls (one per channel layout).

    Parameters are those of :func:`quantize`; ``keys`` gives each image its
    own random stream (see :func:`fit_palettes`), so an image's result does
    not depend on the rest of the batch. Default keys: the positions.
    """
    problem = dither_error(dither) or palette_size_error(int(k))
    if problem:
        raise ValueError(problem)
    loaded = [as_loaded(im, max_pixels=max_pixels) for im in images]
    keys = list(range(len(loaded))) if keys is None else list(keys)
    dev = resolve_device(device)
    # On CUDA the pixels go up once, in one pinned copy, for the fit and then for PSNR and SSIM,
    # which the GPU measures in milliseconds where the CPU took longer than the fit.
    on_gpu = dev.type == "cuda"
    results: list[QuantizedImage | None] = [None] * len(loaded)
    for channels in sorted({im.pixels.shape[2] for im in loaded}):
        members = [i for i, im in enumerate(loaded) if im.pixels.shape[2] == channels]
        t0 = time.perf_counter()
        flats = [torch.from_numpy(loaded[i].pixels.reshape(-1, channels)) for i in members]
        if on_gpu:
            sizes = [f.shape[0] for f in flats]
            flats = list(torch.cat(flats).pin_memory().to(dev, non_blocking=True).split(sizes))
        palettes = fit_palettes(
            flats, int(k), seed=seed, keys=[keys[i] for i in members], device=dev, clock=clock, **options
        )
        share = (time.perf_counter() - t0) / len(members)
        # With transparency only the compiled diffusion dithers (Pillow's remap drops the alpha).
        dithered = dither == "fs" and (channels in (1, 3) or cpu_kernels.compiled())
        measured: list[tuple[float, float] | None] = [None] * len(members)
        # (An image above _GPU_METRICS_PIXELS is measured on the CPU: its rebuilt pixels stay off the GPU.)
        on_device = [j for j, f in enumerate(flats) if on_gpu and not dithered and f.shape[0] <= _GPU_METRICS_PIXELS]
        if on_device:
            with stage(clock, "metrics"):
                qualities = []
                for j in on_device:
                    h, w = loaded[members[j]].height, loaded[members[j]].width
                    qualities.append(quality_of(flats[j].view(h, w, channels), palettes[j].colors,
                                                palettes[j].indices.view(h, w)))  # fmt: skip
                values = torch.stack(qualities).tolist()  # one transfer for the batch
                for j, (q, s) in zip(on_device, values):
                    measured[j] = (q, s)
        t1 = time.perf_counter()
        with stage(clock, "assign"):
            maps = []  # (pixels, palette, indices) of each image
            for i, pal in zip(members, palettes):
                pixels = loaded[i].pixels
                maps.append((pixels, pal.colors.cpu().numpy(), pal.indices.cpu().numpy().reshape(pixels.shape[:2])))
            if dithered:  # a diffusion runs one pixel after another: the images of a batch go side by side
                maps = cpu_kernels.run_threads(
                    lambda job: (job[0], job[1], _dither_fs(*job)), maps, torch.get_num_threads()
                )
            elif dither == "fs":
                for i in members:
                    loaded[i].notes.append("dithering is not applied to images with transparency")
            maps = [in_png_order(colors, indices) for _, colors, indices in maps]
        each = (time.perf_counter() - t1) / len(members)
        for i, pal, quality, (colors, indices) in zip(members, palettes, measured, maps):
            results[i] = QuantizedImage(
                colors, indices, loaded[i], int(k), dither, share + each, pal.n_iter, quality,
                (colors.shape, colors.tobytes()),
            )  # fmt: skip
    return results  # type: ignore[return-value]


def quantize(
    image: ImageLike,
    k: int = 64,
    *,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    dither: str = "none",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    **options,
) -> QuantizedImage:
    """Quantize one image to a palette of at most ``k`` colors.

    Parameters
    ----------
    image : path, PIL image, uint8 array (H, W[, C]) or tensor ((C,) H, W)
    k : int
        Palette size, 2 to 256 (what a palette PNG holds).
    seed : int
        Same seed, device and image: the same bytes out.
    device : "auto", "cpu", "cuda" or "cuda:N"
    dither : "none" or "fs"
        "fs" maps the pixels to the fitted palette with Floyd-Steinberg error
        diffusion: smoother gradients, lower PSNR, larger files.
    max_pixels : int
        Larger images are refused before decoding.
    **options
        Engine knobs of :func:`fit_palettes` (``coarse_bits``, ``refine_iter``,
        ``coarse_n_init``, ``max_iter``, ``tol``, ``relax``).

    Returns
    -------
    QuantizedImage
        Palette, indices, the decoded source, metrics (``psnr``, ``ssim``) and ``save``.
    """
    return quantize_batch([image], k, seed=seed, device=device, dither=dither, max_pixels=max_pixels, **options)[0]
