import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.cluster import KMeans as SKKMeans

from kmgpu import cpu_kernels, quantize
from kmgpu.imageio import palette_png_bytes
from kmgpu.metrics import psnr, ssim
from kmgpu.quantize import (
    _CPU_PADDING,
    _SMALL_GROUP,
    _pack,
    _pack_narrow,
    _pillow_fs,
    _Ragged,
    _size_groups,
    _unpack,
    color_histogram,
    fit_palette,
    fit_palettes,
    quantize_pixels,
)

from .conftest import SAMPLES, sample_pixels


def sq_dists(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(N, k) exact squared distances of (N, C) pixels to a (k, C) palette."""
    return ((pixels[:, None, :].astype(np.int64) - palette[None].astype(np.int64)) ** 2).sum(-1)


def full_fit_psnr(pixels: np.ndarray, k: int) -> float:
    """PSNR of scikit-learn's full K-means fit of (N, C) pixels, stored as uint8, each pixel on its nearest."""
    centers = SKKMeans(k, n_init=1, random_state=0).fit(pixels.astype(np.float32)).cluster_centers_
    palette = np.clip(np.round(centers), 0, 255).astype(np.uint8)
    return psnr(pixels, palette[sq_dists(pixels, palette).argmin(1)])


def test_color_histogram_round_trips(coffee_small):
    pixels = torch.from_numpy(coffee_small)
    hist = color_histogram(pixels)
    assert torch.equal(hist.colors[hist.inverse], pixels)
    assert int(hist.counts.sum()) == len(pixels)
    assert len(np.unique(hist.colors.numpy(), axis=0)) == hist.colors.shape[0]


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_packed_colors_unpack_to_themselves(channels):
    rng = np.random.default_rng(channels)
    pixels = torch.from_numpy(rng.integers(0, 256, (500, channels), dtype=np.uint8))
    pixels[0] = 255  # the top byte set: an int32 key of 4 channels is negative
    for keys in (_pack(pixels, 8), _pack_narrow(pixels)):
        assert torch.equal(_unpack(keys, channels), pixels)


@pytest.mark.parametrize("sizes", [[7], [0], [3, 0, 4], [1, 1, 5]])
def test_ragged_layout_from_sizes_is_the_one_from_images(sizes):
    counts = torch.tensor(sizes, dtype=torch.int64)
    from_sizes = _Ragged.of_sizes(counts)
    from_images = _Ragged(torch.repeat_interleave(torch.arange(len(sizes)), counts), len(sizes))
    for name in ("image", "slot", "sizes"):
        assert torch.equal(getattr(from_sizes, name), getattr(from_images, name)), name
    assert (from_sizes.host_sizes, from_sizes.host_starts) == (from_images.host_sizes, from_images.host_starts)


@pytest.mark.parametrize("k", [2, 16, 64])
def test_every_pixel_gets_its_nearest_stored_color(coffee_small, k):
    pal = fit_palette(torch.from_numpy(coffee_small), k, seed=0, device="cpu")
    palette = pal.colors.numpy()
    assert palette.shape == (k, 3) and pal.colors.dtype == torch.uint8
    d = sq_dists(coffee_small, palette)
    chosen = d[np.arange(len(d)), pal.indices.numpy()]
    np.testing.assert_array_equal(chosen, d.min(1))


def test_fewer_colors_than_k_is_lossless():
    pixels = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]] * 50, np.uint8).reshape(10, 15, 3)
    palette, indices, _ = quantize_pixels(pixels, 16, device="cpu")
    assert len(palette) == 3
    np.testing.assert_array_equal(palette[indices], pixels)


def test_grayscale_clusters_in_one_dimension():
    pixels = sample_pixels("camera.png", step=2).reshape(256, 256, 1)
    palette, indices, _ = quantize_pixels(pixels, 8, device="cpu")
    assert palette.shape == (8, 1)
    assert psnr(pixels, palette[indices]) > 30


