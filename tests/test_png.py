import io
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kmgpu import png, quantize
from kmgpu.imageio import palette_png_bytes, png_palette
from kmgpu.png import bit_depth_for, encode_palette_png, smooth_order
from kmgpu.quantize import quantize_pixels

from .conftest import SAMPLES, sample_pixels
from .images import png_info


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 256),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.booleans(),
    level=st.sampled_from([0, 1, 6, 7, 8, 9, 10, 12]),
)
def test_any_index_map_round_trips(k, h, w, seed, alpha, level):
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(k, 3), dtype=np.uint8)
    indices = rng.integers(0, k, size=(h, w)).astype(np.uint8)
    opacity = rng.integers(0, 256, size=k, dtype=np.uint8) if alpha else None
    data = encode_palette_png(indices, palette, alpha=opacity, level=level)
    info = png_info(data)
    assert info["bit_depth"] == bit_depth_for(k) and info["palette_len"] == k
    im = decode(data)
    assert im.mode == "P" and im.size == (w, h)
    want = np.hstack([palette, opacity[:, None]]) if alpha else palette
    got = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    np.testing.assert_array_equal(got, want[indices])


@pytest.mark.parametrize("k, bits", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (16, 4), (17, 8), (256, 8)])
def test_smallest_bit_depth(k, bits):
    assert bit_depth_for(k) == bits


def test_more_than_256_colors_is_refused():
    with pytest.raises(ValueError, match="at most 256 colors, got 257"):
        bit_depth_for(257)


def test_smooth_order_is_a_permutation_from_the_darkest():
    palette = np.array([[200, 200, 200], [0, 0, 0], [100, 100, 100], [10, 10, 10]], np.uint8)
    order = smooth_order(palette)
    assert order.tolist() == [1, 3, 2, 0]


def test_trns_is_trimmed_and_absent_when_opaque():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    indices = np.array([[0, 1, 2]], np.uint8)
    assert "tRNS" not in png_info(encode_palette_png(indices, palette, alpha=np.full(3, 255, np.uint8)))["chunks"]
    info = png_info(encode_palette_png(indices, palette, alpha=np.array([255, 0, 255], np.uint8), reorder=False))
    assert info["trns_len"] == 2


