"""A small palette-PNG encoder: bytes only, no files.

Pillow writes 8-bit palette images with no PNG filter at all and chooses no
palette order. Measured on the bundled samples at k = 64 and 256
(`BENCHMARKS.md`, "Palette PNG encoding"), two things make the files smaller:

- **Palette order.** Entries are chained nearest-neighbour through color
  space from the darkest, so neighbouring indices hold similar colors. With
  a smooth order, the PNG filters (which predict a byte from its neighbours)
  have something to predict, and at 1, 2 and 4 bits per pixel the packed
  bytes repeat more often.
- **Filters.** With that order, libpng's heuristic (per row, the filter with
  the smallest sum of absolute differences) shrank index maps of photos by
  up to 36% and enlarged others by up to 41% against no filter (140 maps:
  20 photos and scans at k = 64 and 256, 100 bench-folder images at k=64).
  Neither a sample of the rows nor their first half predicted which, so
  both are compressed and the smaller is kept: the file is never larger
  than the unfiltered stream alone.
- **Runs.** The filtered rows are deflated with zlib's Z_RLE strategy
  (matches at distance 1 only: the runs the filters leave), not Z_FILTERED.
  On the 140 maps the filtered stream came out 3.1% smaller so in a quarter
  of the time, and with the unfiltered stream beside it the files of 13
  photos at k = 16, 64, 256 were 0.8% smaller, the bench folder's 2.9%.
  zlib's level does not change this stream.
- **Deflate.** The unfiltered stream goes to libdeflate, which has no
  Z_RLE: on the 8-bit maps of those 140, its level 7 made the best of the two
  streams the same size as zlib's 6 did (+0.02%) in 0.46x its deflate time
  (20.9 against 45.1 ms a megapixel), and each of its levels 1 to 7 was
  smaller and faster than zlib's same level. Its 8 and 9 were not (+0.11%,
  +0.06%, slower than 7), so at levels 8 and 9 the unfiltered stream is
  zlib's (-0.44%, -0.49%). Levels 10 to 12 are libdeflate's near-optimal
  parsing, for a filtered stream too: on 60 bench-folder images at k=64,
  level 10 took 3.8x the deflate time of zlib's 6 for files 7.5% smaller,
  and 12 took 8.6x for 8.8% smaller; on 13 other photos at k = 16, 64, 256,
  5.2% and 5.8% (scripts/bench_png.py). libdeflate takes a stream whole (it
  has no streaming mode), so above ``_WHOLE_BYTES`` of scanlines (32 MP) levels
  1 to 7 go to zlib at the same level, streamed block by block as every zlib
  stream is; 10 to 12 stay libdeflate's.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

from .icc import srgb_intent
from .threads import ProcessThreads

__all__ = [
    "MAX_LEVEL",
    "DEFAULT_LEVEL",
    "SIGNATURE",
    "encode_palette_png",
    "bit_depth_for",
    "smooth_order",
    "writer_order",
    "palette_size_error",
    "level_error",
]

SIGNATURE = b"\x89PNG\r\n\x1a\n"


# The default: libdeflate's 7 (see the module's notes). zlib's levels go up to 9; the unfiltered
# stream is zlib's at 8 and 9, libdeflate's at the others (above 9, its near-optimal parsing).
DEFAULT_LEVEL = 7
_ZLIB_LEVELS = (8, 9)
_ZLIB_MAX_LEVEL = 9
MAX_LEVEL = 12


def level_error(level: int) -> str | None:
    """Why ``level`` cannot be the compression level asked for, or None when it can."""
    if 0 <= level <= MAX_LEVEL:
        return None
    return f"level={level} is out of range: levels are 0 to {MAX_LEVEL} (default {DEFAULT_LEVEL}; 10-12 slowest)"


def palette_size_error(k: int) -> str | None:
    """Why ``k`` cannot be the palette size asked for, or None when it can."""
    if 2 <= k <= 256:
        return None
    return f"k={k} is out of range: palette PNGs hold 2 to 256 colors"


def bit_depth_for(n_colors: int) -> int:
    """The smallest PNG palette bit depth (1, 2, 4 or 8) that holds ``n_colors`` entries."""
    for bits in (1, 2, 4, 8):
        if n_colors <= 1 << bits:
            return bits
    raise ValueError(f"a palette PNG holds at most 256 colors, got {n_colors}")


def smooth_order(palette: np.ndarray) -> np.ndarray:
    """A permutation of the palette rows that walks nearest-neighbour from the darkest.

    Parameters
    ----------
    palette : ndarray of shape (k, C), uint8

    Returns
    -------
    ndarray of shape (k,), int64: ``palette[order]`` is the new palette.
    """
    p = palette.astype(np.float64)
    k = len(p)
    if k <= 2:
        return np.arange(k)
    brightness = p[:, : min(3, p.shape[1])].sum(1)
    from . import cpu_kernels  # here, not at the top: the command line's --help and report need no torch

    if cpu_kernels.compiled():  # the same chain, 11x faster at k=64
        return cpu_kernels.nearest_chain(p, int(np.argmin(brightness)))
    dist = np.zeros((k, k))
    for channel in p.T:  # exact integers; one channel at a time is 10x faster than a (k, k, C) broadcast
        dist += np.subtract.outer(channel, channel) ** 2
    order = np.empty(k, dtype=np.int64)
    visited = np.zeros(k)  # +inf once an entry is in the chain
    row = np.empty(k)
    current = int(np.argmin(brightness))
    for i in range(k):
        order[i] = current
        visited[current] = np.inf
        if i + 1 < k:
            current = int(np.argmin(np.add(dist[current], visited, out=row)))
    return order


def writer_order(rgb: np.ndarray, alpha: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The order the writer stores a palette in (:func:`smooth_order` of its RGB(A)) and its inverse.

    Returns ``(order, rank)``: ``rgb[order]`` is the stored palette and
    ``rank[i]`` (uint8) the new index of entry ``i``; or None where the
    palette is already in that order.
    """
    k = len(rgb)
    order = smooth_order(rgb if alpha is None else np.hstack([rgb, alpha[:, None]]))
    if np.array_equal(order, np.arange(k)):
        return None
    rank = np.empty(k, dtype=np.uint8)
    rank[order] = np.arange(k, dtype=np.uint8)
    return order, rank