def best_uint8_palette_error(levels: np.ndarray, counts: np.ndarray, k: int, top: int) -> int:
    """The least squared error of any k-level uint8 palette within 0..top, by trying every one."""
    from itertools import combinations

    err = (levels[:, None].astype(np.int64) - np.arange(top + 1)[None]) ** 2 * counts[:, None]  # (levels, value)
    return min(int(err[:, list(c)].min(1).sum()) for c in combinations(range(top + 1), k))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 11), min_size=4, max_size=60),
    st.integers(2, 4),
)
def test_gray_levels_get_the_best_uint8_palette(values, k):
    """Single-channel images are solved exactly: no uint8 palette of k levels has less error."""
    pixels = np.array(values, np.uint8).reshape(-1, 1)
    levels, counts = np.unique(pixels, return_counts=True)
    palette, indices, _ = quantize_pixels(pixels.reshape(-1, 1, 1), k, device="cpu")
    errors = (palette[indices.ravel()].astype(np.int64) - pixels)[:, 0] ** 2
    assert np.array_equal(sq_dists(pixels, palette).min(1), errors)  # each pixel on its nearest level
    got = int(errors.sum())
    if len(levels) > k:
        assert len(palette) == k
        assert got == best_uint8_palette_error(levels, counts, k, 11)
    else:
        assert got == 0


@pytest.mark.parametrize("k", [4, 16, 64])
def test_gray_photo_beats_a_full_kmeans_fit(k):
    pixels = sample_pixels("camera.png", step=2).reshape(-1, 1)
    palette, indices, _ = quantize_pixels(pixels.reshape(-1, 1, 1), k, device="cpu")
    assert np.array_equal(sq_dists(pixels, palette).argmin(1), indices.ravel())  # each pixel on its nearest level
    assert psnr(pixels, palette[indices.ravel()]) >= full_fit_psnr(pixels, k) - 1e-9


def test_gray_images_batched_equal_alone():
    camera = torch.from_numpy(sample_pixels("camera.png", step=2).reshape(-1, 1))
    dark = camera[::7] // 3  # fewer levels: padded in the batch
    few = torch.tensor([[0], [9], [200]], dtype=torch.uint8).repeat(50, 1)  # 3 levels: kept exactly
    images = [camera, dark, few]
    assert 12 < len(dark.unique()) < len(camera.unique())
    batch = fit_palettes(images, [12, 12, 12], device="cpu")
    for image, got in zip(images, batch):
        alone = fit_palette(image, 12, device="cpu")
        assert torch.equal(got.colors, alone.colors) and torch.equal(got.indices, alone.indices)
    assert batch[1].colors.shape == (12, 1) and batch[2].colors.shape == (3, 1)
    mixed = fit_palettes([camera, dark], [5, 40], device="cpu")  # one batch, two k: each fitted at its own
    assert [len(p.colors) for p in mixed] == [5, 40]
    assert torch.equal(mixed[1].colors, fit_palette(dark, 40, device="cpu").colors)


@pytest.mark.parametrize("k", [1, 257])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=f"k={k} is out of range: palette PNGs hold 2 to 256 colors"):
        quantize_pixels(np.zeros((4, 4, 3), np.uint8), k)


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "rocket.jpg"])
@pytest.mark.parametrize("k", [16, 64, 256])
def test_beats_pillow_quantizers(name, k):
    with Image.open(SAMPLES / name) as im:
        rgb = im.convert("RGB")
    pixels = np.asarray(rgb)
    palette, indices, _ = quantize_pixels(pixels, k, seed=0, device="cpu")
    ours = psnr(pixels, palette[indices])
    for method in (Image.Quantize.MEDIANCUT, Image.Quantize.FASTOCTREE):
        theirs = np.asarray(rgb.quantize(k, method=method, dither=Image.Dither.NONE).convert("RGB"))
        assert ours > psnr(pixels, theirs), (method, ours)