def pillow_plain_bytes(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """What Pillow writes for these indices and this palette (gray palettes given as RGB)."""
    im = Image.frombytes("P", indices.shape[::-1], indices.tobytes())
    rgb = np.repeat(palette, 3, axis=1) if palette.shape[1] == 1 else palette
    im.putpalette(rgb.reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def pillow_plain_save(indices: np.ndarray, palette: np.ndarray) -> int:
    return len(pillow_plain_bytes(indices, palette))


@pytest.mark.parametrize("seed", range(4))
def test_within_a_hair_of_pillows_plain_save_where_nothing_helps(seed):
    # Noise: no palette order and no filter can help; libdeflate's unfiltered stream is then about zlib's.
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (200, 3), dtype=np.uint8)
    indices = rng.integers(0, 200, (97, 131), dtype=np.uint8)
    indices[:, :40] = indices[:, :1]  # and some runs, that deflate can find
    ours = encode_palette_png(indices, palette)
    assert len(ours) <= 1.002 * pillow_plain_save(indices, palette)
    np.testing.assert_array_equal(np.asarray(decode(ours).convert("RGB")), palette[indices])


def idat_of(data: bytes) -> bytes:
    """The concatenated IDAT payload of a PNG file."""
    out, pos = [], 8
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            out.append(data[pos + 8 : pos + 8 + size])
        pos += 12 + size
    return b"".join(out)


@pytest.mark.parametrize("k", [2, 4, 16])
def test_packed_rows_filtered_as_pillow_are_pillows_stream(k):
    """Packed (1 to 4 bits), Pillow filters each row; our filters for packed rows give its very bytes."""
    pixels = sample_pixels("camera.png", step=2).reshape(256, 256)
    indices = (pixels.astype(np.uint16) * k // 256).astype(np.uint8)  # gray levels in k bands: runs and edges
    palette = np.repeat((np.arange(k) * 255 // (k - 1)).astype(np.uint8)[:, None], 3, axis=1)
    rows = png._pack_rows(indices, bit_depth_for(k))
    ours = png._deflate(png._scanlines(rows, True, png._PACKED_FILTERS), 6, zlib.Z_FILTERED)
    assert ours == idat_of(pillow_plain_bytes(indices, palette))
    assert png._filtered(rows, True, filters=png._PACKED_FILTERS)[:, 0].tolist().count(3) == 0  # no Average


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 16), seed=st.integers(0, 2**32 - 1))
def test_packed_files_in_any_palette_order_are_no_larger_than_pillows(k, seed):
    """Indices laid out in the order given (here ramps of it) stay as small as Pillow's file of them: the given
    order's filtered rows are a candidate beside the smooth order's. (Without it, up to 1.49x; 300 seeds.)"""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (k, 3), dtype=np.uint8)  # any order: the smooth one is seldom it
    yy, xx = np.mgrid[0:60, 0:90]
    indices = ((xx + yy * rng.integers(0, 3)) // rng.integers(1, 12) + rng.integers(0, 2, (60, 90))) % k
    indices = indices.astype(np.uint8)
    ours = encode_palette_png(indices, palette)
    assert len(ours) <= 1.01 * pillow_plain_save(indices, palette)
    np.testing.assert_array_equal(np.asarray(decode(ours).convert("RGB")), palette[indices])


def quantized_sample(name: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bundled photo quantized to k colors: its palette, that palette as RGB, and its indices."""
    with Image.open(SAMPLES / name) as im:
        pixels = np.asarray(im.convert("L" if im.mode == "L" else "RGB"))
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    palette, indices, _ = quantize_pixels(pixels, k, device="cpu")
    rgb = np.repeat(palette, 3, axis=1) if palette.shape[1] == 1 else palette
    return palette, rgb, indices


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "coffee.png", "rocket.jpg"])
def test_smaller_than_pillows_plain_save_of_each_photo(name):
    """Over k = 16, 64 and 256 each photo's files are smaller in total than Pillow's plain saves of the same
    indices (2.4% to 15% measured), and no one file is more than 2% larger (rocket at k=64: 1.6%)."""
    ours = pillows = 0
    for k in (16, 64, 256):
        palette, rgb, indices = quantized_sample(name, k)
        data = encode_palette_png(indices, rgb)
        np.testing.assert_array_equal(np.asarray(decode(data).convert("RGB")), rgb[indices])
        pillow = pillow_plain_save(indices, palette)
        assert len(data) <= 1.02 * pillow
        ours, pillows = ours + len(data), pillows + pillow
    assert ours < 0.98 * pillows


def test_the_default_level_is_libdeflates_and_as_small_as_zlibs_6(monkeypatch):
    """The unfiltered stream goes to libdeflate at the default level, 7: on the samples at k = 16, 64, 256 the
    files are within 0.2% in total of what zlib's 6 in its place gives (0.12% smaller measured), which takes twice
    the time (scripts/bench_png.py)."""
    names = ("astronaut.png", "camera.png", "coffee.png", "rocket.jpg")
    maps = [quantized_sample(name, k)[1:] for name in names for k in (16, 64, 256)]
    strategies = []
    real = png._deflate
    monkeypatch.setattr(png, "_deflate", lambda rows, level, s: strategies.append((level, s)) or real(rows, level, s))
    ours = [encode_palette_png(indices, rgb) for rgb, indices in maps]
    assert png.DEFAULT_LEVEL == 7 and (7, None) in strategies and (6, zlib.Z_DEFAULT_STRATEGY) not in strategies
    monkeypatch.setattr(png, "_ZLIB_LEVELS", (6, 8, 9))  # level 6 as zlib's, the encoder's default until session 19
    zlibs = [encode_palette_png(indices, rgb, level=6) for rgb, indices in maps]
    assert (6, zlib.Z_DEFAULT_STRATEGY) in strategies
    assert sum(map(len, ours)) <= 1.002 * sum(map(len, zlibs))
    for (rgb, indices), data in zip(maps, ours):
        np.testing.assert_array_equal(np.asarray(decode(data).convert("RGB")), rgb[indices])


def test_past_the_whole_stream_limit_the_unfiltered_rows_stream_through_zlib(monkeypatch):
    """libdeflate takes a stream whole; above _WHOLE_BYTES the unfiltered one goes to zlib at the same level, block
    by block, so memory stays bounded on huge images. Only the choice of deflate changes: the same pixels."""
    _, rgb, indices = quantized_sample("coffee.png", 64)
    indices = np.ascontiguousarray(indices[:120, :200])
    small = encode_palette_png(indices, rgb)
    calls = []
    real = png._deflate

    def deflate(scanlines, level, strategy):
        blocks = list(scanlines)
        calls.append((level, strategy, len(blocks)))
        return real(iter(blocks), level, strategy)

    monkeypatch.setattr(png, "_deflate", deflate)
    monkeypatch.setattr(png, "_BLOCK_BYTES", 2_000)  # ten rows a block
    monkeypatch.setattr(png, "_WHOLE_BYTES", 120 * 201 - 1)  # one byte short of this image's unfiltered stream
    huge = encode_palette_png(indices, rgb)
    assert (7, zlib.Z_DEFAULT_STRATEGY, 12) in calls and not any(s is None for _, s, _ in calls)
    monkeypatch.setattr(png, "_WHOLE_BYTES", 120 * 201)
    assert encode_palette_png(indices, rgb) == small and (7, None, 12) in calls
    for data in (small, huge):
        np.testing.assert_array_equal(np.asarray(decode(data).convert("RGB")), rgb[indices])


def test_filtered_rows_go_to_zlib_as_runs_and_pay_on_photos(monkeypatch):
    """The filtered candidate is deflated with Z_RLE: on the samples at k = 16, 64 and 256 the files come out
    smaller in total than with Z_FILTERED at level 5 in its place (the encoder's choice until session 18)."""
    maps = [quantized_sample(name, k)[1:] for name in ("astronaut.png", "coffee.png", "rocket.jpg") for k in (16, 64)]
    maps += [quantized_sample("coffee.png", 256)[1:]]
    strategies = []
    real = png._deflate
    monkeypatch.setattr(png, "_deflate", lambda rows, level, s: strategies.append(s) or real(rows, level, s))
    ours = [encode_palette_png(indices, rgb) for rgb, indices in maps]
    assert zlib.Z_RLE in strategies and None in strategies  # None: libdeflate's

    def as_before(rows, level, strategy):
        return real(rows, 5, zlib.Z_FILTERED) if strategy == zlib.Z_RLE else real(rows, level, strategy)

    monkeypatch.setattr(png, "_deflate", as_before)
    before = [encode_palette_png(indices, rgb) for rgb, indices in maps]
    assert sum(map(len, ours)) < 0.995 * sum(map(len, before))
    for (rgb, indices), data in zip(maps, ours):
        np.testing.assert_array_equal(np.asarray(decode(data).convert("RGB")), rgb[indices])


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "coffee.png", "rocket.jpg"])
@pytest.mark.parametrize("k", [4, 64, 256])
def test_levels_above_zlibs_make_smaller_files_of_the_same_pixels(name, k):
    """Levels 10 and 12 (libdeflate's near-optimal parsing) are never larger than the default 7 and zlib's 9, and
    smaller at k >= 64. (At k=4 a run-length stream, the same at every level, can be the smallest of all.)"""
    _, rgb, indices = quantized_sample(name, k)
    files = {level: encode_palette_png(indices, rgb, level=level) for level in (7, 9, 10, 12)}
    size = {level: len(data) for level, data in files.items()}
    assert max(size[10], size[12]) <= min(size[7], size[9])  # (12 against 10 goes either way, by 0.2% at most)
    if k >= 64:
        assert max(size[10], size[12]) < min(size[7], size[9])
    for data in files.values():
        np.testing.assert_array_equal(np.asarray(decode(data).convert("RGB")), rgb[indices])


def test_without_libdeflate_levels_0_to_9_are_zlibs(monkeypatch):
    """libdeflate is a dependency, but a checkout run from its folder may lack it: levels up to 9 then deflate
    every stream with zlib (the same pixels); 10 to 12, which ask for it, say what to install."""
    indices, palette = np.arange(64, dtype=np.uint8).reshape(8, 8) % 5, np.arange(15, dtype=np.uint8).reshape(5, 3)
    with_it = encode_palette_png(indices, palette)
    monkeypatch.setitem(sys.modules, "deflate", None)  # as if it were not installed
    for level in (0, 1, 7, 9):
        data = encode_palette_png(indices, palette, level=level)
        np.testing.assert_array_equal(np.asarray(decode(data).convert("RGB")), palette[indices])
    assert idat_of(encode_palette_png(indices, palette)) != idat_of(with_it)
    with pytest.raises(RuntimeError, match="level 10 needs libdeflate's Python package: pip install deflate"):
        encode_palette_png(indices, palette, level=10)


@pytest.mark.parametrize("level", [-1, 13])
def test_levels_out_of_range_are_named(level):
    assert png.level_error(level) == (f"level={level} is out of range: levels are 0 to 12 (default 7; 10-12 slowest)")
    assert png.level_error(0) is None and png.level_error(12) is None
    with pytest.raises(ValueError, match=f"level={level} is out of range"):
        encode_palette_png(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), level=level)


def test_a_forked_child_encodes_with_threads_of_its_own():
    """The candidate threads are kept per process; a child forked while a parent's thread held their lock
    (a DataLoader worker started mid-run) makes its own and writes the same bytes, rather than waiting forever."""
    import multiprocessing

    _, palette, indices = quantized_sample("coffee.png", 64)
    indices = np.ascontiguousarray(indices[:300, :300])  # 90,000 pixels: above the size encoded inline
    parent = encode_palette_png(indices, palette)
    assert png._candidates.pool is not None
    with png._candidates.lock:
        pool = multiprocessing.get_context("fork").Pool(1)
    try:
        child = pool.apply_async(encode_palette_png, (indices, palette)).get(timeout=60)
    finally:
        pool.terminate()
    assert child == parent


@pytest.mark.parametrize("k", [2, 4, 16, 64, 256])
def test_rows_are_encoded_in_blocks_with_the_same_bytes(monkeypatch, k):
    """Scanlines are filtered and deflated a block of rows at a time (bounded memory); the file is the same."""
    with Image.open(SAMPLES / "coffee.png") as im:
        pixels = np.asarray(im.convert("RGB").resize((173, 131)))
    palette, indices, _ = quantize_pixels(pixels, k, device="cpu")
    whole = encode_palette_png(indices, palette)
    monkeypatch.setattr(png, "_BLOCK_BYTES", 1)  # one row a block: every row's filters look across a block edge
    assert len(list(png._scanlines(indices, True))) == 131
    assert b"".join(png._scanlines(indices, True)) == png._filtered(indices, True).tobytes()
    assert encode_palette_png(indices, palette) == whole
    assert encode_palette_png(indices, palette, alpha=np.arange(len(palette), dtype=np.uint8)) != whole
    np.testing.assert_array_equal(np.asarray(decode(whole).convert("RGB")), palette[indices])


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "coffee.png", "rocket.jpg"])
@pytest.mark.parametrize("k", [4, 16, 64])
def test_quantized_palettes_come_in_the_order_the_file_stores(name, k):
    """kmgpu.quantize orders its palette as the writer would (the writer then skips that work), and its file is
    about as small as Pillow's plain save of the same indices or smaller."""
    result = quantize(SAMPLES / name, k, device="cpu")
    rgb, alpha = png_palette(result.palette)
    assert alpha is None and smooth_order(rgb).tolist() == list(range(len(rgb)))
    data = result.png_bytes()  # with the source's ICC profile, which the plain save leaves out: compare the IDATs
    assert len(idat_of(data)) <= 1.02 * len(idat_of(pillow_plain_bytes(result.indices, rgb)))
    np.testing.assert_array_equal(np.asarray(decode(data).convert("RGB")), rgb[result.indices])


def test_a_quantized_palettes_order_is_not_worked_out_twice_unless_it_changed(monkeypatch):
    """quantize leaves its palette in the writer's order; the writer then skips that work (k^2 distances)
    and writes the same bytes. A palette changed since is ordered afresh."""
    result = quantize(SAMPLES / "coffee.png", 256, device="cpu")
    calls = []
    real = png.smooth_order
    monkeypatch.setattr(png, "smooth_order", lambda p: calls.append(len(p)) or real(p))
    data = result.png_bytes()
    assert calls == []
    assert data == palette_png_bytes(result.indices, result.palette, icc_profile=result.source.icc_profile)
    assert calls == [256]
    swap = np.arange(256)
    swap[[0, 200]] = [200, 0]
    result.palette[:] = result.palette[swap]
    result.indices[:] = swap[result.indices]  # the same pixels, two entries trade places
    again = result.png_bytes()
    assert calls == [256, 256]
    np.testing.assert_array_equal(np.asarray(decode(again).convert("RGB")), np.asarray(decode(data).convert("RGB")))