def _pack_rows(indices: np.ndarray, bits: int) -> np.ndarray:
    """(H, W) uint8 indices -> (H, ceil(W * bits / 8)) bytes, most significant bits first."""
    if bits == 8:
        return indices
    h, w = indices.shape
    per_byte = 8 // bits
    padded_w = -(-w // per_byte) * per_byte
    x = np.zeros((h, padded_w), dtype=np.uint8)
    x[:, :w] = indices
    x = x.reshape(h, -1, per_byte)
    packed = np.zeros(x.shape[:2], dtype=np.uint8)
    for j in range(per_byte):
        packed |= x[:, :, j] << (8 - bits * (j + 1))
    return packed


# The filter types each row may take, in the order that wins a tie of costs. At 8 bits per pixel
# all five, libpng's choice. Packed (1 to 4 bits), Pillow's: no Average, which predicts a byte of
# two to eight pixels from the mean of its neighbours' bytes, a number unrelated to any of those
# pixels, and ties go to Up before Sub, so that a row filtered so is, byte for byte, Pillow's. (On
# 12 photos and 7 gray images at k=16 the packed files were 0.9% smaller so; BENCHMARKS.md.)
_ALL_FILTERS = (0, 1, 2, 3, 4)
_PACKED_FILTERS = (0, 2, 1, 4)


def _filtered(
    rows: np.ndarray, adaptive: bool, above: np.ndarray | None = None, filters: tuple[int, ...] = _ALL_FILTERS
) -> np.ndarray:
    """PNG scanlines: a filter-type byte, then the filtered bytes of each row (1 byte per pixel step).

    ``above`` (1, W) is the row before ``rows`` in the image, which the
    first row's filters predict from (none: the image's first row).
    ``filters``: the filter types a row may take (adaptive only), the
    first of the cheapest winning.
    """
    if not adaptive:
        return np.hstack([np.zeros((rows.shape[0], 1), np.uint8), rows])
    from . import cpu_kernels  # here, not at the top: the command line's --help and report need no torch

    if cpu_kernels.compiled():  # the same bytes, 6x faster (see cpu_kernels.filter_rows)
        return cpu_kernels.filter_rows(rows, above, filters)
    return _filtered_numpy(rows, above, filters)


def _filtered_numpy(rows: np.ndarray, above: np.ndarray | None, filters: tuple[int, ...]) -> np.ndarray:
    """:func:`_filtered` with adaptive filters, in NumPy: every candidate row in full, then the cheapest."""
    # The filters are differences modulo 256, so they are taken in uint8 as they are stored; only
    # Paeth's choice of predictor needs signed arithmetic. (4x faster than all of it in int16.)
    x = rows
    up = np.empty_like(x)
    up[0] = 0 if above is None else above[0]
    up[1:] = x[:-1]
    left = np.zeros_like(x)
    left[:, 1:] = x[:, :-1]
    up_left = np.zeros_like(x)
    up_left[:, 1:] = up[:, :-1]
    # Paeth (a = left, b = up, c = up-left): |p - a| = |b - c|, |p - b| = |a - c|, |p - c| = |a + b - 2c|.
    from_a = up.astype(np.int16) - up_left
    from_b = left.astype(np.int16) - up_left
    pa, pb, pc = np.abs(from_a), np.abs(from_b), np.abs(from_a + from_b)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    candidates = np.empty((len(filters),) + x.shape, np.uint8)
    for out, kind in zip(candidates, filters):
        if kind == 0:
            out[...] = x
        elif kind == 3:
            np.subtract(x, (left >> 1) + (up >> 1) + (left & up & 1), out=out)  # floor((a + b) / 2) in 8 bits
        else:
            np.subtract(x, (left, up, None, paeth)[kind - 1], out=out)
    # libpng's heuristic: bytes as signed values, the smallest sum of magnitudes wins. (|-128|
    # wraps to -128 in int8, which is 128 read back as uint8.)
    cost = np.abs(candidates.view(np.int8)).view(np.uint8).sum(-1, dtype=np.uint32)
    kind = cost.argmin(0)
    chosen = np.take_along_axis(candidates, kind[None, :, None], axis=0)[0]
    return np.hstack([np.array(filters, np.uint8)[kind][:, None], chosen])


# Scanlines are filtered and deflated this many bytes of rows at a time: memory stays bounded
# whatever the image size (the adaptive filters hold about 20 bytes per pixel while they work).
_BLOCK_BYTES = 2**20


def _scanlines(rows: np.ndarray, adaptive: bool, filters: tuple[int, ...] = _ALL_FILTERS) -> Iterator[bytes]:
    """The filtered scanlines of ``rows`` (H, W) uint8, block by block (see ``_BLOCK_BYTES``)."""
    step = max(1, _BLOCK_BYTES // max(1, rows.shape[1]))
    for r in range(0, rows.shape[0], step):
        yield _filtered(rows[r : r + step], adaptive, rows[r - 1 : r] if r else None, filters).tobytes()


# libdeflate takes a stream whole: above this many bytes of scanlines, levels 1 to 7 stream zlib's instead.
_WHOLE_BYTES = 2**25


def _deflate(scanlines: Iterable[bytes], level: int, strategy: int | None) -> bytes:
    """One zlib stream of the blocks.

    ``strategy`` None: libdeflate's at ``level``, which takes the stream
    whole (it has no streaming mode; the stream is one byte per pixel, the
    size of the index map). Otherwise zlib's, with that strategy, block by
    block: zlib's output does not depend on how its input is cut.
    """
    if strategy is None:
        try:
            import deflate as libdeflate  # a dependency; here, so that --help and report need not load it
        except ImportError as err:
            if level > _ZLIB_MAX_LEVEL:
                raise RuntimeError(f"level {level} needs libdeflate's Python package: pip install deflate") from err
            strategy = zlib.Z_DEFAULT_STRATEGY  # a checkout on a bare PYTHONPATH: zlib's same level
        else:
            return bytes(libdeflate.zlib_compress(b"".join(scanlines), level))
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    out = [z.compress(block) for block in scanlines]
    out.append(z.flush())
    return b"".join(out)


# A file's candidate streams are deflated side by side (zlib and most of numpy release the GIL), the
# first in the calling thread and the others on threads kept for the process (kmgpu.threads). Below
# _INLINE_PIXELS they are deflated one after the other in the calling thread, where handing one over
# costs more than it saves.
_INLINE_PIXELS = 2**16
_candidates = ProcessThreads("kmgpu-png")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def encode_palette_png(
    indices: np.ndarray,
    palette: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    icc_profile: bytes | None = None,
    level: int = DEFAULT_LEVEL,
    reorder: bool = True,
) -> bytes:
    """Encode an index map and its palette as a palette PNG (color type 3).

    Parameters
    ----------
    indices : ndarray of shape (H, W), integer
        Palette entry of each pixel.
    palette : ndarray of shape (k, 3), uint8
        RGB of each entry, 1 <= k <= 256.
    alpha : ndarray of shape (k,), uint8, optional
        Opacity of each entry; written as a tRNS chunk unless all are 255.
    icc_profile : bytes, optional
        An RGB ICC profile, written as an iCCP chunk; or, where its colors
        are sRGB's (:func:`kmgpu.icc.srgb_intent`), as an sRGB chunk.
    level : int
        0 to 12: 0 stores the rows undeflated; the default, 7, is libdeflate's,
        which on index maps gives zlib's level-6 sizes in half its time; 8
        and 9 deflate the unfiltered stream with zlib's (9: 0.2% smaller than
        7 on 13 photos, 5x the encoding time); 10 to 12, libdeflate's near-optimal parsing,
        every stream at that level and the run-length one beside them (see
        the module's notes).
    reorder : bool
        Reorder the palette smoothly (the decoded pixels are the same).

    Returns
    -------
    bytes of the whole file
    """
    problem = level_error(level)
    if problem:
        raise ValueError(problem)
    k = len(palette)
    bits = bit_depth_for(k)
    h, w = indices.shape
    indices = np.ascontiguousarray(indices, dtype=np.uint8)
    given = (palette, alpha, _pack_rows(indices, bits))
    layout = given
    permutation = writer_order(palette, alpha) if reorder else None
    if permutation is not None:
        order, rank = permutation
        layout = (palette[order], None if alpha is None else alpha[order], _pack_rows(rank[indices], bits))

    head = [SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 3, 0, 0, 0))]
    if icc_profile:
        intent = srgb_intent(icc_profile)  # an sRGB profile is said in one byte (kmgpu.icc)
        if intent is None:
            head.append(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile, 9)))
        else:
            head.append(_chunk(b"sRGB", bytes([intent])))

    def candidate(layout, adaptive: bool, filters: tuple[int, ...], level: int, strategy: int | None) -> bytes:
        pal, alp, rows = layout
        out = [*head, _chunk(b"PLTE", np.ascontiguousarray(pal, dtype=np.uint8).tobytes())]
        if alp is not None and bool((alp < 255).any()):
            last = int(np.nonzero(alp < 255)[0].max())
            out.append(_chunk(b"tRNS", np.ascontiguousarray(alp[: last + 1], dtype=np.uint8).tobytes()))
        out.append(_chunk(b"IDAT", _deflate(_scanlines(rows, adaptive, filters), level, strategy)))
        out.append(_chunk(b"IEND", b""))
        return b"".join(out)

    if level == 0:
        return candidate(layout, False, _ALL_FILTERS, 0, zlib.Z_DEFAULT_STRATEGY)
    # Candidates, the smallest wins, on the smooth order (which gives the filters neighbouring
    # colors to predict from, and packs better at 1 to 4 bits):
    # - no filter, libdeflate's at ``level`` (zlib's at 8 and 9, and past _WHOLE_BYTES);
    # - adaptive filters, deflated with zlib's Z_RLE strategy (see the module's notes; zlib ignores
    #   the level there). At 8 bits libpng's filters; packed, Pillow's (see _PACKED_FILTERS);
    # - above level 9, the same filtered rows at libdeflate's near-optimal parsing as well, which
    #   has no strategies (the run-length stream still won 8 of the 140 index maps at level 10);
    # - packed (1 to 4 bits, streams of half a byte a pixel at most) where the smooth order is not
    #   the order given: the given order's filtered rows too, for indices laid out in that order.
    filters = _ALL_FILTERS if bits == 8 else _PACKED_FILTERS
    rows = layout[2]
    whole = level > _ZLIB_MAX_LEVEL or (level not in _ZLIB_LEVELS and h * (rows.shape[1] + 1) <= _WHOLE_BYTES)
    jobs = [(layout, False, filters, level, None if whole else zlib.Z_DEFAULT_STRATEGY)]
    jobs.append((layout, True, filters, min(level, _ZLIB_MAX_LEVEL), zlib.Z_RLE))
    if level > _ZLIB_MAX_LEVEL:
        jobs.append((layout, True, filters, level, None))
    if bits < 8 and layout is not given:
        jobs.append((given, True, filters, min(level, _ZLIB_MAX_LEVEL), zlib.Z_RLE))

    if h * w <= _INLINE_PIXELS:
        files = [candidate(*job) for job in jobs]
    else:
        others = [_candidates.get().submit(candidate, *job) for job in jobs[1:]]
        files = [candidate(*jobs[0])] + [f.result() for f in others]
    return min(files, key=len)  # the first of the smallest: the same file however the work was shared