def test_close_to_a_full_kmeans_fit():
    pixels = sample_pixels("coffee.png", step=2)
    ref_psnr = full_fit_psnr(pixels, 32)
    palette, indices, _ = quantize_pixels(pixels.reshape(-1, 1, 3), 32, seed=0, device="cpu")
    assert psnr(pixels.reshape(-1, 1, 3), palette[indices]) > ref_psnr - 0.15


def test_a_batch_fits_each_image_as_alone():
    photo = torch.from_numpy(sample_pixels("rocket.jpg", step=3))
    # 256 levels of one channel spread over RGB: more colors than k, but fewer coarse bins than k
    ramp = torch.arange(256, dtype=torch.uint8).repeat_interleave(3).reshape(-1, 3).repeat(20, 1)
    flat = torch.tensor([[10, 20, 30], [200, 100, 0]], dtype=torch.uint8).repeat(500, 1)  # 2 colors only
    images, keys = [photo, ramp, flat], [7, 8, 9]
    batch = fit_palettes(images, 100, seed=3, keys=keys, device="cpu")
    for image, key, got in zip(images, keys, batch):
        alone = fit_palette(image, 100, seed=3, device="cpu", keys=[key])
        assert torch.equal(got.colors, alone.colors)
        assert torch.equal(got.indices, alone.indices)
        assert got.indices.dtype == torch.uint8 and got.indices.shape == (image.shape[0],)
    assert batch[2].colors.shape[0] == 2 and torch.equal(batch[2].reconstruct(), flat)
    assert batch[1].colors.shape[0] == 100 and batch[1].n_iter > 0


def test_a_batch_is_cut_into_groups_of_similar_size_on_the_cpu():
    sizes = [100_000, 3_000, 90_000, 2_900, 20_000, 2_500, 900, 30_000]
    groups = _size_groups(list(range(len(sizes))), sizes, cpu=True)
    assert sorted(b for g in groups for b in g) == list(range(len(sizes)))
    for g in groups:
        padded = max(sizes[b] for b in g) * len(g)
        assert len(g) == 1 or padded <= min(_SMALL_GROUP, _CPU_PADDING * sum(sizes[b] for b in g))
    assert [0] in groups and [2] in groups  # large images are fitted one by one
    assert any({1, 3, 5} <= set(g) for g in groups)  # small ones of similar size together
    assert not any({1, 6} <= set(g) for g in groups)  # but not padded 3x
    assert _size_groups(list(range(8)), sizes, cpu=False) == [list(range(8))]  # CUDA: one group


def test_images_grouped_by_size_fit_as_alone(monkeypatch):
    module = sys.modules["kmgpu.quantize"]
    seen, fit_group = [], module._fit_group
    monkeypatch.setattr(module, "_fit_group", lambda *a, **kw: seen.append(a[5].tolist()) or fit_group(*a, **kw))
    photo = sample_pixels("rocket.jpg", step=2)
    images = [torch.from_numpy(photo[a : a + n].copy()) for a, n in [(0, 40_000), (5_000, 3_000), (9_000, 2_800),
                                                                    (20_000, 2_600), (30_000, 700)]]  # fmt: skip
    batch = fit_palettes(images, 32, seed=1, keys=[1, 2, 3, 4, 5], device="cpu")
    for key, image, got in zip([1, 2, 3, 4, 5], images, batch):
        alone = fit_palette(image, 32, seed=1, device="cpu", keys=[key])
        assert torch.equal(got.colors, alone.colors) and torch.equal(got.indices, alone.indices)
    assert max(len(g) for g in seen[:3]) >= 3  # the batch's own groups: the small crops went together


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("path", ["chunks", "table, joined", "table, one by one"])
def test_large_images_keep_no_index_per_pixel_with_the_same_result(monkeypatch, channels, path):
    """Above _CHUNKED_PIXELS a batch's histograms are made chunk by chunk (bounded memory for huge
    images); on the CPU a batch with an image of _ROWS_BELOW pixels or more has its colors counted and
    its pixels labelled through a table (up to 3 channels, with numba), its images joined in one call
    where the batch is small. Neither keeps an index per pixel; palettes and indices are the same as
    those of the sort or of the small table."""
    module = sys.modules["kmgpu.quantize"]
    photo = sample_pixels("coffee.png", step=2)
    if channels == 4:
        photo = np.concatenate([photo, photo[:, :1] // 2], axis=1)  # an alpha that varies
    photo = np.ascontiguousarray(photo[:, :channels])
    images = [torch.from_numpy(photo[a : a + n].copy()) for a, n in [(0, 30_000), (7_000, 9_001), (40_000, 500)]]
    whole = fit_palettes(images, 16, seed=3, device="cpu")
    if path == "chunks":
        monkeypatch.setattr(module, "_ROWS_BELOW", 10**9)  # no table of counts
    else:
        monkeypatch.setattr(module, "_ROWS_BELOW", 9_001)  # the batch holds two such images
    if path != "table, joined":
        monkeypatch.setattr(module, "_CHUNKED_PIXELS", 1_000)
        monkeypatch.setattr(module, "_CHUNK", 4_099)  # several chunks an image, the last one short
    calls = {"chunks": 0, "count": 0, "label": 0}

    def spy(owner, name, key):
        real = getattr(owner, name)

        def called(*args):
            calls[key] += 1
            return real(*args)

        monkeypatch.setattr(owner, name, called)

    spy(module, "_chunked_histograms", "chunks")
    spy(cpu_kernels, "count_colors", "count")
    spy(cpu_kernels, "label_pixels", "label")
    got = fit_palettes(images, 16, seed=3, device="cpu")
    tabled = path != "chunks" and channels <= 3 and cpu_kernels.compiled()
    runs = 1 if path == "table, joined" else 3
    assert calls == {
        "chunks": int(not tabled and path != "table, joined"),
        "count": runs if tabled else 0,
        "label": runs if tabled else 0,
    }
    for a, b in zip(whole, got):
        assert torch.equal(a.colors, b.colors) and torch.equal(a.indices, b.indices) and a.n_iter == b.n_iter


def test_images_with_different_channel_counts_are_refused():
    with pytest.raises(ValueError, match="same number of channels"):
        fit_palettes([torch.zeros(4, 3, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8)], 4)


def test_graphic_with_few_colors_is_fitted_as_well_as_a_full_fit():
    # A logo: a few heavy flat colors and their anti-aliased edges, about 1,300
    # distinct colors. A fit on coarse bins settled 6 dB below scikit-learn here.
    import skimage.data

    from kmgpu.quantize import as_loaded, quantize

    src = as_loaded(skimage.data.logo()[:250, :250])
    flat = src.pixels.reshape(-1, src.pixels.shape[2])
    ours = quantize(src, 256, device="cpu")
    full = full_fit_psnr(flat, 256)
    assert ours.psnr > full - 0.5, (ours.psnr, full)  # 61.27 against 61.33 when written


@pytest.mark.parametrize("coarse_bits", [6, 8])
def test_photo_fit_with_and_without_the_coarse_grid(coarse_bits):
    # coffee has about 94k distinct colors: above the direct-fit limit, so the grid is used
    # at 6 bits and skipped at 8 (no grid); both must give every pixel its nearest color.
    pixels = torch.from_numpy(sample_pixels("coffee.png", step=1).copy())
    assert color_histogram(pixels).colors.shape[0] > 8192
    pal = fit_palette(pixels, 16, seed=0, device="cpu", coarse_bits=coarse_bits, refine_iter=2)
    d = sq_dists(pixels.numpy(), pal.colors.numpy())
    np.testing.assert_array_equal(d[np.arange(len(d)), pal.indices.long().numpy()], d.min(1))
    rebuilt = pal.reconstruct().numpy()
    assert psnr(pixels.numpy(), rebuilt) > 27.0


@pytest.mark.parametrize("k", [64, 256])
def test_palette_does_not_depend_on_the_number_of_torch_threads(k):
    """`kmgpu run` fits on one thread in each worker and on all of them with --workers 0: same bytes out.

    A float32 BLAS product over the points rounds some elements differently
    with the thread count; the fit must not let that pick other centers.
    """
    photo = torch.from_numpy(sample_pixels("astronaut.png").copy())  # ~16k coarse bins: k-means++ on all
    before = torch.get_num_threads()
    try:
        fits = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fits.append(fit_palette(photo, k, seed=0, device="cpu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(fits[0].colors, fits[1].colors)
    assert torch.equal(fits[0].indices, fits[1].indices)


@pytest.mark.parametrize(("k", "max_iter", "coarse_steps"), [(64, None, 20), (256, None, 10), (256, 15, 15)])
def test_coarse_steps_by_default_and_when_given(k, max_iter, coarse_steps):
    """Above k=128 the coarse fit stops after 10 steps unless max_iter says otherwise; tol=0 runs every step."""
    photo = torch.from_numpy(sample_pixels("astronaut.png").copy())
    pal = fit_palette(photo, k, seed=0, device="cpu", tol=0.0, refine_iter=2, max_iter=max_iter)
    assert pal.n_iter == coarse_steps + 2


def test_max_iter_below_one_is_refused():
    with pytest.raises(ValueError, match="max_iter=0"):
        fit_palettes([torch.zeros(40, 3, dtype=torch.uint8)], 4, max_iter=0)


# --------------------------------------------------------------------------
# Dithering (--dither fs)
# --------------------------------------------------------------------------


def blurred_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR after the same Gaussian blur (sigma 1.5) of both images: how well local averages are kept."""
    from kmgpu.metrics import _blur, _gaussian_taps

    taps = _gaussian_taps(9, 1.5)
    d = [_blur(torch.from_numpy(a[..., ch] - b[..., ch].astype(np.float64)), taps) for ch in range(a.shape[2])]
    return float(10 * np.log10(255.0**2 / np.mean([float((x * x).mean()) for x in d])))


@pytest.mark.skipif(not cpu_kernels.compiled(), reason="the compiled dithering needs numba (else Pillow's runs)")
@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "coffee.png", "rocket.jpg"])
@pytest.mark.parametrize("k", [16, 64])
def test_dither_beats_pillows_floyd_steinberg_on_the_same_palette(name, k):
    """kmgpu's error diffusion against Pillow's remap onto the same palette: a smaller file, more PSNR
    and more SSIM, on every sample (color and gray)."""
    plain = quantize(SAMPLES / name, k)
    ours = quantize(SAMPLES / name, k, dither="fs")
    pixels = plain.source.pixels
    pillows = _pillow_fs(pixels, plain.palette)
    theirs = plain.palette[pillows]
    assert len(ours.png_bytes()) < len(palette_png_bytes(pillows, plain.palette))
    assert ours.psnr > psnr(pixels, theirs) and ours.ssim > ssim(pixels, theirs)
    assert ours.psnr < plain.psnr  # and it does dither


@pytest.mark.skipif(not cpu_kernels.compiled(), reason="the compiled dithering needs numba (else Pillow's runs)")
def test_dither_keeps_the_local_average_of_a_gradient():
    """On a smooth gradient, where banding shows, the diffusion is at full strength: the blurred image is
    3 dB closer than without dithering (4.4 measured), and within 0.5 dB of Pillow's undamped Floyd-Steinberg."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:200, 0:300] / np.array([200.0, 300.0])[:, None, None]
    sky = np.stack([60 + 90 * y + 20 * x, 110 + 100 * y, 200 + 40 * y - 10 * x], -1)
    sky = np.clip(np.round(sky + rng.normal(0, 0.5, sky.shape)), 0, 255).astype(np.uint8)
    plain, ours = quantize(sky, 16), quantize(sky, 16, dither="fs")
    pillows = plain.palette[_pillow_fs(sky, plain.palette)]
    mine = blurred_psnr(sky, ours.reconstruct())
    assert mine > blurred_psnr(sky, plain.reconstruct()) + 3
    assert mine > blurred_psnr(sky, pillows) - 0.5


def test_dither_reproduces_an_image_of_few_colors():
    """No more colors than k: nothing to diffuse, the pixels come back exactly."""
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    pixels = colors[rng.integers(0, 12, (30, 40))]
    result = quantize(pixels, 16, dither="fs")
    np.testing.assert_array_equal(result.reconstruct(), pixels)


def cut_out(blur: float) -> np.ndarray:
    """A sample photo cut out by an ellipse whose edge is blurred by ``blur`` pixels: RGBA uint8."""
    from PIL import ImageDraw, ImageFilter

    with Image.open(SAMPLES / "astronaut.png") as im:
        rgb = np.asarray(im.convert("RGB").resize((256, 256)))
    mask = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(mask).ellipse([40, 30, 216, 226], fill=255)
    return np.dstack([rgb, np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)))])


@pytest.mark.parametrize("k", [16, 64])
def test_opaque_pixels_stay_opaque_and_transparent_ones_transparent(k):
    """A cut-out with a soft edge: the entries that hold the opaque area (and the clear one) take the alpha
    of most of their pixels, not the mean that the edge pulls below 255 (or above 0), so nothing turns
    see-through and the background takes no haze; while the edge keeps its levels of alpha."""
    a = cut_out(3)
    out = quantize(a, k).reconstruct()
    assert (out[a[..., 3] == 255][:, 3] == 255).all()
    assert (out[a[..., 3] == 0] == 0).all()
    edge = (a[..., 3] > 0) & (a[..., 3] < 255)
    assert len(np.unique(out[edge][:, 3])) >= 3


@pytest.mark.skipif(not cpu_kernels.compiled(), reason="images with transparency are dithered by the compiled kernel")
def test_images_with_transparency_are_dithered_too():
    """--dither fs on RGBA: the colors are diffused (the file changes, the blurred picture gets closer), the
    alpha's extremes stay exact, and no note says dithering was skipped."""
    a = cut_out(2)
    plain, ours = quantize(a, 16), quantize(a, 16, dither="fs")
    dithered = ours.reconstruct()
    assert not ours.source.notes
    assert not np.array_equal(dithered, plain.reconstruct())
    pixels = ours.source.pixels
    assert blurred_psnr(pixels, dithered) > blurred_psnr(pixels, plain.reconstruct()) + 0.2  # 0.4 measured
    assert (dithered[a[..., 3] == 255][:, 3] == 255).all() and (dithered[a[..., 3] == 0] == 0).all()


def test_without_numba_pillows_floyd_steinberg_dithers(monkeypatch):
    """The fallback where the compiled kernels cannot run: Pillow's remap onto the fitted palette, and images
    with transparency are left undithered, with a note that says so."""
    monkeypatch.setattr(cpu_kernels, "compiled", lambda: False)
    with Image.open(SAMPLES / "coffee.png") as im:
        rgb = np.asarray(im.convert("RGB"))[::2, ::2].copy()
    plain, dithered = quantize(rgb, 16), quantize(rgb, 16, dither="fs")
    expected = plain.palette[_pillow_fs(rgb, plain.palette)]
    # Pillow's remap settles a few near-ties by the palette's order, which the result has changed.
    same = (dithered.reconstruct() == expected).all(-1).mean()
    assert same > 0.999 and not np.array_equal(dithered.reconstruct(), plain.reconstruct())
    rgba = cut_out(2)
    result = quantize(rgba, 16, dither="fs")
    assert result.source.notes == ["dithering is not applied to images with transparency"]
    np.testing.assert_array_equal(result.reconstruct(), quantize(rgba, 16).reconstruct())
